//! W3C trace context (`traceparent`): parsed, printed, started and continued. The same
//! [`TraceContext`] rides in HTTP headers between services, in a batch's header over QUIC, in
//! a mission to a drone and on derived delivery-event batches, so one trace id follows a
//! delivery from the scheduling request to its history.

use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::wire::TraceContext;

fn hex_into(out: &mut String, bytes: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for b in bytes {
        out.push(HEX[usize::from(b >> 4)] as char);
        out.push(HEX[usize::from(b & 15)] as char);
    }
}

fn unhex(s: &str, out: &mut [u8]) -> Option<()> {
    let s = s.as_bytes();
    if s.len() != out.len() * 2 {
        return None;
    }
    let nibble = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    for (i, o) in out.iter_mut().enumerate() {
        *o = (nibble(s[2 * i])? << 4) | nibble(s[2 * i + 1])?;
    }
    Some(())
}

/// 64 unpredictable-enough bits for ids: a per-process random key hashed with a counter and
/// the clock (ids must be unique, not secret).
fn random_u64() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    thread_local! {
        static STATE: std::collections::hash_map::RandomState = std::collections::hash_map::RandomState::new();
    }
    STATE.with(|s| {
        let mut h = s.build_hasher();
        h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
        h.write_u64(crate::now_us());
        h.finish()
    })
}

fn nonzero_u64() -> u64 {
    loop {
        let v = random_u64();
        if v != 0 {
            return v;
        }
    }
}

impl TraceContext {
    /// Whether this carries a trace (an all-zero trace id means none).
    pub fn is_some(&self) -> bool {
        self.trace_id != [0; 16]
    }

    /// A new trace (sampled) with a new root span.
    pub fn new_root() -> Self {
        let mut trace_id = [0u8; 16];
        trace_id[..8].copy_from_slice(&nonzero_u64().to_le_bytes());
        trace_id[8..].copy_from_slice(&random_u64().to_le_bytes());
        Self { trace_id, span_id: nonzero_u64().to_le_bytes(), flags: 1 }
    }

    /// A new span in the same trace, whose parent is this one.
    pub fn child(&self) -> Self {
        Self { trace_id: self.trace_id, span_id: nonzero_u64().to_le_bytes(), flags: self.flags }
    }

    /// Parses a `traceparent` header value (`00-<trace id>-<span id>-<flags>`, lower-case
    /// hex). Anything else, including all-zero ids, is `None`: the receiver starts a new trace.
    pub fn parse(header: &str) -> Option<Self> {
        let mut parts = header.trim().split('-');
        let (version, trace, span, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        // Version 00 has exactly four fields; later versions may append more.
        if version.len() != 2 || version == "ff" || (version == "00" && parts.next().is_some()) {
            return None;
        }
        let mut ctx = TraceContext::default();
        unhex(trace, &mut ctx.trace_id)?;
        unhex(span, &mut ctx.span_id)?;
        let mut f = [0u8; 1];
        unhex(flags, &mut f)?;
        ctx.flags = f[0];
        (ctx.is_some() && ctx.span_id != [0; 8]).then_some(ctx)
    }

    /// The `traceparent` header value.
    pub fn to_header(&self) -> String {
        let mut out = String::with_capacity(55);
        out.push_str("00-");
        hex_into(&mut out, &self.trace_id);
        out.push('-');
        hex_into(&mut out, &self.span_id);
        out.push('-');
        hex_into(&mut out, &[self.flags]);
        out
    }

    /// The trace id in hex, as logs and trace viewers show it.
    pub fn trace_hex(&self) -> String {
        let mut out = String::with_capacity(32);
        hex_into(&mut out, &self.trace_id);
        out
    }

    /// The span id in hex.
    pub fn span_hex(&self) -> String {
        let mut out = String::with_capacity(16);
        hex_into(&mut out, &self.span_id);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_round_trips_and_bad_headers_are_refused() {
        let h = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let ctx = TraceContext::parse(h);
        assert_eq!(ctx.map(|c| c.to_header()).as_deref(), Some(h));
        assert_eq!(ctx.map(|c| c.trace_hex()).as_deref(), Some("4bf92f3577b34da6a3ce929d0e0e4736"));
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
        ] {
            assert_eq!(TraceContext::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn children_keep_the_trace_and_get_new_spans() {
        let root = TraceContext::new_root();
        assert!(root.is_some());
        let child = root.child();
        assert_eq!(child.trace_id, root.trace_id);
        assert_ne!(child.span_id, root.span_id);
        assert_ne!(TraceContext::new_root().trace_id, root.trace_id);
        assert!(!TraceContext::default().is_some());
    }
}
