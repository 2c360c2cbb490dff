//! WebSocket framing (RFC 6455): the client-to-server decoder ([`codec`])
//! and the server's frames ([`frame`]), pure and unit-tested.

pub mod codec;
pub mod frame;
