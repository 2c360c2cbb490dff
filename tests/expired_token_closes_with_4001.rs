//! protocol.md "Authentication", `exp`: a connection whose token expires is
//! closed with 4001 within a second after expiry (not before); a fresh token
//! sent with `auth` keeps it open; `JWT_LEEWAY` admits recently expired tokens.

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{token, unix_now, Client, Server};
use serde_json::json;

fn now_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis()
}

/// Pings `c` every 100 ms until the wall clock passes `until_ms`; every ping
/// must be answered (the connection stays open the whole time).
fn stays_open_until(c: &mut Client, until_ms: u128, what: &str) {
    loop {
        let extra = c.sync();
        assert!(extra.is_empty(), "{what}: unexpected frames {extra:?}");
        if now_ms() > until_ms {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn connection_is_closed_with_4001_shortly_after_exp_and_not_before() {
    let server = Server::with_secret(&[]);
    let exp = unix_now() + 2;
    let mut c = Client::with_token(&server, &token(json!({"read":["*"],"exp":exp})));
    c.subscribe("news");
    assert!(c.sync().is_empty(), "open before expiry");

    let (code, _reason) = c.expect_close();
    let closed_at = now_ms();
    let exp_ms = u128::from(exp) * 1000;
    assert_eq!(code, 4001, "close code on expiry");
    assert!(
        closed_at >= exp_ms,
        "closed {} ms before exp",
        exp_ms - closed_at
    );
    assert!(
        closed_at <= exp_ms + 4000,
        "closed {} ms after exp (expected within about a second)",
        closed_at - exp_ms
    );
}

#[test]
fn fresh_token_via_auth_keeps_the_connection_open_past_the_old_exp() {
    let server = Server::with_secret(&[]);
    let exp = unix_now() + 2;
    let short = token(json!({"read":["*"],"write":["*"],"exp":exp}));
    let mut control = Client::with_token(&server, &short);
    let mut renewed = Client::with_token(&server, &short);

    let fresh = token(json!({"read":["*"],"write":["*"],"exp":exp + 60}));
    renewed.send_json(json!({"op":"auth","token":fresh,"id":"renew"}));
    assert_eq!(renewed.recv_json(), json!({"op":"authed","id":"renew"}));
    assert!(
        now_ms() < u128::from(exp) * 1000,
        "the renewal must happen before the old exp for this test to mean anything"
    );

    // The control connection, which did not renew, is closed at exp...
    let (code, _) = control.expect_close();
    assert_eq!(code, 4001, "control connection close code");
    assert!(now_ms() >= u128::from(exp) * 1000);

    // ...while the renewed one still answers well past the old exp (the
    // server has a second after exp to close; give it 1.5 s).
    stays_open_until(
        &mut renewed,
        u128::from(exp) * 1000 + 1500,
        "renewed connection",
    );
    renewed.subscribe("after");
    renewed.publish("after", json!(1));
}

#[test]
fn jwt_leeway_admits_a_recently_expired_token() {
    let expired = token(json!({"read":["*"],"exp": unix_now() - 10}));

    // Without leeway: refused at connect.
    let strict = Server::with_secret(&[]);
    match Client::try_connect(strict.addr, &format!("/ws?auth={expired}"), &[]) {
        Ok(_) => panic!("expired token accepted without JWT_LEEWAY"),
        Err(r) => assert_eq!(r.status, 401, "{r:?}"),
    }

    // With JWT_LEEWAY=60: accepted, and not closed by the expiry timer either.
    let lenient = Server::with_secret(&[("JWT_LEEWAY", "60")]);
    let mut c = Client::with_token(&lenient, &expired);
    c.subscribe("news");
    stays_open_until(&mut c, now_ms() + 1200, "connection within leeway");
}
