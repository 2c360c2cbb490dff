//! protocol.md "Messages": subscribe, publish (sender excluded, data byte
//! for byte, ack only with id), unsubscribe, ping, binary frames.

mod common;

use common::{Client, Server};
use serde_json::json;
use tungstenite::Message;

#[test]
fn publish_reaches_other_subscribers_but_not_the_publisher() {
    let server = Server::open();
    let mut a = Client::connect(&server, "/ws");
    let mut b = Client::connect(&server, "/");
    a.subscribe("news");
    b.subscribe("news");
    a.publish("news", json!({"from":"a"}));
    assert_eq!(
        b.recv_json(),
        json!({"op":"message","channel":"news","data":{"from":"a"}})
    );
    b.publish("news", json!("from b"));
    // a receives b's message first: its own publish was never echoed.
    assert_eq!(
        a.recv_json(),
        json!({"op":"message","channel":"news","data":"from b"})
    );
}

#[test]
fn data_is_passed_through_byte_for_byte() {
    let server = Server::open();
    let mut a = Client::connect(&server, "/ws");
    let mut b = Client::connect(&server, "/ws");
    b.subscribe("raw");
    let data = r#"{ "z": 1.50, "a" : [true,null], "s":"\u00e9" }"#;
    a.send_text(&format!(
        r#"{{"op":"publish","channel":"raw","data":{data}}}"#
    ));
    let Message::Text(t) = b.recv() else {
        panic!("text expected")
    };
    assert_eq!(
        t.as_str(),
        format!(r#"{{"op":"message","channel":"raw","data":{data}}}"#)
    );
    a.send_text(r#"{"op":"publish","channel":"raw","data":null}"#);
    assert_eq!(
        b.recv_json(),
        json!({"op":"message","channel":"raw","data":null})
    );
}

#[test]
fn ack_only_when_id_present_and_ids_echo_verbatim() {
    let server = Server::open();
    let mut a = Client::connect(&server, "/ws");
    a.send_text(r#"{"op":"publish","channel":"x","data":1}"#);
    a.send_text(r#"{"op":"publish","channel":"x","data":1,"id":42}"#);
    a.send_text(r#"{"op":"ping","id":"p-1"}"#);
    a.send_text(r#"{"op":"ping"}"#);
    assert_eq!(a.recv_json(), json!({"op":"ack","id":42}));
    assert_eq!(a.recv_json(), json!({"op":"pong","id":"p-1"}));
    let v = a.recv_json();
    assert_eq!(v, json!({"op":"pong"}));
    assert!(v.get("id").is_none());
}

#[test]
fn double_subscribe_delivers_once_and_unsubscribe_stops_delivery() {
    let server = Server::open();
    let mut a = Client::connect(&server, "/ws");
    let mut b = Client::connect(&server, "/ws");
    b.subscribe("c");
    b.subscribe("c");
    a.publish("c", json!(1));
    a.publish("c", json!(2));
    assert_eq!(b.recv_json()["data"], 1);
    assert_eq!(b.recv_json()["data"], 2);
    b.send_json(json!({"op":"unsubscribe","channel":"c","id":9}));
    assert_eq!(
        b.recv_json(),
        json!({"op":"unsubscribed","channel":"c","id":9})
    );
    a.publish("c", json!(3));
    // Nothing for b between its unsubscribe and this pong.
    assert!(b.sync().is_empty());
}

#[test]
fn messages_from_one_publisher_arrive_in_order() {
    let server = Server::open();
    let mut subs: Vec<Client> = (0..4).map(|_| Client::connect(&server, "/ws")).collect();
    for s in subs.iter_mut() {
        s.subscribe("seq");
    }
    let mut publisher = Client::connect(&server, "/ws");
    for i in 0..500 {
        publisher.send_json(json!({"op":"publish","channel":"seq","data":i}));
    }
    for s in subs.iter_mut() {
        for i in 0..500 {
            assert_eq!(s.recv_json()["data"], i);
        }
    }
}

#[test]
fn binary_publish_is_delivered_in_the_same_layout() {
    let server = Server::open();
    let mut a = Client::connect(&server, "/ws");
    let mut b = Client::connect(&server, "/ws");
    b.subscribe("bin");
    let mut frame = vec![3u8];
    frame.extend_from_slice(b"bin");
    frame.extend_from_slice(&[0, 159, 146, 150, 255]);
    a.ws.send(Message::binary(frame.clone())).unwrap();
    match b.recv() {
        Message::Binary(got) => assert_eq!(&got[..], &frame[..]),
        other => panic!("binary expected, got {other:?}"),
    }
}

#[test]
fn websocket_ping_gets_pong_with_same_payload() {
    let server = Server::open();
    let mut a = Client::connect(&server, "/ws");
    a.ws.send(Message::Ping(b"hello".to_vec().into())).unwrap();
    match a.ws.read().unwrap() {
        Message::Pong(p) => assert_eq!(&p[..], b"hello"),
        other => panic!("pong expected, got {other:?}"),
    }
}

#[test]
fn write_coalescing_delivers_everything_in_order() {
    // WRITE_DELAY: deliveries wait up to 2 ms to share one write per
    // connection; nothing is lost or reordered, and replies do not wait.
    let server = Server::start(&[("WRITE_DELAY", "2ms")]);
    let mut subs: Vec<Client> = (0..4).map(|_| Client::connect(&server, "/ws")).collect();
    for s in &mut subs {
        s.subscribe("burst");
    }
    let mut publisher = Client::connect(&server, "/ws");
    for i in 0..300 {
        publisher.send_text(&format!(
            r#"{{"op":"publish","channel":"burst","data":{i}}}"#
        ));
    }
    assert!(
        publisher.sync().is_empty(),
        "no reply to publishes without id"
    );
    for s in &mut subs {
        for i in 0..300 {
            assert_eq!(
                s.recv_json(),
                json!({"op":"message","channel":"burst","data":i})
            );
        }
    }
}
