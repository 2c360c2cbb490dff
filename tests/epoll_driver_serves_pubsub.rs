//! The epoll fallback (IO_DRIVER=epoll, also taken where io_uring cannot be
//! set up) runs the same reactors: delivery across cores, a slow consumer
//! and a large echo all work on it.

mod common;

use common::{Client, Server};
use serde_json::json;

#[test]
fn pubsub_works_on_the_epoll_driver() {
    let server = Server::start(&[("IO_DRIVER", "epoll"), ("ECHO_ENDPOINT", "true")]);
    assert!(
        server.log().contains("driver=\"epoll\""),
        "log: {}",
        server.log()
    );
    let mut subs: Vec<Client> = (0..20).map(|_| Client::connect(&server, "/ws")).collect();
    for s in subs.iter_mut() {
        s.subscribe("e");
    }
    let mut publisher = Client::connect(&server, "/ws");
    for i in 0..200 {
        publisher.send_json(json!({"op":"publish","channel":"e","data":i}));
    }
    for s in subs.iter_mut() {
        for i in 0..200 {
            assert_eq!(s.recv_json()["data"], i);
        }
    }
    let mut echo = Client::connect(&server, "/echo");
    let payload = vec![7u8; 60_000];
    echo.ws
        .send(tungstenite::Message::binary(payload.clone()))
        .unwrap();
    match echo.recv() {
        tungstenite::Message::Binary(b) => assert_eq!(&b[..], &payload[..]),
        other => panic!("binary echo expected, got {other:?}"),
    }
}

#[test]
fn io_uring_is_the_default_where_available() {
    let server = Server::open();
    let log = server.log();
    assert!(
        log.contains("driver=\"io_uring\"") || log.contains("io_uring is not available"),
        "log: {log}"
    );
}
