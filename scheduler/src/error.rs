//! Errors with kinds, as async-nats has them: an [`Error<K>`] says *what* failed as a closed,
//! `Copy` kind a caller can match on ([`Error::kind`]) and *why* as its source, and displays as
//! `<kind>: <source>`. Each component defines its kind enum next to its code (for example
//! [`crate::leader::router::RouterErrorKind`], [`crate::record::recorder::RecordErrorKind`],
//! [`crate::deadletter::DeadLetterErrorKind`]).

use std::fmt;

/// Any error, as a source.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// What failed (`K`) and why.
pub struct Error<K> {
    kind: K,
    source: Option<BoxError>,
}

impl<K: Copy> Error<K> {
    /// An error of `kind` with no further cause.
    pub fn new(kind: K) -> Error<K> {
        Error { kind, source: None }
    }

    /// An error of `kind` caused by `source` (any error, or a message).
    pub fn with_source(kind: K, source: impl Into<BoxError>) -> Error<K> {
        Error {
            kind,
            source: Some(source.into()),
        }
    }

    /// What failed.
    pub fn kind(&self) -> K {
        self.kind
    }
}

impl<K: fmt::Display> fmt::Display for Error<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.source {
            Some(s) => write!(f, "{}: {s}", self.kind),
            None => write!(f, "{}", self.kind),
        }
    }
}

impl<K: fmt::Debug> fmt::Debug for Error<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Error")
            .field("kind", &self.kind)
            .field("source", &self.source)
            .finish()
    }
}

impl<K: fmt::Debug + fmt::Display> std::error::Error for Error<K> {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|s| s as &(dyn std::error::Error + 'static))
    }
}

/// Defines a kind enum with the message of each kind, for use as `Error<Kind>`.
macro_rules! error_kinds {
    ($(#[$m:meta])* $vis:vis enum $name:ident { $($(#[$vm:meta])* $variant:ident => $msg:literal,)* }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        $vis enum $name {
            $($(#[$vm])* $variant,)*
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(match self {
                    $($name::$variant => $msg,)*
                })
            }
        }
    };
}
pub(crate) use error_kinds;

#[cfg(test)]
mod tests {
    use super::*;

    error_kinds! {
        enum Kind {
            Read => "cannot read the thing",
            Gone => "the thing is gone",
        }
    }

    #[test]
    fn kinds_match_and_messages_chain() {
        let e = Error::with_source(Kind::Read, "connection refused");
        assert_eq!(e.kind(), Kind::Read);
        assert_eq!(e.to_string(), "cannot read the thing: connection refused");
        assert!(std::error::Error::source(&e).is_some());
        let e = Error::new(Kind::Gone);
        assert_eq!(e.to_string(), "the thing is gone");
    }
}
