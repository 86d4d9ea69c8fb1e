//! Echoing user input in error messages: [`echo`] is the one helper every validation and API
//! error uses for a value the user gave (names, paths, cron expressions, time zones, URLs…), so
//! a 100 KB name is not repeated back in full, and control characters are shown, not sent.

use std::fmt::Write as _;

/// Characters of a value kept by [`echo`].
pub const ECHO_CHARS: usize = 60;

/// `value` as shown in an error: at most [`ECHO_CHARS`] characters, followed by `…(N bytes)`
/// when it was longer; control characters (and Unicode direction overrides) as `\u{..}` escapes.
///
/// ```
/// use krest_schemas::text::echo;
/// assert_eq!(echo("0/5 * * * * ?"), "0/5 * * * * ?");
/// assert_eq!(echo(&"x".repeat(1000)), format!("{}…(1000 bytes)", "x".repeat(60)));
/// assert_eq!(echo("a\u{1b}[2Jb"), "a\\u{1b}[2Jb");
/// ```
pub fn echo(value: &str) -> String {
    let mut out = String::new();
    let mut chars = value.chars();
    for c in chars.by_ref().take(ECHO_CHARS) {
        if is_unsafe(c) {
            let _ = write!(out, "\\u{{{:x}}}", c as u32);
        } else {
            out.push(c);
        }
    }
    if chars.next().is_some() {
        let _ = write!(out, "…({} bytes)", value.len());
    }
    out
}

/// Characters a terminal may act on: C0/C1 controls, DEL, and the Unicode bidirectional
/// formatting characters (which can make text display in another order than it is).
pub fn is_unsafe(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{061c}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}'
        )
}

/// Shortens, with [`echo`], every quoted value in a message produced by a library (serde's
/// `unknown variant `…``, `invalid type: string "…"`), where the value is embedded whole.
/// Backtick spans and double-quoted spans (with `\"` escapes) longer than [`ECHO_CHARS`]
/// characters, or holding unsafe characters, are shortened; the rest is kept.
pub fn shorten_quoted(message: &str) -> String {
    let mut out = String::with_capacity(message.len().min(1024));
    let mut rest = message;
    while let Some(open) = rest.find(['`', '"']) {
        let quote = rest.as_bytes()[open];
        out.push_str(&rest[..=open]);
        let after = &rest[open + 1..];
        // The closing quote: the next unescaped one of the same kind.
        let mut close = None;
        let mut escaped = false;
        for (i, b) in after.bytes().enumerate() {
            match b {
                b'\\' if quote == b'"' && !escaped => escaped = true,
                b if b == quote && !escaped => {
                    close = Some(i);
                    break;
                }
                _ => escaped = false,
            }
        }
        let Some(close) = close else {
            out.push_str(&echo(after));
            return out;
        };
        let inner = &after[..close];
        if inner.chars().count() > ECHO_CHARS || inner.chars().any(is_unsafe) {
            out.push_str(&echo(inner));
        } else {
            out.push_str(inner);
        }
        out.push(char::from(quote));
        rest = &after[close + 1..];
    }
    out.push_str(rest);
    out
}

/// The message of a panic payload (what `panic!` was given), for reporting a task or handler
/// that panicked.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_string()
    }
}

/// Cuts `s` to at most `max` bytes on a character boundary, marking the cut with `...`.
pub fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut cut = max.saturating_sub(3);
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push_str("...");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_values_are_kept() {
        assert_eq!(echo(""), "");
        assert_eq!(echo(&"é".repeat(60)), "é".repeat(60));
    }

    #[test]
    fn long_values_are_cut_on_a_character_boundary_with_their_size() {
        let v = "é".repeat(100);
        assert_eq!(echo(&v), format!("{}…(200 bytes)", "é".repeat(60)));
    }

    #[test]
    fn unsafe_characters_are_escaped() {
        assert_eq!(echo("a\nb\u{7f}\u{202e}"), "a\\u{a}b\\u{7f}\\u{202e}");
    }

    #[test]
    fn quoted_spans_in_library_messages_are_shortened() {
        let long = "v".repeat(100_000);
        let msg = format!("unknown variant `{long}`, expected one of `NORMAL`, `SHARDING`");
        let short = shorten_quoted(&msg);
        assert_eq!(
            short,
            format!(
                "unknown variant `{}…(100000 bytes)`, expected one of `NORMAL`, `SHARDING`",
                "v".repeat(60)
            )
        );
        let msg = format!("invalid type: string \"a\\\"{long}\", expected a boolean");
        assert!(shorten_quoted(&msg).len() < 200, "{}", shorten_quoted(&msg));
        assert_eq!(shorten_quoted("no quotes here"), "no quotes here");
        assert_eq!(shorten_quoted("open `quote"), "open `quote");
        assert_eq!(shorten_quoted("field `a\u{1b}`"), "field `a\\u{1b}`");
    }

    #[test]
    fn panic_payloads_become_messages() {
        assert_eq!(panic_message(&"boom"), "boom");
        assert_eq!(panic_message(&"boom".to_string()), "boom");
        assert_eq!(panic_message(&42), "non-string panic payload");
    }
}
