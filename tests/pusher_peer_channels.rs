//! Pushi's peer channels (README "Use it as a Pusher server"):
//! `peer-{presence channel}:{user}&{user}[&...]`, which only its users may
//! subscribe to, each a peer (`"peer": true` in its `channel_data`) on that
//! presence channel; client events and API triggers reach them alone.
//! Tested with two and three users, over the Pusher protocol.

mod common;

use common::*;
use serde_json::{json, Value};

const APPS: &str = r#"[{"id":"a1","key":"k1","secret":"s1","enable_client_messages":true}]"#;

struct User {
    c: Client,
    socket_id: String,
}

fn connect(server: &Server) -> User {
    let mut c = Client::connect(server, "/app/k1?protocol=7");
    let hello = c.recv_json();
    let data: Value = serde_json::from_str(hello["data"].as_str().unwrap()).unwrap();
    User {
        c,
        socket_id: data["socket_id"].as_str().unwrap().to_string(),
    }
}

impl User {
    /// Joins presence channel `channel` as `user_id`, a peer or not.
    fn join(&mut self, channel: &str, user_id: &str, peer: bool) {
        let data = match peer {
            true => json!({"user_id": user_id, "user_info": {}, "peer": true}),
            false => json!({"user_id": user_id, "user_info": {}}),
        }
        .to_string();
        let sig = hmac_sha256_hex(
            "s1",
            format!("{}:{channel}:{data}", self.socket_id).as_bytes(),
        );
        self.c.send_json(json!({"event":"pusher:subscribe","data":{
            "channel": channel, "auth": format!("k1:{sig}"), "channel_data": data}}));
        loop {
            let r = self.c.recv_json();
            if r["event"] == "pusher_internal:subscription_succeeded" {
                return;
            }
            assert_eq!(r["event"], "pusher_internal:member_added", "{r}");
        }
    }

    /// Subscribes to `channel` and returns the answer (success or error),
    /// past any member events.
    fn subscribe(&mut self, channel: &str) -> Value {
        self.c
            .send_json(json!({"event":"pusher:subscribe","data":{"channel":channel}}));
        loop {
            let r = self.c.recv_json();
            if r["event"] != "pusher_internal:member_added"
                && r["event"] != "pusher_internal:member_removed"
            {
                return r;
            }
        }
    }

    /// The next event that is not a member event.
    fn next_event(&mut self) -> Value {
        loop {
            let r = self.c.recv_json();
            if !r["event"]
                .as_str()
                .unwrap()
                .starts_with("pusher_internal:member_")
            {
                return r;
            }
        }
    }

    /// Every frame before the answer to a ping.
    fn sync(&mut self) -> Vec<Value> {
        pusher_sync(&mut self.c)
    }
}

fn ok(r: &Value) -> bool {
    r["event"] == "pusher_internal:subscription_succeeded"
}

fn refused(r: &Value, status: u64) -> bool {
    r["event"] == "pusher:subscription_error" && r["data"]["status"] == status
}

#[test]
fn two_peers_share_a_channel_no_one_else_may_join() {
    let server = Server::start(&[
        ("APPS", APPS),
        ("SECRET", "0123456789abcdef0123456789abcdef"),
    ]);
    let (mut a, mut b, mut c, mut d) = (
        connect(&server),
        connect(&server),
        connect(&server),
        connect(&server),
    );
    a.join("presence-room", "alice", true);
    b.join("presence-room", "bob", true);
    c.join("presence-room", "carol", true);
    d.join("presence-room", "dave", false);
    let pair = "peer-presence-room:alice&bob";
    let r = a.subscribe(pair);
    assert!(ok(&r), "{r}");
    let r = b.subscribe(pair);
    assert!(ok(&r), "{r}");
    // Not one of its users, not in ascending order, not a peer, not on the
    // presence channel at all.
    let r = c.subscribe(pair);
    assert!(refused(&r, 403), "{r}");
    let r = a.subscribe("peer-presence-room:bob&alice");
    assert_eq!(r["event"], "pusher:error", "an invalid name: {r}");
    let r = a.subscribe("peer-presence-room:alice&dave");
    assert!(refused(&r, 403), "dave is no peer: {r}");
    let r = d.subscribe("peer-presence-room:alice&dave");
    assert!(refused(&r, 403), "{r}");
    let mut e = connect(&server);
    let r = e.subscribe(pair);
    assert!(refused(&r, 403), "{r}");

    // A client event reaches the other peer only.
    a.c.send_json(json!({"event":"client-hi","channel":pair,"data":{"n":1}}));
    let m = b.next_event();
    assert_eq!(
        (m["event"].as_str(), m["channel"].as_str()),
        (Some("client-hi"), Some(pair)),
        "{m}"
    );
    assert!(
        a.sync().iter().all(|v| v["event"] != "client-hi"),
        "not echoed"
    );
    assert!(
        c.sync().iter().all(|v| v["channel"] != pair),
        "carol got nothing"
    );
    // So does a trigger from the server.
    let body = json!({"name":"note","channel":pair,"data":"from the server"}).to_string();
    let (status, _) = pusher_api(server.addr, ("k1", "s1"), "POST", "/apps/a1/events", &body);
    assert_eq!(status, 200);
    for u in [&mut a, &mut b] {
        let m = u.next_event();
        assert_eq!(
            (m["event"].as_str(), m["data"].as_str()),
            (Some("note"), Some("from the server"))
        );
    }
}

#[test]
fn three_peers_have_a_group_channel_and_pairs_and_lose_them_when_one_leaves() {
    let server = Server::start(&[
        ("APPS", APPS),
        ("SECRET", "0123456789abcdef0123456789abcdef"),
    ]);
    let (mut a, mut b, mut c) = (connect(&server), connect(&server), connect(&server));
    a.join("presence-room", "alice", true);
    b.join("presence-room", "bob", true);
    c.join("presence-room", "carol", true);
    let group = "peer-presence-room:alice&bob&carol";
    for u in [&mut a, &mut b, &mut c] {
        let r = u.subscribe(group);
        assert!(ok(&r), "{r}");
    }
    b.c.send_json(json!({"event":"client-hi","channel":group,"data":"to all"}));
    for u in [&mut a, &mut c] {
        let m = u.next_event();
        assert_eq!(
            (m["channel"].as_str(), m["data"].as_str()),
            (Some(group), Some("to all"))
        );
    }
    // A pair of the three: bob is not in it.
    let pair = "peer-presence-room:alice&carol";
    assert!(ok(&a.subscribe(pair)));
    let r = b.subscribe(pair);
    assert!(refused(&r, 403), "{r}");
    // Carol leaves the presence channel: she is no longer a peer there.
    c.c.send_json(json!({"event":"pusher:unsubscribe","data":{"channel":"presence-room"}}));
    c.sync();
    let r = b.subscribe("peer-presence-room:bob&carol");
    assert!(refused(&r, 403), "{r}");
    // The others still are.
    assert!(ok(&b.subscribe("peer-presence-room:alice&bob")));
}
