//! HTTP/1.1: request heads ([`head`]), the registry bounding connections
//! that have not become WebSockets ([`pending`]), the client address
//! behind proxies ([`forwarded`]) and the outgoing client ([`client`]).
//! The request loop that uses them is the runtime's router.

pub mod client;
pub mod forwarded;
pub mod head;
pub mod pending;
