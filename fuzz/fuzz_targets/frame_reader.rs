//! `codec::Decoder::decode` over arbitrary bytes, as the session reads
//! them: decode, drop what was consumed, read more when incomplete. The
//! input is fed whole, split once at an arbitrary point (a partial read),
//! and one byte at a time; all three must decode to the same messages,
//! and nothing may panic.
#![no_main]

use herald::transport::ws::codec::{Decoded, Decoder, Message};
use libfuzzer_sys::fuzz_target;

const MAX_MESSAGE: usize = 4096;

#[derive(Debug, PartialEq, Eq)]
enum Event {
    Text(Vec<u8>),
    Binary(Vec<u8>),
    Ping(Vec<u8>),
    Pong,
    Close(Option<(u16, String)>),
    Error(String),
}

/// Decodes `input` delivered in `chunks` (lengths summing to input.len()).
fn run(input: &[u8], chunks: impl IntoIterator<Item = usize>) -> Vec<Event> {
    let mut decoder = Decoder::new(MAX_MESSAGE);
    let mut events = Vec::new();
    let mut buf: Vec<u8> = Vec::new();
    let mut fed = 0;
    let mut chunks = chunks.into_iter();
    loop {
        let buffered = buf.len();
        let consumed = match decoder.decode(&mut buf) {
            Ok(Decoded::Incomplete { frame_len }) => {
                assert!(
                    frame_len == 0 || frame_len > buffered,
                    "incomplete with the whole frame buffered"
                );
                None
            }
            Ok(Decoded::Frame { consumed, message }) => {
                assert!(consumed > 0 && consumed <= buffered, "consumed {consumed}");
                let event = message.map(|m| match m {
                    Message::Text(t) => {
                        assert!(t.len() <= MAX_MESSAGE);
                        assert!(std::str::from_utf8(t).is_ok(), "text is UTF-8");
                        Event::Text(t.to_vec())
                    }
                    Message::Binary(b) => {
                        assert!(b.len() <= MAX_MESSAGE);
                        Event::Binary(b.to_vec())
                    }
                    Message::Ping(p) => {
                        assert!(p.len() <= 125);
                        Event::Ping(p.to_vec())
                    }
                    Message::Pong => Event::Pong,
                    Message::Close(c) => Event::Close(c.map(|(code, r)| (code, r.to_string()))),
                });
                events.extend(event);
                Some(consumed)
            }
            Err(e) => {
                let _ = e.close_code();
                events.push(Event::Error(e.to_string()));
                break;
            }
        };
        match consumed {
            Some(n) => drop(buf.drain(..n)),
            None => {
                let Some(n) = chunks.next() else { break };
                buf.extend_from_slice(&input[fed..fed + n]);
                fed += n;
            }
        }
    }
    events
}

fuzz_target!(|data: &[u8]| {
    let Some((&seed, input)) = data.split_first() else {
        return;
    };
    let whole = run(input, [input.len()]);
    let at = (seed as usize * input.len()) / 255;
    let split = run(input, [at, input.len() - at]);
    assert_eq!(whole, split, "split at {at}");
    let bytes = run(input, std::iter::repeat_n(1, input.len()));
    assert_eq!(whole, bytes, "one byte at a time");
});
