//! wspubsub's endpoints (protocol.md "wspubsub endpoints"): a connection
//! bound to one topic for its whole life, raw payloads both ways.
//!
//! - `GET /ws/sub/{domain}/{topic}` subscribes to channel
//!   `{domain}:{topic}`; every message published there reaches it as the
//!   bare payload (text or binary), and what it sends is ignored.
//! - `GET /ws/pub/{apikey}/{domain}/{topic}` publishes each text or binary
//!   message it sends to that channel, as it is. The upgrade is refused
//!   with 403 unless `{apikey}` is an active key of `{domain}`
//!   ([`keys`]); a key deactivated later closes its publishers (1008) at
//!   their next message.
//!
//! The endpoints exist only when `API_KEYS_FILE` is set, and subscribers
//! are admitted only to domains the file names: the channels of
//! herald's other clients stay out of reach of an unauthenticated path.
//! The channels are herald's own (namespace 0): a native client with the
//! permission may subscribe or publish to `{domain}:{topic}` too; what it
//! publishes reaches wspubsub subscribers through [`encode`] (a JSON
//! string as its text, other JSON as its text, bytes as bytes), and what
//! a wspubsub publisher sends reaches native subscribers as protocol.md
//! says (text as a JSON string unless it is JSON, bytes as a binary frame).

use std::convert::Infallible;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::endpoint::{Endpoint, LocalFuture, Upgrade};
use crate::engine::core::Subscribed;
use crate::engine::message::{Encoding, Message, PayloadKind};
use crate::engine::shard::SubscribeError;
use crate::session::{Cx, Flow, FrontEnd};
use crate::transport::http1::head::HttpError;
use crate::transport::ws::frame;

pub mod keys;

use keys::ApiKeys;

/// The raw encoding: a frame holding only the payload.
pub const ENCODING: Encoding = Encoding(2);

/// How often the keys file is checked for changes.
const KEYS_POLL: Duration = Duration::from_secs(1);

/// The node-wide state: the API keys in force.
pub struct WsPubSub {
    keys: Arc<ApiKeys>,
}

impl WsPubSub {
    /// Serves with `keys`, watching their file for changes.
    pub fn start(keys: ApiKeys) -> Arc<WsPubSub> {
        let keys = Arc::new(keys);
        keys.watch(KEYS_POLL);
        Arc::new(WsPubSub { keys })
    }

    /// The keys in force (replaced whole when their source changes).
    pub fn keys(&self) -> &Arc<ApiKeys> {
        &self.keys
    }
}

/// Where a wspubsub path leads.
#[derive(Debug, PartialEq, Eq)]
pub enum Route<'a> {
    Sub {
        domain: &'a str,
        topic: &'a str,
    },
    Pub {
        key: &'a str,
        domain: &'a str,
        topic: &'a str,
    },
}

impl Route<'_> {
    fn domain(&self) -> &str {
        match self {
            Route::Sub { domain, .. } | Route::Pub { domain, .. } => domain,
        }
    }

    /// The channel: `{domain}:{topic}`.
    fn channel(&self) -> String {
        match self {
            Route::Sub { domain, topic } | Route::Pub { domain, topic, .. } => {
                format!("{domain}:{topic}")
            }
        }
    }
}

/// Parses `/ws/sub/{domain}/{topic}` or `/ws/pub/{apikey}/{domain}/{topic}`
/// (the path without its query). `Err` says what is wrong, for a 400.
pub fn route(path: &str) -> Result<Route<'_>, &'static str> {
    let (publisher, rest) = if let Some(r) = path.strip_prefix("/ws/sub/") {
        (false, r)
    } else if let Some(r) = path.strip_prefix("/ws/pub/") {
        (true, r)
    } else {
        return Err("not a wspubsub path");
    };
    let parts: Vec<&str> = rest.split('/').collect();
    let route = match (publisher, parts.as_slice()) {
        (false, [domain, topic]) => Route::Sub { domain, topic },
        (true, [key, domain, topic]) => {
            if key.is_empty() {
                return Err("empty apikey");
            }
            Route::Pub { key, domain, topic }
        }
        (false, _) => return Err("expected /ws/sub/{domain}/{topic}"),
        (true, _) => return Err("expected /ws/pub/{apikey}/{domain}/{topic}"),
    };
    if !keys::valid_domain(route.domain()) {
        return Err("invalid domain: 1 to 64 bytes of A-Z a-z 0-9 _ - = @ , . ;");
    }
    let topic = match &route {
        Route::Sub { topic, .. } | Route::Pub { topic, .. } => *topic,
    };
    let ok = !topic.is_empty()
        && route.domain().len() + 1 + topic.len() <= crate::engine::message::MAX_CHANNEL_LEN
        && topic
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-=@,.;:".contains(&b));
    if !ok {
        return Err(
            "invalid topic: A-Z a-z 0-9 _ - = @ , . ; : (domain and topic at most 254 bytes)",
        );
    }
    Ok(route)
}

/// The raw frame of a message published in another encoding: a JSON
/// string's text, any other JSON value's text, text as it is, bytes as a
/// binary frame.
pub fn encode(m: &Message) -> Option<Bytes> {
    let payload = m.payload();
    Some(match m.kind() {
        PayloadKind::Json => match serde_json::from_slice::<String>(payload) {
            Ok(text) => frame::text(text.as_bytes()),
            Err(_) => frame::text(payload),
        },
        PayloadKind::Text => frame::text(payload),
        PayloadKind::Binary => frame::binary(payload),
    })
}

/// One core's wspubsub endpoint.
pub struct WsPubSubEndpoint {
    shared: Arc<WsPubSub>,
    sub: Rc<Subscriber>,
    publ: Rc<Publisher>,
}

impl WsPubSubEndpoint {
    pub fn new(shared: Arc<WsPubSub>) -> WsPubSubEndpoint {
        WsPubSubEndpoint {
            sub: Rc::new(Subscriber),
            publ: Rc::new(Publisher {
                keys: shared.keys.clone(),
            }),
            shared,
        }
    }
}

impl Endpoint for WsPubSubEndpoint {
    fn serves_upgrade(&self, path: &str) -> bool {
        path.starts_with("/ws/sub/") || path.starts_with("/ws/pub/")
    }

    fn upgrade(self: Rc<Self>, up: Upgrade) -> LocalFuture<'static, ()> {
        Box::pin(async move {
            let path = up.head.path().to_string();
            let route = match route(&path) {
                Ok(r) => r,
                Err(e) => return up.refuse("bad_request", HttpError::new(400, e)).await,
            };
            let keys = self.shared.keys.get();
            let channel = Bytes::from(route.channel());
            match route {
                Route::Sub { domain, .. } => {
                    if !keys.knows(domain) {
                        let err = HttpError::new(404, format!("unknown domain {domain}"));
                        return up.refuse("not_found", err).await;
                    }
                    up.admit(self.sub.clone(), channel).await
                }
                Route::Pub { key, domain, .. } => {
                    let generation = self.shared.keys.generation();
                    if !keys.allows(domain, key) {
                        let err = HttpError::new(403, "apikey is not an active key of this domain");
                        return up.refuse("forbidden", err).await;
                    }
                    let conn = PubConn {
                        domain_len: domain.len() as u8,
                        key: key.into(),
                        channel,
                        generation,
                    };
                    up.admit(self.publ.clone(), conn).await
                }
            }
        })
    }
}

/// The front-end of `/ws/sub/` connections.
pub struct Subscriber;

impl FrontEnd for Subscriber {
    const ENCODING: Encoding = ENCODING;
    const SHUTDOWN_CODE: u16 = 1001;
    type Conn = ();
    /// The channel.
    type Admitted = Bytes;
    type Wait = Infallible;

    fn open(&self, cx: &Cx<'_>, channel: Bytes) {
        // The channel was validated with the path.
        let channel = std::str::from_utf8(&channel).unwrap_or("");
        let key = cx.key;
        let then: Subscribed = Box::new(move |core, result| {
            let why = match result {
                Ok(()) => return,
                // Only MAX_SUBSCRIPTIONS=0 refuses a first subscription.
                Err(SubscribeError::TooMany(_)) => (1008, "subscriptions not allowed"),
                Err(SubscribeError::Unavailable) => (1013, "cluster unavailable"),
            };
            let mut shard = core.shard.borrow_mut();
            shard.close(key, Some(why.0), why.1, false);
        });
        cx.worker.core.subscribe_then(cx.key, channel, then);
    }

    /// Subscribers' messages are ignored, as in wspubsub.
    fn on_text(&self, _cx: &Cx<'_>, _: &mut (), _text: &[u8]) -> Flow<Infallible> {
        Flow::Continue
    }

    fn on_binary(&self, _cx: &Cx<'_>, _: &mut (), _data: &[u8]) -> Flow<Infallible> {
        Flow::Continue
    }

    async fn resume<'a>(&'a self, _cx: Cx<'a>, _: &'a mut (), wait: Infallible) {
        match wait {}
    }

    fn close(&self, _cx: &Cx<'_>, _: &mut ()) {}
}

/// The front-end of `/ws/pub/` connections.
pub struct Publisher {
    keys: Arc<ApiKeys>,
}

/// A publisher's state.
pub struct PubConn {
    /// The channel, shared by every message it publishes.
    channel: Bytes,
    /// The domain is `channel[..domain_len]`.
    domain_len: u8,
    key: Box<str>,
    /// The keys' generation its key was last checked in.
    generation: u64,
}

impl Publisher {
    /// Is the connection's key still active? Checked again only after a
    /// reload of the keys.
    fn still_allowed(&self, conn: &mut PubConn) -> bool {
        let generation = self.keys.generation();
        if generation == conn.generation {
            return true;
        }
        conn.generation = generation;
        let domain =
            std::str::from_utf8(&conn.channel[..usize::from(conn.domain_len)]).unwrap_or("");
        self.keys.get().allows(domain, &conn.key)
    }

    fn publish(
        &self,
        cx: &Cx<'_>,
        conn: &mut PubConn,
        data: &[u8],
        kind: PayloadKind,
    ) -> Flow<Infallible> {
        let core = &cx.worker.core;
        if !self.still_allowed(conn) {
            let mut shard = core.shard.borrow_mut();
            shard.close(cx.key, Some(1008), "apikey no longer active", false);
            return Flow::Continue;
        }
        if !core.shard.borrow_mut().take_publish_token(cx.key) {
            // wspubsub has no error frames: over PUBLISH_RATE a message is
            // dropped, and counted (herald_rate_limited_total).
            return Flow::Continue;
        }
        let wire = match kind {
            PayloadKind::Binary => frame::binary(data),
            _ => frame::text(data),
        };
        let payload = wire.len() - data.len()..wire.len();
        let msg = Message::with_channel(wire, ENCODING, conn.channel.clone(), payload, kind, 0);
        // The session checked the bus for room before decoding this.
        core.publish(msg, None);
        Flow::Continue
    }
}

impl FrontEnd for Publisher {
    const ENCODING: Encoding = ENCODING;
    const SHUTDOWN_CODE: u16 = 1001;
    type Conn = PubConn;
    type Admitted = PubConn;
    type Wait = Infallible;

    fn open(&self, _cx: &Cx<'_>, conn: PubConn) -> PubConn {
        conn
    }

    fn on_text(&self, cx: &Cx<'_>, conn: &mut PubConn, text: &[u8]) -> Flow<Infallible> {
        // Text that is JSON is marked so, for native subscribers' `data`.
        let kind = if serde_json::from_slice::<serde::de::IgnoredAny>(text).is_ok() {
            PayloadKind::Json
        } else {
            PayloadKind::Text
        };
        self.publish(cx, conn, text, kind)
    }

    fn on_binary(&self, cx: &Cx<'_>, conn: &mut PubConn, data: &[u8]) -> Flow<Infallible> {
        self.publish(cx, conn, data, PayloadKind::Binary)
    }

    async fn resume<'a>(&'a self, _cx: Cx<'a>, _: &'a mut PubConn, wait: Infallible) {
        match wait {}
    }

    fn close(&self, _cx: &Cx<'_>, _: &mut PubConn) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        assert_eq!(
            route("/ws/sub/test/room"),
            Ok(Route::Sub {
                domain: "test",
                topic: "room"
            })
        );
        assert_eq!(
            route("/ws/pub/f47ac10b-58cc/test/room:1"),
            Ok(Route::Pub {
                key: "f47ac10b-58cc",
                domain: "test",
                topic: "room:1"
            })
        );
        assert_eq!(route("/ws/sub/test/room").unwrap().channel(), "test:room");
        for bad in [
            "/ws/sub/test",
            "/ws/sub/test/",
            "/ws/sub//room",
            "/ws/sub/a:b/room",
            "/ws/sub/test/ro om",
            "/ws/sub/test/room/extra",
            "/ws/sub/test/r%20m",
            "/ws/pub/test/room",
            "/ws/pub//test/room",
            "/ws/pub/k/test/room/x",
            "/ws/other/a/b",
        ] {
            assert!(route(bad).is_err(), "{bad} should be refused");
        }
        let long = format!("/ws/sub/d/{}", "t".repeat(253));
        assert!(route(&long).is_ok(), "d: + 253 = 255 bytes");
        let long = format!("/ws/sub/d/{}", "t".repeat(254));
        assert!(route(&long).is_err(), "256 bytes");
    }

    fn raw_message(data: &[u8], kind: PayloadKind) -> Message {
        let wire = match kind {
            PayloadKind::Binary => frame::binary(data),
            _ => frame::text(data),
        };
        let payload = wire.len() - data.len()..wire.len();
        Message::with_channel(wire, ENCODING, Bytes::from_static(b"d:t"), payload, kind, 0)
    }

    #[test]
    fn native_messages_become_raw_payloads() {
        use crate::frontends::native::protocol::{binary_frame, message_frame};
        let text = |m: &Message| encode(m).unwrap();
        assert_eq!(
            &text(&message_frame("d:t", r#""hello""#))[..],
            b"\x81\x05hello"
        );
        assert_eq!(
            &text(&message_frame("d:t", r#"{"a":1}"#))[..],
            b"\x81\x07{\"a\":1}"
        );
        assert_eq!(&text(&message_frame("d:t", "42"))[..], b"\x81\x0242");
        assert_eq!(
            &text(&binary_frame("d:t", &[0, 255]))[..],
            b"\x82\x02\x00\xff"
        );
    }

    #[test]
    fn raw_messages_reach_native_subscribers() {
        use crate::frontends::native::protocol;
        let m = raw_message(b"hi there", PayloadKind::Text);
        let f = protocol::encode(&m).unwrap();
        assert_eq!(
            &f[2..],
            br#"{"op":"message","channel":"d:t","data":"hi there"}"#
        );
        let m = raw_message(br#"{"n":1}"#, PayloadKind::Json);
        let f = protocol::encode(&m).unwrap();
        assert_eq!(
            &f[2..],
            br#"{"op":"message","channel":"d:t","data":{"n":1}}"#
        );
        let m = raw_message(&[1, 2, 3], PayloadKind::Binary);
        let f = protocol::encode(&m).unwrap();
        assert_eq!(&f[..], b"\x82\x07\x03d:t\x01\x02\x03");
        // A raw subscriber gets the publisher's own frame.
        assert_eq!(
            &raw_message(b"x", PayloadKind::Text).frame()[..],
            b"\x81\x01x"
        );
    }
}
