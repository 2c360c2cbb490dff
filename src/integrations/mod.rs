//! What herald talks to besides its clients: the authorizer webhook, the
//! metrics it exposes, the disk its history is kept on (`HISTORY_DIR`),
//! the broker of its cluster (`BROKER_URL`), the database its
//! configuration may be kept in (`DATABASE_URL`), and, during a restart, the
//! other herald process (`handoff`).

pub mod authorizer;
pub mod cluster;
pub mod database;
pub mod handoff;
pub mod history_disk;
pub mod metrics;
