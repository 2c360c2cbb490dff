//! herald: a WebSocket publish/subscribe server built as thread-per-core
//! reactors with zero-copy fan-out.
//!
//! # Layout
//!
//! The tree is the architecture (ARCHITECTURE.md, at the repository's
//! root, says more); from the
//! bottom layer up, each importing only from those below it:
//!
//! - [`engine`]: channels, subscribers, the fan-out and the bus between
//!   cores, each channel's order (its owner core) and history; it moves
//!   encoded frames and knows no protocol.
//! - [`transport`]: bytes on the wire: a connection's socket halves and
//!   write batches ([`transport::tcp`]), HTTP/1.1 ([`transport::http1`]:
//!   request heads, pending connections, the outgoing client) and
//!   WebSocket framing ([`transport::ws`]). The only layer that touches
//!   sockets.
//! - [`clock`] (monotonic deadlines, Unix time where protocols need it),
//!   [`auth`] (tokens and permission patterns), [`config`].
//! - [`integrations`]: the authorizer webhook and the metrics.
//! - [`worker`]: one reactor's context and the process-wide state.
//! - [`session`]: one WebSocket connection's reader and writer, generic
//!   over the front-end that interprets its messages.
//! - [`frontends`]: the protocols, each an endpoint the router hands its
//!   paths to: herald's own ([`frontends::native`]), Pusher Channels
//!   ([`frontends::pusher`]), wspubsub ([`frontends::wspubsub`]) and the
//!   conformance echo.
//! - [`runtime`]: start-up, listeners, signals, timers, and the HTTP
//!   [`runtime::router`]; [`cli`]: the command-line client.
//!
//! The hot path: the [`session`] reads and decodes a frame, the front-end
//! ([`frontends::native::session`]) applies a publish,
//! [`engine::core::Core::publish`] hands the one encoded frame to the
//! channel's owner core, which orders it (and keeps it, with history) and
//! hands it to the [`engine::bus`] and to
//! [`engine::shard::Shard::deliver`], which queues a refcounted clone per
//! subscriber; each subscriber's writer takes its
//! queue in [`engine::shard::Shard::fill`] and writes it with one system
//! call.

pub mod auth;
pub mod cli;
pub mod clock;
pub mod config;
pub mod engine;
pub mod frontends;
pub mod integrations;
pub mod runtime;
pub mod session;
pub mod transport;
pub mod worker;
