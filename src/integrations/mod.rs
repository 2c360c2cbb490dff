//! What herald talks to besides its clients: the authorizer webhook, the
//! metrics it exposes, and the disk its history is kept on
//! (`HISTORY_DIR`).

pub mod authorizer;
pub mod history_disk;
pub mod metrics;
