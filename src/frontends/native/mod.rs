//! herald's own protocol (docs/protocol.md) and wsify's commands, at `/ws`
//! (and `/`), with the HTTP publish API (`POST /publish`, wsify's
//! `POST /broadcast`).
//!
//! - [`protocol`]: the messages and frames, pure.
//! - [`session`]: what a connection's messages do.
//! - here: who may connect (a token, or the authorizer webhook) and the
//!   HTTP API.

pub mod history;
pub mod personal;
pub mod protocol;
pub mod session;

use std::rc::Rc;
use std::sync::Arc;

use self::protocol::ErrorCode;
use super::endpoint::{Answer, Endpoint, LocalFuture, Request, Upgrade};
use crate::auth::{self, AuthError, Grant};
use crate::integrations::authorizer::{self, Action, ConnAuthz, Decision};
use crate::transport::http1::head::{HttpError, RequestHead};
use crate::worker::{Shared, Worker};

/// The native front-end of one core.
pub struct Native;

impl Native {
    pub fn new(_shared: &Arc<Shared>) -> Native {
        Native
    }
}

impl Endpoint for Native {
    fn serves_upgrade(&self, path: &str) -> bool {
        matches!(path, "/" | "/ws")
    }

    fn upgrade(self: Rc<Self>, up: Upgrade) -> LocalFuture<'static, ()> {
        Box::pin(upgrade(self, up))
    }

    fn serves_http(&self, path: &str) -> bool {
        matches!(path, "/publish" | "/broadcast" | "/history") || personal::is_api_path(path)
    }

    fn http<'a>(&'a self, worker: &'a Worker, req: Request<'a>) -> LocalFuture<'a, Answer> {
        Box::pin(async move {
            if req.head.path() == "/history" {
                if req.head.method() != "GET" {
                    let msg = format!(
                        "method {} not allowed on /history: use GET",
                        req.head.method()
                    );
                    let mut a = json_error(ErrorCode::BadRequest, &msg);
                    a.status = 405;
                    a.headers.push(("Allow", "GET".into()));
                    return a;
                }
                return history::get(worker, req.head, req.peer).await;
            }
            if req.head.method() != "POST" {
                let path = req.head.path();
                let msg = format!(
                    "method {} not allowed on {path}: use POST",
                    req.head.method()
                );
                let mut a = json_error(ErrorCode::BadRequest, &msg);
                a.status = 405;
                a.headers.push(("Allow", "POST".into()));
                a.close = true;
                return a;
            }
            if personal::is_api_path(req.head.path()) {
                return personal::api(worker, req.head, req.body, req.peer).await;
            }
            let wsify = req.head.path() == "/broadcast";
            publish(worker, req.head, req.body, wsify, req.peer).await
        })
    }
}

/// Admits a connection: with AUTHORIZER_URL the webhook decides, else its
/// token does; then MAX_CONNECTIONS.
async fn upgrade(fe: Rc<Native>, up: Upgrade) {
    let worker = up.worker.clone();
    let shared = &worker.shared;
    let admitted = if worker.authorizer.is_some() {
        // Boxed: a webhook call is large, and inline it would enlarge
        // every handshake's task.
        match Box::pin(authorize_connect(&worker, &up.head, &up.peer)).await {
            Ok(pair) => pair,
            Err((reason, err)) => return up.refuse(reason, err).await,
        }
    } else {
        match shared
            .auth
            .authenticate(up.head.header("authorization"), up.head.query())
        {
            Ok(g) => (g, None),
            Err(e) => {
                return up
                    .refuse("unauthorized", HttpError::new(401, e.to_string()))
                    .await
            }
        }
    };
    up.admit(fe, admitted).await
}

/// A refused upgrade: the metric reason and the HTTP error.
type Refusal = (&'static str, HttpError);

/// The permissions of a connection the authorizer is asked about: a token,
/// if one is sent (and SECRET is set), must be valid; then the webhook
/// decides, and the claims of its answer, if any, replace the token's.
async fn authorize_connect(
    worker: &Worker,
    head: &RequestHead,
    peer: &str,
) -> Result<(Arc<Grant>, Option<Box<ConnAuthz>>), Refusal> {
    let shared = &worker.shared;
    let Some(authorizer) = worker.authorizer.as_ref() else {
        return Ok((Grant::open(), None));
    };
    let token_grant = if shared.auth.is_open() {
        None
    } else {
        match auth::find_token(head.header("authorization"), head.query()) {
            Ok(t) => match shared.auth.verify(&t) {
                Ok(g) => Some(g),
                Err(e) => return Err(("unauthorized", HttpError::new(401, e.to_string()))),
            },
            Err(AuthError::Missing) => None,
            Err(e) => return Err(("unauthorized", HttpError::new(401, e.to_string()))),
        }
    };
    let body = authorizer::connect_body(head.headers(), head.query(), peer);
    let decision = authorizer.ask(body).await;
    shared.metrics.authorized("connect", decision.label());
    let answer = match decision {
        Decision::Allow(body) => authorizer::parse_connect_answer(&body).map_err(|e| {
            tracing::warn!(error = %e, "authorizer answer to connect ignored");
            ("authorizer_unavailable", HttpError::new(503, e.to_string()))
        })?,
        Decision::Deny(status) => {
            let msg = format!("not authorized (authorizer answered {status})");
            return Err(("authorizer_denied", HttpError::new(403, msg)));
        }
        Decision::Unavailable(why) => {
            tracing::warn!(peer, error = %why, "authorizer unavailable");
            let msg = "authorizer unavailable, try again later";
            return Err(("authorizer_unavailable", HttpError::new(503, msg)));
        }
    };
    let grant = match (answer.claims, token_grant) {
        (Some(claims), _) => Arc::new(Grant::from_claims(claims)),
        (None, Some(g)) => match answer.sub {
            Some(sub) => Arc::new(Grant {
                sub: Some(sub.into()),
                ..(*g).clone()
            }),
            None => g,
        },
        (None, None) => Arc::new(Grant {
            sub: answer.sub.map(Into::into),
            ..(*Grant::open()).clone()
        }),
    };
    let per_action = [Action::Subscribe, Action::Unsubscribe, Action::Publish];
    let authz = per_action.iter().any(|a| authorizer.wants(*a)).then(|| {
        let client =
            authorizer::client_json(grant.sub.as_deref(), &worker.connection_id(), head.query());
        Box::new(ConnAuthz::new(client))
    });
    Ok((grant, authz))
}

/// A JSON error of the HTTP API: `{"code":..,"message":..}` with its status.
pub fn json_error(code: ErrorCode, message: &str) -> Answer {
    let body = serde_json::json!({ "code": code.as_str(), "message": message });
    Answer::json(code.http_status(), body.to_string().into_bytes())
}

fn accepted() -> Answer {
    Answer::json(202, br#"{"ok":true}"#.to_vec())
}

/// An HTTP request on a server without `SECRET` and with an authorizer:
/// there are no tokens to check, so the authorizer approves the request
/// as it would `action` on `channel` (with the request's headers in
/// `client`); the answer to send instead, if it does not.
async fn authorizer_approves(
    worker: &Worker,
    authorizer: &authorizer::Authorizer,
    head: &RequestHead,
    peer: &str,
    (action, channel, data): (Action, &str, Option<&str>),
) -> Result<(), Answer> {
    let client = authorizer::http_client_json(head.headers(), peer);
    let req = authorizer::action_body(action, channel, data, &client);
    let decision = authorizer.ask(req).await;
    worker
        .shared
        .metrics
        .authorized(action.as_str(), decision.label());
    match decision {
        Decision::Allow(_) => Ok(()),
        Decision::Deny(status) => {
            let msg = format!("not authorized (authorizer answered {status})");
            Err(json_error(ErrorCode::Forbidden, &msg))
        }
        Decision::Unavailable(_) => Err(json_error(
            ErrorCode::Unavailable,
            "authorizer unavailable, try again later",
        )),
    }
}

/// `POST /publish` and `POST /broadcast`: authenticate, parse, publish.
/// With AUTHORIZER_URL and no SECRET there are no tokens to check, so the
/// authorizer approves each request instead (`publish`, with the request's
/// headers in `client`).
async fn publish(
    worker: &Worker,
    head: &RequestHead,
    body: &[u8],
    wsify: bool,
    peer: &str,
) -> Answer {
    let shared = &worker.shared;
    worker.core.stats.messages_in.inc();
    worker.core.stats.bytes_in.add(body.len() as u64);
    if let (Some(authorizer), true) = (&worker.authorizer, shared.auth.is_open()) {
        let p = match protocol::parse_http_publish(body, wsify) {
            Ok(parts) => parts,
            Err(msg) => return json_error(ErrorCode::BadRequest, &msg),
        };
        let what = (Action::Publish, &*p.channel, Some(p.data));
        if let Err(refused) = authorizer_approves(worker, authorizer, head, peer, what).await {
            return refused;
        }
        if worker.core.congested() {
            worker.core.wait_for_space().await;
        }
        return publish_parsed(worker, p).await;
    }
    let grant = match shared
        .auth
        .authenticate(head.header("authorization"), head.query())
    {
        Ok(g) => g,
        Err(e) => return json_error(ErrorCode::Unauthorized, &e.to_string()),
    };
    let p = match protocol::parse_http_publish(body, wsify) {
        Ok(parts) => parts,
        Err(msg) => return json_error(ErrorCode::BadRequest, &msg),
    };
    if !grant.write.allows(&p.channel) {
        let msg = format!("no write permission on channel {}", p.channel);
        return json_error(ErrorCode::Forbidden, &msg);
    }
    publish_parsed(worker, p).await
}

/// Publishes a `POST /publish` body whose sender needs no token (the
/// debug console, behind its admin token).
pub async fn publish_trusted(worker: &Worker, body: &[u8]) -> Answer {
    match protocol::parse_http_publish(body, false) {
        Ok(p) => publish_parsed(worker, p).await,
        Err(msg) => json_error(ErrorCode::BadRequest, &msg),
    }
}

/// Publishes an allowed HTTP publish. On a channel with history the reply
/// waits for the channel's owner: `{"ok":true,"epoch":..,"offset":N}`
/// (protocol.md 1.1); a repeated idempotency key gets the first reply.
async fn publish_parsed(worker: &Worker, p: protocol::HttpPublish<'_>) -> Answer {
    let msg = protocol::message_frame(&p.channel, p.data);
    let key = p.idempotency_key.as_deref().map(Into::into);
    // In a cluster the answer waits for the broker (503 when it is
    // unreachable).
    if worker.core.hub.keeps(0, &p.channel).is_none() && worker.core.hub.broker().is_none() {
        worker.core.publish_with(msg, None, key, None);
        return accepted();
    }
    let (tx, rx) = tokio::sync::oneshot::channel();
    let done: crate::engine::core::Done = Box::new(move |_owner, outcome| {
        let _ = tx.send(outcome.clone());
    });
    worker.core.publish_with(msg, None, key, Some(done));
    match rx.await {
        Ok(outcome) if outcome.unavailable => {
            let msg = "the cluster's broker is unreachable; try again later";
            json_error(ErrorCode::Unavailable, msg)
        }
        Ok(outcome) => match outcome.position {
            Some((epoch, offset)) => {
                // In protocol.md's order; epochs are the server's own hex.
                let body = format!(r#"{{"ok":true,"epoch":"{epoch}","offset":{offset}}}"#);
                Answer::json(202, body.into_bytes())
            }
            None => accepted(),
        },
        // The owner dropped the publish: the server is stopping.
        Err(_) => {
            let body = serde_json::json!({"code":"unavailable","message":"server shutting down"});
            Answer::json(503, body.to_string().into_bytes())
        }
    }
}
