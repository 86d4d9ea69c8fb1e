//! The shape of a parked message on the dead-letter stream (`KREST_DLQ`): which headers it
//! carries and how much of the original payload fits.
//!
//! Bad input can be as large as the server accepts (`max_payload`, headers included). A copy
//! with extra headers would not fit, and a node that retried parking it would stall forever. So
//! a parked copy keeps as much of the payload as fits under `max_payload` together with its
//! headers, and says what it cut: [`ParkedCopy::truncated`], the original size and the original
//! stream sequence travel as headers. The original stays where it was found (the events stream
//! keeps it until its max age), so the copy never needs to be complete.

use crate::names::{
    DLQ_ORIGINAL_SIZE_HEADER, DLQ_REASON_HEADER, DLQ_SOURCE_HEADER, DLQ_SOURCE_SEQ_HEADER,
    DLQ_TRUNCATED_HEADER,
};

/// Longest header value written on a parked copy (reasons and subjects are cut to this).
pub const MAX_HEADER_VALUE: usize = 1000;

/// Room left for what the client adds to a message beyond the headers we count (the header
/// block's framing, `Nats-Msg-Id`, protocol line differences between servers).
const SLACK: usize = 1024;

/// Where a bad message was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin<'a> {
    /// The subject it was published on.
    pub subject: &'a str,
    /// Its sequence in the stream it was read from, if it was read from a stream.
    pub seq: Option<u64>,
}

/// What to publish on the dead-letter stream for one bad message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParkedCopy {
    /// Headers, in order: reason, source subject, source sequence, original size and, when the
    /// payload was cut, the truncation marker.
    pub headers: Vec<(&'static str, String)>,
    /// How many leading bytes of the original payload the copy keeps.
    pub keep: usize,
    /// Whether `keep` is less than the original size.
    pub truncated: bool,
}

/// Makes a header value safe: control characters become spaces, and it is cut to
/// [`MAX_HEADER_VALUE`] bytes at a character boundary.
pub fn header_value(s: &str) -> String {
    let mut out = String::with_capacity(s.len().min(MAX_HEADER_VALUE));
    for c in s.chars() {
        let c = if c.is_control() { ' ' } else { c };
        if out.len() + c.len_utf8() > MAX_HEADER_VALUE {
            break;
        }
        out.push(c);
    }
    out
}

/// The parked copy of a `payload_len`-byte message found at `origin`, parked for `reason` with
/// message id `msg_id`, on a server whose `max_payload` is given: headers plus kept payload stay
/// under it with room to spare.
pub fn parked_copy(
    payload_len: usize,
    reason: &str,
    origin: &Origin<'_>,
    msg_id: &str,
    max_payload: usize,
) -> ParkedCopy {
    let mut headers = vec![
        (DLQ_REASON_HEADER, header_value(reason)),
        (DLQ_SOURCE_HEADER, header_value(origin.subject)),
    ];
    if let Some(seq) = origin.seq {
        headers.push((DLQ_SOURCE_SEQ_HEADER, seq.to_string()));
    }
    headers.push((DLQ_ORIGINAL_SIZE_HEADER, payload_len.to_string()));
    // `Name: value\r\n` per header, the version line and the final blank line; the message id
    // header too.
    let header_bytes = |headers: &[(&str, String)]| -> usize {
        headers
            .iter()
            .map(|(n, v)| n.len() + v.len() + 4)
            .sum::<usize>()
            + "NATS/1.0\r\n\r\n".len()
            + "Nats-Msg-Id: \r\n".len()
            + msg_id.len()
    };
    let marker = (DLQ_TRUNCATED_HEADER, format!("{payload_len}"));
    let room = max_payload.saturating_sub(header_bytes(&headers) + SLACK);
    if payload_len <= room {
        return ParkedCopy {
            headers,
            keep: payload_len,
            truncated: false,
        };
    }
    headers.push(marker);
    let room = max_payload.saturating_sub(header_bytes(&headers) + SLACK);
    if let Some((_, v)) = headers.last_mut() {
        *v = format!("kept the first {room} of {payload_len} bytes");
    }
    ParkedCopy {
        headers,
        keep: room,
        truncated: true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: usize = 1024 * 1024;

    fn size(copy: &ParkedCopy, msg_id: &str) -> usize {
        copy.headers
            .iter()
            .map(|(n, v)| n.len() + v.len() + 4)
            .sum::<usize>()
            + 12
            + 15
            + msg_id.len()
            + copy.keep
    }

    #[test]
    fn small_messages_are_kept_whole() {
        let origin = Origin {
            subject: "krest.events.g.j",
            seq: Some(7),
        };
        let c = parked_copy(100, "malformed", &origin, "events/7", MIB);
        assert_eq!(c.keep, 100);
        assert!(!c.truncated);
        assert!(c.headers.contains(&(DLQ_SOURCE_SEQ_HEADER, "7".into())));
        assert!(c
            .headers
            .contains(&(DLQ_ORIGINAL_SIZE_HEADER, "100".into())));
    }

    #[test]
    fn a_message_at_the_limit_is_cut_to_fit_with_its_headers() {
        let origin = Origin {
            subject: "krest.events.g.j",
            seq: Some(9),
        };
        let reason = "x".repeat(5000);
        for len in [MIB - 1, MIB - 2000, MIB, 64 * 1024] {
            for max in [MIB, 64 * 1024, 8 * MIB] {
                let c = parked_copy(len, &reason, &origin, "events/9", max);
                assert!(size(&c, "events/9") + 512 <= max, "{len} {max}: {c:?}");
                assert_eq!(c.truncated, c.keep < len);
                if c.truncated {
                    assert!(c.headers.iter().any(|(n, _)| *n == DLQ_TRUNCATED_HEADER));
                }
            }
        }
    }

    #[test]
    fn header_values_are_single_line_and_bounded() {
        assert_eq!(header_value("a\r\nb"), "a  b");
        let long = "é".repeat(2000);
        let v = header_value(&long);
        assert!(v.len() <= MAX_HEADER_VALUE);
        assert!(v.chars().all(|c| c == 'é'));
    }
}
