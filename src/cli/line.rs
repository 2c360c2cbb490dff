//! Pure conversions between terminal text and protocol.md frames: the
//! requests the client sends, the server frames it reads, and the one line
//! `herald sub` prints per message.
//!
//! No IO and no clock, so every rule here (what counts as JSON, how data is
//! compacted onto one line, how binary payloads are shown) is unit-tested
//! below.

use std::borrow::Cow;

use base64::Engine;
use serde::Deserialize;
use serde_json::value::RawValue;

/// A server frame, as far as the client cares.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame<'a> {
    /// A published message; `data` is the JSON text as the server sent it.
    Message {
        channel: Cow<'a, str>,
        data: &'a str,
        /// On a channel with history (protocol.md 1.1).
        offset: Option<u64>,
    },
    Subscribed {
        id: Option<&'a str>,
        /// On a channel with history: its epoch and top offset, and with
        /// `since`, whether what was missed follows.
        epoch: Option<Cow<'a, str>>,
        offset: Option<u64>,
        recovered: Option<bool>,
    },
    /// Also sent, without `id`, when an `auth` removed read permission.
    Unsubscribed {
        channel: Cow<'a, str>,
        id: Option<&'a str>,
    },
    Ack {
        id: Option<&'a str>,
    },
    Error {
        id: Option<&'a str>,
        code: Cow<'a, str>,
        message: Cow<'a, str>,
    },
    /// Anything else (`pong`, `authed`, an `op` added later).
    Other,
}

/// The fields of any server frame; which are present depends on `op`.
#[derive(Deserialize)]
struct Wire<'a> {
    #[serde(borrow)]
    op: Cow<'a, str>,
    #[serde(borrow, default)]
    channel: Option<Cow<'a, str>>,
    /// `None` for a missing field and for `null` alike.
    #[serde(borrow, default)]
    data: Option<&'a RawValue>,
    #[serde(borrow, default)]
    id: Option<&'a RawValue>,
    #[serde(borrow, default)]
    code: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    message: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    epoch: Option<Cow<'a, str>>,
    #[serde(default)]
    offset: Option<u64>,
    #[serde(default)]
    recovered: Option<bool>,
}

/// Reads a server text frame; `None` if it is not a JSON object with `op`.
pub fn parse_frame(text: &str) -> Option<Frame<'_>> {
    let w: Wire<'_> = serde_json::from_str(text).ok()?;
    let id = w.id.map(RawValue::get);
    Some(match &*w.op {
        "message" => Frame::Message {
            channel: w.channel?,
            data: w.data.map(RawValue::get).unwrap_or("null"),
            offset: w.offset,
        },
        "subscribed" => Frame::Subscribed {
            id,
            epoch: w.epoch,
            offset: w.offset,
            recovered: w.recovered,
        },
        "unsubscribed" => Frame::Unsubscribed {
            channel: w.channel.unwrap_or_default(),
            id,
        },
        "ack" => Frame::Ack { id },
        "error" => Frame::Error {
            id,
            code: w.code.unwrap_or(Cow::Borrowed("error")),
            message: w.message.unwrap_or_default(),
        },
        _ => Frame::Other,
    })
}

/// `{"op":"subscribe","channel":..,"id":id}`, with
/// `"since":{"epoch":..,"offset":..}` to resume after that message.
pub fn subscribe_request(channel: &str, id: u64, since: Option<(&str, u64)>) -> String {
    let mut req = serde_json::json!({"op": "subscribe", "channel": channel, "id": id});
    if let Some((epoch, offset)) = since {
        req["since"] = serde_json::json!({"epoch": epoch, "offset": offset});
    }
    req.to_string()
}

/// `{"op":"publish","channel":..,"data":..,"id":id}` with `data` (JSON text,
/// see [`data_json`]) spliced in unchanged, as the server will pass it on.
pub fn publish_request(channel: &str, data: &str, id: u64) -> String {
    let channel = serde_json::Value::from(channel);
    format!(r#"{{"op":"publish","channel":{channel},"data":{data},"id":{id}}}"#)
}

/// What `herald pub` sends for a piece of text: the text itself when it is
/// one JSON value (surrounding whitespace dropped), otherwise the text as a
/// JSON string, so `hello` is sent as `"hello"` and `{"x":1}` as `{"x":1}`.
pub fn data_json(text: &str) -> Cow<'_, str> {
    match serde_json::from_str::<&RawValue>(text) {
        Ok(raw) => Cow::Borrowed(raw.get()),
        Err(_) => Cow::Owned(serde_json::Value::from(text).to_string()),
    }
}

/// Drops the whitespace between JSON tokens, keeping every other byte (and
/// all of every string) as it was, so a pretty-printed value fits on one
/// line without being re-serialised. `json` must be valid JSON, in which
/// strings hold no raw line breaks.
pub fn compact_json(json: &str) -> Cow<'_, str> {
    let is_ws = |b: u8| matches!(b, b' ' | b'\t' | b'\n' | b'\r');
    if !json.bytes().any(is_ws) {
        return Cow::Borrowed(json);
    }
    let mut out = String::with_capacity(json.len());
    let (mut in_string, mut escaped) = (false, false);
    for c in json.chars() {
        if in_string {
            out.push(c);
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
        } else if c == '"' {
            in_string = true;
            out.push(c);
        } else if !(c.is_ascii() && is_ws(c as u8)) {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// The line for a text message: `channel<TAB>data`.
pub fn message_line(channel: &str, data: &str) -> String {
    format!("{channel}\t{}", compact_json(data))
}

/// The line for a binary message (protocol.md: one length byte, the
/// channel, the payload): `channel<TAB>base64:<payload>`, or with `json`
/// `{"op":"message","channel":..,"base64":..}`.
pub fn binary_line(
    frame: &[u8],
    json: bool,
) -> Result<String, crate::frontends::native::protocol::BinaryError> {
    let (channel, payload) = crate::frontends::native::protocol::parse_binary(frame)?;
    let encoded = base64::engine::general_purpose::STANDARD.encode(payload);
    Ok(if json {
        serde_json::json!({"op": "message", "channel": channel, "base64": encoded}).to_string()
    } else {
        format!("{channel}\tbase64:{encoded}")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_data_is_sent_as_is_and_other_text_as_a_string() {
        assert_eq!(data_json(r#"{"x":1}"#), r#"{"x":1}"#);
        assert_eq!(data_json(r#"{ "x" : 1 }"#), r#"{ "x" : 1 }"#);
        assert_eq!(data_json("  [1, 2]  "), "[1, 2]");
        assert_eq!(data_json("42"), "42");
        assert_eq!(data_json("1.50"), "1.50");
        assert_eq!(data_json("true"), "true");
        assert_eq!(data_json("null"), "null");
        assert_eq!(data_json(r#""quoted""#), r#""quoted""#);
        assert_eq!(data_json("hello"), r#""hello""#);
        assert_eq!(data_json("hello world"), r#""hello world""#);
        assert_eq!(data_json(r#"say "hi""#), r#""say \"hi\"""#);
        assert_eq!(data_json("{broken"), r#""{broken""#);
        assert_eq!(data_json(""), r#""""#);
        assert_eq!(data_json("1 2"), r#""1 2""#);
    }

    #[test]
    fn publish_request_splices_data() {
        assert_eq!(
            publish_request("chat:1", r#"{ "x": 1 }"#, 7),
            r#"{"op":"publish","channel":"chat:1","data":{ "x": 1 },"id":7}"#
        );
        let v: serde_json::Value =
            serde_json::from_str(&subscribe_request("news", 3, None)).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"op":"subscribe","channel":"news","id":3})
        );
        let v: serde_json::Value =
            serde_json::from_str(&subscribe_request("news", 3, Some(("ep", 7)))).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"op":"subscribe","channel":"news","id":3,
                               "since":{"epoch":"ep","offset":7}})
        );
    }

    #[test]
    fn compact_json_drops_only_whitespace_between_tokens() {
        assert_eq!(compact_json(r#"{"x":1}"#), r#"{"x":1}"#);
        assert!(matches!(compact_json(r#"{"x":1}"#), Cow::Borrowed(_)));
        assert_eq!(
            compact_json("{\n  \"a b\": [1, 2.50],\r\n\t\"c\": \"x\\\" y\"\n}"),
            r#"{"a b":[1,2.50],"c":"x\" y"}"#
        );
        assert_eq!(compact_json(r#"" \\" "#), r#"" \\""#);
        assert_eq!(compact_json(" \"é ü\" "), "\"é ü\"");
    }

    #[test]
    fn frames_are_read() {
        assert_eq!(
            parse_frame(r#"{"op":"message","channel":"c","data":{"x": 1}}"#),
            Some(Frame::Message {
                channel: "c".into(),
                data: r#"{"x": 1}"#,
                offset: None,
            })
        );
        assert_eq!(
            parse_frame(r#"{"op":"message","channel":"c","data":null}"#),
            Some(Frame::Message {
                channel: "c".into(),
                data: "null",
                offset: None,
            })
        );
        assert_eq!(
            parse_frame(r#"{"op":"subscribed","channel":"c","id":2}"#),
            Some(Frame::Subscribed {
                id: Some("2"),
                epoch: None,
                offset: None,
                recovered: None,
            })
        );
        assert_eq!(
            parse_frame(
                r#"{"op":"subscribed","channel":"c","id":2,"epoch":"e","offset":4,"recovered":false}"#
            ),
            Some(Frame::Subscribed {
                id: Some("2"),
                epoch: Some("e".into()),
                offset: Some(4),
                recovered: Some(false),
            })
        );
        assert_eq!(
            parse_frame(r#"{"op":"message","channel":"c","offset":9,"data":1}"#),
            Some(Frame::Message {
                channel: "c".into(),
                data: "1",
                offset: Some(9),
            })
        );
        assert_eq!(
            parse_frame(r#"{"op":"ack","id":5}"#),
            Some(Frame::Ack { id: Some("5") })
        );
        assert_eq!(
            parse_frame(r#"{"op":"error","id":1,"code":"forbidden","message":"no"}"#),
            Some(Frame::Error {
                id: Some("1"),
                code: "forbidden".into(),
                message: "no".into()
            })
        );
        assert_eq!(
            parse_frame(r#"{"op":"unsubscribed","channel":"c"}"#),
            Some(Frame::Unsubscribed {
                channel: "c".into(),
                id: None
            })
        );
        assert_eq!(parse_frame(r#"{"op":"pong"}"#), Some(Frame::Other));
        assert_eq!(parse_frame("not json"), None);
        assert_eq!(parse_frame(r#"{"channel":"c"}"#), None);
    }

    #[test]
    fn message_lines_are_channel_tab_compact_data() {
        assert_eq!(message_line("chan", r#"{"x":1}"#), "chan\t{\"x\":1}");
        assert_eq!(message_line("chan", "{ \"x\" :\n 1 }"), "chan\t{\"x\":1}");
        assert_eq!(message_line("chan", r#""hello""#), "chan\t\"hello\"");
    }

    #[test]
    fn binary_lines_show_base64() {
        let mut frame = vec![4];
        frame.extend_from_slice(b"chan");
        frame.extend_from_slice(&[0, 1, 2, 255]);
        assert_eq!(binary_line(&frame, false).unwrap(), "chan\tbase64:AAEC/w==");
        let v: serde_json::Value =
            serde_json::from_str(&binary_line(&frame, true).unwrap()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"op":"message","channel":"chan","base64":"AAEC/w=="})
        );
        assert!(binary_line(&[], false).is_err());
        assert!(binary_line(&[9, b'a'], false).is_err());
    }
}
