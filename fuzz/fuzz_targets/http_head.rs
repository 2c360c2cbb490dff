//! HTTP request heads on arbitrary bytes: `head::parse_head`, then
//! everything the server derives from a head (`accept_key`,
//! `origin_allowed`, `content_length`, ...). Nothing may panic.
#![no_main]

use herald::transport::http1::head;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let head = match head::parse_head(data) {
        Ok(Some((head, len))) => {
            assert!(len > 0 && len <= data.len(), "head length {len}");
            head
        }
        Ok(None) => return,
        Err(e) => {
            assert!((400..=599).contains(&e.status), "status {}", e.status);
            let _ = head::error_response(&e);
            return;
        }
    };
    // Every part is a span of the head that must read back as text: a
    // span out of place would show as an empty or cut string.
    let raw = String::from_utf8_lossy(data);
    for s in [head.method(), head.path()]
        .into_iter()
        .chain(head.query())
        .chain(head.headers().flat_map(|(k, v)| [k, v]))
    {
        assert!(raw.contains(s), "{s:?} is not part of the head");
    }
    let _ = head.wants_websocket();
    let _ = head.keep_alive();
    let _ = head.content_length();
    let _ = head.header("authorization");
    match head::accept_key(&head) {
        Ok(accept) => {
            assert_eq!(accept.len(), 28, "base64 of a SHA-1: {accept:?}");
            let _ = head::switching_protocols(&accept);
        }
        Err(e) => {
            let _ = head::error_response(&e);
        }
    }
    let _ = head::origin_allowed(&head, &[]);
    let _ = head::origin_allowed(&head, &["*".to_string()]);
    let listed: Vec<String> = head
        .header("x-allowed-origins")
        .map(|v| v.split(',').map(str::to_string).collect())
        .unwrap_or_default();
    let _ = head::origin_allowed(&head, &listed);
});
