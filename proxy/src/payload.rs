//! What every event store can hold of a JSON payload.
//!
//! SQLite keeps a payload as text, so it would take any valid JSON; PostgreSQL keeps it as
//! `jsonb`, which refuses some of it. A tenant's events must be able to move to any store, so
//! the proxy accepts only what both hold and names the first offending place otherwise
//! (`events[0].payload.a.b`). The limits, as measured on PostgreSQL 15 (`'…'::jsonb`; the
//! test `tests/tests/data_plane.rs::payload_rules_match_postgres` keeps them honest):
//!
//! - strings and keys: no `\u0000` ("unsupported Unicode escape sequence"), no UTF-16
//!   surrogate escape without its pair (`"\ud800"`: "invalid input syntax for type json");
//! - numbers are `numeric`: at most 16383 digits after the decimal point as written (the
//!   literal's fraction digits minus its exponent), the leading digit below 10^131072, an
//!   exponent below 2^30 either way ("value overflows numeric format");
//! - nesting: `jsonb` input recurses once per level and fails at the server's
//!   `max_stack_depth` (about 14,000 levels at the default 2 MB, about 700 at the smallest
//!   setting, 100 kB). The proxy allows [`MAX_DEPTH`] levels: below every setting, and below
//!   `serde_json`'s own recursion limit (128), which the stores use to compare payloads.

use std::fmt;

/// Deepest nesting of objects and arrays a payload may have (the payload object is level 1).
pub const MAX_DEPTH: usize = 100;

/// Largest `numeric` scale: digits after the decimal point.
const MAX_SCALE: i64 = 16_383;
/// Largest decimal exponent of a `numeric`'s leading digit (32767 base-10000 digits).
const MAX_LEADING_EXPONENT: i64 = 131_071;
/// PostgreSQL refuses an exponent of `INT_MAX / 2` or more, either way, before anything else.
const MAX_EXPONENT: i64 = 1_073_741_822;
/// Longest key shown in a path before it is cut.
const MAX_SHOWN_KEY: usize = 64;

/// Why a payload cannot be stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    Nul,
    LoneSurrogate,
    NumberOutOfRange,
    TooDeep,
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Nul => "holds \\u0000, which PostgreSQL's jsonb cannot store",
            Self::LoneSurrogate => {
                "holds a UTF-16 surrogate escape (\\ud800 to \\udfff) without its pair"
            }
            Self::NumberOutOfRange => {
                "is a number outside PostgreSQL's numeric range (the leading digit below \
                 10^131072, at most 16383 digits after the decimal point)"
            }
            Self::TooDeep => {
                return write!(f, "nests objects and arrays deeper than {MAX_DEPTH} levels")
            }
        })
    }
}

/// The first place of a payload that a store cannot hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unstorable {
    /// Where, from `root` down: `events[0].payload.a[2]`, `events[0].payload["a b"]`.
    pub path: String,
    pub reason: Reason,
}

/// Checks a payload that is already valid JSON (as `serde_json` parsed it); `root` names it in
/// the path of an error.
pub fn check(json: &str, root: &str) -> Result<(), Unstorable> {
    Scanner {
        text: json,
        bytes: json.as_bytes(),
        pos: 0,
        frames: Vec::new(),
    }
    .run()
    .map_err(|(frames, reason)| Unstorable {
        path: path(root, &frames),
        reason,
    })
}

/// One open object or array.
#[derive(Debug, Clone, Copy)]
enum Frame<'a> {
    /// The key of the member being read (raw, as written), or none while a key is expected.
    Object(Option<&'a str>),
    /// The index of the element being read.
    Array(usize),
}

struct Scanner<'a> {
    text: &'a str,
    bytes: &'a [u8],
    pos: usize,
    frames: Vec<Frame<'a>>,
}

type Failure<'a> = (Vec<Frame<'a>>, Reason);

impl<'a> Scanner<'a> {
    fn run(mut self) -> Result<(), Failure<'a>> {
        while let Some(&byte) = self.bytes.get(self.pos) {
            match byte {
                b'{' | b'[' => {
                    if self.frames.len() >= MAX_DEPTH {
                        return Err((self.frames, Reason::TooDeep));
                    }
                    self.frames.push(if byte == b'{' {
                        Frame::Object(None)
                    } else {
                        Frame::Array(0)
                    });
                    self.pos += 1;
                }
                b'}' | b']' => {
                    self.frames.pop();
                    self.pos += 1;
                }
                b',' => {
                    match self.frames.last_mut() {
                        Some(Frame::Object(key)) => *key = None,
                        Some(Frame::Array(index)) => *index += 1,
                        None => {}
                    }
                    self.pos += 1;
                }
                b'"' => {
                    let start = self.pos + 1;
                    let reading_key = matches!(self.frames.last(), Some(Frame::Object(None)));
                    let result = self.string();
                    if reading_key {
                        let key = self.text.get(start..self.pos - 1).unwrap_or_default();
                        if let Some(Frame::Object(slot)) = self.frames.last_mut() {
                            *slot = Some(key);
                        }
                    }
                    if let Err(reason) = result {
                        return Err((self.frames, reason));
                    }
                }
                b'-' | b'0'..=b'9' => {
                    if !self.number() {
                        return Err((self.frames, Reason::NumberOutOfRange));
                    }
                }
                // Whitespace, ':' and the letters of true, false and null.
                _ => self.pos += 1,
            }
        }
        Ok(())
    }

    /// Reads a string from its opening quote to past its closing quote; the first refusal in it.
    fn string(&mut self) -> Result<(), Reason> {
        let mut refusal = None;
        self.pos += 1;
        while let Some(&byte) = self.bytes.get(self.pos) {
            match byte {
                b'"' => break,
                b'\\' if self.bytes.get(self.pos + 1) == Some(&b'u') => {
                    let unit = self.hex(self.pos + 2);
                    self.pos += 6;
                    let found = match unit {
                        Some(0) => Some(Reason::Nul),
                        Some(0xD800..=0xDBFF) => {
                            let low = (self.bytes.get(self.pos..self.pos + 2) == Some(&b"\\u"[..]))
                                .then(|| self.hex(self.pos + 2))
                                .flatten();
                            if matches!(low, Some(0xDC00..=0xDFFF)) {
                                self.pos += 6;
                                None
                            } else {
                                Some(Reason::LoneSurrogate)
                            }
                        }
                        Some(0xDC00..=0xDFFF) => Some(Reason::LoneSurrogate),
                        _ => None,
                    };
                    refusal = refusal.or(found);
                }
                b'\\' => self.pos += 2,
                _ => self.pos += 1,
            }
        }
        self.pos += 1;
        refusal.map_or(Ok(()), Err)
    }

    fn hex(&self, at: usize) -> Option<u32> {
        let digits = self.text.get(at..at + 4)?;
        u32::from_str_radix(digits, 16).ok()
    }

    /// Reads a number; whether PostgreSQL's `numeric` holds it.
    fn number(&mut self) -> bool {
        let digits = |scanner: &mut Self| {
            let start = scanner.pos;
            while scanner
                .bytes
                .get(scanner.pos)
                .is_some_and(u8::is_ascii_digit)
            {
                scanner.pos += 1;
            }
            &scanner.bytes[start..scanner.pos]
        };
        if self.bytes.get(self.pos) == Some(&b'-') {
            self.pos += 1;
        }
        let integer = digits(self);
        let mut fraction: &[u8] = &[];
        if self.bytes.get(self.pos) == Some(&b'.') {
            self.pos += 1;
            fraction = digits(self);
        }
        let mut exponent: i64 = 0;
        if matches!(self.bytes.get(self.pos), Some(b'e' | b'E')) {
            self.pos += 1;
            let negative = self.bytes.get(self.pos) == Some(&b'-');
            if matches!(self.bytes.get(self.pos), Some(b'-' | b'+')) {
                self.pos += 1;
            }
            let written = digits(self);
            let significant = &written[written.iter().take_while(|d| **d == b'0').count()..];
            if significant.len() > 10 {
                return false;
            }
            exponent = significant
                .iter()
                .fold(0, |n, d| n * 10 + i64::from(d - b'0'));
            if negative {
                exponent = -exponent;
            }
        }
        numeric_holds(integer, fraction, exponent)
    }
}

/// Whether PostgreSQL's `numeric` holds `integer.fraction × 10^exponent` as written.
fn numeric_holds(integer: &[u8], fraction: &[u8], exponent: i64) -> bool {
    if exponent.abs() > MAX_EXPONENT {
        return false;
    }
    let scale = i64::try_from(fraction.len()).unwrap_or(i64::MAX) - exponent;
    if scale > MAX_SCALE {
        return false;
    }
    let leading = if let Some(i) = integer.iter().position(|d| *d != b'0') {
        i64::try_from(integer.len() - 1 - i).unwrap_or(i64::MAX)
    } else if let Some(j) = fraction.iter().position(|d| *d != b'0') {
        -i64::try_from(j + 1).unwrap_or(i64::MAX)
    } else {
        // Zero: only the scale counts.
        return true;
    };
    leading.saturating_add(exponent) <= MAX_LEADING_EXPONENT
}

fn path(root: &str, frames: &[Frame<'_>]) -> String {
    let mut out = root.to_owned();
    for frame in frames {
        match frame {
            Frame::Array(index) => out.push_str(&format!("[{index}]")),
            Frame::Object(Some(key)) => {
                let shown: String = key.chars().take(MAX_SHOWN_KEY).collect();
                let cut = if shown.len() < key.len() { "…" } else { "" };
                let plain = !key.is_empty()
                    && !key.starts_with(|c: char| c.is_ascii_digit())
                    && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
                if plain {
                    out.push('.');
                    out.push_str(&shown);
                    out.push_str(cut);
                } else {
                    // The key as written in the JSON (escapes kept), so it is valid JSON text.
                    out.push_str(&format!("[\"{shown}{cut}\"]"));
                }
            }
            Frame::Object(None) => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(json: &str) -> Option<(String, Reason)> {
        check(json, "p").err().map(|e| (e.path, e.reason))
    }

    #[test]
    fn strings_and_keys() {
        assert_eq!(refused(r#"{"a":"\ud83d\ude00","b":"\uffff"}"#), None);
        assert_eq!(refused(r#"{"a":"\\u0000 is text"}"#), None);
        assert_eq!(
            refused(r#"{"a":{"b":"x\u0000"}}"#),
            Some(("p.a.b".into(), Reason::Nul))
        );
        assert_eq!(
            refused(r#"{"a":["ok","\ud800"]}"#),
            Some(("p.a[1]".into(), Reason::LoneSurrogate))
        );
        assert_eq!(
            refused(r#"{"a":"\ud800\u0041"}"#),
            Some(("p.a".into(), Reason::LoneSurrogate))
        );
        assert_eq!(
            refused(r#"{"a":"\udc00"}"#),
            Some(("p.a".into(), Reason::LoneSurrogate))
        );
        assert_eq!(
            refused(r#"{"x":1,"a b\ud800":1}"#),
            Some((r#"p["a b\ud800"]"#.into(), Reason::LoneSurrogate))
        );
        assert_eq!(
            refused(r#"{"\u0000":1}"#),
            Some((r#"p["\u0000"]"#.into(), Reason::Nul))
        );
    }

    #[test]
    fn numbers() {
        for ok in [
            "0",
            "-0",
            "1e131071",
            "9.99e131071",
            "1e-16383",
            "0e999999",
            "12.5e-3",
            "1E+5",
            "0.00001e-16378",
        ] {
            assert_eq!(refused(&format!(r#"{{"n":{ok}}}"#)), None, "{ok}");
        }
        for bad in [
            "1e131072",
            "1e999999",
            "12345e131068",
            "1e-16384",
            "10e-16384",
            "0e-999999",
            "0e9999999999",
            "1e00000000000000000000000001073741823",
        ] {
            assert_eq!(
                refused(&format!(r#"{{"a":[{{"n":{bad}}}]}}"#)),
                Some(("p.a[0].n".into(), Reason::NumberOutOfRange)),
                "{bad}"
            );
        }
    }

    #[test]
    fn depth() {
        let nested = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
        assert_eq!(
            refused(&format!(r#"{{"a":{}}}"#, nested(MAX_DEPTH - 1))),
            None
        );
        let (path, reason) =
            refused(&format!(r#"{{"a":{}}}"#, nested(MAX_DEPTH))).expect("too deep");
        assert_eq!(reason, Reason::TooDeep);
        assert!(path.starts_with("p.a[0][0]"), "{path}");
    }
}
