//! HTTP/1.1: request heads ([`head`]), the connections that have not become
//! WebSockets ([`server`], bounded by [`pending`]), the client address
//! behind proxies ([`forwarded`]) and the outgoing client ([`client`]).

pub mod client;
pub mod forwarded;
pub mod head;
pub mod pending;
pub mod server;
