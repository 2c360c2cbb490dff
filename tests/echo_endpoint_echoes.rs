//! protocol.md "Endpoints": `/echo` exists only with ECHO_ENDPOINT=true,
//! and then echoes every text and binary message exactly (fragmented ones
//! as one message, large ones whole) and answers pings with pongs.

mod common;

use common::{Client, Server};
use tungstenite::protocol::frame::coding::{Data, OpCode};
use tungstenite::protocol::frame::Frame;
use tungstenite::Message;

#[test]
fn echo_is_404_unless_enabled() {
    let server = Server::open();
    let refused = Client::try_connect(server.addr, "/echo", &[])
        .err()
        .expect("/echo must not upgrade without ECHO_ENDPOINT");
    assert_eq!(refused.status, 404, "{refused:?}");
    let server = Server::start(&[("ECHO_ENDPOINT", "false")]);
    let refused = Client::try_connect(server.addr, "/echo", &[])
        .err()
        .expect("/echo must not upgrade with ECHO_ENDPOINT=false");
    assert_eq!(refused.status, 404, "{refused:?}");
}

#[test]
fn text_and_binary_messages_are_echoed_exactly() {
    let server = Server::start(&[("ECHO_ENDPOINT", "true")]);
    let mut c = Client::connect(&server, "/echo");
    let texts = [
        "hello",
        "",
        "ünïcödé € 😀",
        // Not interpreted as a request: echoed, not answered with a pong.
        r#"{"op":"ping","id":1}"#,
        "not json at all",
    ];
    for t in texts {
        c.ws.send(Message::text(t)).unwrap();
        match c.recv() {
            Message::Text(got) => assert_eq!(got.as_str(), t),
            other => panic!("text {t:?} expected back, got {other:?}"),
        }
    }
    let all_bytes: Vec<u8> = (0..=255u8).collect();
    for b in [vec![], vec![0u8], all_bytes, vec![0xff; 300]] {
        c.ws.send(Message::binary(b.clone())).unwrap();
        match c.recv() {
            Message::Binary(got) => assert_eq!(&got[..], &b[..]),
            other => panic!("binary of {} bytes expected back, got {other:?}", b.len()),
        }
    }
    // Many in flight at once come back in order.
    for i in 0..100 {
        c.ws.send(Message::text(format!("m{i}"))).unwrap();
    }
    for i in 0..100 {
        match c.recv() {
            Message::Text(got) => assert_eq!(got.as_str(), format!("m{i}")),
            other => panic!("text expected, got {other:?}"),
        }
    }
}

#[test]
fn a_one_mib_binary_message_is_echoed_whole() {
    let server = Server::start(&[
        ("ECHO_ENDPOINT", "true"),
        ("MAX_MESSAGE_SIZE", "16MiB"),
        ("SEND_QUEUE_LIMIT", "64MiB"),
    ]);
    let mut c = Client::connect(&server, "/echo");
    let big: Vec<u8> = (0..1 << 20).map(|i: u32| (i * 31 % 251) as u8).collect();
    c.ws.send(Message::binary(big.clone())).unwrap();
    match c.recv() {
        Message::Binary(got) => {
            assert_eq!(got.len(), big.len());
            assert!(got[..] == big[..], "1 MiB echo differs");
        }
        other => panic!("binary expected, got {other:?}"),
    }
}

#[test]
fn a_fragmented_text_message_is_echoed_as_one_message() {
    let server = Server::start(&[("ECHO_ENDPOINT", "true")]);
    let mut c = Client::connect(&server, "/echo");
    // "é" and "😀" are cut between fragments.
    let whole = "frag-é-😀-end";
    let b = whole.as_bytes();
    let cut1 = whole.find('é').unwrap() + 1;
    let cut2 = whole.find('😀').unwrap() + 2;
    let frames = [
        Frame::message(b[..cut1].to_vec(), OpCode::Data(Data::Text), false),
        Frame::message(b[cut1..cut2].to_vec(), OpCode::Data(Data::Continue), false),
        Frame::message(b[cut2..].to_vec(), OpCode::Data(Data::Continue), true),
    ];
    for f in frames {
        c.ws.write(Message::Frame(f)).unwrap();
    }
    c.ws.flush().unwrap();
    match c.recv() {
        Message::Text(got) => assert_eq!(got.as_str(), whole),
        other => panic!("the whole text expected, got {other:?}"),
    }
    // A fragmented binary message too.
    let frames = [
        Frame::message(vec![1u8, 2], OpCode::Data(Data::Binary), false),
        Frame::message(vec![3u8], OpCode::Data(Data::Continue), true),
    ];
    for f in frames {
        c.ws.write(Message::Frame(f)).unwrap();
    }
    c.ws.flush().unwrap();
    match c.recv() {
        Message::Binary(got) => assert_eq!(&got[..], &[1, 2, 3]),
        other => panic!("the whole binary expected, got {other:?}"),
    }
}

#[test]
fn ping_is_answered_with_pong() {
    let server = Server::start(&[("ECHO_ENDPOINT", "true")]);
    let mut c = Client::connect(&server, "/echo");
    for payload in [&b"echo-ping"[..], b"", &[0xab; 125]] {
        c.ws.send(Message::Ping(payload.to_vec().into())).unwrap();
        match c.ws.read().unwrap() {
            Message::Pong(p) => assert_eq!(&p[..], payload),
            other => panic!("pong expected, got {other:?}"),
        }
    }
    // And the connection still echoes afterwards.
    c.ws.send(Message::text("after")).unwrap();
    match c.recv() {
        Message::Text(got) => assert_eq!(got.as_str(), "after"),
        other => panic!("text expected, got {other:?}"),
    }
}

/// Autobahn's 9.* cases send 16 MiB messages: with MAX_MESSAGE_SIZE and
/// SEND_QUEUE_LIMIT both raised to 16 MiB, a 16 MiB message (whose echo
/// frame is 16 MiB plus its header) must come back whole.
#[test]
fn sixteen_mebibyte_message_is_echoed_with_limits_of_sixteen_mebibytes() {
    let server = Server::start(&[
        ("ECHO_ENDPOINT", "true"),
        ("MAX_MESSAGE_SIZE", "16MiB"),
        ("SEND_QUEUE_LIMIT", "16MiB"),
    ]);
    let mut c = Client::connect(&server, "/echo");
    let payload: Vec<u8> = (0..16 * 1024 * 1024).map(|i| (i % 251) as u8).collect();
    c.ws.send(tungstenite::Message::binary(payload.clone()))
        .unwrap();
    match c.recv() {
        tungstenite::Message::Binary(got) => assert!(got[..] == payload[..], "echo differs"),
        other => panic!("binary echo expected, got {other:?}"),
    }
}
