//! Pusher Channels protocol (version 7) on herald's core: apps, the
//! WebSocket side at `/app/{key}`, the signed HTTP API at `/apps/{id}/..`,
//! presence, client events and webhooks.
//!
//! Pure parts: [`apps`] (APPS configuration), [`sign`] (HMAC signatures of
//! channel auth, the HTTP API and webhooks), [`wire`] (client messages and
//! server frames), [`socket`] (socket ids). Shared state: the engine's
//! [`NodePresence`] (subscription counts and presence members across
//! cores, and in a cluster across nodes, whose transitions this node
//! decided get their webhooks in `PusherShared::act`). IO:
//! [`connection`] (a client's messages), [`api`] (HTTP API), [`webhooks`]
//! (the sender thread).

pub mod api;
pub mod apps;
pub mod cache;
pub mod connection;
pub mod frontend;
pub mod personal;
pub mod sign;
pub mod socket;
pub mod webhooks;
pub mod wire;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;

use self::apps::{AppTable, Apps, WebhookEvent};
use self::webhooks::Webhooks;
use crate::config::Config;
use crate::engine::core::{Broker, Core};
use crate::engine::message::{Encoding, Message};
use crate::engine::presence::NodePresence;
use crate::engine::roster::Transition;
use crate::integrations::metrics::Metrics;

/// The Pusher protocol's encoding of published messages.
pub const ENCODING: Encoding = Encoding(1);

/// Pusher frames cannot be built from another protocol's messages: an
/// event needs its name, which only the Pusher API or a client event
/// gives. (Pusher channels live in their app's namespace, where no other
/// protocol publishes.)
pub fn encode(_: &Message) -> Option<Bytes> {
    None
}

/// A request from one core to every core.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Control {
    /// Close the connections of `user_id` in namespace `ns`.
    Terminate { ns: u16, user_id: String },
}

/// The Pusher state shared by every worker.
pub struct PusherShared {
    /// The apps in force (replaced whole when they come from a database).
    pub apps: AppTable,
    /// Subscription counts and presence members (node-wide, and in a
    /// cluster cluster-wide).
    pub presence: Arc<NodePresence>,
    pub webhooks: Option<Webhooks>,
    /// Open connections per app (by index), for `max_connections` (and
    /// the metrics, which read the same counters).
    pub app_connections: Arc<[AtomicUsize]>,
    /// Silence after which a connection is pinged.
    pub activity_timeout: Duration,
    /// Time a pinged connection has to answer before it is closed (4201).
    pub pong_timeout: Duration,
    /// Per-worker inboxes of [`Control`] requests, read by the timer loop.
    inboxes: Vec<Mutex<Vec<Control>>>,
    /// The node's tag in a cluster, carried in socket ids.
    node_tag: std::sync::OnceLock<u32>,
    /// Peers on each presence channel (routing key): user -> connections
    /// that joined as a peer (Pushi's peer channels).
    peers: Mutex<std::collections::HashMap<String, std::collections::HashMap<String, usize>>>,
}

impl PusherShared {
    /// Counts a new connection of app `ns`; false over the app's quota.
    pub fn admit(&self, app: &apps::App, ns: u16) -> bool {
        let Some(counter) = self.app_connections.get(ns as usize - 1) else {
            return false;
        };
        let max = app.max_connections.unwrap_or(usize::MAX);
        counter
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .is_ok()
    }

    /// Uncounts a connection of app `ns`.
    pub fn release(&self, ns: u16) {
        if let Some(c) = self.app_connections.get(ns as usize - 1) {
            c.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// The Pusher state for `apps`, if there is any app, or if they come
    /// from the database (`capacity` apps at most then).
    pub fn start(
        config: &Config,
        apps: Apps,
        from_database: bool,
        metrics: &Arc<Metrics>,
    ) -> Option<Arc<PusherShared>> {
        if apps.is_empty() && !from_database {
            return None;
        }
        let capacity = match from_database {
            true => apps::MAX_DATABASE_APPS,
            false => apps.len(),
        };
        let shared = PusherShared::new(
            AppTable::new(apps, capacity),
            config.worker_count(),
            config.pusher_activity_timeout,
            config.pusher_pong_timeout,
            config.authorizer_timeout,
            webhooks::WebhookMetrics::new(metrics.clone()),
        );
        metrics.track_app_connections(shared.app_connections.clone());
        Some(Arc::new(shared))
    }

    pub fn new(
        apps: AppTable,
        workers: usize,
        activity_timeout: Duration,
        pong_timeout: Duration,
        webhook_timeout: Duration,
        webhook_metrics: webhooks::WebhookMetrics,
    ) -> PusherShared {
        // Apps from a database may gain webhooks later.
        let any =
            apps.capacity() > apps.get().len() || apps.get().iter().any(|a| !a.webhooks.is_empty());
        let webhooks = Webhooks::start(any, webhook_timeout, webhook_metrics);
        PusherShared {
            app_connections: (0..apps.capacity()).map(|_| AtomicUsize::new(0)).collect(),
            apps,
            presence: Arc::new(NodePresence::default()),
            webhooks,
            activity_timeout,
            pong_timeout,
            inboxes: (0..workers).map(|_| Mutex::default()).collect(),
            node_tag: std::sync::OnceLock::new(),
            peers: Mutex::default(),
        }
    }

    /// A connection of `user` joined presence channel `route` as a peer.
    pub fn add_peer(&self, route: &str, user: &str) {
        let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        *peers
            .entry(route.to_string())
            .or_default()
            .entry(user.to_string())
            .or_default() += 1;
    }

    /// A peer's connection left presence channel `route`.
    pub fn remove_peer(&self, route: &str, user: &str) {
        let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(users) = peers.get_mut(route) {
            if let Some(n) = users.get_mut(user) {
                *n -= 1;
                if *n == 0 {
                    users.remove(user);
                }
            }
            if users.is_empty() {
                peers.remove(route);
            }
        }
    }

    /// Is every one of `users` a peer on presence channel `route` now?
    pub fn are_peers(&self, route: &str, users: &[&str]) -> bool {
        let peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        peers
            .get(route)
            .is_some_and(|on| users.iter().all(|u| on.contains_key(*u)))
    }

    /// Makes presence and occupancy cluster-wide: the transitions this
    /// node decides get their webhooks and member events here.
    pub fn join_cluster(self: &Arc<Self>, broker: Arc<dyn Broker>) {
        let _ = self.node_tag.set(broker.tag());
        let shared = self.clone();
        let act = Box::new(move |core: &Core, t: Transition| shared.act(core, t));
        NodePresence::join_cluster(&self.presence, broker, act);
    }

    /// Closes the connections of `user_id` in namespace `ns` on every
    /// worker of this node (within a timer tick).
    pub fn terminate_here(&self, ns: u16, user_id: &str) {
        for w in 0..self.inboxes.len() {
            self.control(
                w,
                Control::Terminate {
                    ns,
                    user_id: user_id.to_string(),
                },
            );
        }
    }

    /// The node's tag in socket ids (0 on a single node).
    pub fn node_tag(&self) -> u32 {
        self.node_tag.get().copied().unwrap_or(0)
    }

    /// A cluster-wide transition this node decided: its webhook, and for
    /// members the event to the channel's subscribers (on every node).
    fn act(&self, core: &Core, t: Transition) {
        use serde_json::json;
        let key = match &t {
            Transition::Occupied { key }
            | Transition::Vacated { key }
            | Transition::MemberAdded { key, .. }
            | Transition::MemberRemoved { key, .. } => key,
            Transition::Terminate { ns, user } => {
                self.terminate_here(*ns, user);
                return;
            }
        };
        let Some((ns, channel)) = key
            .split_once('#')
            .and_then(|(n, c)| Some((n.parse::<u16>().ok()?, c)))
        else {
            return;
        };
        // Namespace n is app index n - 1.
        let Some(app) = ns
            .checked_sub(1)
            .and_then(|i| self.apps.get().get(i).cloned())
        else {
            return;
        };
        let (kind, event) = match &t {
            Transition::Occupied { .. } => (
                WebhookEvent::ChannelOccupied,
                json!({"name": "channel_occupied", "channel": channel}),
            ),
            Transition::Vacated { .. } => (
                WebhookEvent::ChannelVacated,
                json!({"name": "channel_vacated", "channel": channel}),
            ),
            Transition::MemberAdded {
                user, info, except, ..
            } => {
                let frame = wire::member_added_routed(channel, user, info);
                let mut msg = connection::notice(frame, ns);
                if let Some((w, slot, gen)) = except {
                    msg.set_except(*w, *slot, *gen);
                }
                core.publish(msg, None);
                (
                    WebhookEvent::MemberAdded,
                    json!({"name": "member_added", "channel": channel, "user_id": &**user}),
                )
            }
            Transition::Terminate { .. } => return,
            Transition::MemberRemoved { user, .. } => {
                let frame = wire::member_removed_routed(channel, user);
                core.publish(connection::notice(frame, ns), None);
                (
                    WebhookEvent::MemberRemoved,
                    json!({"name": "member_removed", "channel": channel, "user_id": &**user}),
                )
            }
        };
        if let Some(w) = &self.webhooks {
            w.send(&app, kind, event);
        }
    }

    /// Queues `c` for worker `w` (acted on within one timer tick).
    pub fn control(&self, w: usize, c: Control) {
        if let Some(inbox) = self.inboxes.get(w) {
            inbox.lock().unwrap_or_else(|e| e.into_inner()).push(c);
        }
    }

    /// Takes worker `w`'s pending requests.
    pub fn take_controls(&self, w: usize) -> Vec<Control> {
        match self.inboxes.get(w) {
            Some(inbox) => std::mem::take(&mut *inbox.lock().unwrap_or_else(|e| e.into_inner())),
            None => Vec::new(),
        }
    }
}

/// The Pusher apps `config` asks for: APPS, or the contents of APPS_FILE,
/// or in open mode the default app. The error is one line for `main`.
pub fn load_apps(config: &Config) -> Result<Apps, apps::AppsError> {
    let file = match &config.apps_file {
        Some(path) => Some(
            std::fs::read_to_string(path).map_err(|e| apps::AppsError::File {
                path: path.display().to_string(),
                message: e.to_string(),
            })?,
        ),
        None => None,
    };
    apps::load(config.apps.as_deref(), file.as_deref(), config.open_mode())
}
