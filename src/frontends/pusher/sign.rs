//! Pusher's signatures: channel authorizations (`key:HMAC-SHA256`), user
//! sign-in, the HTTP API's signed query strings and webhook bodies.
//!
//! Pure: bytes and an explicit `now` in, verdicts out; no clock, no IO.
//! Each format is checked byte for byte against what the official server
//! libraries produce (pusher-http-node `lib/auth.js`, `lib/requests.js`,
//! `lib/util.js`; pusher-http-python `pusher/authentication_client.py`,
//! `pusher/http.py`, `pusher/signature.py`) and against the worked examples
//! of Pusher's "Generating authentication signatures" and "HTTP API
//! reference" pages. Signatures are compared in constant time.

use hmac::{Hmac, KeyInit, Mac};
use md5::{Digest, Md5};
use sha2::Sha256;
use subtle::ConstantTimeEq;

use super::apps::App;

/// How far `auth_timestamp` may be from the server's clock, either way
/// (HTTP API reference: "within 600s of the current time").
pub const TIMESTAMP_TOLERANCE_SECS: u64 = 600;

/// The only `auth_version` Pusher defines.
pub const AUTH_VERSION: &str = "1.0";

/// MD5 of the empty body: what pusher-http-python sends as `body_md5` on GET.
pub const EMPTY_BODY_MD5: &str = "d41d8cd98f00b204e9800998ecf8427e";

type HmacSha256 = Hmac<Sha256>;

/// HMAC-SHA256 of the concatenation of `parts`, without building it.
fn hmac_parts(secret: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut mac = <HmacSha256 as KeyInit>::new_from_slice(secret)
        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
    for p in parts {
        mac.update(p);
    }
    mac.finalize().into_bytes().into()
}

/// Lower-case hexadecimal, as every Pusher library writes digests.
fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 0xf)] as char);
    }
    s
}

/// Hex HMAC-SHA256 of `msg` keyed with `secret`.
pub fn hmac_sha256_hex(secret: &[u8], msg: &[u8]) -> String {
    hex(&hmac_parts(secret, &[msg]))
}

/// Hex MD5 of `body` (the HTTP API's `body_md5`).
pub fn md5_hex(body: &[u8]) -> String {
    hex(&Md5::digest(body))
}

/// Compares two byte strings in time that depends only on their lengths.
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.ct_eq(b).into()
}

// ---------------------------------------------------------------------------
// Channel authorization (private-, presence-, private-encrypted- channels)

/// The `auth` a server library returns for a channel subscription:
/// `key:hex(HMAC-SHA256(secret, "socket_id:channel"))`, or for presence
/// channels over `"socket_id:channel:channel_data"` (the exact JSON string
/// the client sends as `channel_data`).
pub fn channel_auth(
    key: &str,
    secret: &str,
    socket_id: &str,
    channel: &str,
    channel_data: Option<&str>,
) -> String {
    format!(
        "{key}:{}",
        hex(&channel_mac(secret, socket_id, channel, channel_data))
    )
}

fn channel_mac(
    secret: &str,
    socket_id: &str,
    channel: &str,
    channel_data: Option<&str>,
) -> [u8; 32] {
    let (sep, data) = match channel_data {
        Some(d) => (&b":"[..], d.as_bytes()),
        None => (&b""[..], &b""[..]),
    };
    hmac_parts(
        secret.as_bytes(),
        &[socket_id.as_bytes(), b":", channel.as_bytes(), sep, data],
    )
}

/// Why a channel (or user) authorization was refused. The texts are the
/// ones Pusher itself shows, so the usual troubleshooting advice applies.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChannelAuthError {
    #[error("Missing auth: subscribing to a {0} channel needs an authorization")]
    Missing(&'static str),
    #[error("Invalid auth format: expected <app key>:<signature>, got {0:?}")]
    Malformed(String),
    #[error("Invalid key in subscription auth data: '{0}'")]
    InvalidKey(String),
    #[error(
        "Invalid signature: Expected HMAC SHA256 hex digest of {string_to_sign}, but got {got}"
    )]
    InvalidSignature { string_to_sign: String, got: String },
}

/// Checks a subscription's `auth` against `app`: the key part must be the
/// app's key and the signature must match `socket_id:channel[:channel_data]`.
/// Pass `channel_data` only for presence channels, as the libraries sign it.
pub fn check_channel_auth(
    app: &App,
    socket_id: &str,
    channel: &str,
    channel_data: Option<&str>,
    auth: &str,
) -> Result<(), ChannelAuthError> {
    let sig = split_auth(app, auth)?;
    let expected = hex(&channel_mac(&app.secret, socket_id, channel, channel_data));
    if ct_eq(expected.as_bytes(), sig.as_bytes()) {
        return Ok(());
    }
    let mut string_to_sign = format!("{socket_id}:{channel}");
    if let Some(d) = channel_data {
        string_to_sign.push(':');
        string_to_sign.push_str(d);
    }
    Err(ChannelAuthError::InvalidSignature {
        string_to_sign,
        got: sig.to_owned(),
    })
}

/// [`check_channel_auth`] as a yes or no.
pub fn verify_channel_auth(
    app: &App,
    socket_id: &str,
    channel: &str,
    channel_data: Option<&str>,
    auth: &str,
) -> bool {
    check_channel_auth(app, socket_id, channel, channel_data, auth).is_ok()
}

/// Splits `key:signature` and checks the key.
fn split_auth<'a>(app: &App, auth: &'a str) -> Result<&'a str, ChannelAuthError> {
    let (key, sig) = auth
        .rsplit_once(':')
        .ok_or_else(|| ChannelAuthError::Malformed(auth.to_owned()))?;
    if key != app.key {
        return Err(ChannelAuthError::InvalidKey(key.to_owned()));
    }
    Ok(sig)
}

// ---------------------------------------------------------------------------
// User authentication (pusher:signin, protocol 7)

/// The `auth` of `pusher:signin`: `key:hex(HMAC-SHA256(secret,
/// "socket_id::user::user_data"))` (Pusher's auth-signatures page).
pub fn user_auth(key: &str, secret: &str, socket_id: &str, user_data: &str) -> String {
    format!("{key}:{}", hex(&user_mac(secret, socket_id, user_data)))
}

fn user_mac(secret: &str, socket_id: &str, user_data: &str) -> [u8; 32] {
    hmac_parts(
        secret.as_bytes(),
        &[socket_id.as_bytes(), b"::user::", user_data.as_bytes()],
    )
}

/// Checks a `pusher:signin`'s `auth` for `user_data` against `app`.
pub fn check_user_auth(
    app: &App,
    socket_id: &str,
    user_data: &str,
    auth: &str,
) -> Result<(), ChannelAuthError> {
    let sig = split_auth(app, auth)?;
    let expected = hex(&user_mac(&app.secret, socket_id, user_data));
    if ct_eq(expected.as_bytes(), sig.as_bytes()) {
        return Ok(());
    }
    Err(ChannelAuthError::InvalidSignature {
        string_to_sign: format!("{socket_id}::user::{user_data}"),
        got: sig.to_owned(),
    })
}

// ---------------------------------------------------------------------------
// HTTP API

/// Why an HTTP API request's signature was refused. All are 401 like
/// Pusher's (see [`ApiAuthError::status`]); the texts follow Pusher's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiAuthError {
    /// A required query parameter is absent (`auth_key`, `auth_timestamp`,
    /// `auth_version`, `auth_signature`, or `body_md5` with a body).
    #[error("Missing {0}")]
    Missing(&'static str),
    #[error("Unknown auth_key")]
    UnknownAuthKey,
    #[error("Invalid auth_timestamp {0:?}: expected seconds since the Unix epoch")]
    InvalidTimestamp(String),
    #[error("Timestamp expired: Given timestamp ({given}) not within 600s of server time ({now})")]
    TimestampExpired { given: u64, now: u64 },
    #[error("Unsupported auth_version {0:?}: only 1.0 is supported")]
    UnsupportedVersion(String),
    #[error("Invalid body_md5: the MD5 of the body is {expected}, but body_md5 is {given:?}")]
    InvalidBodyMd5 { expected: String, given: String },
    /// Pusher's own wording, quoting the string the signature must cover.
    #[error("Invalid signature: you should have sent HmacSHA256Hex({string_to_sign:?}, your_secret_key), but you sent {sent:?}")]
    InvalidSignature {
        string_to_sign: String,
        sent: String,
    },
}

impl ApiAuthError {
    /// The HTTP status to answer with: Pusher answers every authentication
    /// failure with 401 ("Authentication error: response body will contain
    /// an explanation").
    pub fn status(&self) -> u16 {
        match self {
            ApiAuthError::Missing(_)
            | ApiAuthError::UnknownAuthKey
            | ApiAuthError::InvalidTimestamp(_)
            | ApiAuthError::TimestampExpired { .. }
            | ApiAuthError::UnsupportedVersion(_)
            | ApiAuthError::InvalidBodyMd5 { .. }
            | ApiAuthError::InvalidSignature { .. } => 401,
        }
    }
}

/// Verifies a signed HTTP API request (HTTP API reference, "Generating
/// authentication signatures").
///
/// - `method`: the request method (signed upper-cased);
/// - `path`: the request target's path, as received (no query);
/// - `query`: the raw query string (without `?`);
/// - `now_unix`: the server's clock, seconds since the epoch.
///
/// The signed string is `METHOD\nPATH\n` followed by every query parameter
/// except `auth_signature`, keys lower-cased, sorted by key (stably, like
/// pusher-http-node's `toOrderedArray`), joined as `k=v` with `&`, with
/// keys and values URL-decoded: the reference says the string "must not be
/// url escaped", and both pusher-http-node and pusher-http-python put raw
/// values into the URL and sign them as they are.
///
/// `body_md5` must be present and match for a non-empty body; on an empty
/// body it may be absent (pusher-http-node) or the MD5 of the empty string
/// (pusher-http-python signs one on every GET). When present it is part of
/// the signed string like any parameter.
///
/// A path is checked as received and, if that fails and it contains
/// `%`-escapes, also percent-decoded: pusher-http-node signs the path
/// before its HTTP client escapes it (a user id with a space in
/// `/users/{id}/terminate_connections`).
pub fn verify_api_request(
    app: &App,
    method: &str,
    path: &str,
    query: &str,
    body: &[u8],
    now_unix: u64,
) -> Result<(), ApiAuthError> {
    let mut params: Vec<(String, String)> = Vec::new();
    let mut signature = None;
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        let k = k.to_ascii_lowercase();
        if k == "auth_signature" {
            signature.get_or_insert(v.into_owned());
        } else {
            params.push((k, v.into_owned()));
        }
    }
    let param = |name: &str| {
        params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };

    let key = param("auth_key").ok_or(ApiAuthError::Missing("auth_key"))?;
    if key != app.key {
        return Err(ApiAuthError::UnknownAuthKey);
    }
    let sent = signature.ok_or(ApiAuthError::Missing("auth_signature"))?;
    let ts = param("auth_timestamp").ok_or(ApiAuthError::Missing("auth_timestamp"))?;
    let given: u64 = match ts.parse() {
        Ok(t) if ts.bytes().all(|b| b.is_ascii_digit()) => t,
        _ => return Err(ApiAuthError::InvalidTimestamp(ts.to_owned())),
    };
    if given.abs_diff(now_unix) > TIMESTAMP_TOLERANCE_SECS {
        return Err(ApiAuthError::TimestampExpired {
            given,
            now: now_unix,
        });
    }
    let version = param("auth_version").ok_or(ApiAuthError::Missing("auth_version"))?;
    if version != AUTH_VERSION {
        return Err(ApiAuthError::UnsupportedVersion(version.to_owned()));
    }
    match param("body_md5") {
        None if body.is_empty() => {}
        None => return Err(ApiAuthError::Missing("body_md5")),
        Some(given) => {
            let expected = md5_hex(body);
            if !given.eq_ignore_ascii_case(&expected) {
                return Err(ApiAuthError::InvalidBodyMd5 {
                    expected,
                    given: given.to_owned(),
                });
            }
        }
    }

    params.sort_by(|a, b| a.0.cmp(&b.0));
    let query_part = join_params(params.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    let method = method.to_ascii_uppercase();
    let decoded = percent_decode(path);
    let mut candidates = vec![path.as_bytes()];
    if let Some(d) = decoded.as_deref() {
        candidates.push(d);
    }
    for p in candidates {
        let mac = hmac_parts(
            app.secret.as_bytes(),
            &[method.as_bytes(), b"\n", p, b"\n", query_part.as_bytes()],
        );
        if ct_eq(hex(&mac).as_bytes(), sent.as_bytes()) {
            return Ok(());
        }
    }
    Err(ApiAuthError::InvalidSignature {
        string_to_sign: format!("{method}\n{path}\n{query_part}"),
        sent,
    })
}

fn join_params<'a>(pairs: impl Iterator<Item = (&'a str, &'a str)>) -> String {
    let mut out = String::new();
    for (k, v) in pairs {
        if !out.is_empty() {
            out.push('&');
        }
        out.push_str(k);
        out.push('=');
        out.push_str(v);
    }
    out
}

/// `%XX`-decodes a path (`+` stays `+` in a path). `None` when there is
/// nothing to decode or an escape is malformed.
fn percent_decode(path: &str) -> Option<Vec<u8>> {
    if !path.contains('%') {
        return None;
    }
    let b = path.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hi = (*b.get(i + 1)? as char).to_digit(16)?;
            let lo = (*b.get(i + 2)? as char).to_digit(16)?;
            out.push((hi * 16 + lo) as u8);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Some(out)
}

/// Builds the signed query string a server library would send (without the
/// leading `?`): `params` plus `auth_key`, `auth_timestamp`,
/// `auth_version=1.0` and, for a non-empty body, `body_md5`, then
/// `auth_signature`. Values are URL-encoded in the output and signed
/// decoded, as [`verify_api_request`] expects. `params` must not contain
/// the `auth_*` or `body_md5` keys.
pub fn sign_api_query(
    app: &App,
    method: &str,
    path: &str,
    params: &[(&str, &str)],
    body: &[u8],
    timestamp: u64,
) -> String {
    debug_assert!(params
        .iter()
        .all(|(k, _)| !k.starts_with("auth_") && *k != "body_md5"));
    let ts = timestamp.to_string();
    let md5 = (!body.is_empty()).then(|| md5_hex(body));
    let mut all: Vec<(String, &str)> = vec![
        ("auth_key".into(), app.key.as_str()),
        ("auth_timestamp".into(), ts.as_str()),
        ("auth_version".into(), AUTH_VERSION),
    ];
    if let Some(m) = &md5 {
        all.push(("body_md5".into(), m.as_str()));
    }
    all.extend(params.iter().map(|(k, v)| (k.to_ascii_lowercase(), *v)));
    all.sort_by(|a, b| a.0.cmp(&b.0));

    let signed = join_params(all.iter().map(|(k, v)| (k.as_str(), *v)));
    let to_sign = format!("{}\n{path}\n{signed}", method.to_ascii_uppercase());
    let signature = hmac_sha256_hex(app.secret.as_bytes(), to_sign.as_bytes());

    let mut query = form_urlencoded::Serializer::new(String::new());
    for (k, v) in &all {
        query.append_pair(k, v);
    }
    query.append_pair("auth_signature", &signature);
    query.finish()
}

// ---------------------------------------------------------------------------
// Webhooks

/// `X-Pusher-Signature` of a webhook body: hex HMAC-SHA256 of the exact
/// bytes POSTed, keyed with the app secret (pusher-http-node
/// `lib/webhook.js` and pusher-http-python `validate_webhook` recompute it
/// over the raw body). The `X-Pusher-Key` header carries the app key.
pub fn webhook_signature(secret: &[u8], body: &[u8]) -> String {
    hmac_sha256_hex(secret, body)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The credentials of Pusher's worked examples.
    fn doc_app() -> App {
        App::new("3", "278d425bdf160c739803", "7ad3773142a6692b25b8")
    }

    #[test]
    fn primitives() {
        // RFC 4231 test case 2.
        assert_eq!(
            hmac_sha256_hex(b"Jefe", b"what do ya want for nothing?"),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        assert_eq!(md5_hex(b""), EMPTY_BODY_MD5);
        assert_eq!(md5_hex(b"abc"), "900150983cd24fb0d6963f7d28e17f72");
        assert!(ct_eq(b"abc", b"abc"));
        assert!(!ct_eq(b"abc", b"abd"));
        assert!(!ct_eq(b"abc", b"ab"));
        assert_eq!(hex(&[0x00, 0x0f, 0xa0, 0xff]), "000fa0ff");
    }

    #[test]
    fn private_channel_auth_matches_pusher_worked_example() {
        // "Generating authentication and authorization strings", worked example.
        let auth = channel_auth(
            "278d425bdf160c739803",
            "7ad3773142a6692b25b8",
            "1234.1234",
            "private-foobar",
            None,
        );
        assert_eq!(
            auth,
            "278d425bdf160c739803:58df8b0c36d6982b82c3ecf6b4662e34fe8c25bba48f5369f135bf843651c3a4"
        );
        let app = doc_app();
        assert!(verify_channel_auth(
            &app,
            "1234.1234",
            "private-foobar",
            None,
            &auth
        ));
        assert!(!verify_channel_auth(
            &app,
            "1234.1235",
            "private-foobar",
            None,
            &auth
        ));
        assert!(!verify_channel_auth(
            &app,
            "1234.1234",
            "private-foobaz",
            None,
            &auth
        ));
    }

    #[test]
    fn presence_auth_signs_channel_data_verbatim() {
        let app = doc_app();
        // What pusher-http-node's authorizeChannel returns: channel_data is
        // JSON.stringify(data), and the signature covers it after a colon.
        let data = r#"{"user_id":10,"user_info":{"name":"Mr. Channels"}}"#;
        let auth = channel_auth(
            &app.key,
            &app.secret,
            "1234.1234",
            "presence-foobar",
            Some(data),
        );
        let sig = auth.split_once(':').unwrap().1;
        assert_eq!(
            sig,
            hmac_sha256_hex(
                app.secret.as_bytes(),
                format!("1234.1234:presence-foobar:{data}").as_bytes()
            )
        );
        assert!(verify_channel_auth(
            &app,
            "1234.1234",
            "presence-foobar",
            Some(data),
            &auth
        ));
        // The same user data serialised differently is another string.
        let spaced = r#"{"user_id": 10, "user_info": {"name": "Mr. Channels"}}"#;
        assert!(!verify_channel_auth(
            &app,
            "1234.1234",
            "presence-foobar",
            Some(spaced),
            &auth
        ));
        assert!(!verify_channel_auth(
            &app,
            "1234.1234",
            "presence-foobar",
            None,
            &auth
        ));
    }

    #[test]
    fn channel_auth_errors_read_like_pushers() {
        let app = doc_app();
        let e = check_channel_auth(&app, "1.2", "private-a", None, "nocolon").unwrap_err();
        assert!(matches!(e, ChannelAuthError::Malformed(_)));
        let e = check_channel_auth(&app, "1.2", "private-a", None, "other:abc").unwrap_err();
        assert_eq!(
            e.to_string(),
            "Invalid key in subscription auth data: 'other'"
        );
        let e = check_channel_auth(
            &app,
            "1.2",
            "private-a",
            Some("{}"),
            "278d425bdf160c739803:abc",
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "Invalid signature: Expected HMAC SHA256 hex digest of 1.2:private-a:{}, but got abc"
        );
        // Upper-case hex is not what any library sends.
        let good = channel_auth(&app.key, &app.secret, "1.2", "private-a", None);
        assert!(!verify_channel_auth(
            &app,
            "1.2",
            "private-a",
            None,
            &good.to_uppercase()
        ));
    }

    #[test]
    fn user_auth_matches_pusher_worked_example() {
        let app = doc_app();
        let auth = user_auth(&app.key, &app.secret, "1234.1234", r#"{"id":"12345"}"#);
        assert_eq!(
            auth,
            "278d425bdf160c739803:4708d583dada6a56435fb8bc611c77c359a31eebde13337c16ab43aa6de336ba"
        );
        assert!(check_user_auth(&app, "1234.1234", r#"{"id":"12345"}"#, &auth).is_ok());
        assert!(check_user_auth(&app, "1234.1234", r#"{"id":"1234"}"#, &auth).is_err());
    }

    const DOC_BODY: &[u8] =
        br#"{"name":"foo","channels":["project-3"],"data":"{\"some\":\"data\"}"}"#;
    const DOC_QUERY: &str = "auth_key=278d425bdf160c739803&auth_timestamp=1353088179&auth_version=1.0&body_md5=ec365a775a4cd0599faeb73354201b6f&auth_signature=da454824c97ba181a32ccc17a72625ba02771f50b50e1e7430e47a1f3f457e6c";

    #[test]
    fn api_request_matches_pusher_worked_example() {
        // HTTP API reference, "Worked authentication example".
        assert_eq!(md5_hex(DOC_BODY), "ec365a775a4cd0599faeb73354201b6f");
        let app = doc_app();
        assert_eq!(
            verify_api_request(
                &app,
                "POST",
                "/apps/3/events",
                DOC_QUERY,
                DOC_BODY,
                1353088179
            ),
            Ok(())
        );
        // sign_api_query produces the same signature for the same inputs.
        let q = sign_api_query(&app, "POST", "/apps/3/events", &[], DOC_BODY, 1353088179);
        assert_eq!(q, DOC_QUERY);
    }

    #[test]
    fn timestamps_within_600s_either_way() {
        let app = doc_app();
        let t = 1353088179;
        for now in [t - 600, t, t + 600] {
            assert!(
                verify_api_request(&app, "POST", "/apps/3/events", DOC_QUERY, DOC_BODY, now)
                    .is_ok()
            );
        }
        let e = verify_api_request(&app, "POST", "/apps/3/events", DOC_QUERY, DOC_BODY, t + 601)
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "Timestamp expired: Given timestamp (1353088179) not within 600s of server time (1353088780)"
        );
        assert_eq!(e.status(), 401);
        assert!(
            verify_api_request(&app, "POST", "/apps/3/events", DOC_QUERY, DOC_BODY, t - 601)
                .is_err()
        );
    }

    /// What pusher-http-node's createSignedQueryString sends: parameters in
    /// key order, values raw (not URL-encoded), no body_md5 without a body.
    fn node_query(
        app: &App,
        method: &str,
        path: &str,
        params: &[(&str, &str)],
        body: &str,
        ts: u64,
    ) -> String {
        let mut all: Vec<(String, String)> = vec![
            ("auth_key".into(), app.key.clone()),
            ("auth_timestamp".into(), ts.to_string()),
            ("auth_version".into(), "1.0".into()),
        ];
        if !body.is_empty() {
            all.push(("body_md5".into(), md5_hex(body.as_bytes())));
        }
        all.extend(params.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        all.sort_by(|a, b| a.0.cmp(&b.0));
        let qs = all
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("&");
        let sig = hmac_sha256_hex(
            app.secret.as_bytes(),
            format!("{method}\n{path}\n{qs}").as_bytes(),
        );
        format!("{qs}&auth_signature={sig}")
    }

    /// What pusher-http-python's Request sends: on GET the params plus a
    /// body_md5 of the empty body; on POST only the auth params.
    fn python_query(
        app: &App,
        method: &str,
        path: &str,
        params: &[(&str, &str)],
        body: &str,
        ts: u64,
    ) -> String {
        let mut all: Vec<(String, String)> = params
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        all.push(("auth_key".into(), app.key.clone()));
        all.push(("body_md5".into(), md5_hex(body.as_bytes())));
        all.push(("auth_version".into(), "1.0".into()));
        all.push(("auth_timestamp".into(), ts.to_string()));
        all.sort_by(|a, b| a.0.cmp(&b.0));
        let qs = all
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("&");
        let sig = hmac_sha256_hex(
            app.secret.as_bytes(),
            format!("{method}\n{path}\n{qs}").as_bytes(),
        );
        all.push(("auth_signature".into(), sig));
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all.iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("&")
    }

    #[test]
    fn node_and_python_requests_verify() {
        let app = App::new("42", "app-key", "app-secret");
        let now = 1_700_000_000;
        let get_params = [
            ("filter_by_prefix", "presence-"),
            ("info", "user_count,subscription_count"),
        ];
        let path = "/apps/42/channels";
        for q in [
            node_query(&app, "GET", path, &get_params, "", now),
            python_query(&app, "GET", path, &get_params, "", now),
            sign_api_query(&app, "GET", path, &get_params, b"", now),
        ] {
            assert_eq!(
                verify_api_request(&app, "GET", path, &q, b"", now + 3),
                Ok(()),
                "{q}"
            );
            // Any change to a signed value breaks it.
            let tampered = q.replace("presence-", "private-");
            assert!(verify_api_request(&app, "GET", path, &tampered, b"", now).is_err());
            assert!(verify_api_request(&app, "GET", "/apps/42/channels/x", &q, b"", now).is_err());
        }
        let body = r#"{"name":"e","data":"{\"x\":1}","channels":["a","b"]}"#;
        let path = "/apps/42/events";
        for q in [
            node_query(&app, "POST", path, &[], body, now),
            python_query(&app, "POST", path, &[], body, now),
            sign_api_query(&app, "post", path, &[], body.as_bytes(), now),
        ] {
            assert_eq!(
                verify_api_request(&app, "POST", path, &q, body.as_bytes(), now),
                Ok(()),
                "{q}"
            );
            let e = verify_api_request(&app, "POST", path, &q, b"{}", now).unwrap_err();
            assert!(matches!(e, ApiAuthError::InvalidBodyMd5 { .. }), "{e}");
        }
    }

    #[test]
    fn query_values_are_signed_decoded_and_keys_lowercased() {
        let app = App::new("1", "k", "s");
        let now = 1000;
        // A client that percent-encodes values (as sign_api_query does) and
        // upper-cases a key still verifies: the signed string is decoded.
        let q = sign_api_query(
            &app,
            "GET",
            "/apps/1/channels",
            &[("Filter_By_Prefix", "a b,c")],
            b"",
            now,
        );
        assert!(q.contains("filter_by_prefix=a+b%2Cc"), "{q}");
        assert_eq!(
            verify_api_request(&app, "GET", "/apps/1/channels", &q, b"", now),
            Ok(())
        );
        let upper = q.replace("filter_by_prefix", "FILTER_BY_PREFIX");
        assert_eq!(
            verify_api_request(&app, "GET", "/apps/1/channels", &upper, b"", now),
            Ok(())
        );
        let e = verify_api_request(
            &app,
            "GET",
            "/apps/1/channels",
            &q.replace("a+b", "a+c"),
            b"",
            now,
        )
        .unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.starts_with(r#"Invalid signature: you should have sent HmacSHA256Hex("GET\n/apps/1/channels\nauth_key=k&auth_timestamp=1000&auth_version=1.0&filter_by_prefix=a c,c", your_secret_key), but you sent ""#),
            "{msg}"
        );
    }

    #[test]
    fn escaped_paths_verify_as_signed_raw_or_escaped() {
        let app = App::new("1", "k", "s");
        let raw = "/apps/1/users/ann smith/terminate_connections";
        let sent = "/apps/1/users/ann%20smith/terminate_connections";
        // pusher-http-node signs the raw path; its HTTP client escapes it.
        let q = node_query(&app, "POST", raw, &[], "{}", 5000);
        assert_eq!(
            verify_api_request(&app, "POST", sent, &q, b"{}", 5000),
            Ok(())
        );
        // A client that signs what it sends verifies too.
        let q = sign_api_query(&app, "POST", sent, &[], b"{}", 5000);
        assert_eq!(
            verify_api_request(&app, "POST", sent, &q, b"{}", 5000),
            Ok(())
        );
        assert_eq!(percent_decode("/a%2"), None);
        assert_eq!(percent_decode("/a+b"), None);
        assert_eq!(percent_decode("/a%41+").as_deref(), Some(&b"/aA+"[..]));
    }

    #[test]
    fn each_missing_or_bad_parameter_has_its_error() {
        let app = App::new("1", "k", "s");
        let now = 1_000_000;
        let ok = sign_api_query(&app, "GET", "/apps/1/channels", &[], b"", now);
        let without = |name: &str| {
            ok.split('&')
                .filter(|kv| !kv.starts_with(&format!("{name}=")))
                .collect::<Vec<_>>()
                .join("&")
        };
        let check = |q: &str, body: &[u8]| {
            verify_api_request(&app, "GET", "/apps/1/channels", q, body, now)
        };
        assert_eq!(
            check(&without("auth_key"), b""),
            Err(ApiAuthError::Missing("auth_key"))
        );
        assert_eq!(
            check(&without("auth_signature"), b""),
            Err(ApiAuthError::Missing("auth_signature"))
        );
        assert_eq!(
            check(&without("auth_timestamp"), b""),
            Err(ApiAuthError::Missing("auth_timestamp"))
        );
        assert_eq!(
            check(&without("auth_version"), b""),
            Err(ApiAuthError::Missing("auth_version"))
        );
        assert_eq!(
            check(&ok.replace("auth_key=k", "auth_key=x"), b""),
            Err(ApiAuthError::UnknownAuthKey)
        );
        assert!(matches!(
            check(&ok.replace("auth_version=1.0", "auth_version=2.0"), b""),
            Err(ApiAuthError::UnsupportedVersion(v)) if v == "2.0"
        ));
        assert!(matches!(
            check(
                &ok.replace(&format!("auth_timestamp={now}"), "auth_timestamp=-5"),
                b""
            ),
            Err(ApiAuthError::InvalidTimestamp(_))
        ));
        // A body needs body_md5.
        assert_eq!(check(&ok, b"{}"), Err(ApiAuthError::Missing("body_md5")));
        // An empty body with a wrong body_md5 is refused.
        let bad = format!("{ok}&body_md5=00");
        assert!(matches!(
            check(&bad, b""),
            Err(ApiAuthError::InvalidBodyMd5 { .. })
        ));
        assert_eq!(
            ApiAuthError::Missing("auth_key").to_string(),
            "Missing auth_key"
        );
        assert_eq!(ApiAuthError::UnknownAuthKey.status(), 401);
        assert_eq!(check("", b""), Err(ApiAuthError::Missing("auth_key")));
    }

    #[test]
    fn webhook_signature_is_hmac_of_the_body() {
        let body = br#"{"time_ms":1327078148132,"events":[{"name":"channel_occupied","channel":"test_channel"}]}"#;
        let sig = webhook_signature(b"7ad3773142a6692b25b8", body);
        assert_eq!(sig, hmac_sha256_hex(b"7ad3773142a6692b25b8", body));
        assert_eq!(sig.len(), 64);
        assert!(sig
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
    }
}
