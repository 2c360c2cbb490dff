//! herald's own protocol (docs/protocol.md) and wsify's commands.

pub mod protocol;
