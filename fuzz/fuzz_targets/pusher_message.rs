//! Pusher client messages and HTTP API bodies on arbitrary bytes:
//! `wire::parse`, `parse_trigger`, `parse_batch`, `parse_channel_data`.
//! Every client event accepted is encoded the way it fans out and must
//! parse back as JSON carrying its `data` byte for byte, on its channel.
#![no_main]

use herald::frontends::pusher::wire::{self, ClientMessage};
use libfuzzer_sys::fuzz_target;

/// The JSON payload of an unmasked, unfragmented server text frame.
fn json_payload(frame: &[u8]) -> serde_json::Value {
    assert!(frame.len() >= 2);
    assert_eq!(frame[0], 0x81, "FIN + text");
    let (len, at) = match frame[1] & 0x7F {
        126 => (u16::from_be_bytes([frame[2], frame[3]]) as usize, 4),
        127 => (u64::from_be_bytes(frame[2..10].try_into().unwrap()) as usize, 10),
        n => (n as usize, 2),
    };
    assert_eq!(at + len, frame.len(), "frame length in header");
    serde_json::from_slice(&frame[at..]).expect("server frame is JSON")
}

fuzz_target!(|input: &[u8]| {
    match wire::parse(input) {
        Ok(ClientMessage::ClientEvent { event, channel, data }) => {
            if wire::validate_channel(&channel).is_ok() {
                let r = wire::event_frame_routed(&event, &channel, data, Some("u"));
                assert_eq!(r.channel(), &*channel);
                let v = json_payload(&r.frame);
                assert_eq!(v["event"], *event);
                assert_eq!(v["channel"], *channel);
                if let Ok(d) = serde_json::from_str::<serde_json::Value>(data) {
                    assert_eq!(v["data"], d);
                }
            }
        }
        Ok(ClientMessage::Subscribe { channel, channel_data, .. }) => {
            let v = json_payload(&wire::subscription_error(&channel, "AuthError", "x", 401));
            assert_eq!(v["channel"], *channel);
            if let Some(cd) = channel_data {
                if let Ok((user, info)) = wire::parse_channel_data(&cd) {
                    let p = wire::presence_data(&[(&user, &info)]);
                    let v: serde_json::Value = serde_json::from_str(&p).expect("presence JSON");
                    assert_eq!(v["presence"]["count"], 1);
                }
            }
        }
        Ok(_) => {}
        Err(e) => {
            json_payload(&wire::error(None, &e.to_string()));
        }
    }
    if let Ok(t) = wire::parse_trigger(input) {
        for ch in &t.channels {
            let r = wire::event_frame_routed(&t.name, ch, &t.data_json, None);
            assert_eq!(json_payload(&r.frame)["data"], t.data);
        }
    }
    let _ = wire::parse_batch(input);
});
