//! The protocols herald speaks on top of the engine: its own
//! ([`native`], protocol.md and wsify's commands, with the HTTP publish
//! API) and Pusher Channels ([`pusher`]).

use crate::engine::message::Encoder;

pub mod native;
pub mod pusher;

/// Every front-end's encoder, by encoding: each front-end's `ENCODING` is
/// its index here (checked by a test below).
pub static ENCODERS: &[Encoder] = &[native::protocol::encode, pusher::encode];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodings_index_their_encoders() {
        assert_eq!(usize::from(native::protocol::ENCODING.0), 0);
        assert_eq!(usize::from(pusher::ENCODING.0), 1);
        assert_eq!(ENCODERS.len(), 2);
    }
}
