//! Authentication and permissions: verifies HS256 JSON Web Tokens and
//! answers "may this connection read / write this channel?".
//!
//! Pure code: no IO, and the clock is read only by `jsonwebtoken` while
//! validating `exp` (the live expiry check compares with a `now` passed in).
//! Patterns follow protocol.md: an exact name, a prefix ending in `*`, or `*`.

use std::sync::Arc;

use jsonwebtoken::{errors::ErrorKind, Algorithm, DecodingKey, Validation};
use serde::Deserialize;

/// Why a token was refused. The `Display` text is the one-line reason sent
/// with HTTP 401 or in an `unauthorized` error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("missing token: send Authorization: Bearer <jwt> or ?auth=<jwt>")]
    Missing,
    #[error("malformed Authorization header: expected 'Bearer <jwt>'")]
    BadScheme,
    #[error("malformed token: {0}")]
    Malformed(String),
    #[error("token signature does not match")]
    BadSignature,
    #[error("token expired")]
    Expired,
    #[error("token not valid yet")]
    NotYetValid,
}

/// The claims herald reads from a token; others are ignored.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct Claims {
    #[serde(default)]
    pub sub: Option<String>,
    #[serde(default)]
    pub read: Vec<String>,
    #[serde(default)]
    pub write: Vec<String>,
    #[serde(default)]
    pub exp: Option<u64>,
}

/// A set of channel patterns compiled for matching.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Patterns {
    any: bool,
    exact: Vec<Box<str>>,
    prefixes: Vec<Box<str>>,
}

impl Patterns {
    /// Every channel.
    pub fn all() -> Self {
        Patterns {
            any: true,
            ..Default::default()
        }
    }

    /// Compiles `["news", "chat:*", "*"]`-style entries.
    pub fn compile<S: AsRef<str>>(entries: &[S]) -> Self {
        let mut p = Patterns::default();
        for e in entries {
            let e = e.as_ref();
            if e == "*" {
                p.any = true;
            } else if let Some(prefix) = e.strip_suffix('*') {
                p.prefixes.push(prefix.into());
            } else {
                p.exact.push(e.into());
            }
        }
        p
    }

    /// Does this set allow `channel`? Case-sensitive.
    pub fn allows(&self, channel: &str) -> bool {
        self.any
            || self.exact.iter().any(|e| &**e == channel)
            || self.prefixes.iter().any(|p| channel.starts_with(&**p))
    }
}

/// What a connection may do, shared cheaply between its owner and checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub sub: Option<Box<str>>,
    pub read: Patterns,
    pub write: Patterns,
    /// Expiry in Unix seconds, if the token had one.
    pub exp: Option<u64>,
}

impl Grant {
    /// The open-mode grant: every channel, no expiry.
    /// Every permission, no subject, no expiry: one grant shared by every
    /// connection that has it, so it costs them nothing each.
    pub fn open() -> Arc<Grant> {
        static OPEN: std::sync::OnceLock<Arc<Grant>> = std::sync::OnceLock::new();
        OPEN.get_or_init(|| {
            Arc::new(Grant {
                sub: None,
                read: Patterns::all(),
                write: Patterns::all(),
                exp: None,
            })
        })
        .clone()
    }

    pub fn from_claims(c: Claims) -> Grant {
        Grant {
            read: Patterns::compile(&c.read),
            write: Patterns::compile(&c.write),
            sub: c.sub.map(Into::into),
            exp: c.exp,
        }
    }

    /// Has this grant expired at Unix time `now` (seconds), given `leeway`?
    pub fn expired_at(&self, now: u64, leeway: u64) -> bool {
        matches!(self.exp, Some(exp) if now > exp.saturating_add(leeway))
    }
}

/// Verifies tokens, or grants everything in open mode.
#[derive(Clone)]
pub struct Authenticator {
    key: Option<(DecodingKey, Validation)>,
    open: Arc<Grant>,
}

impl Authenticator {
    /// `secret = None` is open mode.
    pub fn new(secret: Option<&str>, leeway: u64) -> Self {
        let key = secret.map(|s| {
            let mut v = Validation::new(Algorithm::HS256);
            v.leeway = leeway;
            v.validate_exp = true;
            v.validate_nbf = true;
            v.validate_aud = false;
            v.required_spec_claims.clear();
            (DecodingKey::from_secret(s.as_bytes()), v)
        });
        Authenticator {
            key,
            open: Grant::open(),
        }
    }

    pub fn is_open(&self) -> bool {
        self.key.is_none()
    }

    /// Verifies a token. In open mode the token is ignored.
    pub fn verify(&self, token: &str) -> Result<Arc<Grant>, AuthError> {
        let Some((key, validation)) = &self.key else {
            return Ok(self.open.clone());
        };
        match jsonwebtoken::decode::<Claims>(token, key, validation) {
            Ok(data) => Ok(Arc::new(Grant::from_claims(data.claims))),
            Err(e) => Err(match e.kind() {
                ErrorKind::ExpiredSignature => AuthError::Expired,
                ErrorKind::ImmatureSignature => AuthError::NotYetValid,
                ErrorKind::InvalidSignature => AuthError::BadSignature,
                ErrorKind::InvalidAlgorithm => {
                    AuthError::Malformed("only HS256 tokens are accepted".into())
                }
                other => AuthError::Malformed(format!("{other:?}").to_lowercase()),
            }),
        }
    }

    /// Authenticates a connection from its request: the token is taken, in
    /// order, from `Authorization: Bearer`, `?auth=`, then `?token=`; the
    /// first one present is used. Open mode ignores all of them.
    pub fn authenticate(
        &self,
        authorization: Option<&str>,
        query: Option<&str>,
    ) -> Result<Arc<Grant>, AuthError> {
        if self.is_open() {
            return Ok(self.open.clone());
        }
        let token = find_token(authorization, query)?;
        self.verify(&token)
    }
}

/// Finds the token of a request (see [`Authenticator::authenticate`]).
pub fn find_token(authorization: Option<&str>, query: Option<&str>) -> Result<String, AuthError> {
    if let Some(h) = authorization {
        let h = h.trim();
        let (scheme, rest) = h.split_once(' ').unwrap_or((h, ""));
        if !scheme.eq_ignore_ascii_case("bearer") || rest.trim().is_empty() {
            return Err(AuthError::BadScheme);
        }
        return Ok(rest.trim().to_string());
    }
    if let Some(q) = query {
        let mut token = None;
        for (k, v) in form_urlencoded::parse(q.as_bytes()) {
            if k == "auth" {
                return Ok(v.into_owned());
            }
            if k == "token" && token.is_none() {
                token = Some(v.into_owned());
            }
        }
        if let Some(t) = token {
            return Ok(t);
        }
    }
    Err(AuthError::Missing)
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};
    use serde_json::json;

    fn token(claims: serde_json::Value, secret: &str) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    }

    fn now() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    #[test]
    fn patterns_match_exact_prefix_and_star() {
        let p = Patterns::compile(&["news", "chat:*"]);
        assert!(p.allows("news"));
        assert!(!p.allows("News"));
        assert!(!p.allows("newsroom"));
        assert!(p.allows("chat:room1"));
        assert!(p.allows("chat:"));
        assert!(!p.allows("chatroom"));
        assert!(Patterns::compile(&["*"]).allows("anything"));
        assert!(!Patterns::compile::<&str>(&[]).allows("x"));
    }

    #[test]
    fn valid_token_yields_grant() {
        let a = Authenticator::new(Some("s3"), 0);
        let t = token(json!({"sub":"u1","read":["a"],"write":["b*"]}), "s3");
        let g = a.verify(&t).unwrap();
        assert_eq!(g.sub.as_deref(), Some("u1"));
        assert!(g.read.allows("a") && !g.read.allows("b1"));
        assert!(g.write.allows("b1"));
        assert_eq!(g.exp, None);
    }

    #[test]
    fn wrong_secret_expired_and_garbage_are_refused() {
        let a = Authenticator::new(Some("s3"), 0);
        let t = token(json!({"read":["a"]}), "other");
        assert_eq!(a.verify(&t), Err(AuthError::BadSignature));
        let t = token(json!({"read":["a"], "exp": now() - 10}), "s3");
        assert_eq!(a.verify(&t), Err(AuthError::Expired));
        assert!(matches!(a.verify("abc"), Err(AuthError::Malformed(_))));
    }

    #[test]
    fn leeway_admits_recently_expired() {
        let a = Authenticator::new(Some("s3"), 60);
        let t = token(json!({"exp": now() - 10}), "s3");
        let g = a.verify(&t).unwrap();
        assert!(!g.expired_at(now(), 60));
        assert!(g.expired_at(now() + 100, 60));
    }

    #[test]
    fn token_order_header_then_auth_then_token() {
        assert_eq!(find_token(Some("Bearer h"), Some("auth=a")).unwrap(), "h");
        assert_eq!(find_token(None, Some("token=t&auth=a")).unwrap(), "a");
        assert_eq!(find_token(None, Some("token=t")).unwrap(), "t");
        assert_eq!(find_token(None, Some("x=1")), Err(AuthError::Missing));
        assert_eq!(
            find_token(Some("Basic xyz"), Some("auth=a")),
            Err(AuthError::BadScheme)
        );
        assert_eq!(find_token(None, Some("auth=a%2Bb")).unwrap(), "a+b");
    }

    #[test]
    fn open_mode_ignores_tokens() {
        let a = Authenticator::new(None, 0);
        let g = a.authenticate(Some("Bearer garbage"), None).unwrap();
        assert!(g.read.allows("x") && g.write.allows("y"));
    }
}
