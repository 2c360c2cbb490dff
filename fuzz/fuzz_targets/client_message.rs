//! Client messages on arbitrary bytes: `parse_request`, `parse_binary`,
//! `parse_http_publish`. Every accepted publish is encoded the way the
//! server sends it and must parse back as JSON carrying the publisher's
//! `data` byte for byte; every reply and error frame must be valid JSON.
#![no_main]

use herald::frontends::native::protocol::{self, ErrorCode, Op};
use libfuzzer_sys::fuzz_target;
use serde::Deserialize;
use serde_json::value::RawValue;

/// Splits an unmasked, unfragmented server frame into opcode and payload,
/// checking the header's length matches the frame's.
fn unframe(frame: &[u8]) -> (u8, &[u8]) {
    assert!(frame.len() >= 2, "frame too short: {frame:?}");
    assert_eq!(frame[0] & 0xF0, 0x80, "FIN set, RSV clear");
    assert_eq!(frame[1] & 0x80, 0, "server frames are not masked");
    let (len, at) = match frame[1] & 0x7F {
        126 => (u16::from_be_bytes([frame[2], frame[3]]) as usize, 4),
        127 => (
            u64::from_be_bytes(frame[2..10].try_into().unwrap()) as usize,
            10,
        ),
        n => (n as usize, 2),
    };
    assert_eq!(at + len, frame.len(), "frame length in header");
    (frame[0] & 0x0F, &frame[at..])
}

/// A JSON text frame: its payload, parsed.
fn json_frame(frame: &[u8]) -> serde_json::Value {
    let (opcode, payload) = unframe(frame);
    assert_eq!(opcode, 1, "text frame");
    serde_json::from_slice(payload).unwrap_or_else(|e| {
        panic!(
            "server frame is not JSON ({e}): {:?}",
            String::from_utf8_lossy(payload)
        )
    })
}

#[derive(Deserialize)]
struct Message<'a> {
    op: &'a str,
    channel: &'a str,
    #[serde(borrow)]
    data: &'a RawValue,
}

fn check_publish(channel: &str, data: &str) {
    let published = protocol::message_frame(channel, data);
    assert_eq!(published.channel(), channel);
    let (opcode, payload) = unframe(&published.frame());
    assert_eq!(opcode, 1, "text frame");
    let msg: Message<'_> = serde_json::from_slice(payload).unwrap_or_else(|e| {
        panic!(
            "message frame is not JSON ({e}): {:?}",
            String::from_utf8_lossy(payload)
        )
    });
    assert_eq!(msg.op, "message");
    assert_eq!(msg.channel, channel);
    assert_eq!(msg.data.get(), data, "data passed through byte for byte");
    // Where `data` is representable as a value, the frame carries that value.
    if let Ok(value) = serde_json::from_str::<serde_json::Value>(data) {
        assert_eq!(json_frame(&published.frame())["data"], value);
    }
}

fuzz_target!(|input: &[u8]| {
    match protocol::parse_request(input) {
        Ok(req) => {
            // An id is echoed raw: it must keep every reply valid JSON.
            let id = req.id;
            let pong = json_frame(&protocol::pong(id));
            if let Some(id) = id {
                let want: serde_json::Value = serde_json::from_str(id).expect("raw id is JSON");
                assert_eq!(pong["id"], want);
                json_frame(&protocol::ack(id));
            }
            json_frame(&protocol::authed(id));
            match &req.op {
                Op::Publish { channel, data, .. } => check_publish(channel, data),
                Op::Subscribe { channel, .. } | Op::Unsubscribe { channel } => {
                    let v = json_frame(&protocol::subscribed(channel, id));
                    assert_eq!(v["channel"], **channel);
                    json_frame(&protocol::unsubscribed(channel, id));
                }
                Op::History { .. } | Op::Auth { .. } | Op::Ping => {}
            }
        }
        Err(bad) => {
            let v = json_frame(&protocol::error(
                bad.id,
                ErrorCode::BadRequest,
                &bad.message,
            ));
            assert_eq!(v["code"], "bad_request");
        }
    }

    if let Ok((channel, payload)) = protocol::parse_binary(input) {
        assert!(protocol::validate_channel(channel).is_ok());
        let published = protocol::binary_frame(channel, payload);
        assert_eq!(published.channel(), channel);
        let (opcode, body) = unframe(&published.frame());
        assert_eq!(opcode, 2, "binary frame");
        assert_eq!(body, input, "binary delivery has the publisher's layout");
    }

    for wsify in [false, true] {
        match protocol::parse_http_publish(input, wsify) {
            Ok(p) => check_publish(&p.channel, p.data),
            Err(message) => {
                json_frame(&protocol::error(None, ErrorCode::BadRequest, &message));
            }
        }
    }
});
