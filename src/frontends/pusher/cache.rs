//! Pusher cache channels (`cache-`, `private-cache-`,
//! `private-encrypted-cache-`, `presence-cache-`): a channel that
//! remembers its last event for 30 minutes, replayed to each new
//! subscriber right after `pusher_internal:subscription_succeeded`; with
//! none, the subscriber gets `pusher:cache_miss` and the app's webhook a
//! `cache_miss` event.
//!
//! The engine keeps the event ([`keep`] is this namespace's history rule:
//! one message, 30 minutes), as published, on the channel's owner core.

use bytes::Bytes;

use super::wire;
use crate::engine::history::Keep;

/// How long a cache channel remembers its last event (Pusher's figure).
pub const TTL_MS: u64 = 30 * 60 * 1000;

const PREFIXES: [&str; 4] = [
    "cache-",
    "private-cache-",
    "private-encrypted-cache-",
    "presence-cache-",
];

/// Is `channel` a cache channel?
pub fn is_cache(channel: &str) -> bool {
    PREFIXES.iter().any(|p| channel.starts_with(p))
}

/// What a Pusher channel keeps: its last event, for a cache channel.
pub fn keep(channel: &str) -> Option<Keep> {
    is_cache(channel).then_some(Keep {
        size: 1,
        ttl_ms: TTL_MS,
    })
}

/// `{"event":"pusher:cache_miss","channel":..}`: nothing cached.
pub fn cache_miss(channel: &str) -> Bytes {
    let mut out = Vec::with_capacity(48 + channel.len());
    out.extend_from_slice(br#"{"event":"pusher:cache_miss","channel":"#);
    out.extend_from_slice(
        serde_json::to_string(channel)
            .unwrap_or_default()
            .as_bytes(),
    );
    out.push(b'}');
    wire::text_frame(&out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_channels_keep_one_event_for_half_an_hour() {
        for c in [
            "cache-a",
            "private-cache-a",
            "private-encrypted-cache-a",
            "presence-cache-a",
        ] {
            assert_eq!(
                keep(c),
                Some(Keep {
                    size: 1,
                    ttl_ms: 1_800_000
                }),
                "{c}"
            );
        }
        for c in ["a", "private-a", "presence-a", "cachex", "x-cache-a"] {
            assert_eq!(keep(c), None, "{c}");
        }
        let f = cache_miss("cache-a");
        let text = std::str::from_utf8(&f[2..]).unwrap();
        assert_eq!(text, r#"{"event":"pusher:cache_miss","channel":"cache-a"}"#);
    }
}
