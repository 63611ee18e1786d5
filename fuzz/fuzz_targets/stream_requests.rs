//! Arbitrary bytes through every decoder of the QUIC streams' small frames, as the server and
//! the client read them: the first byte picks the frame (a consume request, a settle frame's
//! head and reason, an offset subscription's request, a cursor name, a batch answer's fixed
//! part), the rest is the frame. Each must return, never panic, and what it accepts must encode
//! back to the same bytes where the format has one encoding.
#![no_main]

use ingest::consume::{SETTLE_HEAD_LEN, decode_request, decode_settle_head, decode_verdict, encode_request, encode_settle};
use ingest::proto::{RESPONSE_LEN, Response, SUBSCRIBE_FROM_LEN, decode_cursor_name, decode_subscribe_from};
use libfuzzer_sys::fuzz_target;

fn fixed<const N: usize>(b: &[u8]) -> Option<[u8; N]> {
    b.get(..N)?.try_into().ok()
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, frame)) = data.split_first() else { return };
    match which % 5 {
        0 => {
            if let Some(req) = fixed(frame)
                && let Ok((queue, keys, max)) = decode_request(&req)
            {
                let again = encode_request(queue, keys, max);
                assert_eq!(decode_request(&again).ok(), Some((queue, keys, max)));
            }
        }
        1 => {
            let Some(head) = fixed::<SETTLE_HEAD_LEN>(frame) else { return };
            let Ok((id, token, len)) = decode_settle_head(&head) else { return };
            let Some(reason) = frame[SETTLE_HEAD_LEN..].get(..len) else { return };
            if let Ok(verdict) = decode_verdict(head[16], reason) {
                let mut out = Vec::new();
                encode_settle(id, token, &verdict, &mut out);
                let again: [u8; SETTLE_HEAD_LEN] = out[..SETTLE_HEAD_LEN].try_into().expect("a settle head");
                assert_eq!(decode_settle_head(&again).map(|(i, t, _)| (i, t)).ok(), Some((id, token)));
            }
        }
        2 => {
            if let Some(req) = fixed::<SUBSCRIBE_FROM_LEN>(frame) {
                let _ = decode_subscribe_from(&req);
            }
        }
        3 => {
            let _ = decode_cursor_name(frame.to_vec());
        }
        _ => {
            if let Some(head) = fixed::<RESPONSE_LEN>(frame) {
                let (_seq, _code, len, _events) = Response::decode_fixed(&head);
                if let Some(reason) = frame[RESPONSE_LEN..].get(..len) {
                    let _ = String::from_utf8_lossy(reason);
                }
            }
        }
    }
});
