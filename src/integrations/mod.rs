//! What herald talks to besides its clients: the authorizer webhook and
//! the metrics it exposes.

pub mod authorizer;
pub mod metrics;
