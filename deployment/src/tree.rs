//! A document tree with byte spans, the common input of validation for TOML and JSON files.

use std::ops::Range;

use toml::de::{DeTable, DeValue};

/// The file format of a deployment, chosen by file name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Format {
    /// TOML, the default.
    Toml,
    /// JSON, for file names ending in `.json`.
    Json,
}

/// A value of the document with the byte span it came from.
#[derive(Debug, Clone)]
pub(crate) struct Node {
    /// Byte range of the value in the text (for a TOML `[[table]]`, its header).
    pub(crate) span: Range<usize>,
    /// The value.
    pub(crate) value: Value,
}

/// A document value; tables keep their entries in file order, duplicates included.
#[derive(Debug, Clone)]
pub(crate) enum Value {
    /// A string.
    String(String),
    /// An integer.
    Integer(i128),
    /// A float, as written (TOML underscores removed).
    Float(String),
    /// A boolean.
    Boolean(bool),
    /// A TOML date-time, as TOML text.
    Datetime(String),
    /// A JSON `null`.
    Null,
    /// An array.
    Array(Vec<Node>),
    /// A table (TOML) or object (JSON).
    Table(Vec<Entry>),
}

/// One key of a table with its span and value.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    /// The key, unescaped.
    pub(crate) key: String,
    /// Byte range of the key in the text.
    pub(crate) key_span: Range<usize>,
    /// The value.
    pub(crate) value: Node,
}

impl Value {
    /// How a user would name this kind of value, with its article (`an integer`).
    pub(crate) fn kind(&self, format: Format) -> &'static str {
        match (self, format) {
            (Value::String(_), _) => "a string",
            (Value::Integer(_), _) => "an integer",
            (Value::Float(_), _) => "a float",
            (Value::Boolean(_), _) => "a boolean",
            (Value::Datetime(_), _) => "a date-time",
            (Value::Null, _) => "null",
            (Value::Array(_), _) => "an array",
            (Value::Table(_), Format::Toml) => "a table",
            (Value::Table(_), Format::Json) => "an object",
        }
    }
}

/// Converts a parsed TOML document into a [`Node`] tree.
pub(crate) fn from_toml(table: toml::Spanned<DeTable<'_>>) -> Node {
    let span = table.span();
    Node {
        span,
        value: toml_table(table.into_inner()),
    }
}

fn toml_table(table: DeTable<'_>) -> Value {
    let mut entries: Vec<Entry> = table
        .into_iter()
        .map(|(key, value)| Entry {
            key_span: key.span(),
            key: key.into_inner().into_owned(),
            value: toml_node(value),
        })
        .collect();
    // The parser's map may be sorted by key; validation reports the first problem in file order.
    entries.sort_by_key(|entry| entry.key_span.start);
    Value::Table(entries)
}

fn toml_node(value: toml::Spanned<DeValue<'_>>) -> Node {
    let span = value.span();
    let value = match value.into_inner() {
        DeValue::String(text) => Value::String(text.into_owned()),
        DeValue::Integer(integer) => {
            match i128::from_str_radix(integer.as_str(), integer.radix()) {
                Ok(number) => Value::Integer(number),
                // Cannot happen for a TOML integer (64 bits); keep the text rather than fail.
                Err(_) => Value::Float(integer.as_str().to_owned()),
            }
        }
        DeValue::Float(float) => Value::Float(float.as_str().to_owned()),
        DeValue::Boolean(flag) => Value::Boolean(flag),
        DeValue::Datetime(datetime) => Value::Datetime(datetime.to_string()),
        DeValue::Array(array) => Value::Array(array.into_iter().map(toml_node).collect()),
        DeValue::Table(table) => toml_table(table),
    };
    Node { span, value }
}
