//! `herald token`: prints an HS256 JSON Web Token with the claims
//! [`crate::auth`] reads (`read`, `write`, `sub`, `exp`), so a backend
//! developer can try permissions without writing code.
//!
//! Building the claims and parsing `--ttl` are pure (the current time is
//! passed in); signing uses `jsonwebtoken`, like the server's verifier. The
//! secret comes from `--secret` or the server's own variable, `SECRET`.

use std::time::{SystemTime, UNIX_EPOCH};

use clap::Args;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::Serialize;

use super::CliError;

pub const EXAMPLES: &str = "\
Examples:
  export SECRET=change-me                  # the server's secret
  herald token --read 'news,chat:*' --write 'chat:*' --sub alice --ttl 1h
  herald token --read '*' --write '*' --ttl none --secret change-me

Patterns are exact channel names, a prefix ending in '*' (chat:* matches
chat:room1), or '*' for every channel. --ttl takes 30s, 15m, 1h, 7d, 1h30m or
a number of seconds; 0 or none leaves out exp (herald accepts such tokens).";

#[derive(Debug, Clone, Args)]
pub struct TokenArgs {
    /// Channels the token may subscribe to: names or patterns, comma-separated
    /// (or repeat the flag).
    #[arg(long, value_name = "PATTERNS", value_delimiter = ',', value_parser = parse_pattern)]
    pub read: Vec<String>,

    /// Channels the token may publish to: names or patterns, comma-separated.
    #[arg(long, value_name = "PATTERNS", value_delimiter = ',', value_parser = parse_pattern)]
    pub write: Vec<String>,

    /// The client's identity (the `sub` claim).
    #[arg(long, value_name = "ID")]
    pub sub: Option<String>,

    /// Lifetime of the token (30s, 15m, 1h, 7d, seconds; 0 or none: no expiry).
    #[arg(long, default_value = "1h", value_parser = parse_ttl)]
    pub ttl: Ttl,

    /// HS256 secret: the server's SECRET.
    #[arg(long, env = "SECRET", hide_env_values = true)]
    pub secret: Option<String>,
}

/// A token lifetime in seconds; `None` for a token without `exp`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ttl(pub Option<u64>);

/// The claims of a token, in the shape [`crate::auth::Claims`] reads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TokenClaims {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sub: Option<String>,
    pub read: Vec<String>,
    pub write: Vec<String>,
    /// Issued at (RFC 7519 §4.1.6); herald ignores it, people reading the token do not.
    pub iat: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exp: Option<u64>,
}

/// Runs `herald token`: prints the signed token and a newline.
pub fn run(args: TokenArgs) -> Result<(), CliError> {
    let secret = args
        .secret
        .as_deref()
        .filter(|s| !s.is_empty())
        .ok_or_else(|| {
            CliError::Usage("no secret to sign with: set SECRET or pass --secret".into())
        })?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_err(|_| CliError::Failed("the system clock is before 1970".into()))?
        .as_secs();
    let claims = claims(&args, now)?;
    let token = sign(&claims, secret)
        .map_err(|e| CliError::Failed(format!("cannot sign the token: {e}")))?;
    println!("{token}");
    Ok(())
}

/// The claims for `args`, issued at Unix time `now`.
pub fn claims(args: &TokenArgs, now: u64) -> Result<TokenClaims, CliError> {
    let exp = match args.ttl.0 {
        None => None,
        Some(ttl) => Some(
            now.checked_add(ttl)
                .ok_or_else(|| CliError::Usage("--ttl is too long".into()))?,
        ),
    };
    Ok(TokenClaims {
        sub: args.sub.clone(),
        read: args.read.clone(),
        write: args.write.clone(),
        iat: now,
        exp,
    })
}

/// Signs `claims` with HS256.
pub fn sign(claims: &TokenClaims, secret: &str) -> Result<String, jsonwebtoken::errors::Error> {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
}

/// Checks a permission pattern (protocol.md "Authentication"): `*`, a
/// channel name, or a prefix of allowed channel characters followed by `*`.
pub fn parse_pattern(s: &str) -> Result<String, String> {
    if s == "*" {
        return Ok(s.to_string());
    }
    if s.is_empty() {
        return Err("empty pattern".into());
    }
    let name = s.strip_suffix('*').unwrap_or(s);
    if name.contains('*') {
        return Err("'*' may only end a pattern".into());
    }
    // A prefix is checked like a name: a pattern no channel can match is a mistake.
    crate::frontends::native::protocol::validate_channel(name).map_err(|e| e.to_string())?;
    Ok(s.to_string())
}

/// Parses `--ttl`: `0`/`none`/`never` (no expiry), a number of seconds, or
/// a duration with units as `humantime` reads them (`30s`, `15m`, `1h`, `7d`,
/// `2w`, `1h30m`).
pub fn parse_ttl(s: &str) -> Result<Ttl, String> {
    let s = s.trim();
    if matches!(s.to_ascii_lowercase().as_str(), "none" | "never") {
        return Ok(Ttl(None));
    }
    const EXPECTED: &str = "expected e.g. 30s, 15m, 1h, 7d, 1h30m, a number of seconds, or none";
    if s.is_empty() {
        return Err(EXPECTED.into());
    }
    if let Ok(secs) = s.parse::<u64>() {
        return Ok(Ttl((secs > 0).then_some(secs)));
    }
    let total = humantime::parse_duration(s)
        .map_err(|e| match e {
            humantime::DurationError::UnknownUnit { unit, .. } => {
                format!("unknown unit '{unit}': {EXPECTED}")
            }
            _ => EXPECTED.to_string(),
        })?
        .as_secs();
    Ok(Ttl((total > 0).then_some(total)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Authenticator;

    fn args(read: &[&str], write: &[&str], ttl: Option<u64>) -> TokenArgs {
        TokenArgs {
            read: read.iter().map(|s| s.to_string()).collect(),
            write: write.iter().map(|s| s.to_string()).collect(),
            sub: Some("alice".into()),
            ttl: Ttl(ttl),
            secret: Some("s3".into()),
        }
    }

    #[test]
    fn ttl_units_and_none() {
        let ok = |s: &str| parse_ttl(s).unwrap().0;
        assert_eq!(ok("30s"), Some(30));
        assert_eq!(ok("15m"), Some(900));
        assert_eq!(ok("1h"), Some(3600));
        assert_eq!(ok("7d"), Some(604_800));
        assert_eq!(ok("2w"), Some(1_209_600));
        assert_eq!(ok("1h30m"), Some(5400));
        assert_eq!(ok("1h 30m"), Some(5400));
        assert_eq!(ok("90"), Some(90));
        assert_eq!(ok(" 45 "), Some(45));
        assert_eq!(ok("0"), None);
        assert_eq!(ok("0s"), None);
        assert_eq!(ok("none"), None);
        assert_eq!(ok("NEVER"), None);
        for bad in ["", "h", "1x", "-1", "99999999999999999999s", "1h3"] {
            assert!(parse_ttl(bad).is_err(), "{bad:?}");
        }
        assert!(parse_ttl(&format!("{}d", u64::MAX / 1000)).is_err());
    }

    #[test]
    fn patterns_are_checked() {
        for good in ["*", "news", "chat:*", "chat:room-1", "a*"] {
            assert_eq!(parse_pattern(good).unwrap(), good);
        }
        for bad in ["", "a*b", "**", "*a", "has space", "ch at:*", "é"] {
            assert!(parse_pattern(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn claims_carry_permissions_and_expiry() {
        let c = claims(&args(&["a", "b"], &["chat:*"], Some(3600)), 1_000).unwrap();
        assert_eq!(
            serde_json::to_value(&c).unwrap(),
            serde_json::json!({"sub":"alice","read":["a","b"],"write":["chat:*"],"iat":1000,"exp":4600})
        );
        let c = claims(&args(&[], &[], None), 1_000).unwrap();
        assert_eq!(
            serde_json::to_value(&c).unwrap(),
            serde_json::json!({"sub":"alice","read":[],"write":[],"iat":1000})
        );
        assert!(claims(&args(&[], &[], Some(u64::MAX)), 1).is_err());
    }

    #[test]
    fn signed_tokens_pass_the_servers_verifier() {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let a = args(&["news", "chat:*"], &["chat:*"], Some(60));
        let token = sign(&claims(&a, now).unwrap(), "s3").unwrap();
        let grant = Authenticator::new(Some("s3"), 0).verify(&token).unwrap();
        assert_eq!(grant.sub.as_deref(), Some("alice"));
        assert_eq!(grant.exp, Some(now + 60));
        assert!(grant.read.allows("news") && grant.read.allows("chat:x"));
        assert!(!grant.read.allows("other"));
        assert!(grant.write.allows("chat:x") && !grant.write.allows("news"));
        assert!(Authenticator::new(Some("other"), 0).verify(&token).is_err());

        let forever = sign(&claims(&args(&["*"], &[], None), now).unwrap(), "s3").unwrap();
        let grant = Authenticator::new(Some("s3"), 0).verify(&forever).unwrap();
        assert_eq!(grant.exp, None);
        assert!(grant.read.allows("anything"));
    }
}
