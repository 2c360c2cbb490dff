//! The configuration file (`CONFIG=/etc/herald/herald.toml`): TOML whose
//! keys are the settings' names in lower case (`port = 6380`,
//! `history = "chat:*=100/5m"`, `allowed_origins = ["https://a.example"]`).
//!
//! This module turns the file's text into settings with the line each came
//! from; it reads no file and knows nothing of precedence (the caller lets
//! flags and environment variables win).

use toml::de::{DeTable, DeValue};

/// One setting of the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Setting {
    /// As written: the setting's name in lower case (`max_connections`).
    pub key: String,
    /// The value as the matching environment variable would hold it
    /// (arrays joined with commas).
    pub value: String,
    /// 1-based.
    pub line: usize,
}

/// Why the file's text cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FileError {
    #[error("{0}")]
    Syntax(String),
    #[error("line {line}: `{key}`: {why}")]
    Value {
        key: String,
        line: usize,
        why: String,
    },
}

/// The settings of `text`, in the file's order.
pub fn parse(text: &str) -> Result<Vec<Setting>, FileError> {
    let table = DeTable::parse(text).map_err(|e| FileError::Syntax(syntax(text, &e)))?;
    let line_of = |at: usize| text[..at.min(text.len())].matches('\n').count() + 1;
    let mut out = Vec::new();
    for (key, value) in table.get_ref().iter() {
        let line = line_of(key.span().start);
        let bad = |why: &str| FileError::Value {
            key: key.get_ref().to_string(),
            line,
            why: why.to_string(),
        };
        let value = match value.get_ref() {
            DeValue::Table(_) => {
                return Err(bad(
                    "expected a value; herald's settings are top-level keys, not tables",
                ))
            }
            DeValue::Array(items) => {
                let mut parts = Vec::with_capacity(items.len());
                for item in items.iter() {
                    match scalar(item.get_ref()) {
                        Some(s) if !s.contains(',') => parts.push(s),
                        Some(_) => return Err(bad("an array item may not contain a comma")),
                        None => return Err(bad("expected an array of plain values")),
                    }
                }
                parts.join(",")
            }
            v => scalar(v).ok_or_else(|| bad("expected a string, number or boolean"))?,
        };
        out.push(Setting {
            key: key.get_ref().to_string(),
            value,
            line,
        });
    }
    out.sort_by_key(|s| s.line);
    Ok(out)
}

/// A plain value as text.
fn scalar(v: &DeValue<'_>) -> Option<String> {
    Some(match v {
        DeValue::String(s) => s.to_string(),
        // Digits without prefix or underscores, in the integer's radix.
        DeValue::Integer(i) => i128::from_str_radix(i.as_str(), i.radix())
            .ok()?
            .to_string(),
        DeValue::Float(f) => f.as_str().replace('_', ""),
        DeValue::Boolean(b) => b.to_string(),
        _ => return None,
    })
}

/// A syntax error as one line, with its line number.
fn syntax(text: &str, e: &toml::de::Error) -> String {
    let what = e.message().trim().replace('\n', " ");
    match e.span() {
        Some(span) => {
            let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
            format!("line {line}: {what}")
        }
        None => what,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_become_what_the_variables_would_hold() {
        let text = "# herald\nport = 7000\n\nhistory = \"chat:*=100/5m\"\ncheck_origin = true\n\
                    allowed_origins = [\"https://a.example\", \"https://b.example\"]\n\
                    max_connections = 1_000\nping_interval = 2.5\nread_buffer_size = 0x10\n";
        let s = parse(text).unwrap();
        let got: Vec<(&str, &str, usize)> = s
            .iter()
            .map(|s| (s.key.as_str(), s.value.as_str(), s.line))
            .collect();
        assert_eq!(
            got,
            [
                ("port", "7000", 2),
                ("history", "chat:*=100/5m", 4),
                ("check_origin", "true", 5),
                ("allowed_origins", "https://a.example,https://b.example", 6),
                ("max_connections", "1000", 7),
                ("ping_interval", "2.5", 8),
                ("read_buffer_size", "16", 9),
            ]
        );
    }

    #[test]
    fn errors_name_the_line() {
        let e = parse("port = 1\n[pusher]\nx = 1\n").unwrap_err();
        assert_eq!(e.to_string().split(':').next(), Some("line 2"), "{e}");
        assert!(e.to_string().contains("pusher"), "{e}");
        let e = parse("port = 1\nhost = \n").unwrap_err();
        assert!(e.to_string().starts_with("line 2"), "{e}");
        let e = parse("a = 1\nb = [[1]]\n").unwrap_err();
        assert!(e.to_string().starts_with("line 2: `b`"), "{e}");
        let e = parse("port = 1\nport = 2\n").unwrap_err();
        assert!(e.to_string().starts_with("line 2"), "{e}");
    }
}
