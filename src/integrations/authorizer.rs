//! The authorizer webhook (AUTHORIZER_URL): a backend that approves
//! connections and, with AUTHORIZE, each subscribe, unsubscribe and publish.
//!
//! herald POSTs a JSON description of the action; the answer decides:
//! 200 allows (for `connect`, a JSON body may carry `read`/`write`/`sub`
//! claims that become the connection's permissions), 5xx, a timeout or a
//! failed connection mean the authorizer is down, any other status denies.
//!
//! Each reactor owns one [`Authorizer`]: an HTTP client
//! ([`crate::transport::http1::client`]) whose keep-alive pool belongs to that reactor,
//! so a check is an async request on the reactor's own event loop, never a
//! blocking call, and checks of different connections run concurrently.
//! A check has no side effects, so one that meets a pooled connection the
//! server has just closed is retried on a fresh one within the same
//! timeout. Request bodies and the reading of answers are pure functions,
//! tested below.

use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::Deserialize;

use prometheus_client::metrics::histogram::Histogram;

use crate::auth::Claims;
use crate::config::{Actions, Config};
use crate::transport::http1::client::{Client, Error as HttpError, Target};

/// An action sent for approval.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Connect,
    Subscribe,
    Unsubscribe,
    Publish,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Connect => "connect",
            Action::Subscribe => "subscribe",
            Action::Unsubscribe => "unsubscribe",
            Action::Publish => "publish",
        }
    }
}

/// What the authorizer answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// 200, with the response body.
    Allow(Bytes),
    /// A status other than 200 and 5xx.
    Deny(u16),
    /// 5xx, timeout, or no connection: try again later.
    Unavailable(String),
}

impl Decision {
    /// The metric label of this outcome.
    pub fn label(&self) -> &'static str {
        match self {
            Decision::Allow(_) => "allow",
            Decision::Deny(_) => "deny",
            Decision::Unavailable(_) => "unavailable",
        }
    }
}

/// Classifies an HTTP status (the body matters only for 200).
pub fn decide(status: u16, body: Bytes) -> Decision {
    match status {
        200 => Decision::Allow(body),
        500..=599 => Decision::Unavailable(format!("authorizer answered {status}")),
        _ => Decision::Deny(status),
    }
}

/// Largest answer read from the authorizer.
const MAX_ANSWER: usize = 64 * 1024;

/// One reactor's client of the authorizer.
pub struct Authorizer {
    client: Client,
    target: Target,
    timeout: Duration,
    actions: Actions,
    pub cache_ttl: Duration,
}

impl Authorizer {
    /// The authorizer of `config`, if AUTHORIZER_URL is set; each request's
    /// duration goes to `latency`.
    pub fn from_config(config: &Config, latency: Option<Histogram>) -> Option<Authorizer> {
        let url = config.authorizer_url.as_deref()?;
        // The URL was validated when the configuration was read.
        let target = Target::parse(url).ok()?;
        Some(Authorizer {
            client: Client::new(MAX_ANSWER, latency),
            target,
            timeout: config.authorizer_timeout,
            actions: config.authorize,
            cache_ttl: config.authorizer_cache_ttl,
        })
    }

    /// Is `action` sent for approval? (`connect` always is.)
    pub fn wants(&self, action: Action) -> bool {
        match action {
            Action::Connect => true,
            Action::Subscribe => self.actions.subscribe,
            Action::Unsubscribe => self.actions.unsubscribe,
            Action::Publish => self.actions.publish,
        }
    }

    /// POSTs `body` and classifies the answer, within AUTHORIZER_TIMEOUT.
    pub async fn ask(&self, body: Vec<u8>) -> Decision {
        let headers = [("content-type", "application/json")];
        let res = self
            .client
            .post(
                &self.target,
                &headers,
                Bytes::from(body),
                self.timeout,
                true,
            )
            .await;
        match res {
            Ok(r) => decide(r.status, r.body),
            Err(HttpError::Timeout(t)) => {
                Decision::Unavailable(format!("authorizer did not answer within {t:?}"))
            }
            Err(e) => Decision::Unavailable(format!("authorizer unreachable: {e}")),
        }
    }
}

/// Per-connection state kept when an authorizer is configured.
#[derive(Debug)]
pub struct ConnAuthz {
    /// The `client` object of action requests, rendered once.
    pub client_json: Box<str>,
    /// Positive decisions still valid (AUTHORIZER_CACHE_TTL).
    cache: Vec<(Action, Box<str>, Instant)>,
}

impl ConnAuthz {
    pub fn new(client_json: Box<str>) -> ConnAuthz {
        ConnAuthz {
            client_json,
            cache: Vec::new(),
        }
    }

    /// Was (`action`, `channel`) allowed less than the TTL ago?
    pub fn cached(&mut self, action: Action, channel: &str, now: Instant) -> bool {
        self.cache.retain(|e| e.2 > now);
        self.cache
            .iter()
            .any(|(a, c, _)| *a == action && &**c == channel)
    }

    /// Remembers an approval until `until`.
    pub fn remember(&mut self, action: Action, channel: &str, until: Instant) {
        self.cache
            .retain(|(a, c, _)| !(*a == action && &**c == channel));
        self.cache.push((action, channel.into(), until));
    }
}

/// Appends `s` as a JSON string.
fn push_str(out: &mut Vec<u8>, s: &str) {
    // Serialising a &str into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, s);
}

/// Appends a JSON object of name -> value pairs; repeated names are joined
/// as HTTP joins them (`, `; `; ` for Cookie).
fn push_map<'a>(out: &mut Vec<u8>, pairs: impl Iterator<Item = (String, &'a str)>) {
    let mut map: Vec<(String, String)> = Vec::new();
    for (k, v) in pairs {
        match map.iter_mut().find(|(n, _)| *n == k) {
            Some((n, joined)) => {
                joined.push_str(if n == "cookie" { "; " } else { ", " });
                joined.push_str(v);
            }
            None => map.push((k, v.to_string())),
        }
    }
    out.push(b'{');
    for (i, (k, v)) in map.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        push_str(out, k);
        out.push(b':');
        push_str(out, v);
    }
    out.push(b'}');
}

/// Appends the query string as a JSON object (repeated keys joined by `,`).
fn push_query(out: &mut Vec<u8>, query: Option<&str>) {
    let pairs: Vec<(String, String)> = form_urlencoded::parse(query.unwrap_or("").as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    push_map(out, pairs.iter().map(|(k, v)| (k.clone(), v.as_str())));
}

/// The body of a `connect` request: the upgrade's headers (names in lower
/// case), query parameters and the peer's address.
pub fn connect_body<'a>(
    headers: impl Iterator<Item = (&'a str, &'a str)>,
    query: Option<&str>,
    peer: &str,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(512);
    out.extend_from_slice(br#"{"command":"connect","args":{"headers":"#);
    push_map(&mut out, headers.map(|(k, v)| (k.to_ascii_lowercase(), v)));
    out.extend_from_slice(br#","query":"#);
    push_query(&mut out, query);
    out.extend_from_slice(br#","remote_addr":"#);
    push_str(&mut out, peer);
    out.extend_from_slice(b"}}");
    out
}

/// The `client` object sent with a connection's actions.
pub fn client_json(sub: Option<&str>, connection_id: &str, query: Option<&str>) -> Box<str> {
    let mut out = Vec::with_capacity(128);
    out.extend_from_slice(br#"{"sub":"#);
    match sub {
        Some(s) => push_str(&mut out, s),
        None => out.extend_from_slice(b"null"),
    }
    out.extend_from_slice(br#","connection_id":"#);
    push_str(&mut out, connection_id);
    out.extend_from_slice(br#","query":"#);
    push_query(&mut out, query);
    out.push(b'}');
    // Built from JSON pieces that are all valid UTF-8.
    String::from_utf8(out).unwrap_or_default().into_boxed_str()
}

/// The `client` object of an HTTP API publish: its headers and address.
pub fn http_client_json<'a>(
    headers: impl Iterator<Item = (&'a str, &'a str)>,
    peer: &str,
) -> String {
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(br#"{"sub":null,"connection_id":null,"headers":"#);
    push_map(&mut out, headers.map(|(k, v)| (k.to_ascii_lowercase(), v)));
    out.extend_from_slice(br#","remote_addr":"#);
    push_str(&mut out, peer);
    out.push(b'}');
    String::from_utf8(out).unwrap_or_default()
}

/// The body of a subscribe, unsubscribe or publish request. `data` is the
/// publish's raw JSON, spliced in as the client sent it.
pub fn action_body(action: Action, channel: &str, data: Option<&str>, client: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(96 + channel.len() + data.map_or(0, str::len) + client.len());
    out.extend_from_slice(br#"{"command":"#);
    push_str(&mut out, action.as_str());
    out.extend_from_slice(br#","args":{"channel":"#);
    push_str(&mut out, channel);
    if let Some(d) = data {
        out.extend_from_slice(br#","data":"#);
        out.extend_from_slice(d.as_bytes());
    }
    out.extend_from_slice(br#"},"client":"#);
    out.extend_from_slice(client.as_bytes());
    out.push(b'}');
    out
}

/// What a 200 answer to `connect` may carry.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ConnectAnswer {
    /// `read`/`write` (and `exp`) given: they replace the token's permissions.
    pub claims: Option<Claims>,
    /// `sub` given: the connection's subject.
    pub sub: Option<String>,
}

#[derive(Deserialize)]
struct RawAnswer {
    #[serde(default)]
    sub: Option<String>,
    #[serde(default)]
    read: Option<Vec<String>>,
    #[serde(default)]
    write: Option<Vec<String>>,
    #[serde(default)]
    exp: Option<u64>,
}

/// An authorizer's answer to `connect` whose claims are ill-typed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("authorizer answer has invalid claims: {0}")]
pub struct AnswerError(String);

/// Reads a 200 answer to `connect`. An empty body, or one that is not a
/// JSON object, carries nothing; an object with ill-typed claims is an
/// error (the backend meant to say something and said it wrong).
pub fn parse_connect_answer(body: &[u8]) -> Result<ConnectAnswer, AnswerError> {
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    if first != Some(&b'{') {
        return Ok(ConnectAnswer::default());
    }
    let raw: RawAnswer = serde_json::from_slice(body).map_err(|e| AnswerError(e.to_string()))?;
    let claims = (raw.read.is_some() || raw.write.is_some()).then(|| Claims {
        sub: raw.sub.clone(),
        read: raw.read.unwrap_or_default(),
        write: raw.write.unwrap_or_default(),
        exp: raw.exp,
    });
    Ok(ConnectAnswer {
        claims,
        sub: raw.sub,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn v(b: &[u8]) -> Value {
        serde_json::from_slice(b).unwrap()
    }

    #[test]
    fn statuses() {
        assert_eq!(
            decide(200, Bytes::from_static(b"x")),
            Decision::Allow(Bytes::from_static(b"x"))
        );
        assert_eq!(decide(204, Bytes::new()), Decision::Deny(204));
        assert_eq!(decide(403, Bytes::new()), Decision::Deny(403));
        assert_eq!(decide(404, Bytes::new()), Decision::Deny(404));
        assert!(matches!(
            decide(500, Bytes::new()),
            Decision::Unavailable(_)
        ));
        assert!(matches!(
            decide(503, Bytes::new()),
            Decision::Unavailable(_)
        ));
    }

    #[test]
    fn connect_body_maps_headers_and_query() {
        let headers = [
            ("Host", "x"),
            ("X-Tag", "a"),
            ("x-tag", "b"),
            ("Cookie", "k=1"),
            ("cookie", "j=2"),
        ];
        let body = connect_body(
            headers.iter().copied(),
            Some("user=ann&room=a%20b"),
            "127.0.0.1:5000",
        );
        assert_eq!(
            v(&body),
            json!({"command":"connect","args":{
                "headers":{"host":"x","x-tag":"a, b","cookie":"k=1; j=2"},
                "query":{"user":"ann","room":"a b"},
                "remote_addr":"127.0.0.1:5000"}})
        );
        let body = connect_body(std::iter::empty(), None, "[::1]:1");
        assert_eq!(v(&body)["args"]["query"], json!({}));
    }

    #[test]
    fn action_bodies() {
        let client = client_json(Some("ann\""), "0.7", Some("a=1"));
        assert_eq!(
            v(client.as_bytes()),
            json!({"sub":"ann\"","connection_id":"0.7","query":{"a":"1"}})
        );
        let b = action_body(Action::Publish, "chat", Some(r#"{"t": [1]}"#), &client);
        assert_eq!(
            v(&b),
            json!({"command":"publish","args":{"channel":"chat","data":{"t":[1]}},
                   "client":{"sub":"ann\"","connection_id":"0.7","query":{"a":"1"}}})
        );
        let b = action_body(
            Action::Subscribe,
            "c",
            None,
            &client_json(None, "1.2", None),
        );
        assert_eq!(
            v(&b),
            json!({"command":"subscribe","args":{"channel":"c"},
                   "client":{"sub":null,"connection_id":"1.2","query":{}}})
        );
    }

    #[test]
    fn connect_answers() {
        assert_eq!(parse_connect_answer(b"").unwrap(), ConnectAnswer::default());
        assert_eq!(
            parse_connect_answer(b"OK").unwrap(),
            ConnectAnswer::default()
        );
        let a = parse_connect_answer(br#"{"sub":"u1"}"#).unwrap();
        assert_eq!(a.claims, None);
        assert_eq!(a.sub.as_deref(), Some("u1"));
        let a =
            parse_connect_answer(br#" {"read":["news"],"write":["chat:*"],"sub":"u2"}"#).unwrap();
        let c = a.claims.unwrap();
        assert_eq!(c.read, vec!["news"]);
        assert_eq!(c.write, vec!["chat:*"]);
        assert_eq!(c.sub.as_deref(), Some("u2"));
        let a = parse_connect_answer(br#"{"read":["a"]}"#).unwrap();
        assert_eq!(a.claims.unwrap().write, Vec::<String>::new());
        assert!(parse_connect_answer(br#"{"read":"news"}"#).is_err());
    }

    #[test]
    fn cache_expires() {
        let mut c = ConnAuthz::new("{}".into());
        let t0 = Instant::now();
        assert!(!c.cached(Action::Publish, "a", t0));
        c.remember(Action::Publish, "a", t0 + Duration::from_secs(5));
        assert!(c.cached(Action::Publish, "a", t0));
        assert!(!c.cached(Action::Subscribe, "a", t0));
        assert!(!c.cached(Action::Publish, "b", t0));
        assert!(!c.cached(Action::Publish, "a", t0 + Duration::from_secs(6)));
    }
}
