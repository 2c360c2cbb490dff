//! wspubsub's API keys: rows `(domain, apikey, active)`, read from the
//! file `API_KEYS_FILE` names and read again when it changes.
//!
//! The file is CSV, one row per line, as `psql`'s
//! `\copy apikeys (domain, apikey, active) to 'keys.csv' csv header`
//! writes it: an optional header line `domain,apikey,active`, blank lines
//! and lines starting with `#` ignored; `active` is one of `true`/`false`,
//! `t`/`f`, `yes`/`no`, `1`/`0`. A domain may have several keys (to rotate
//! one); a key belongs to one domain. A file that does not parse is
//! refused whole: at start-up herald exits, on a reload it keeps the keys
//! it had and logs why.
//!
//! Parsing is pure ([`parse`]); [`ApiKeys`] holds the current set behind a
//! lock that only upgrades and a reload take, with a generation number
//! publishers compare to notice a reload without locking.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, Weak};
use std::time::{Duration, SystemTime};

use subtle::ConstantTimeEq;

/// Longest domain name, in bytes (wspubsub's `varchar(64)`).
pub const MAX_DOMAIN: usize = 64;
/// Longest API key, in bytes.
pub const MAX_KEY: usize = 255;
/// Largest keys file read.
const MAX_FILE: u64 = 16 << 20;

/// Why a keys file was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeysError {
    #[error("line {line}: expected 3 fields (domain,apikey,active), found {found}")]
    Fields { line: usize, found: usize },
    #[error("line {line}: invalid domain {domain:?}: 1 to 64 bytes of A-Z a-z 0-9 _ - = @ , . ; (no `:`)")]
    Domain { line: usize, domain: String },
    #[error("line {line}: invalid apikey: 1 to 255 bytes, no spaces or quotes")]
    Key { line: usize },
    #[error("line {line}: invalid active {value:?}: use true or false")]
    Active { line: usize, value: String },
    #[error("line {line}: apikey repeated (first on line {first})")]
    Duplicate { line: usize, first: usize },
}

/// Why a keys file could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("API_KEYS_FILE {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("API_KEYS_FILE {path}: larger than {MAX_FILE} bytes")]
    TooLarge { path: String },
    #[error("API_KEYS_FILE {path}: {source}")]
    Parse { path: String, source: KeysError },
}

/// One domain's keys.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Domain {
    /// (key, active)
    keys: Vec<(Box<str>, bool)>,
}

/// A parsed set of keys.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct KeySet {
    domains: HashMap<Box<str>, Domain>,
}

impl KeySet {
    /// Is `key` an active key of `domain`? Compared in constant time.
    pub fn allows(&self, domain: &str, key: &str) -> bool {
        let Some(d) = self.domains.get(domain) else {
            return false;
        };
        let mut found = false;
        for (k, active) in &d.keys {
            // Every key of the domain is compared: the time taken does
            // not say which one matched.
            let eq: bool = k.as_bytes().ct_eq(key.as_bytes()).into();
            found |= eq && *active;
        }
        found
    }

    /// Does any row name `domain`?
    pub fn knows(&self, domain: &str) -> bool {
        self.domains.contains_key(domain)
    }

    /// Rows in the set.
    pub fn len(&self) -> usize {
        self.domains.values().map(|d| d.keys.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.domains.is_empty()
    }
}

/// Is `domain` a valid domain: channel-name characters but `:`, which
/// separates it from the topic (so no key's domain can reach into another
/// domain's channels)?
pub fn valid_domain(domain: &str) -> bool {
    !domain.is_empty()
        && domain.len() <= MAX_DOMAIN
        && domain
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-=@,.;".contains(&b))
}

/// Parses a keys file's text.
pub fn parse(text: &str) -> Result<KeySet, KeysError> {
    let mut set = KeySet::default();
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let row = raw.trim();
        if row.is_empty() || row.starts_with('#') {
            continue;
        }
        let fields: Vec<&str> = row.split(',').map(str::trim).collect();
        if fields.len() != 3 {
            return Err(KeysError::Fields {
                line,
                found: fields.len(),
            });
        }
        let (domain, key, active) = (fields[0], fields[1], fields[2]);
        if line == 1 && domain == "domain" && key == "apikey" && active == "active" {
            continue;
        }
        if !valid_domain(domain) {
            return Err(KeysError::Domain {
                line,
                domain: domain.chars().take(80).collect(),
            });
        }
        if !valid_key(key) {
            return Err(KeysError::Key { line });
        }
        let active = match active.to_ascii_lowercase().as_str() {
            "true" | "t" | "yes" | "y" | "1" => true,
            "false" | "f" | "no" | "n" | "0" => false,
            _ => {
                return Err(KeysError::Active {
                    line,
                    value: active.chars().take(20).collect(),
                })
            }
        };
        if let Some(&first) = seen.get(key) {
            return Err(KeysError::Duplicate { line, first });
        }
        seen.insert(key, line);
        set.domains
            .entry(domain.into())
            .or_default()
            .keys
            .push((key.into(), active));
    }
    Ok(set)
}

/// The keys of rows read from a database (`(domain, apikey, active)`):
/// a row that is not valid (its domain or key, or a key another row has
/// already) is left out and counted, not trusted, so that one bad row
/// does not lock every publisher out.
pub fn from_rows(rows: impl IntoIterator<Item = (String, String, bool)>) -> (KeySet, usize) {
    let mut set = KeySet::default();
    let mut seen = std::collections::HashSet::new();
    let mut skipped = 0;
    for (domain, key, active) in rows {
        let (domain, key) = (domain.trim(), key.trim());
        if !valid_domain(domain) || !valid_key(key) || !seen.insert(key.to_string()) {
            skipped += 1;
            continue;
        }
        set.domains
            .entry(domain.into())
            .or_default()
            .keys
            .push((key.into(), active));
    }
    (set, skipped)
}

/// Is `key` a valid API key: 1 to 255 printable bytes, no quotes?
fn valid_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= MAX_KEY
        && key
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\'')
}

/// Reads and parses the file at `path`.
pub fn read(path: &Path) -> Result<KeySet, LoadError> {
    let name = || path.display().to_string();
    let io = |source| LoadError::Io {
        path: name(),
        source,
    };
    if std::fs::metadata(path).map_err(io)?.len() > MAX_FILE {
        return Err(LoadError::TooLarge { path: name() });
    }
    let text = std::fs::read_to_string(path).map_err(io)?;
    parse(&text).map_err(|source| LoadError::Parse {
        path: name(),
        source,
    })
}

/// The keys in force, replaced whole on a reload.
#[derive(Debug)]
pub struct ApiKeys {
    current: RwLock<Arc<KeySet>>,
    /// Counts reloads: a publisher that saw another number checks its key
    /// again.
    generation: AtomicU64,
    path: Option<PathBuf>,
}

impl ApiKeys {
    /// Keys that never change (tests, or keys from elsewhere).
    pub fn fixed(set: KeySet) -> ApiKeys {
        ApiKeys {
            current: RwLock::new(Arc::new(set)),
            generation: AtomicU64::new(0),
            path: None,
        }
    }

    /// The keys of the file at `path`, as they are now.
    pub fn from_file(path: &Path) -> Result<ApiKeys, LoadError> {
        Ok(ApiKeys {
            current: RwLock::new(Arc::new(read(path)?)),
            generation: AtomicU64::new(0),
            path: Some(path.to_path_buf()),
        })
    }

    /// The keys in force.
    pub fn get(&self) -> Arc<KeySet> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Puts `set` in force (publishers check their keys again).
    pub fn replace(&self, set: KeySet) {
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(set);
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// Watches the file (if any) from a thread of its own, checking its
    /// size, modification time and inode every `every`; the thread ends
    /// when the keys are dropped.
    pub fn watch(self: &Arc<Self>, every: Duration) {
        let Some(path) = self.path.clone() else {
            return;
        };
        let weak: Weak<ApiKeys> = Arc::downgrade(self);
        let spawned = std::thread::Builder::new()
            .name("herald-apikeys".into())
            .spawn(move || {
                let mut last = stamp(&path);
                loop {
                    std::thread::sleep(every);
                    let Some(keys) = weak.upgrade() else {
                        return;
                    };
                    let now = stamp(&path);
                    if now == last {
                        continue;
                    }
                    last = now;
                    match read(&path) {
                        Ok(set) => {
                            tracing::info!(
                                "API_KEYS_FILE {}: reloaded, {} keys",
                                path.display(),
                                set.len()
                            );
                            keys.replace(set);
                        }
                        Err(e) => {
                            tracing::error!("{e}: not reloaded, the keys in force stay")
                        }
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::error!("API_KEYS_FILE will not be reloaded: {e}");
        }
    }
}

/// What tells a changed file: size, modification time, inode (a file
/// replaced by a rename has another).
fn stamp(path: &Path) -> Option<(u64, SystemTime, u64)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some((m.len(), m.modified().ok()?, m.ino()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_header_comments_and_booleans() {
        let set = parse(
            "domain,apikey,active\n\
             # a comment\n\
             \n\
             test, f47ac10b-58cc-4372-a567-0e02b2c3d479 , t\n\
             test,old-key,f\n\
             acme.io,k2,TRUE\n",
        )
        .unwrap();
        assert_eq!(set.len(), 3);
        assert!(set.allows("test", "f47ac10b-58cc-4372-a567-0e02b2c3d479"));
        assert!(!set.allows("test", "old-key"), "inactive");
        assert!(
            !set.allows("acme.io", "f47ac10b-58cc-4372-a567-0e02b2c3d479"),
            "another domain's key"
        );
        assert!(set.allows("acme.io", "k2"));
        assert!(!set.allows("nope", "k2"));
        assert!(!set.allows("acme.io", "k"), "a prefix is not the key");
        assert!(!set.allows("acme.io", "k22"));
        assert!(set.knows("test") && !set.knows("nope"));
        assert!(parse("").unwrap().is_empty());
    }

    #[test]
    fn each_bad_row_names_its_line() {
        assert_eq!(parse("a,b\n"), Err(KeysError::Fields { line: 1, found: 2 }));
        assert_eq!(
            parse("ok,k,t\nbad:domain,k2,t\n"),
            Err(KeysError::Domain {
                line: 2,
                domain: "bad:domain".into()
            })
        );
        assert!(matches!(
            parse(",k,t"),
            Err(KeysError::Domain { line: 1, .. })
        ));
        assert!(matches!(
            parse(&format!("{},k,t", "d".repeat(65))),
            Err(KeysError::Domain { .. })
        ));
        assert_eq!(parse("d,,t"), Err(KeysError::Key { line: 1 }));
        assert_eq!(parse("d,a b,t"), Err(KeysError::Key { line: 1 }));
        assert_eq!(parse("d,\"k\",t"), Err(KeysError::Key { line: 1 }));
        assert_eq!(
            parse("d,k,maybe"),
            Err(KeysError::Active {
                line: 1,
                value: "maybe".into()
            })
        );
        assert_eq!(
            parse("d,k,t\ne,k,f\n"),
            Err(KeysError::Duplicate { line: 2, first: 1 })
        );
        assert!(
            parse("domain,apikey,active\ndomain,apikey,active\n").is_err(),
            "a header only on line 1"
        );
    }

    #[test]
    fn domains_cannot_hold_the_separator() {
        assert!(valid_domain("test"));
        assert!(valid_domain("acme.io"));
        assert!(!valid_domain("a:b"));
        assert!(!valid_domain("a/b"));
        assert!(!valid_domain(""));
        assert!(!valid_domain("a*"));
    }

    #[test]
    fn a_reload_counts_a_generation() {
        let keys = ApiKeys::fixed(parse("d,k,t").unwrap());
        assert_eq!(keys.generation(), 0);
        assert!(keys.get().allows("d", "k"));
        keys.replace(parse("d,k,f").unwrap());
        assert_eq!(keys.generation(), 1);
        assert!(!keys.get().allows("d", "k"));
    }

    #[test]
    fn file_errors_name_the_file() {
        let e = read(Path::new("/nonexistent/keys.csv")).unwrap_err();
        assert!(matches!(e, LoadError::Io { .. }), "{e}");
        assert!(
            e.to_string()
                .starts_with("API_KEYS_FILE /nonexistent/keys.csv: "),
            "{e}"
        );
        let dir = std::env::temp_dir().join(format!("herald-keys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("keys.csv");
        std::fs::write(&path, "d,k,t\nd,k2,sometimes\n").unwrap();
        let e = read(&path).unwrap_err();
        assert!(
            e.to_string()
                .ends_with("line 2: invalid active \"sometimes\": use true or false"),
            "{e}"
        );
        std::fs::write(&path, "d,k,t\n").unwrap();
        assert!(read(&path).unwrap().allows("d", "k"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn rows_from_a_database_leave_out_what_is_not_valid() {
        let row = |d: &str, k: &str, a: bool| (d.to_string(), k.to_string(), a);
        let (set, skipped) = from_rows([
            row("test", "k1", true),
            row("test", "k2", false),
            row("bad domain", "k3", true),
            row("test:x", "k4", true),
            row("other", "k1", true),
            row("other", "has space", true),
            row(" acme.io ", " k5 ", true),
        ]);
        assert_eq!(skipped, 4);
        assert!(set.allows("test", "k1"));
        assert!(!set.allows("test", "k2"), "inactive");
        assert!(!set.allows("other", "k1"), "a key belongs to one domain");
        assert!(
            set.allows("acme.io", "k5"),
            "trimmed as a file's fields are"
        );
        assert_eq!(set.len(), 3);
    }
}
