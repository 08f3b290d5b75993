//! Names the configuration field a serde_json error is at.
//!
//! serde_json reports where it stopped reading (line and column), not which field it was in.
//! [`field`] walks the JSON text up to that point, keeping the stack of object keys and array
//! indices, and renders the field the way the configuration errors name fields: `a.b`,
//! `a[1].b`, or `(top level)`.
//!
//! Which field a position belongs to, after serde_json's habits:
//! - right after a key's closing quote: that key (an unknown or duplicate field);
//! - elsewhere in a key, or between members: the enclosing object or array (a missing `:`, a
//!   trailing comma, a bad key);
//! - from the `:` after a key, or an element's first byte, through the value's last byte: that
//!   member (a value of the wrong type; an object's closing `}` where a field is missing);
//! - at the end of the input (an EOF error), a value that was complete does not count: the
//!   error is its container's, which was not closed.
//!
//! The text may be anything: the walk stops at the first byte that is not JSON, and never
//! nests deeper than [`MAX_DEPTH`].

/// Deepest nesting followed. serde_json refuses more than 128 levels, so a position it reports
/// is never deeper; past this the path names the outer 128 levels.
pub const MAX_DEPTH: usize = 128;

/// The name of the root, as configuration errors show it.
pub const TOP_LEVEL: &str = "(top level)";

/// The field `error` (from parsing `json`) is at, `(top level)` for the root.
pub fn field(json: &[u8], error: &serde_json::Error) -> String {
    let path = path(json, error_offset(json, error), is_eof(error));
    if path.is_empty() {
        TOP_LEVEL.to_string()
    } else {
        path
    }
}

/// Where serde_json stopped reading `json` when it reported `error`: its end when the error
/// has no position (one raised after the text was read).
pub fn error_offset(json: &[u8], error: &serde_json::Error) -> usize {
    if error.line() == 0 {
        json.len()
    } else {
        offset(json, error.line(), error.column())
    }
}

pub fn is_eof(error: &serde_json::Error) -> bool {
    error.classify() == serde_json::error::Category::Eof
}

/// The field at `end` (bytes of `json` read) as `a.b[1]`, empty for the root.
pub fn path(json: &[u8], end: usize, eof: bool) -> String {
    render(&walk(json, end, eof))
}

/// The bytes serde_json had read at `line` (1-based) and `column` (bytes read on that line).
pub fn offset(json: &[u8], line: usize, column: usize) -> usize {
    let mut start = 0;
    for _ in 1..line {
        match json
            .get(start..)
            .and_then(|rest| rest.iter().position(|&b| b == b'\n'))
        {
            Some(nl) => start += nl + 1,
            None => return json.len(),
        }
    }
    start.saturating_add(column).min(json.len())
}

/// serde_json's line (1-based) and column (bytes of the line read) after `offset` bytes.
pub fn position(json: &[u8], offset: usize) -> (usize, usize) {
    let read = json.get(..offset).unwrap_or(json);
    let line_start = read
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |nl| nl + 1);
    let lines = read.iter().filter(|&&b| b == b'\n').count();
    (lines + 1, read.len() - line_start)
}

enum Member {
    Key(Vec<u8>),
    Index(usize),
}

struct Frame {
    object: bool,
    /// The current member: the key last read, or the element's index.
    member: Member,
    /// Whether the path names the member (the walk is in its value, or just read its key).
    named: bool,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum State {
    /// Expecting a value (after `:`, at an element's first byte, or at the start).
    Value,
    /// In a string: a key or a value; `escaped` right after a backslash.
    Str { key: bool, escaped: bool },
    /// In a number.
    Number,
    /// In `true`, `false` or `null`: the literal and how much of it was read.
    Literal { word: &'static [u8], read: usize },
    /// After a key, expecting `:`.
    Colon,
    /// After `{` (a key or `}`) or after `,` in an object (a key).
    Key { or_end: bool },
    /// After `[` (an element or `]`), or after `,` in an array.
    Element,
    /// After a value: `,`, `}` or `]`.
    After,
}

fn is_ws(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

fn walk(json: &[u8], end: usize, eof: bool) -> Vec<Frame> {
    let text = json.get(..end).unwrap_or(json);
    let mut stack: Vec<Frame> = Vec::new();
    let mut state = State::Value;
    let mut key = Vec::new();
    let mut i = 0;
    while let Some(&b) = text.get(i) {
        i += 1;
        let top = stack.last_mut();
        state = match state {
            State::Str {
                key: is_key,
                escaped,
            } => {
                if is_key {
                    key.push(b);
                }
                match b {
                    b'\\' if !escaped => State::Str {
                        key: is_key,
                        escaped: true,
                    },
                    b'"' if !escaped && is_key => {
                        key.pop();
                        if let Some(top) = top {
                            top.member = Member::Key(std::mem::take(&mut key));
                            top.named = true;
                        }
                        State::Colon
                    }
                    b'"' if !escaped => State::After,
                    _ => State::Str {
                        key: is_key,
                        escaped: false,
                    },
                }
            }
            State::Literal { word, read } => match word.get(read) {
                Some(&w) if w == b => match read + 1 {
                    n if n == word.len() => State::After,
                    n => State::Literal { word, read: n },
                },
                // serde_json reads the byte that does not fit as part of the value.
                _ => break,
            },
            State::Number if matches!(b, b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E') => {
                State::Number
            }
            // A number ending in a sign, point or exponent: serde_json's error is the
            // number's.
            State::Number
                if matches!(
                    i.checked_sub(2).and_then(|j| text.get(j)),
                    Some(b'-' | b'+' | b'.' | b'e' | b'E')
                ) =>
            {
                break
            }
            // The value ended at the byte before: this byte is read as the next token.
            State::Number | State::After => {
                if let Some(top) = top {
                    top.named = false;
                }
                match b {
                    _ if is_ws(b) => State::After,
                    b',' => match stack.last_mut() {
                        Some(top) if top.object => State::Key { or_end: false },
                        Some(top) => {
                            if let Member::Index(n) = &mut top.member {
                                *n = n.saturating_add(1);
                            }
                            State::Element
                        }
                        None => break,
                    },
                    b'}' | b']' => match stack.last() {
                        // The closed container is the value just read: its member stays
                        // named until the next byte.
                        Some(top) if top.object == (b == b'}') => {
                            stack.pop();
                            State::After
                        }
                        _ => break,
                    },
                    _ => break,
                }
            }
            _ if is_ws(b) => {
                if let (State::Colon, Some(top)) = (state, top) {
                    top.named = false;
                }
                state
            }
            State::Value => match b {
                b'{' | b'[' if stack.len() >= MAX_DEPTH => break,
                b'{' | b'[' => {
                    stack.push(Frame {
                        object: b == b'{',
                        member: Member::Index(0),
                        named: false,
                    });
                    if b == b'{' {
                        State::Key { or_end: true }
                    } else {
                        State::Element
                    }
                }
                b'"' => State::Str {
                    key: false,
                    escaped: false,
                },
                b'-' | b'0'..=b'9' => State::Number,
                b't' => State::Literal {
                    word: b"true",
                    read: 1,
                },
                b'f' => State::Literal {
                    word: b"false",
                    read: 1,
                },
                b'n' => State::Literal {
                    word: b"null",
                    read: 1,
                },
                _ => break,
            },
            State::Key { or_end } => match b {
                b'"' => State::Str {
                    key: true,
                    escaped: false,
                },
                b'}' if or_end => {
                    stack.pop();
                    State::After
                }
                _ => break,
            },
            State::Colon => match (b, top) {
                (b':', Some(top)) => {
                    top.named = true;
                    State::Value
                }
                (_, top) => {
                    if let Some(top) = top {
                        top.named = false;
                    }
                    break;
                }
            },
            State::Element => match b {
                b']' => {
                    stack.pop();
                    State::After
                }
                _ => {
                    if let Some(top) = top {
                        top.named = true;
                    }
                    // This byte is the element's first: read it again as a value.
                    i = i.saturating_sub(1);
                    State::Value
                }
            },
        };
    }
    let top = stack.last_mut();
    match (state, top) {
        // At the end of the input a complete value is not where the error is.
        (State::After | State::Number | State::Colon, Some(top)) if eof => top.named = false,
        // serde_json reports a wrong-type object or array element before reading its first
        // byte: the element is the one that follows.
        (State::Element, Some(top)) if !eof => {
            let next = json
                .get(i..)
                .and_then(|rest| rest.iter().find(|&&b| !is_ws(b)));
            top.named = next.is_some_and(|&b| b != b']');
        }
        _ => {}
    }
    stack
}

fn render(stack: &[Frame]) -> String {
    let mut out = String::new();
    for frame in stack.iter().take_while(|f| f.named) {
        match &frame.member {
            Member::Key(k) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(&unescape(k));
            }
            Member::Index(n) => {
                out.push('[');
                out.push_str(&n.to_string());
                out.push(']');
            }
        }
    }
    out
}

/// A key as written (between the quotes) as the text it stands for, read by serde_json itself;
/// a key that is not a valid JSON string is shown as written, lossily.
fn unescape(raw: &[u8]) -> String {
    let mut quoted = Vec::with_capacity(raw.len() + 2);
    quoted.push(b'"');
    quoted.extend_from_slice(raw);
    quoted.push(b'"');
    serde_json::from_slice::<String>(&quoted)
        .unwrap_or_else(|_| String::from_utf8_lossy(raw).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(json: &str, end: usize) -> String {
        path(json.as_bytes(), end, false)
    }

    #[test]
    fn names_keys_indices_and_the_member_a_position_is_in() {
        let json = r#"{"a": {"b": [1, {"c": "x\"y"}]}, "d\u0041": 2}"#;
        let cut = |s: &str| json.find(s).unwrap() + s.len();
        assert_eq!(at(json, 0), "");
        assert_eq!(at(json, cut(r#"{"a""#)), "a");
        assert_eq!(at(json, cut(r#"{"a":"#)), "a");
        assert_eq!(at(json, cut(r#""b": [1"#)), "a.b[0]");
        assert_eq!(at(json, cut(r#"[1,"#)), "a.b[1]", "an element not yet read");
        assert_eq!(path(json.as_bytes(), cut(r#"[1,"#), true), "a.b");
        assert_eq!(
            at(json, cut(r#"[1, "#)),
            "a.b[1]",
            "an element not yet read"
        );
        assert_eq!(at(json, cut(r#""c": "x\""#)), "a.b[1].c");
        assert_eq!(at(json, cut(r#""x\"y"}"#)), "a.b[1]");
        assert_eq!(at(json, cut(r#""x\"y"}]"#)), "a.b");
        assert_eq!(at(json, cut(r#"}]}"#)), "a");
        assert_eq!(at(json, cut(r#"}]},"#)), "");
        assert_eq!(at(json, cut(r#""d\u0041""#)), "dA");
        assert_eq!(at(json, json.len()), "");
        assert_eq!(at(json, usize::MAX), "");
    }

    #[test]
    fn at_the_end_of_the_input_a_complete_value_is_not_the_error() {
        assert_eq!(path(br#"{"a":{"b":1"#, 11, true), "a");
        assert_eq!(path(br#"{"a":{"b":1"#, 11, false), "a.b");
        assert_eq!(path(br#"{"a":{"b":"#, 10, true), "a.b");
        assert_eq!(path(br#"{"a":{"b""#, 9, true), "a");
        assert_eq!(path(br#"{"a":["#, 6, true), "a");
    }

    #[test]
    fn lines_and_columns_are_serde_json_s() {
        let json = b"{\n  \"a\": 1,\n  \"b\": x\n}";
        let err = serde_json::from_slice::<serde_json::Value>(json).unwrap_err();
        let end = error_offset(json, &err);
        assert_eq!(position(json, end), (err.line(), err.column()));
        assert_eq!(field(json, &err), "b");
        assert_eq!(offset(json, 99, 0), json.len());
        assert_eq!(offset(json, 1, 99), json.len());
        assert_eq!(position(b"", 5), (1, 0));
    }

    #[test]
    fn deep_nesting_is_bounded_and_odd_bytes_stop_the_walk() {
        let deep = format!("{}{}", r#"{"k":["#.repeat(1000), "x");
        let p = path(deep.as_bytes(), deep.len(), false);
        assert_eq!(p.matches('k').count(), MAX_DEPTH / 2);
        for junk in [
            &b"\xff\xfe{"[..],
            b"}}]]",
            b"{\"a\":-}",
            b"[tru",
            b"{\"a\\",
            b"\"\\u",
        ] {
            let _ = path(junk, junk.len(), false);
            let _ = path(junk, junk.len(), true);
        }
    }
}
