//! Errors with kinds, as async-nats has them: an [`Error`] carries a kind for code to match on
//! ([`Error::kind`]) and a message for people. Without a parameter, `Error` is the SDK's public
//! error (kind [`ErrorKind`]); the worker's internal steps use the same type with their own
//! kinds ([`WaitKind`], [`ConsumerKind`], [`PublishKind`]), so a caller decides by kind (retry,
//! give up, log a hint) and never by parsing a message.

use std::fmt;

use async_nats::jetstream::context::{PublishError, PublishErrorKind};

/// An error of the worker SDK: [`Error::kind`] says what went wrong, the message (its
/// `Display`) says it for people.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Error<K: fmt::Debug = ErrorKind> {
    kind: K,
    message: String,
}

impl<K: fmt::Debug + Copy> Error<K> {
    /// An error of `kind`; `message` is what it displays.
    pub fn new(kind: K, message: impl Into<String>) -> Error<K> {
        Error {
            kind,
            message: message.into(),
        }
    }

    /// What went wrong.
    pub fn kind(&self) -> K {
        self.kind
    }
}

impl Error {
    /// The builder's settings are unusable: `invalid worker configuration: <detail>`.
    pub(crate) fn config(detail: impl fmt::Display) -> Error {
        Error::new(
            ErrorKind::Config,
            format!("invalid worker configuration: {detail}"),
        )
    }
}

/// What went wrong, for the SDK's public [`Error`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The worker's settings are unusable: an invalid app name, instance id, capacity, ack wait
    /// or NATS URL, no handlers, or an HTTP client that cannot be built. Fix the configuration.
    Config,
    /// NATS refused something the worker cannot work without (its subscription to
    /// cancellations).
    Nats,
    /// The worker's task ended abnormally (it panicked or was aborted).
    Task,
}

/// Why a stream or bucket the worker needs at start is not usable yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WaitKind {
    /// It does not exist: no scheduler node has created it yet.
    NotFound,
    /// JetStream did not answer (not enabled, not reachable) or failed.
    Unavailable,
}

/// Why the worker could not get one of its durable consumers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ConsumerKind {
    /// JetStream did not answer the request (connection, timeout): retrying may help.
    Unavailable,
    /// JetStream refused it (e.g. another consumer's filter overlaps ours on the work-queue
    /// stream): retrying helps only once that is fixed.
    Refused,
    /// A consumer of someone else (another filter) holds our name and could not be removed.
    Foreign,
}

/// Why a JetStream publish (a run event, a parked copy, a retry handed to the router) was not
/// stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PublishKind {
    /// The message could not be serialized: retrying cannot help.
    Encode,
    /// The message exceeds the server's `max_payload`: retrying cannot help.
    TooLarge,
    /// No stream stores the subject (it does not exist yet, or was deleted).
    NoStream,
    /// JetStream did not confirm storing it (connection lost, timeout, server error): retrying
    /// may help.
    NotStored,
    /// The worker's event publisher has stopped (the worker is stopping).
    Stopped,
}

impl PublishKind {
    /// Whether publishing the same message again may succeed.
    pub(crate) fn is_transient(self) -> bool {
        matches!(self, PublishKind::NoStream | PublishKind::NotStored)
    }

    /// The kind of an async-nats publish error (of the send or of the acknowledgement).
    pub(crate) fn of(e: &PublishError) -> PublishKind {
        match e.kind() {
            PublishErrorKind::StreamNotFound => PublishKind::NoStream,
            PublishErrorKind::MaxPayloadExceeded => PublishKind::TooLarge,
            _ => PublishKind::NotStored,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_of_publish_errors() {
        let cases = [
            (
                PublishErrorKind::StreamNotFound,
                PublishKind::NoStream,
                true,
            ),
            (
                PublishErrorKind::MaxPayloadExceeded,
                PublishKind::TooLarge,
                false,
            ),
            (PublishErrorKind::TimedOut, PublishKind::NotStored, true),
            (PublishErrorKind::BrokenPipe, PublishKind::NotStored, true),
            (PublishErrorKind::Other, PublishKind::NotStored, true),
        ];
        for (nats, kind, transient) in cases {
            let got = PublishKind::of(&PublishError::new(nats));
            assert_eq!(got, kind, "{nats:?}");
            assert_eq!(got.is_transient(), transient, "{nats:?}");
        }
        assert!(!PublishKind::Encode.is_transient());
        assert!(!PublishKind::Stopped.is_transient());
    }

    #[test]
    fn an_error_displays_its_message_and_reports_its_kind() {
        let e = Error::config("weight and slots must be at least 1");
        assert_eq!(e.kind(), ErrorKind::Config);
        assert_eq!(
            e.to_string(),
            "invalid worker configuration: weight and slots must be at least 1"
        );
        let e: Error<PublishKind> = Error::new(PublishKind::NoStream, "no stream");
        assert_eq!(e.kind(), PublishKind::NoStream);
    }
}
