//! W3C trace context (`traceparent`, <https://www.w3.org/TR/trace-context/>) for runs.
//!
//! A run's trace id is a pure function of its run id, so every node, worker and tool agrees on
//! it without storing it (the API shows it with each run), a fire published twice carries the
//! same trace, and a retry stays in its run's trace. Each hop is a span of that trace with its
//! own parent id: the leader's dispatch (per shard), then each attempt. A client that triggers
//! a run with its own `traceparent` is not linked (the run keeps its own trace id); its trace
//! id could be recorded as a link later.
//!
//! The ids are derived with 64-bit FNV-1a: stable across builds and platforms, not secret
//! (trace ids are not credentials).

/// Header carrying the trace context on work messages, events and HTTP calls.
pub const TRACEPARENT: &str = "traceparent";

fn fnv1a(seed: u64, parts: &[&[u8]]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed;
    for part in parts {
        for b in *part {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        // A separator, so ("ab", "c") and ("a", "bc") differ.
        h ^= 0xff;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// A span id (never all zeros, which the format forbids).
fn span_id(parts: &[&[u8]]) -> u64 {
    fnv1a(0x5be0_cd19_137e_2179, parts).max(1)
}

/// The trace id of a run: 32 lowercase hex digits.
pub fn trace_id(run_id: &str) -> String {
    let hi = fnv1a(0x6a09_e667_f3bc_c908, &[run_id.as_bytes()]);
    let lo = fnv1a(0xbb67_ae85_84ca_a73b, &[run_id.as_bytes()]).max(1);
    format!("{hi:016x}{lo:016x}")
}

/// `traceparent` of the leader's dispatch of one shard of a run.
pub fn dispatch_traceparent(run_id: &str, shard: u32) -> String {
    let span = span_id(&[run_id.as_bytes(), b"dispatch", &shard.to_be_bytes()]);
    format!("00-{}-{span:016x}-01", trace_id(run_id))
}

/// `traceparent` of one attempt of a shard (what a worker sends on its events and passes to
/// what its handler calls).
pub fn attempt_traceparent(run_id: &str, shard: u32, attempt: u32) -> String {
    let span = span_id(&[
        run_id.as_bytes(),
        b"attempt",
        &shard.to_be_bytes(),
        &attempt.to_be_bytes(),
    ]);
    format!("00-{}-{span:016x}-01", trace_id(run_id))
}

/// The trace id of a well-formed `traceparent` (`00-<32 hex>-<16 hex>-<2 hex>`, ids not all
/// zeros), else `None`.
pub fn parse_trace_id(traceparent: &str) -> Option<&str> {
    let mut parts = traceparent.trim().split('-');
    let (version, trace, parent, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let hex = |s: &str, n: usize| {
        s.len() == n
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    let ok = hex(version, 2)
        && version != "ff"
        && hex(trace, 32)
        && trace.bytes().any(|b| b != b'0')
        && hex(parent, 16)
        && parent.bytes().any(|b| b != b'0')
        && hex(flags, 2)
        && (version != "00" || parts.next().is_none());
    ok.then_some(trace)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_has_one_trace_and_each_hop_its_own_span() {
        let run = "billing.invoices.1796283530000";
        let t = trace_id(run);
        assert_eq!(t.len(), 32);
        assert_eq!(t, trace_id(run), "deterministic");
        assert_ne!(t, trace_id("billing.invoices.1796283531000"));
        let d0 = dispatch_traceparent(run, 0);
        let d1 = dispatch_traceparent(run, 1);
        let a1 = attempt_traceparent(run, 0, 1);
        let a2 = attempt_traceparent(run, 0, 2);
        for tp in [&d0, &d1, &a1, &a2] {
            assert_eq!(parse_trace_id(tp), Some(t.as_str()), "{tp}");
            assert_eq!(tp.len(), 55);
        }
        let spans: std::collections::HashSet<&str> =
            [&d0, &d1, &a1, &a2].iter().map(|tp| &tp[36..52]).collect();
        assert_eq!(spans.len(), 4, "every hop its own span id");
    }

    #[test]
    fn malformed_traceparents_are_refused() {
        let good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(
            parse_trace_id(good),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
        ] {
            assert_eq!(parse_trace_id(bad), None, "{bad}");
        }
    }
}
