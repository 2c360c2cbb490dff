//! Bytes on the wire: HTTP/1.1 (request heads, the server's request loop,
//! the outgoing client) and WebSocket framing. The only layer that touches
//! sockets and file descriptors; it knows no channel and no protocol
//! message.

pub mod http1;
pub mod socket;
pub mod tcp;
pub mod tls;
pub mod ws;
