//! herald: a WebSocket publish/subscribe server built as thread-per-core
//! reactors with zero-copy fan-out.
//!
//! # Layout
//!
//! Pure protocol code (bytes in, values out, no IO, no clock):
//! - [`config`]: environment variables and flags.
//! - [`auth`]: JWT verification and channel permission patterns.
//! - [`protocol`]: client messages and server replies of protocol.md.
//! - [`frame`]: server-to-client WebSocket frames.
//! - [`codec`]: client-to-server WebSocket frames (RFC 6455).
//! - [`handshake`]: HTTP request heads and the opening handshake.
//! - [`forwarded`]: the client's address behind trusted reverse proxies.
//!
//! Shared and per-core state:
//! - [`interest`]: which cores hold subscribers of which channel.
//! - [`bus`]: the cross-core queues carrying encoded frames.
//! - [`shard`]: one core's connections, channel table and outbound queues.
//! - [`metrics`]: Prometheus counters.
//! - [`pending`]: the bounded set of connections not yet upgraded.
//! - [`worker`]: a core's context and the publish path.
//!
//! IO:
//! - [`session`]: a WebSocket connection's reader and writer tasks.
//! - [`http`]: request heads, upgrades and the HTTP API.
//! - [`authorizer`]: the webhook that approves connections and actions.
//! - [`pusher`]: the Pusher Channels protocol (apps, `/app/{key}`, the
//!   signed HTTP API, presence, webhooks) on the same fan-out.
//! - [`server`]: threads, listeners, signals.
//! - [`cli`]: the command-line client (`herald sub|pub|token`).
//!
//! The hot path: [`session`] reads and decodes a frame, `handle_request`
//! applies a publish, [`worker::Worker::publish`] encodes nothing more and
//! hands the one frame to the [`bus`] and to [`shard::Shard::deliver`],
//! which queues a refcounted clone per subscriber; each subscriber's writer
//! takes its queue in [`shard::Shard::fill`] and writes it with one
//! vectored write.

pub mod auth;
pub mod authorizer;
pub mod bus;
pub mod cli;
pub mod codec;
pub mod config;
pub mod forwarded;
pub mod frame;
pub mod handshake;
pub mod http;
pub mod http_client;
pub mod interest;
pub mod metrics;
pub mod pending;
pub mod protocol;
pub mod pusher;
pub mod server;
pub mod session;
pub mod shard;
pub mod slots;
pub mod subscribers;
pub mod worker;
