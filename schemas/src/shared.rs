//! Texts that many job definitions repeat — app, group, cron expression, time zone, handler
//! path — held as one shared copy ([`Shared`]) and deduplicated by an [`Interner`].
//!
//! A leader holds every job's definition: 100,000 jobs of one app in a handful of groups and
//! schedules would otherwise hold 100,000 copies of each of those texts. On the wire a
//! [`Shared`] is a JSON string, and its JSON Schema is `String`'s.

use std::borrow::{Borrow, Cow};
use std::collections::HashSet;
use std::fmt;
use std::ops::Deref;
use std::sync::Arc;

/// An immutable text, cheap to clone: equal texts passed through one [`Interner`] share one
/// allocation.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Shared(Arc<str>);

impl Shared {
    /// The text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `a` and `b` are the same copy (not only equal texts).
    pub fn same_copy(a: &Shared, b: &Shared) -> bool {
        Arc::ptr_eq(&a.0, &b.0)
    }

    /// How many holders share this copy (an [`Interner`] holding it counts as one).
    pub fn holders(&self) -> usize {
        Arc::strong_count(&self.0)
    }
}

impl Default for Shared {
    fn default() -> Self {
        Shared(Arc::from(""))
    }
}

impl Deref for Shared {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for Shared {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl Borrow<str> for Shared {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&*self.0, f)
    }
}

impl fmt::Debug for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl From<&str> for Shared {
    fn from(s: &str) -> Self {
        Shared(Arc::from(s))
    }
}

impl From<String> for Shared {
    fn from(s: String) -> Self {
        Shared(Arc::from(s))
    }
}

impl From<&String> for Shared {
    fn from(s: &String) -> Self {
        Shared(Arc::from(s.as_str()))
    }
}

impl From<Box<str>> for Shared {
    fn from(s: Box<str>) -> Self {
        Shared(Arc::from(s))
    }
}

impl From<Shared> for String {
    fn from(s: Shared) -> Self {
        s.0.to_string()
    }
}

impl From<&Shared> for String {
    fn from(s: &Shared) -> Self {
        s.0.to_string()
    }
}

impl PartialEq<str> for Shared {
    fn eq(&self, other: &str) -> bool {
        &*self.0 == other
    }
}

impl PartialEq<&str> for Shared {
    fn eq(&self, other: &&str) -> bool {
        &*self.0 == *other
    }
}

impl PartialEq<String> for Shared {
    fn eq(&self, other: &String) -> bool {
        *self.0 == **other
    }
}

impl PartialEq<Shared> for str {
    fn eq(&self, other: &Shared) -> bool {
        self == &*other.0
    }
}

impl PartialEq<Shared> for &str {
    fn eq(&self, other: &Shared) -> bool {
        *self == &*other.0
    }
}

impl PartialEq<Shared> for String {
    fn eq(&self, other: &Shared) -> bool {
        **self == *other.0
    }
}

impl serde::Serialize for Shared {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for Shared {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Text;
        impl serde::de::Visitor<'_> for Text {
            type Value = Shared;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Shared, E> {
                Ok(Shared::from(v))
            }
            fn visit_string<E: serde::de::Error>(self, v: String) -> Result<Shared, E> {
                Ok(Shared::from(v))
            }
        }
        d.deserialize_str(Text)
    }
}

/// On the wire a JSON string: the same schema as `String`.
impl schemars::JsonSchema for Shared {
    fn inline_schema() -> bool {
        <String as schemars::JsonSchema>::inline_schema()
    }

    fn schema_name() -> Cow<'static, str> {
        <String as schemars::JsonSchema>::schema_name()
    }

    fn schema_id() -> Cow<'static, str> {
        <String as schemars::JsonSchema>::schema_id()
    }

    fn json_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
        <String as schemars::JsonSchema>::json_schema(generator)
    }
}

/// Texts below this many are never pruned from an [`Interner`].
const PRUNE_FROM: usize = 1024;

/// Makes equal [`Shared`] texts one copy. A text no longer held outside the interner is
/// dropped from it when it has doubled since it was last pruned, so it holds at most about
/// twice the distinct texts in use (and at least [`PRUNE_FROM`] before it prunes at all).
#[derive(Debug, Default)]
pub struct Interner {
    texts: HashSet<Shared>,
    prune_at: usize,
}

impl Interner {
    /// Replaces `text` by the interned copy of its text, interning it if it is new.
    pub fn intern(&mut self, text: &mut Shared) {
        if let Some(kept) = self.texts.get(text.as_str()) {
            if !Shared::same_copy(kept, text) {
                *text = kept.clone();
            }
            return;
        }
        if self.texts.len() >= self.prune_at {
            self.texts.retain(|t| t.holders() > 1);
            self.prune_at = (self.texts.len() * 2).max(PRUNE_FROM);
        }
        self.texts.insert(text.clone());
    }

    /// Number of texts held.
    pub fn len(&self) -> usize {
        self.texts.len()
    }

    /// Whether it holds no text.
    pub fn is_empty(&self) -> bool {
        self.texts.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_texts_become_one_copy() {
        let mut interner = Interner::default();
        let mut a = Shared::from("bench");
        let mut b = Shared::from(String::from("bench"));
        assert!(!Shared::same_copy(&a, &b));
        interner.intern(&mut a);
        interner.intern(&mut b);
        assert!(Shared::same_copy(&a, &b));
        assert_eq!(a.holders(), 3, "a, b and the interner");
        assert_eq!(interner.len(), 1);
        assert_eq!(a, "bench");
        assert_eq!(serde_json::to_string(&a).unwrap(), r#""bench""#);
        let back: Shared = serde_json::from_str(r#""bench""#).unwrap();
        assert_eq!(back, b);
    }

    #[test]
    fn texts_no_longer_held_are_pruned() {
        let mut interner = Interner::default();
        let kept: Vec<Shared> = (0..10)
            .map(|i| {
                let mut t = Shared::from(format!("kept-{i}"));
                interner.intern(&mut t);
                t
            })
            .collect();
        for i in 0..10 * PRUNE_FROM {
            let mut t = Shared::from(format!("gone-{i}"));
            interner.intern(&mut t);
        }
        assert!(
            interner.len() <= PRUNE_FROM + 10,
            "{} texts held",
            interner.len()
        );
        for t in &kept {
            let mut again = Shared::from(t.as_str());
            interner.intern(&mut again);
            assert!(Shared::same_copy(t, &again), "{t} is still interned");
        }
    }
}
