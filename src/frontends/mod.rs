//! The protocols herald speaks on top of the engine, each a folder: its
//! own ([`native`]: protocol.md, wsify's commands, the HTTP publish API),
//! the conformance [`echo`], Pusher Channels ([`pusher`]) and wspubsub's
//! raw topics ([`wspubsub`]).
//!
//! A front-end implements [`endpoint::Endpoint`] (the upgrades and HTTP
//! requests at its paths) and [`FrontEnd`](crate::session::FrontEnd)
//! (what its connections' messages do), and plugs in here: what it loads
//! at start-up in [`Loaded`] and [`load`], its node-wide state in
//! [`FrontEnds`], its per-core endpoint in [`endpoints`], its encoder in
//! [`ENCODERS`]. The router ([`crate::runtime::router`]) hands each
//! request to the endpoint that serves its path. Nothing else names a
//! front-end.

use std::rc::Rc;
use std::sync::Arc;

use crate::config::Config;
use crate::engine::core::NamespacedHistory;
use crate::engine::message::Encoder;
use crate::integrations::metrics::Metrics;
use crate::worker::Shared;
use endpoint::Endpoint;

pub mod console;
pub mod echo;
pub mod endpoint;
pub mod native;
pub mod personal;
pub mod pusher;
pub mod wspubsub;

/// Every front-end's encoder, by encoding: each front-end's `ENCODING` is
/// its index here (checked by a test below).
pub static ENCODERS: &[Encoder] = &[native::protocol::encode, pusher::encode, wspubsub::encode];

/// How the channels of the front-ends' namespaces keep history: Pusher's
/// cache channels keep their last event.
/// A stored frame of routing key `key` renumbered `offset` (history kept
/// through a crash): the native protocol's frames show their offset; the
/// other protocols' (a namespace's, `{n}#channel`) do not, and stay as
/// they are.
pub fn reoffset(key: &str, frame: &[u8], offset: u64) -> Option<bytes::Bytes> {
    match key.contains('#') {
        true => Some(bytes::Bytes::copy_from_slice(frame)),
        false => native::protocol::reoffset(key, frame, offset),
    }
}

pub static NAMESPACED_HISTORY: NamespacedHistory = NamespacedHistory {
    keep: pusher::cache::keep,
    encoding: pusher::ENCODING,
};

/// What the front-ends read from files and the environment at start-up,
/// before the server starts (a mistake there stops it with exit code 2).
#[derive(Default)]
pub struct Loaded {
    /// Pusher apps (APPS, APPS_FILE).
    pub apps: pusher::apps::Apps,
    /// The Pusher apps come from the database (DATABASE_URL without APPS
    /// or APPS_FILE): none until it answers.
    pub apps_from_database: bool,
    /// wspubsub API keys (API_KEYS_FILE, or DATABASE_URL's table).
    pub api_keys: Option<wspubsub::keys::ApiKeys>,
}

impl From<pusher::apps::Apps> for Loaded {
    fn from(apps: pusher::apps::Apps) -> Loaded {
        Loaded {
            apps,
            ..Loaded::default()
        }
    }
}

/// Why the front-ends' configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Apps(#[from] pusher::apps::AppsError),
    #[error(transparent)]
    ApiKeys(#[from] wspubsub::keys::LoadError),
}

/// Loads what `config` names for the front-ends.
pub fn load(config: &Config) -> Result<Loaded, LoadError> {
    let apps_from_database =
        config.database_url.is_some() && config.apps.is_none() && config.apps_file.is_none();
    let apps = match apps_from_database {
        true => pusher::apps::Apps::default(),
        false => pusher::load_apps(config)?,
    };
    let api_keys = match (&config.api_keys_file, &config.database_url) {
        (Some(path), _) => Some(wspubsub::keys::ApiKeys::from_file(path)?),
        // Filled from the database once it answers.
        (None, Some(_)) => Some(wspubsub::keys::ApiKeys::fixed(Default::default())),
        (None, None) => None,
    };
    Ok(Loaded {
        apps,
        apps_from_database,
        api_keys,
    })
}

/// The front-ends' node-wide state.
pub struct FrontEnds {
    /// Pusher apps and their cross-core state, when any app exists.
    pub pusher: Option<Arc<pusher::PusherShared>>,
    /// wspubsub's keys, with API_KEYS_FILE or DATABASE_URL.
    pub wspubsub: Option<Arc<wspubsub::WsPubSub>>,
    /// The Pusher apps come from the database (see [`Loaded`]).
    pub apps_from_database: bool,
}

impl FrontEnds {
    pub fn new(config: &Config, loaded: Loaded, metrics: &Arc<Metrics>) -> FrontEnds {
        FrontEnds {
            apps_from_database: loaded.apps_from_database,
            pusher: pusher::PusherShared::start(
                config,
                loaded.apps,
                loaded.apps_from_database,
                metrics,
            ),
            wspubsub: loaded.api_keys.map(wspubsub::WsPubSub::start),
        }
    }

    /// The node joined a cluster: what the front-ends keep node-wide
    /// becomes cluster-wide.
    pub fn join_cluster(&self, broker: &Arc<dyn crate::engine::core::Broker>) {
        if let Some(p) = &self.pusher {
            p.join_cluster(broker.clone());
        }
    }
}

/// One core's endpoints, in the order the router asks them.
pub fn endpoints(
    worker_id: usize,
    shared: &Arc<Shared>,
    frontends: &FrontEnds,
) -> Rc<[Rc<dyn Endpoint>]> {
    let mut all: Vec<Rc<dyn Endpoint>> = vec![Rc::new(native::Native::new(shared))];
    if shared.config.echo_endpoint {
        all.push(Rc::new(echo::Echo));
    }
    if let Some(p) = &frontends.pusher {
        all.push(Rc::new(pusher::connection::Pusher::new(
            worker_id,
            p.clone(),
        )));
    }
    if let Some(w) = &frontends.wspubsub {
        all.push(Rc::new(wspubsub::WsPubSubEndpoint::new(w.clone())));
    }
    if shared.config.admin_token.is_some() {
        all.push(Rc::new(console::Console::new(
            shared,
            frontends.pusher.clone(),
        )));
    }
    all.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodings_index_their_encoders() {
        assert_eq!(usize::from(native::protocol::ENCODING.0), 0);
        assert_eq!(usize::from(pusher::ENCODING.0), 1);
        assert_eq!(usize::from(wspubsub::ENCODING.0), 2);
        assert_eq!(ENCODERS.len(), 3);
    }
}
