//! Pusher apps: the credentials and limits each Pusher-protocol client and
//! server library connects with, read from `APPS` or `APPS_FILE`.
//!
//! Pure: this module parses and validates configuration text handed to it;
//! reading `APPS_FILE` from disk and reporting IO errors is the caller's job.
//! Every app gets a 0-based `index`, which the server uses to keep the
//! channels of different apps apart. Unknown fields are refused so that a
//! misspelt option fails at start-up instead of being silently ignored.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;

/// The app that exists in open mode when no app is configured: the
/// convention Pusher-compatible servers share (Soketi, Sockudo, Reverb's
/// examples), so copy-pasted client snippets work as they are.
pub const DEFAULT_APP_ID: &str = "app-id";
/// Key of the open-mode app.
pub const DEFAULT_APP_KEY: &str = "app-key";
/// Secret of the open-mode app.
pub const DEFAULT_APP_SECRET: &str = "app-secret";

/// Pusher's documented limit on client events per connection per second.
pub const DEFAULT_MAX_CLIENT_EVENTS_PER_SECOND: u32 = 10;

/// Pusher's documented limit on an event's data: 10 KB.
pub const DEFAULT_MAX_EVENT_PAYLOAD_KB: u32 = 10;

/// One Pusher app.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct App {
    /// The `app_id` of the HTTP API paths (`/apps/{id}/events`). A JSON
    /// number is accepted too, since Pusher's own app ids are numeric.
    #[serde(deserialize_with = "string_or_integer")]
    pub id: String,
    /// The public key clients connect with (`/app/{key}`).
    pub key: String,
    /// Signs channel authorizations, HTTP API requests and webhooks.
    pub secret: String,
    /// A disabled app refuses connections (close 4003) and API requests.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// May clients send `client-*` events on private and presence channels?
    #[serde(default)]
    pub enable_client_messages: bool,
    /// Most simultaneous connections (close 4004 beyond); `None`: no limit.
    #[serde(default)]
    pub max_connections: Option<usize>,
    /// Client events one connection may send per second (close 4301 beyond).
    #[serde(default = "default_client_rate")]
    pub max_client_events_per_second: u32,
    /// Largest event data, in KiB (Soketi's name): API triggers over it get
    /// 413, client events a `pusher:error`. Default 10, as Pusher.
    #[serde(default = "default_event_payload_kb")]
    pub max_event_payload_in_kb: u32,
    /// Where this app's webhooks go; one object or an array in the JSON.
    #[serde(default, deserialize_with = "one_or_many")]
    pub webhooks: Vec<Webhook>,
    /// Position in [`Apps`], 0-based; assigned by [`Apps::new`].
    #[serde(skip)]
    pub index: u16,
}

fn yes() -> bool {
    true
}

fn default_client_rate() -> u32 {
    DEFAULT_MAX_CLIENT_EVENTS_PER_SECOND
}

fn default_event_payload_kb() -> u32 {
    DEFAULT_MAX_EVENT_PAYLOAD_KB
}

impl App {
    /// An app with these credentials and every other setting at its default.
    pub fn new(id: &str, key: &str, secret: &str) -> App {
        App {
            id: id.to_owned(),
            key: key.to_owned(),
            secret: secret.to_owned(),
            enabled: true,
            enable_client_messages: false,
            max_connections: None,
            max_client_events_per_second: DEFAULT_MAX_CLIENT_EVENTS_PER_SECOND,
            max_event_payload_in_kb: DEFAULT_MAX_EVENT_PAYLOAD_KB,
            webhooks: Vec::new(),
            index: 0,
        }
    }

    /// The largest event data this app accepts, in bytes.
    pub fn max_event_bytes(&self) -> usize {
        self.max_event_payload_in_kb as usize * 1024
    }

    /// Does any webhook of this app want `event`?
    pub fn wants_webhook(&self, event: WebhookEvent) -> bool {
        self.webhooks.iter().any(|w| w.wants(event))
    }

    fn validate(&self) -> Result<(), AppError> {
        check_name("id", &self.id)?;
        check_name("key", &self.key)?;
        if self.secret.is_empty() {
            return Err(AppError::Empty("secret"));
        }
        if self.max_client_events_per_second == 0 {
            return Err(AppError::AtLeastOne("max_client_events_per_second"));
        }
        if self.max_event_payload_in_kb == 0 {
            return Err(AppError::AtLeastOne("max_event_payload_in_kb"));
        }
        if self.max_connections == Some(0) {
            return Err(AppError::ZeroConnections);
        }
        for (i, w) in self.webhooks.iter().enumerate() {
            w.validate().map_err(|error| AppError::Webhook {
                index: i + 1,
                error,
            })?;
        }
        Ok(())
    }
}

/// The secret never appears in logs or panics.
impl fmt::Debug for App {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("App")
            .field("id", &self.id)
            .field("key", &self.key)
            .field("secret", &"<redacted>")
            .field("enabled", &self.enabled)
            .field("enable_client_messages", &self.enable_client_messages)
            .field("max_connections", &self.max_connections)
            .field(
                "max_client_events_per_second",
                &self.max_client_events_per_second,
            )
            .field("max_event_payload_in_kb", &self.max_event_payload_in_kb)
            .field("webhooks", &self.webhooks)
            .field("index", &self.index)
            .finish()
    }
}

/// Ids and keys travel in URL paths (`/apps/{id}`, `/app/{key}`), so they
/// are kept to characters that never need escaping there.
fn check_name(field: &'static str, value: &str) -> Result<(), AppError> {
    if value.is_empty() {
        return Err(AppError::Empty(field));
    }
    if !value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    {
        return Err(AppError::Name {
            field,
            value: value.to_owned(),
        });
    }
    Ok(())
}

/// What is wrong with one app's settings.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AppError {
    #[error("\"{0}\" must not be empty")]
    Empty(&'static str),
    #[error("\"{field}\" may only contain A-Z a-z 0-9 - _ . (got {value:?})")]
    Name { field: &'static str, value: String },
    #[error("\"{0}\" must be at least 1")]
    AtLeastOne(&'static str),
    #[error("\"max_connections\" must be at least 1 (leave it out for no limit)")]
    ZeroConnections,
    #[error("webhook {index}: {error}")]
    Webhook { index: usize, error: WebhookError },
}

/// What is wrong with one webhook's settings.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WebhookError {
    #[error("\"url\" {url:?} is not a URL: {reason}")]
    NotUrl { url: String, reason: String },
    #[error("\"url\" must start with http:// or https:// and name a host (got {0:?})")]
    Url(String),
    #[error("\"events\" must not be empty (leave it out for every event)")]
    NoEvents,
}

/// Why a list of apps was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AppsError {
    #[error("{0} apps: at most 65536 are supported")]
    TooMany(usize),
    #[error("app {n}: {error}")]
    App { n: usize, error: AppError },
    #[error("app {n}: {field} {value:?} is already used by app {other}")]
    Duplicate {
        n: usize,
        field: &'static str,
        value: String,
        other: usize,
    },
    #[error("expected a JSON array of apps, like [{{\"id\":..,\"key\":..,\"secret\":..}}]")]
    NotArray,
    #[error("not valid JSON: {0}")]
    NotJson(String),
    /// An app the JSON could not be read into: serde's message, and where
    /// in the whole text when it spans lines.
    #[error("app {n}{}: {message}", at.map(|(l, c)| format!(" (line {l}, column {c})")).unwrap_or_default())]
    Parse {
        n: usize,
        at: Option<(usize, usize)>,
        message: String,
    },
    #[error("APPS and APPS_FILE are both set: use one of them")]
    BothSources,
    /// An error in the list read from `source` (APPS or APPS_FILE).
    #[error("{source_name}: {error}")]
    In {
        source_name: &'static str,
        error: Box<AppsError>,
    },
    #[error("APPS_FILE {path}: {message}")]
    File { path: String, message: String },
}

/// A webhook endpoint and the events it receives.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Webhook {
    /// `http://` or `https://` URL the events are POSTed to.
    pub url: String,
    /// The events sent to this URL; absent in the JSON means all of them.
    #[serde(default = "WebhookEvent::all")]
    pub events: Vec<WebhookEvent>,
}

impl Webhook {
    /// Does this webhook want `event`?
    pub fn wants(&self, event: WebhookEvent) -> bool {
        self.events.contains(&event)
    }

    fn validate(&self) -> Result<(), WebhookError> {
        let uri: http::Uri =
            self.url
                .parse()
                .map_err(|e: http::uri::InvalidUri| WebhookError::NotUrl {
                    url: self.url.clone(),
                    reason: e.to_string(),
                })?;
        let scheme_ok = matches!(uri.scheme_str(), Some("http") | Some("https"));
        if !scheme_ok || uri.host().is_none_or(str::is_empty) {
            return Err(WebhookError::Url(self.url.clone()));
        }
        if self.events.is_empty() {
            return Err(WebhookError::NoEvents);
        }
        Ok(())
    }
}

/// The webhook events Pusher defines, named as in its webhook bodies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WebhookEvent {
    ChannelOccupied,
    ChannelVacated,
    MemberAdded,
    MemberRemoved,
    ClientEvent,
    /// A subscriber of a cache channel found nothing cached.
    CacheMiss,
}

impl WebhookEvent {
    /// Every event, in Pusher's documentation order.
    pub const ALL: [WebhookEvent; 6] = [
        WebhookEvent::ChannelOccupied,
        WebhookEvent::ChannelVacated,
        WebhookEvent::MemberAdded,
        WebhookEvent::MemberRemoved,
        WebhookEvent::ClientEvent,
        WebhookEvent::CacheMiss,
    ];

    fn all() -> Vec<WebhookEvent> {
        Self::ALL.to_vec()
    }

    /// The `name` of this event in a webhook body.
    pub fn as_str(self) -> &'static str {
        match self {
            WebhookEvent::ChannelOccupied => "channel_occupied",
            WebhookEvent::ChannelVacated => "channel_vacated",
            WebhookEvent::MemberAdded => "member_added",
            WebhookEvent::MemberRemoved => "member_removed",
            WebhookEvent::ClientEvent => "client_event",
            WebhookEvent::CacheMiss => "cache_miss",
        }
    }
}

/// Accepts `"id": "123"` and `"id": 123`.
fn string_or_integer<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    struct V;
    impl Visitor<'_> for V {
        type Value = String;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a string or an integer")
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<String, E> {
            Ok(v.to_owned())
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<String, E> {
            Ok(v.to_string())
        }
    }
    d.deserialize_any(V)
}

/// Accepts one webhook object or an array of them, keeping serde's own
/// error messages (an untagged enum would replace them with a vague one).
fn one_or_many<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Webhook>, D::Error> {
    struct V;
    impl<'de> Visitor<'de> for V {
        type Value = Vec<Webhook>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a webhook object or an array of them")
        }
        fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
            Webhook::deserialize(de::value::MapAccessDeserializer::new(map)).map(|w| vec![w])
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let mut out = Vec::new();
            while let Some(w) = seq.next_element::<Webhook>()? {
                out.push(w);
            }
            Ok(out)
        }
    }
    d.deserialize_any(V)
}

/// The configured apps, looked up by key (WebSocket side) or id (HTTP API).
#[derive(Debug, Clone, Default)]
pub struct Apps {
    /// By index (an app from a database keeps its index when others go).
    apps: Vec<Option<Arc<App>>>,
    by_key: HashMap<Box<str>, usize>,
    by_id: HashMap<Box<str>, usize>,
}

impl Apps {
    /// Validates `apps`, checks that ids and keys are unique, and numbers
    /// them in order (`index` 0, 1, ...).
    pub fn new(apps: Vec<App>) -> Result<Apps, AppsError> {
        if apps.len() > usize::from(u16::MAX) + 1 {
            return Err(AppsError::TooMany(apps.len()));
        }
        let mut out = Apps::default();
        for (i, mut app) in apps.into_iter().enumerate() {
            let n = i + 1;
            app.validate()
                .map_err(|error| AppsError::App { n, error })?;
            if let Some(&j) = out.by_id.get(app.id.as_str()) {
                return Err(AppsError::Duplicate {
                    n,
                    field: "id",
                    value: app.id,
                    other: j + 1,
                });
            }
            if let Some(&j) = out.by_key.get(app.key.as_str()) {
                return Err(AppsError::Duplicate {
                    n,
                    field: "key",
                    value: app.key,
                    other: j + 1,
                });
            }
            // Bounded by the length check above.
            app.index = i as u16;
            out.put(app);
        }
        Ok(out)
    }

    /// Apps read from a database: each validated on its own (a row that
    /// is not valid, or whose id or key another row has, is left out and
    /// reported, not trusted), each at the index `index_of` gives its id
    /// (`None`: no index is left, it is left out too).
    pub fn from_rows(
        rows: Vec<App>,
        mut index_of: impl FnMut(&str) -> Option<u16>,
    ) -> (Apps, Vec<String>) {
        let mut out = Apps::default();
        let mut problems = Vec::new();
        for mut app in rows {
            if let Err(e) = app.validate() {
                problems.push(format!("app {:?}: {e}", app.id));
                continue;
            }
            if out.by_id.contains_key(app.id.as_str()) || out.by_key.contains_key(app.key.as_str())
            {
                problems.push(format!("app {:?}: its id or key is another app's", app.id));
                continue;
            }
            let Some(index) = index_of(&app.id) else {
                problems.push(format!(
                    "app {:?}: no more apps can be added without a restart",
                    app.id
                ));
                continue;
            };
            app.index = index;
            out.put(app);
        }
        (out, problems)
    }

    fn put(&mut self, app: App) {
        let i = usize::from(app.index);
        if self.apps.len() <= i {
            self.apps.resize(i + 1, None);
        }
        self.by_id.insert(app.id.as_str().into(), i);
        self.by_key.insert(app.key.as_str().into(), i);
        self.apps[i] = Some(Arc::new(app));
    }

    /// The one app of open mode: `app-id` / `app-key` / `app-secret`, with
    /// client events enabled so every feature can be tried at once.
    pub fn open_default() -> Apps {
        let mut app = App::new(DEFAULT_APP_ID, DEFAULT_APP_KEY, DEFAULT_APP_SECRET);
        app.enable_client_messages = true;
        // A valid, unique app cannot fail validation.
        Apps::new(vec![app]).unwrap_or_default()
    }

    /// The app clients connect to as `/app/{key}`.
    pub fn by_key(&self, key: &str) -> Option<&Arc<App>> {
        self.by_key.get(key).and_then(|&i| self.apps[i].as_ref())
    }

    /// The app of HTTP API paths `/apps/{id}/...`.
    pub fn by_id(&self, id: &str) -> Option<&Arc<App>> {
        self.by_id.get(id).and_then(|&i| self.apps[i].as_ref())
    }

    /// The app with this `index`.
    pub fn get(&self, index: u16) -> Option<&Arc<App>> {
        self.apps.get(usize::from(index)).and_then(Option::as_ref)
    }

    /// The 0-based index of `app` (the same as `app.index`).
    pub fn index_of(&self, app: &App) -> u16 {
        app.index
    }

    /// Every app, in index order.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<App>> {
        self.apps.iter().flatten()
    }

    pub fn len(&self) -> usize {
        self.iter().count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Most apps a node serves when they come from a database: each has a
/// namespace, counters and metrics of its own for the process's life.
pub const MAX_DATABASE_APPS: usize = 1024;

/// The apps in force, replaced whole when they come from a database
/// (`DATABASE_URL`) and it changes. An app keeps its index (its channels'
/// namespace) for the process's life, even if it goes and comes back.
#[derive(Debug)]
pub struct AppTable {
    current: std::sync::RwLock<Arc<Apps>>,
    /// Counts replacements: a connection that saw another number looks its
    /// app up again.
    generation: std::sync::atomic::AtomicU64,
    /// Indices given out, by app id.
    indices: std::sync::Mutex<HashMap<String, u16>>,
    /// How many indices there are.
    capacity: usize,
}

impl AppTable {
    /// `apps` (from APPS or APPS_FILE), with room for `capacity` apps in
    /// all.
    pub fn new(apps: Apps, capacity: usize) -> AppTable {
        let indices = apps.iter().map(|a| (a.id.clone(), a.index)).collect();
        AppTable {
            capacity: capacity.max(apps.apps.len()),
            current: std::sync::RwLock::new(Arc::new(apps)),
            generation: std::sync::atomic::AtomicU64::new(0),
            indices: std::sync::Mutex::new(indices),
        }
    }

    /// The apps in force.
    pub fn get(&self) -> Arc<Apps> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::Acquire)
    }

    /// How many apps (indices) the node has room for.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Puts the apps of `rows` in force; returns the rows left out, and
    /// why.
    pub fn replace(&self, rows: Vec<App>) -> Vec<String> {
        let mut indices = self.indices.lock().unwrap_or_else(|e| e.into_inner());
        let capacity = self.capacity;
        let (apps, problems) = Apps::from_rows(rows, |id| {
            if let Some(&i) = indices.get(id) {
                return Some(i);
            }
            let next = indices.len();
            (next < capacity).then(|| {
                indices.insert(id.to_string(), next as u16);
                next as u16
            })
        });
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(apps);
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        problems
    }

    /// Puts the apps of a database's rows in force, each a JSON object as
    /// an app of `APPS` is; returns the rows left out, and why.
    pub fn replace_json(&self, rows: &[String]) -> Vec<String> {
        let mut problems = Vec::new();
        let mut apps = Vec::with_capacity(rows.len());
        for row in rows {
            match serde_json::from_str::<App>(row) {
                Ok(app) => apps.push(app),
                Err(e) => problems.push(format!("a row: {e}")),
            }
        }
        problems.extend(self.replace(apps));
        problems
    }

    /// Every index's app id ("" for one not given out), for the metrics.
    pub fn names(&self) -> Vec<String> {
        let indices = self.indices.lock().unwrap_or_else(|e| e.into_inner());
        let mut names = vec![String::new(); indices.len()];
        for (id, &i) in indices.iter() {
            names[usize::from(i)] = id.clone();
        }
        names
    }
}

/// Builds the app list from the `APPS` variable or the contents of
/// `APPS_FILE` (each a JSON array of apps). With neither, open mode gets the
/// one default app ([`Apps::open_default`]) and any other mode no app.
/// Errors are one line naming the source and the app, for example
/// `APPS: app 2: missing field `secret``.
pub fn load(
    apps_json: Option<&str>,
    apps_file_contents: Option<&str>,
    open_mode: bool,
) -> Result<Apps, AppsError> {
    let within = |source_name| {
        move |e| AppsError::In {
            source_name,
            error: Box::new(e),
        }
    };
    match (apps_json, apps_file_contents) {
        (Some(_), Some(_)) => Err(AppsError::BothSources),
        (Some(text), None) => parse_list(text).map_err(within("APPS")),
        (None, Some(text)) => parse_list(text).map_err(within("APPS_FILE")),
        (None, None) if open_mode => Ok(Apps::open_default()),
        (None, None) => Ok(Apps::default()),
    }
}

/// Parses a JSON array of apps, reporting errors per app with the position
/// in the whole text when it spans several lines.
fn parse_list(text: &str) -> Result<Apps, AppsError> {
    let items: Vec<&RawValue> = serde_json::from_str(text).map_err(|e| {
        if e.is_data() {
            AppsError::NotArray
        } else {
            AppsError::NotJson(e.to_string())
        }
    })?;
    let multiline = text.contains('\n');
    let mut apps = Vec::with_capacity(items.len());
    for (i, raw) in items.iter().enumerate() {
        let app = serde_json::from_str::<App>(raw.get()).map_err(|e| {
            let base = text_offset(text, raw.get());
            AppsError::Parse {
                n: i + 1,
                at: (multiline && e.line() > 0)
                    .then(|| absolute_position(text, base, e.line(), e.column())),
                message: strip_position(&e),
            }
        })?;
        apps.push(app);
    }
    Apps::new(apps)
}

/// serde_json appends " at line L column C" (relative to what it parsed);
/// the caller reports a position relative to the whole text instead.
fn strip_position(e: &serde_json::Error) -> String {
    let msg = e.to_string();
    let suffix = format!(" at line {} column {}", e.line(), e.column());
    msg.strip_suffix(&suffix).map(str::to_owned).unwrap_or(msg)
}

/// Byte offset of `inner` (a slice of `outer`) within `outer`.
fn text_offset(outer: &str, inner: &str) -> usize {
    (inner.as_ptr() as usize).saturating_sub(outer.as_ptr() as usize)
}

/// Turns a 1-based (line, column) inside the slice starting at `base` into
/// a (line, column) of the whole text.
fn absolute_position(text: &str, base: usize, line: usize, column: usize) -> (usize, usize) {
    let before = &text[..base.min(text.len())];
    let base_line = before.matches('\n').count() + 1;
    let base_column = before.len() - before.rfind('\n').map_or(0, |p| p + 1);
    if line <= 1 {
        (base_line, base_column + column)
    } else {
        (base_line + line - 1, column)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_full_app() {
        let apps = load(
            Some(r#"[{"id":"1","key":"k","secret":"s"},
                     {"id":2,"key":"k2","secret":"s2","enabled":false,
                      "enable_client_messages":true,"max_connections":100,
                      "max_client_events_per_second":5,"max_event_payload_in_kb":100,
                      "webhooks":[{"url":"https://example.com/hook","events":["member_added","client_event"]},
                                  {"url":"http://127.0.0.1:9000/"}]}]"#),
            None,
            false,
        )
        .unwrap();
        assert_eq!(apps.len(), 2);
        let a = apps.by_key("k").unwrap();
        assert_eq!((a.id.as_str(), a.index), ("1", 0));
        assert!(a.enabled && !a.enable_client_messages);
        assert_eq!(a.max_connections, None);
        assert_eq!(a.max_client_events_per_second, 10);
        assert_eq!(a.max_event_bytes(), 10 * 1024);
        assert!(a.webhooks.is_empty());
        assert!(!a.wants_webhook(WebhookEvent::ChannelOccupied));

        let b = apps.by_id("2").unwrap();
        assert_eq!(b.key, "k2");
        assert_eq!(apps.index_of(b), 1);
        assert!(Arc::ptr_eq(apps.get(1).unwrap(), b));
        assert!(!b.enabled && b.enable_client_messages);
        assert_eq!(b.max_connections, Some(100));
        assert_eq!(b.max_client_events_per_second, 5);
        assert_eq!(b.max_event_bytes(), 100 * 1024);
        assert_eq!(
            b.webhooks[0].events,
            vec![WebhookEvent::MemberAdded, WebhookEvent::ClientEvent]
        );
        assert_eq!(b.webhooks[1].events, WebhookEvent::ALL.to_vec());
        assert!(b.webhooks[0].wants(WebhookEvent::ClientEvent));
        assert!(!b.webhooks[0].wants(WebhookEvent::ChannelVacated));
        assert!(b.wants_webhook(WebhookEvent::ChannelVacated));
        assert_eq!(
            apps.iter().map(|a| a.id.as_str()).collect::<Vec<_>>(),
            ["1", "2"]
        );
        assert!(apps.by_key("nope").is_none() && apps.by_id("k").is_none());
    }

    #[test]
    fn one_webhook_object_is_accepted() {
        let apps = load(
            Some(
                r#"[{"id":"a","key":"b","secret":"c","webhooks":{"url":"http://h/x","events":["channel_vacated"]}}]"#,
            ),
            None,
            false,
        )
        .unwrap();
        let w = &apps.by_id("a").unwrap().webhooks;
        assert_eq!(w.len(), 1);
        assert_eq!(w[0].url, "http://h/x");
        assert_eq!(w[0].events, vec![WebhookEvent::ChannelVacated]);
    }

    #[test]
    fn neither_source_depends_on_open_mode() {
        let open = load(None, None, true).unwrap();
        assert_eq!(open.len(), 1);
        let a = open.by_key(DEFAULT_APP_KEY).unwrap();
        assert_eq!(
            (a.id.as_str(), a.secret.as_str()),
            (DEFAULT_APP_ID, DEFAULT_APP_SECRET)
        );
        assert!(a.enable_client_messages && a.enabled);
        assert!(load(None, None, false).unwrap().is_empty());
        // A configured list replaces the default app even in open mode.
        let apps = load(Some(r#"[{"id":"x","key":"y","secret":"z"}]"#), None, true).unwrap();
        assert!(apps.by_key(DEFAULT_APP_KEY).is_none());
        assert!(load(None, Some("[]"), true).unwrap().is_empty());
    }

    #[test]
    fn both_sources_is_an_error() {
        let e = load(Some("[]"), Some("[]"), false).unwrap_err().to_string();
        assert!(e.contains("APPS and APPS_FILE"), "{e}");
    }

    fn err(json: &str) -> String {
        load(Some(json), None, false).unwrap_err().to_string()
    }

    #[test]
    fn errors_name_the_source_and_the_app() {
        let e = err(r#"[{"id":"1","key":"k","secret":"s"},{"id":"2","key":"k2"}]"#);
        assert_eq!(e, "APPS: app 2: missing field `secret`");
        let e = load(None, Some(r#"[{"id":"1","key":"k"}]"#), false)
            .unwrap_err()
            .to_string();
        assert_eq!(e, "APPS_FILE: app 1: missing field `secret`");
        let e = err(r#"[{"id":"1","key":"k","secret":"s","enable_client_events":true}]"#);
        assert!(
            e.starts_with("APPS: app 1: unknown field `enable_client_events`"),
            "{e}"
        );
        let e = err(
            r#"[{"id":"1","key":"k","secret":"s","webhooks":[{"url":"http://h","event":[]}]}]"#,
        );
        assert!(e.contains("unknown field `event`"), "{e}");
        let e = err(
            r#"[{"id":"1","key":"k","secret":"s","webhooks":{"url":"http://h","events":["member_joined"]}}]"#,
        );
        assert!(e.contains("unknown variant `member_joined`"), "{e}");
        assert!(err(r#"{"id":"1"}"#).contains("JSON array"));
        assert!(err("[").starts_with("APPS: not valid JSON"));
    }

    #[test]
    fn file_errors_point_at_the_line() {
        let text = "[\n  {\"id\":\"1\",\"key\":\"k\",\"secret\":\"s\"},\n  {\"id\":\"2\",\n   \"key\":\"k2\",\n   \"secret\":\"s\", \"colour\":1}\n]\n";
        let e = load(None, Some(text), false).unwrap_err().to_string();
        assert!(e.starts_with("APPS_FILE: app 2 (line 5, column"), "{e}");
        assert!(e.contains("unknown field `colour`"), "{e}");
    }

    #[test]
    fn validation() {
        let cases = [
            (
                r#"[{"id":"","key":"k","secret":"s"}]"#,
                "\"id\" must not be empty",
            ),
            (
                r#"[{"id":"1","key":"","secret":"s"}]"#,
                "\"key\" must not be empty",
            ),
            (
                r#"[{"id":"1","key":"k","secret":""}]"#,
                "\"secret\" must not be empty",
            ),
            (
                r#"[{"id":"a/b","key":"k","secret":"s"}]"#,
                "\"id\" may only contain",
            ),
            (
                r#"[{"id":"1","key":"k k","secret":"s"}]"#,
                "\"key\" may only contain",
            ),
            (
                r#"[{"id":"1","key":"k","secret":"s","max_client_events_per_second":0}]"#,
                "max_client_events_per_second",
            ),
            (
                r#"[{"id":"1","key":"k","secret":"s","max_event_payload_in_kb":0}]"#,
                "at least 1",
            ),
            (
                r#"[{"id":"1","key":"k","secret":"s","max_connections":0}]"#,
                "\"max_connections\" must be at least 1",
            ),
            (
                r#"[{"id":"1","key":"k","secret":"s","webhooks":[{"url":"ftp://h/x"}]}]"#,
                "app 1: webhook 1: \"url\" must start with http:// or https://",
            ),
            (
                r#"[{"id":"1","key":"k","secret":"s","webhooks":[{"url":"http://h"},{"url":"h/x"}]}]"#,
                "webhook 2:",
            ),
            (
                r#"[{"id":"1","key":"k","secret":"s","webhooks":[{"url":"http://h","events":[]}]}]"#,
                "\"events\" must not be empty",
            ),
            (
                r#"[{"id":"1","key":"k","secret":"s"},{"id":"1","key":"k2","secret":"s"}]"#,
                "app 2: id \"1\" is already used by app 1",
            ),
            (
                r#"[{"id":"1","key":"k","secret":"s"},{"id":"2","key":"k","secret":"s"}]"#,
                "app 2: key \"k\" is already used by app 1",
            ),
            (
                r#"[{"id":true,"key":"k","secret":"s"}]"#,
                "a string or an integer",
            ),
            (
                r#"[{"id":"1","key":"k","secret":"s","enabled":"yes"}]"#,
                "invalid type",
            ),
        ];
        for (json, want) in cases {
            let e = err(json);
            assert!(e.starts_with("APPS: "), "{e}");
            assert!(e.contains(want), "{json}: got {e}, want {want}");
            assert!(!e.contains('\n'), "one line: {e}");
        }
    }

    #[test]
    fn debug_hides_the_secret() {
        let app = App::new("1", "k", "very-secret");
        let shown = format!("{app:?}");
        assert!(!shown.contains("very-secret"), "{shown}");
        assert!(shown.contains("<redacted>"));
    }

    #[test]
    fn apps_from_a_database_keep_their_index_and_leave_out_bad_rows() {
        let t = AppTable::new(Apps::default(), 2);
        let problems = t.replace(vec![
            App::new("a", "ka", "sa"),
            App::new("bad id", "kx", "s"),
            App::new("b", "ka", "sb"),
            App::new("c", "kc", "sc"),
        ]);
        assert_eq!(problems.len(), 2, "{problems:?}");
        let apps = t.get();
        assert_eq!(apps.len(), 2);
        assert_eq!(
            (
                apps.by_key("ka").unwrap().id.as_str(),
                apps.by_id("c").unwrap().index
            ),
            ("a", 1)
        );
        let g = t.generation();
        // "a" goes; "c" keeps index 1; "d" finds no room: the two indices
        // are "a"'s and "c"'s for the process's life.
        let problems = t.replace(vec![App::new("c", "kc", "sc2"), App::new("d", "kd", "sd")]);
        assert!(problems[0].contains("no more apps"), "{problems:?}");
        assert!(t.generation() > g);
        let apps = t.get();
        assert!(apps.by_id("a").is_none() && apps.get(0).is_none());
        assert_eq!(apps.get(1).unwrap().secret, "sc2");
        assert_eq!(t.names(), vec!["a".to_string(), "c".to_string()]);
        // "a" comes back at its index.
        t.replace(vec![App::new("a", "ka", "sa")]);
        assert_eq!(t.get().by_id("a").unwrap().index, 0);
    }
}
