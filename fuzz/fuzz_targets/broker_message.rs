//! What a cluster's broker hands a node, on arbitrary bytes: a message of
//! another node (`Message::decode_wire`, behind an optional
//! `o<epoch> <offset>` prefix) and a presence event of the control
//! channel (`roster::Event` as JSON). Nothing may panic; a message that
//! decodes must encode back to the same message, and an event that parses
//! must apply to a roster and round-trip as JSON.
#![no_main]

use bytes::Bytes;
use herald::engine::message::Message;
use herald::engine::roster::{Event, Roster};
use herald::integrations::cluster::redis::placed_message;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    let wire = match placed_message(input) {
        Some((epoch, offset, wire)) => {
            assert!(!epoch.is_empty() && epoch.len() <= 64 && offset > 0);
            wire
        }
        None => input,
    };
    if let Ok(m) = Message::decode_wire(Bytes::copy_from_slice(wire), 1) {
        let (channel, payload) = (m.channel().to_string(), m.payload().to_vec());
        assert!(!channel.is_empty());
        let mut again = Vec::new();
        m.encode_wire(1, &mut again);
        let back = Message::decode_wire(Bytes::from(again), 1).expect("re-encoded");
        assert_eq!(back.channel(), channel);
        assert_eq!(back.payload(), &payload[..]);
        assert_eq!(back.frame(), m.frame());
        assert_eq!(back.namespace(), m.namespace());
        assert_eq!(back.except_on(0), m.except_on(0));
    }
    if let Ok(e) = serde_json::from_slice::<Event>(input) {
        let mut r = Roster::default();
        r.apply(&e);
        r.apply(&e);
        let text = serde_json::to_string(&e).expect("serializes");
        assert_eq!(serde_json::from_str::<Event>(&text).expect("parses back"), e);
    }
});
