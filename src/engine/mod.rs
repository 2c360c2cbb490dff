//! The engine: channels, subscribers and the fan-out, on every core, with
//! no knowledge of any protocol. It moves already-encoded frames (`Bytes`)
//! from publishers to the queues of subscribers: a shard per core, the
//! interest map saying which cores hold subscribers of a channel, and the
//! bus between cores.
//!
//! Invariant: nothing here imports a front-end, a transport or an
//! integration (checked by `tests/architecture_layers_hold.rs`).

pub mod bus;
pub mod core;
pub mod handoff;
pub mod history;
pub mod interest;
pub mod message;
pub mod personal;
pub mod presence;
pub mod roster;
pub mod shard;
pub mod slots;
pub mod stats;
pub mod subscribers;
pub mod watch;
