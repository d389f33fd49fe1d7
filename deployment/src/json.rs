//! A small JSON reader that keeps the byte span of every key and value.
//!
//! `serde_json` checks the syntax first (it reports errors with line and column); this reader
//! then builds the [`Node`] tree that validation needs, with spans that `serde_json` does not
//! expose. It still returns an error rather than panicking if it meets something unexpected.
//! Strings and numbers are decoded by `serde_json`, so escapes follow the standard exactly.

use super::tree::{Entry, Node, Value};

/// Nesting deeper than this is refused (`serde_json` refuses beyond 128 already).
const MAX_DEPTH: usize = 128;

/// Where and why the JSON text could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct JsonError {
    /// Byte offset of the problem.
    pub(crate) offset: usize,
    /// What was wrong, lowercase.
    pub(crate) message: String,
}

/// Reads a whole JSON document into a [`Node`] tree.
pub(crate) fn read(text: &str) -> Result<Node, JsonError> {
    let mut reader = Reader {
        text,
        bytes: text.as_bytes(),
        pos: 0,
    };
    let node = reader.value(0)?;
    reader.skip_whitespace();
    if reader.pos < reader.bytes.len() {
        return Err(reader.error("trailing characters after the JSON document"));
    }
    Ok(node)
}

struct Reader<'a> {
    text: &'a str,
    bytes: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn error(&self, message: &str) -> JsonError {
        JsonError {
            offset: self.pos,
            message: message.to_owned(),
        }
    }

    fn skip_whitespace(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.bytes.get(self.pos) {
            self.pos += 1;
        }
    }

    fn expect(&mut self, byte: u8, message: &str) -> Result<(), JsonError> {
        self.skip_whitespace();
        if self.bytes.get(self.pos) == Some(&byte) {
            self.pos += 1;
            Ok(())
        } else {
            Err(self.error(message))
        }
    }

    fn value(&mut self, depth: usize) -> Result<Node, JsonError> {
        if depth > MAX_DEPTH {
            return Err(self.error("JSON nested too deeply"));
        }
        self.skip_whitespace();
        let start = self.pos;
        let value = match self.bytes.get(self.pos) {
            Some(b'{') => self.object(depth)?,
            Some(b'[') => self.array(depth)?,
            Some(b'"') => Value::String(self.string()?),
            Some(b't') => self.literal("true", Value::Boolean(true))?,
            Some(b'f') => self.literal("false", Value::Boolean(false))?,
            Some(b'n') => self.literal("null", Value::Null)?,
            Some(b'-' | b'0'..=b'9') => self.number()?,
            Some(_) => return Err(self.error("expected a JSON value")),
            None => return Err(self.error("unexpected end of the JSON document")),
        };
        Ok(Node {
            span: start..self.pos,
            value,
        })
    }

    fn literal(&mut self, word: &str, value: Value) -> Result<Value, JsonError> {
        if self.text[self.pos..].starts_with(word) {
            self.pos += word.len();
            Ok(value)
        } else {
            Err(self.error("expected a JSON value"))
        }
    }

    fn object(&mut self, depth: usize) -> Result<Value, JsonError> {
        self.pos += 1; // '{'
        let mut entries = Vec::new();
        self.skip_whitespace();
        if self.bytes.get(self.pos) == Some(&b'}') {
            self.pos += 1;
            return Ok(Value::Table(entries));
        }
        loop {
            self.skip_whitespace();
            if self.bytes.get(self.pos) != Some(&b'"') {
                return Err(self.error("expected a quoted key"));
            }
            let key_start = self.pos;
            let key = self.string()?;
            let key_span = key_start..self.pos;
            self.expect(b':', "expected `:` after a key")?;
            let value = self.value(depth + 1)?;
            entries.push(Entry {
                key,
                key_span,
                value,
            });
            self.skip_whitespace();
            match self.bytes.get(self.pos) {
                Some(b',') => self.pos += 1,
                Some(b'}') => {
                    self.pos += 1;
                    return Ok(Value::Table(entries));
                }
                _ => return Err(self.error("expected `,` or `}`")),
            }
        }
    }

    fn array(&mut self, depth: usize) -> Result<Value, JsonError> {
        self.pos += 1; // '['
        let mut items = Vec::new();
        self.skip_whitespace();
        if self.bytes.get(self.pos) == Some(&b']') {
            self.pos += 1;
            return Ok(Value::Array(items));
        }
        loop {
            items.push(self.value(depth + 1)?);
            self.skip_whitespace();
            match self.bytes.get(self.pos) {
                Some(b',') => self.pos += 1,
                Some(b']') => {
                    self.pos += 1;
                    return Ok(Value::Array(items));
                }
                _ => return Err(self.error("expected `,` or `]`")),
            }
        }
    }

    /// Reads a string token starting at the opening quote; `serde_json` unescapes it.
    fn string(&mut self) -> Result<String, JsonError> {
        let start = self.pos;
        let mut end = start + 1;
        loop {
            match self.bytes.get(end) {
                Some(b'"') => break,
                Some(b'\\') => end += 2,
                Some(_) => end += 1,
                None => return Err(self.error("unterminated string")),
            }
        }
        let token = self
            .text
            .get(start..=end)
            .ok_or_else(|| self.error("invalid string"))?;
        let decoded = serde_json::from_str::<String>(token)
            .map_err(|error| self.error(&format!("invalid string: {error}")))?;
        self.pos = end + 1;
        Ok(decoded)
    }

    fn number(&mut self) -> Result<Value, JsonError> {
        let start = self.pos;
        while let Some(b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9') = self.bytes.get(self.pos) {
            self.pos += 1;
        }
        let token = &self.text[start..self.pos];
        if serde_json::from_str::<serde_json::Number>(token).is_err() {
            self.pos = start;
            return Err(self.error("invalid number"));
        }
        Ok(match token.parse::<i128>() {
            Ok(integer) => Value::Integer(integer),
            Err(_) => Value::Float(token.to_owned()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_values_keep_their_spans() {
        let text = r#"{"a": [1, "x\"y"], "b": {"c": -2.5e3, "d": null}}"#;
        let node = read(text).expect("valid JSON reads");
        let Value::Table(entries) = node.value else {
            panic!("top level is an object");
        };
        assert_eq!(entries[0].key, "a");
        assert_eq!(&text[entries[0].key_span.clone()], "\"a\"");
        let Value::Array(items) = &entries[0].value.value else {
            panic!("a is an array");
        };
        assert!(matches!(items[0].value, Value::Integer(1)));
        assert!(matches!(&items[1].value, Value::String(s) if s == "x\"y"));
        assert_eq!(&text[items[1].span.clone()], r#""x\"y""#);
        let Value::Table(inner) = &entries[1].value.value else {
            panic!("b is an object");
        };
        assert!(matches!(&inner[0].value.value, Value::Float(f) if f == "-2.5e3"));
        assert!(matches!(inner[1].value.value, Value::Null));
    }

    #[test]
    fn broken_text_is_an_error_not_a_panic() {
        for text in ["{", "[1,", "{\"a\" 1}", "\"abc", "tru", "{} x", "-"] {
            assert!(read(text).is_err(), "{text:?} must not read");
        }
    }
}
