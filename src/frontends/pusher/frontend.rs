//! How the Pusher front-end of a core ([`Pusher`]) plugs in: upgrades at
//! `/app/{key}`, the HTTP API at `/apps/{id}/..`, the idle sweep and other
//! cores' requests on the timer, and each connection's messages (handled
//! in [`super::connection`]).

use std::rc::Rc;
use std::sync::Arc;

use super::apps::App;
use super::connection::{self, Pusher, PusherConn};
use super::{api, wire, Control};
use crate::engine::message::Encoding;
use crate::frontends::endpoint::{Answer, Endpoint, LocalFuture, Request, Upgrade};
use crate::session::{Cx, Flow, FrontEnd};
use crate::transport::ws::frame;
use crate::worker::Worker;

/// The app a Pusher connection was admitted to, and its namespace.
pub type Admitted = (Arc<App>, u16);

impl Endpoint for Pusher {
    fn serves_upgrade(&self, path: &str) -> bool {
        path.starts_with("/app/")
    }

    fn upgrade(self: Rc<Self>, up: Upgrade) -> LocalFuture<'static, ()> {
        Box::pin(upgrade(self, up))
    }

    fn serves_http(&self, path: &str) -> bool {
        api::is_api_path(path)
    }

    fn http<'a>(&'a self, worker: &'a Worker, req: Request<'a>) -> LocalFuture<'a, Answer> {
        Box::pin(async move {
            let head = req.head;
            let query = head.query().unwrap_or("");
            let now = crate::clock::unix_secs();
            let (method, path) = (head.method(), head.path());
            if super::personal::is_api_path(path) {
                let (status, content_type, body) =
                    match api::authorize(&self.shared, method, path, query, req.body, now) {
                        Err(refused) => refused,
                        Ok((app, rest)) => {
                            super::personal::api(worker, &app, method, path, rest, req.body).await
                        }
                    };
                return Answer::new(status, content_type, body);
            }
            let (status, content_type, body) = api::handle(
                &self.shared,
                worker,
                head.method(),
                head.path(),
                query,
                req.body,
                now,
            );
            Answer::new(status, content_type, body)
        })
    }

    fn tick(&self, worker: &Worker, now_ms: u64) {
        for c in self.shared.take_controls(self.worker_id) {
            match c {
                Control::Terminate { ns, user_id } => {
                    connection::terminate_user(self, worker, ns, &user_id)
                }
            }
        }
        // The idle sweep, once a second.
        if now_ms.saturating_sub(self.swept.get()) >= 1000 {
            self.swept.set(now_ms);
            connection::sweep(self, worker, now_ms);
        }
    }
}

/// A Pusher client's upgrade (`/app/{key}?protocol=7&...`). Pusher clients
/// learn why they are refused from a `pusher:error` and a close code after
/// the handshake (4001 unknown app, 4003 disabled, 4004 over the app's
/// quota, 4006/4007 protocol version, 4100 over capacity, 4200 shutting
/// down), so those refusals complete the upgrade first.
async fn upgrade(fe: Rc<Pusher>, up: Upgrade) {
    let shared = up.worker.shared.clone();
    let p = fe.shared.clone();
    let path = up.head.path();
    let key = &path["/app/".len()..];
    let version = up.head.query().and_then(|q| {
        form_urlencoded::parse(q.as_bytes())
            .find(|(k, _)| k == "protocol")
            .map(|(_, v)| v.into_owned())
    });
    let app = p.apps.get().by_key(key).cloned();
    let refusal: Option<(u16, String)> = match (&app, version.as_deref()) {
        _ if key.is_empty() || key.contains('/') => {
            Some((4005, format!("no Pusher endpoint at {path}")))
        }
        (None, _) => Some((4001, format!("App key {key} does not exist"))),
        (Some(app), _) if !app.enabled => Some((4003, "App is disabled".into())),
        (_, Some(v)) if v.parse::<u32>().is_err() => {
            Some((4006, format!("Invalid version string format: {v}")))
        }
        (_, Some(v)) if !matches!(v.parse::<u32>(), Ok(5..=7)) => {
            Some((4007, format!("Unsupported protocol version {v}")))
        }
        _ if shared.is_shutting_down() => Some((4200, "Server is shutting down".into())),
        _ => None,
    };
    let admitted = match (refusal, app) {
        (None, Some(app)) => {
            let ns = app.index + 1;
            if !p.admit(&app, ns) {
                Err((4004, "Application is over connection quota".to_string()))
            } else if !shared.try_reserve_connection() {
                p.release(ns);
                Err((4100, "Over capacity".to_string()))
            } else {
                Ok((app, ns))
            }
        }
        (Some(r), _) => Err(r),
        (None, None) => Err((4001, "App key does not exist".to_string())),
    };
    let peer = up.peer.clone();
    let conn = up.accept();
    match admitted {
        // The session's close releases the app's count and the slot.
        Ok(a) => conn.start(fe, a),
        Err((code, msg)) => {
            tracing::debug!(peer, code, msg, "pusher connection refused");
            shared.metrics.reject("pusher");
            let mut out = wire::error(Some(code), &msg).to_vec();
            out.extend_from_slice(&frame::close(Some(code), &msg));
            conn.send_and_close(out).await;
        }
    }
}

impl FrontEnd for Pusher {
    const ENCODING: Encoding = super::ENCODING;
    /// Pusher clients reconnect at once on 4200 ("generic reconnect").
    const SHUTDOWN_CODE: u16 = 4200;
    type Conn = ();
    type Admitted = Admitted;
    type Wait = ();

    fn open(&self, cx: &Cx<'_>, (app, ns): Admitted) {
        let node = self.shared.node_tag();
        let socket_id = super::socket::format(cx.worker.id, cx.key, cx.gen, node);
        let timeout = self.shared.activity_timeout.as_secs() as u32;
        cx.worker
            .core
            .shard
            .borrow_mut()
            .push(cx.key, wire::connection_established(&socket_id, timeout));
        let now = crate::clock::now_ms();
        self.conns.borrow_mut().insert(
            cx.key,
            PusherConn::new(app, ns, socket_id, now, self.shared.apps.generation()),
        );
    }

    fn on_text(&self, cx: &Cx<'_>, _: &mut (), text: &[u8]) -> Flow<()> {
        let now = crate::clock::now_ms();
        connection::handle_text(self, cx.worker, cx.key, text, now);
        Flow::Continue
    }

    fn on_binary(&self, cx: &Cx<'_>, _: &mut (), _data: &[u8]) -> Flow<()> {
        let msg = "binary frames are not part of the Pusher protocol";
        cx.worker
            .core
            .shard
            .borrow_mut()
            .push(cx.key, wire::error(None, msg));
        Flow::Continue
    }

    fn on_activity(&self, cx: &Cx<'_>, _: &mut ()) {
        if let Some(p) = self.conns.borrow_mut().get_mut(&cx.key) {
            p.seen(crate::clock::now_ms());
        }
    }

    fn resume<'a>(
        &'a self,
        _cx: Cx<'a>,
        _conn: &'a mut (),
        _wait: (),
    ) -> impl std::future::Future<Output = ()> + 'a {
        std::future::ready(())
    }

    fn close(&self, cx: &Cx<'_>, _: &mut ()) {
        connection::on_close(self, cx.worker, cx.key);
    }
}
