//! What herald talks to besides its clients: the authorizer webhook, the
//! metrics it exposes, the disk its history is kept on (`HISTORY_DIR`),
//! and the broker of its cluster (`BROKER_URL`).

pub mod authorizer;
pub mod cluster;
pub mod history_disk;
pub mod metrics;
