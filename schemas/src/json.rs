//! The one strict JSON parser for what users write: job documents read by the CLI and request
//! bodies arriving at the API.
//!
//! It differs from `serde_json::from_slice::<Value>` in two ways:
//! - a UTF-8 byte order mark at the start (editors on Windows write one) is skipped;
//! - an object with the same key twice is an error naming the key and where it is
//!   (`duplicate key `cron` at line 3 column 9`), at any depth — plain serde_json keeps the
//!   last value silently, so `"running": true, …, "running": false` would pause a job nobody
//!   meant to pause.
//!
//! ```
//! let v = krest_schemas::json::parse(b"\xEF\xBB\xBF{\"a\": 1}").unwrap();
//! assert_eq!(v["a"], 1);
//! let e = krest_schemas::json::parse(b"{\"a\": 1,\n \"a\": 2}").unwrap_err();
//! assert_eq!(e.to_string(), "duplicate key `a` at line 2 column 4");
//! ```

use std::fmt;

use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

use crate::text::echo;

/// The UTF-8 byte order mark.
const BOM: &[u8] = b"\xEF\xBB\xBF";

/// `bytes` without a leading UTF-8 byte order mark.
pub fn strip_bom(bytes: &[u8]) -> &[u8] {
    bytes.strip_prefix(BOM).unwrap_or(bytes)
}

/// Parses one JSON value strictly (see the module docs). Errors carry line and column.
pub fn parse(bytes: &[u8]) -> Result<Value, serde_json::Error> {
    let mut de = serde_json::Deserializer::from_slice(strip_bom(bytes));
    let value = Strict.deserialize(&mut de)?;
    de.end()?;
    Ok(value)
}

/// Parses `bytes` strictly like [`parse`], handing the elements of a top-level array to
/// `each` one at a time, as soon as each is parsed (a value that is not an array is handed
/// over whole), so a large array is never held as values all at once. Errors carry the line
/// and column in `bytes`; elements before the error have been handed over.
///
/// ```
/// let mut seen = Vec::new();
/// krest_schemas::json::parse_each(b"[{\"a\": 1}, 2]", |v| seen.push(v)).unwrap();
/// assert_eq!(seen, [serde_json::json!({"a": 1}), serde_json::json!(2)]);
/// ```
pub fn parse_each(bytes: &[u8], mut each: impl FnMut(Value)) -> Result<(), serde_json::Error> {
    let mut de = serde_json::Deserializer::from_slice(strip_bom(bytes));
    de::Deserializer::deserialize_any(&mut de, Each(&mut each))?;
    de.end()
}

/// [`parse`], then decodes the value into `T` (for typed request bodies).
pub fn parse_as<T: de::DeserializeOwned>(bytes: &[u8]) -> Result<T, serde_json::Error> {
    serde_json::from_value(parse(bytes)?)
}

/// A seed producing a [`Value`] that refuses duplicate object keys.
#[derive(Clone, Copy)]
struct Strict;

impl<'de> DeserializeSeed<'de> for Strict {
    type Value = Value;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Strict {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_string()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_some<D: de::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1024));
        while let Some(item) = seq.next_element_seed(Strict)? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            // Raised before the value is read, so serde_json reports the key's position.
            if out.contains_key(&key) {
                return Err(de::Error::custom(format_args!(
                    "duplicate key `{}`",
                    echo(&key)
                )));
            }
            let value = map.next_value_seed(Strict)?;
            out.insert(key, value);
        }
        Ok(Value::Object(out))
    }
}

/// A visitor handing each element of an array (or the one value that is not an array) to a
/// function, as [`Strict`] parses it.
struct Each<'f, F>(&'f mut F);

impl<'de, F: FnMut(Value)> Visitor<'de> for Each<'_, F> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while let Some(item) = seq.next_element_seed(Strict)? {
            (self.0)(item);
        }
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<(), A::Error> {
        (self.0)(Strict.visit_map(map)?);
        Ok(())
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<(), E> {
        (self.0)(Strict.visit_bool(v)?);
        Ok(())
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<(), E> {
        (self.0)(Strict.visit_i64(v)?);
        Ok(())
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<(), E> {
        (self.0)(Strict.visit_u64(v)?);
        Ok(())
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<(), E> {
        (self.0)(Strict.visit_f64(v)?);
        Ok(())
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<(), E> {
        (self.0)(Strict.visit_str(v)?);
        Ok(())
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<(), E> {
        (self.0)(Strict.visit_string(v)?);
        Ok(())
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        (self.0)(Strict.visit_unit()?);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parses_like_serde_json() {
        let text = br#"{"a": [1, -2, 3.5, "x", null, true, {"b": {}}], "c": 18446744073709551615}"#;
        assert_eq!(
            parse(text).unwrap(),
            serde_json::from_slice::<Value>(text).unwrap()
        );
    }

    #[test]
    fn a_bom_is_skipped() {
        assert_eq!(
            parse(b"\xEF\xBB\xBF[1]").unwrap(),
            json!([1]),
            "BOM at the start"
        );
        assert!(parse(b"[1]\xEF\xBB\xBF").is_err(), "only at the start");
    }

    #[test]
    fn duplicate_keys_are_named_with_their_position_at_any_depth() {
        let doc = "{\n  \"jobName\": \"j\",\n  \"cron\": \"* * * * * ?\",\n  \"cron\": \"0 0 * * * ?\"\n}";
        assert_eq!(
            parse(doc.as_bytes()).unwrap_err().to_string(),
            "duplicate key `cron` at line 4 column 8"
        );
        let nested = br#"[{"ok": 1}, {"args": {"x": 1, "y": {"z": 1, "z": 2}}}]"#;
        let e = parse(nested).unwrap_err().to_string();
        assert!(e.starts_with("duplicate key `z` at line 1 column"), "{e}");
        // Same key in different objects is fine.
        assert!(parse(br#"[{"a": 1}, {"a": 2}, {"b": {"a": 3}}]"#).is_ok());
    }

    #[test]
    fn a_long_duplicate_key_is_shortened() {
        let key = "k".repeat(10_000);
        let text = format!("{{\"{key}\": 1, \"{key}\": 2}}");
        let e = parse(text.as_bytes()).unwrap_err().to_string();
        assert!(e.len() < 200, "{e}");
        assert!(e.contains("…(10000 bytes)"), "{e}");
    }

    #[test]
    fn trailing_garbage_and_bad_json_fail() {
        assert!(parse(b"{} x").is_err());
        assert!(parse(b"{ not json").is_err());
        assert!(parse(b"").is_err());
    }

    #[test]
    fn elements_are_handed_over_one_by_one_and_checked_like_parse() {
        let each = |text: &[u8]| {
            let mut seen = Vec::new();
            parse_each(text, |v| seen.push(v)).map(|()| seen)
        };
        let text = br#"[{"a": [1, {"b": null}]}, "x", 3.5, -1, true, null, []]"#;
        let Value::Array(items) = parse(text).unwrap() else {
            panic!("an array")
        };
        assert_eq!(each(text).unwrap(), items);
        assert_eq!(each(b"\xEF\xBB\xBF{\"a\": 1}").unwrap(), [json!({"a": 1})]);
        assert_eq!(each(b" 7 ").unwrap(), [json!(7)]);
        assert_eq!(each(b"[]").unwrap(), Vec::<Value>::new());
        // Errors name their place in the whole text, as `parse` does.
        let late = b"[{\"a\": 1},\n {\"a\": 1},\n {\"b\": 1, \"b\": 2}]";
        assert_eq!(
            each(late).unwrap_err().to_string(),
            parse(late).unwrap_err().to_string()
        );
        assert_eq!(
            each(late).unwrap_err().to_string(),
            "duplicate key `b` at line 3 column 13"
        );
        assert!(each(b"[1, 2] x").is_err());
        assert!(each(b"[1, 2").is_err());
    }

    #[test]
    fn typed_decoding() {
        #[derive(serde::Deserialize)]
        struct R {
            documents: Vec<Value>,
        }
        let r: R = parse_as(b"\xEF\xBB\xBF{\"documents\": [{\"a\": 1}]}").unwrap();
        assert_eq!(r.documents, vec![json!({"a": 1})]);
        assert!(parse_as::<R>(br#"{"documents": [{"a": 1, "a": 1}]}"#).is_err());
    }
}
