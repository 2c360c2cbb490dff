//! The protocols herald speaks on top of the engine: its own
//! ([`native`], protocol.md and wsify's commands, with the HTTP publish
//! API) and Pusher Channels ([`pusher`]).

pub mod native;
pub mod pusher;
