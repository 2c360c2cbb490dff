//! `GET /history?channel=..&limit=..[&epoch=..&since=N]` (protocol.md 1.1,
//! "Reading history"): the same object as the WebSocket `history` op,
//! read on the channel's owner core, for a token that may read the
//! channel.

use std::borrow::Cow;

use super::json_error;
use super::protocol::{self, ErrorCode, Position};
use crate::engine::history::{HistoryRead, Since};
use crate::frontends::endpoint::Answer;
use crate::integrations::authorizer::Action;
use crate::transport::http1::head::RequestHead;
use crate::worker::Worker;

/// What the query asks for.
#[derive(Debug, PartialEq, Eq)]
struct Query<'a> {
    channel: Cow<'a, str>,
    limit: Option<usize>,
    since: Option<Since>,
}

fn parse_query(query: Option<&str>) -> Result<Query<'_>, String> {
    let (mut channel, mut limit, mut epoch, mut since) = (None, None, None, None);
    for (k, v) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        match &*k {
            "channel" => channel = Some(v),
            "limit" => limit = Some(v),
            "epoch" => epoch = Some(v),
            "since" => since = Some(v),
            _ => {}
        }
    }
    let channel = channel.ok_or("missing query parameter 'channel'")?;
    protocol::validate_channel(&channel).map_err(|e| e.to_string())?;
    let limit = match limit {
        None => None,
        Some(l) => Some(
            l.parse::<usize>()
                .ok()
                .filter(|n| *n > 0)
                .ok_or("query parameter 'limit' must be a positive integer")?,
        ),
    };
    let since = match (epoch, since) {
        (None, None) => None,
        (Some(epoch), Some(since)) => {
            if epoch.len() > protocol::MAX_EPOCH_LEN {
                return Err("query parameter 'epoch' is longer than 64 bytes".into());
            }
            let offset = since
                .parse::<u64>()
                .map_err(|_| "query parameter 'since' must be a non-negative integer")?;
            Some(Since {
                epoch: epoch.into(),
                offset,
            })
        }
        _ => return Err("query parameters 'epoch' and 'since' go together".into()),
    };
    Ok(Query {
        channel,
        limit,
        since,
    })
}

/// Answers `GET /history`.
pub async fn get(worker: &Worker, head: &RequestHead, peer: &str) -> Answer {
    let q = match parse_query(head.query()) {
        Ok(q) => q,
        Err(msg) => return json_error(ErrorCode::BadRequest, &msg),
    };
    let shared = &worker.shared;
    if let (Some(authorizer), true) = (&worker.authorizer, shared.auth.is_open()) {
        // No tokens to check: the authorizer approves reading, as it
        // would a subscription.
        let what = (Action::Subscribe, &*q.channel, None);
        if let Err(refused) = super::authorizer_approves(worker, authorizer, head, peer, what).await
        {
            return refused;
        }
    } else {
        let grant = match shared
            .auth
            .authenticate(head.header("authorization"), head.query())
        {
            Ok(g) => g,
            Err(e) => return json_error(ErrorCode::Unauthorized, &e.to_string()),
        };
        if !grant.read.allows(&q.channel) {
            let msg = format!("no read permission on channel {}", q.channel);
            return json_error(ErrorCode::Forbidden, &msg);
        }
    }
    if worker.core.hub.keeps(0, &q.channel).is_none() {
        let msg = format!("channel {} keeps no history", q.channel);
        return json_error(ErrorCode::NotFound, &msg);
    }
    let max = worker.core.hub.history.recover_max;
    let limit = q.limit.unwrap_or(max).min(max);
    let (tx, rx) = tokio::sync::oneshot::channel::<HistoryRead>();
    worker.core.read_history(
        &q.channel,
        q.since,
        limit,
        Box::new(move |_core, read: HistoryRead| {
            let _ = tx.send(read);
        }),
    );
    match rx.await {
        Ok(HistoryRead::Page(page)) => {
            let pos = Position {
                epoch: &page.epoch,
                offset: page.top,
            };
            Answer::json(
                200,
                protocol::history(&q.channel, None, pos, &page.messages),
            )
        }
        Ok(HistoryRead::NotKept) => json_error(ErrorCode::NotFound, "channel keeps no history"),
        Ok(HistoryRead::Unavailable) => json_error(
            ErrorCode::Unavailable,
            "the cluster's broker is unreachable; try again later",
        ),
        Err(_) => {
            let body = serde_json::json!({"code":"unavailable","message":"server shutting down"});
            Answer::json(503, body.to_string().into_bytes())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries() {
        let q = parse_query(Some("channel=news&limit=5")).unwrap();
        assert_eq!((&*q.channel, q.limit, q.since), ("news", Some(5), None));
        let q = parse_query(Some("channel=chat%3Aa&epoch=ab12&since=7")).unwrap();
        assert_eq!(&*q.channel, "chat:a");
        assert_eq!(
            q.since,
            Some(Since {
                epoch: "ab12".into(),
                offset: 7
            })
        );
        for bad in [
            None,
            Some("limit=5"),
            Some("channel=bad%20name"),
            Some("channel=a&limit=0"),
            Some("channel=a&limit=x"),
            Some("channel=a&since=3"),
            Some("channel=a&epoch=e&since=-1"),
        ] {
            assert!(parse_query(bad).is_err(), "{bad:?}");
        }
    }
}
