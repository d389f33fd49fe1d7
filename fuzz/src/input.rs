//! Turning fuzzer bytes into hostile but plausible values: names, durations, sizes and numbers
//! at and around every edge, and small documents rendered as TOML or JSON.
//!
//! Every function takes an [`Unstructured`] and never fails: when the bytes run out,
//! `arbitrary` hands back the first choice and zeroes, which are valid inputs too.

use arbitrary::Unstructured;

/// Picks one of `items` (the first when the bytes run out).
pub fn pick<T: Clone>(u: &mut Unstructured<'_>, items: &[T]) -> T {
    u.choose(items)
        .cloned()
        .unwrap_or_else(|_| items[0].clone())
}

/// A number in `range` (its start when the bytes run out).
pub fn int<T: arbitrary::unstructured::Int>(
    u: &mut Unstructured<'_>,
    range: std::ops::RangeInclusive<T>,
) -> T {
    let start = *range.start();
    u.int_in_range(range).unwrap_or(start)
}

/// True with about one chance in `n`.
pub fn one_in(u: &mut Unstructured<'_>, n: u8) -> bool {
    u.ratio(1, n.max(1)).unwrap_or(false)
}

/// Counts, sizes and values on both sides of the edges a parser or an allocator has.
pub const EDGE_NUMBERS: &[i64] = &[
    0,
    1,
    2,
    -1,
    7,
    63,
    64,
    65,
    127,
    128,
    255,
    256,
    1000,
    1023,
    1024,
    4096,
    65535,
    65536,
    1_000_000,
    i32::MAX as i64,
    1 << 31,
    u32::MAX as i64,
    1 << 32,
    1 << 53,
    500_000_000_000,
    4_000_000_000_000_000_000,
    i64::MAX,
    i64::MIN,
];

/// An integer: an edge value, a small one, or any.
pub fn number(u: &mut Unstructured<'_>) -> i64 {
    match int(u, 0..=3) {
        0 | 1 => pick(u, EDGE_NUMBERS),
        2 => int::<i64>(u, 0..=100),
        _ => u.arbitrary().unwrap_or(0),
    }
}

/// An unsigned magnitude for a number written in text (sizes, durations).
fn magnitude(u: &mut Unstructured<'_>) -> String {
    match int(u, 0..=4) {
        0 => pick(
            u,
            &[
                "0",
                "1",
                "5",
                "64",
                "100",
                "1000",
                "4294967296",
                "18446744073709551615",
                "18446744073709551616",
                "500000000000",
                "99999999999999999999999",
                "1.5",
                "0.001",
                "1e3",
                "-1",
                "",
            ],
        )
        .to_owned(),
        1 => pick(u, EDGE_NUMBERS).unsigned_abs().to_string(),
        2 => int(u, 0..=1000).to_string(),
        _ => u.arbitrary::<u64>().unwrap_or(0).to_string(),
    }
}

/// A duration as text, humantime-style or not quite.
pub fn duration(u: &mut Unstructured<'_>) -> String {
    if one_in(u, 6) {
        return pick(
            u,
            &[
                "500ms",
                "1m 30s",
                "1.5s",
                "5 ms",
                " 5ms ",
                "inf",
                "NaN",
                "-1s",
                "",
                "1",
                "ms",
                "1s1s1s",
                "584942417355y",
                "500000000000y",
                "18446744073709551615s 999ms",
                "1ns",
                "0s",
            ],
        )
        .to_owned();
    }
    let unit = pick(
        u,
        &[
            "",
            "ns",
            "us",
            "ms",
            "s",
            "sec",
            "m",
            "min",
            "h",
            "d",
            "w",
            "M",
            "y",
            "years",
            "µs",
            "fortnights",
        ],
    );
    let space = if one_in(u, 5) { " " } else { "" };
    format!("{}{space}{unit}", magnitude(u))
}

/// A size as text, with binary, decimal or made-up units.
pub fn size(u: &mut Unstructured<'_>) -> String {
    let unit = pick(
        u,
        &[
            "", "B", "KiB", "MiB", "GiB", "TiB", "EiB", "KB", "MB", "kib", "mib", "k", "K", "b",
            " MiB",
        ],
    );
    format!("{}{unit}", magnitude(u))
}

/// A name for a workload, pin, bus, stream or node: valid ones, and every way one can be bad
/// (case, length, separators, control and bidi characters, path tricks).
pub fn name(u: &mut Unstructured<'_>) -> String {
    match int(u, 0..=5) {
        0 => pick(
            u,
            &[
                "counter",
                "thermostat",
                "a",
                "led",
                "button",
                "adc",
                "env",
                "door",
                "node-1",
                "w-0",
                "9",
            ],
        )
        .to_owned(),
        1 => pick(
            u,
            &[
                "",
                "Bad",
                "a b",
                "a\nb",
                "a\rb",
                "\u{202e}evil",
                "é",
                "🦀",
                "-a",
                "a-",
                "a/b",
                "+",
                "#",
                "a\0b",
                "..",
                "../etc",
                "con",
                "a:b",
                "\"quoted\"",
                "\\",
                "\u{feff}bom",
                "\t",
            ],
        )
        .to_owned(),
        2 => {
            let len = pick(u, &[62usize, 63, 64, 65, 127, 128, 129, 256, 4096]);
            "a".repeat(len)
        }
        3 => format!("w-{}", int(u, 0..=20)),
        _ => {
            let len = int::<usize>(u, 0..=24);
            (0..len)
                .map(|_| {
                    pick(
                        u,
                        &[
                            'a', 'z', '0', '9', '-', '_', '.', 'A', ' ', '/', '\n', 'é', '\u{202e}',
                        ],
                    )
                })
                .collect()
        }
    }
}

/// A pin name: the sim board's, another board's, or nonsense.
pub fn pin(u: &mut Unstructured<'_>) -> String {
    if one_in(u, 4) {
        return name(u);
    }
    pick(
        u,
        &[
            "GPIO17", "GPIO27", "GPIO22", "GPIO2", "GPIO0", "ID_SDA", "GPIO99", "gpio17", "11",
            "GPIO-1",
        ],
    )
    .to_owned()
}

/// A bus name: the sim board's SPI and I2C buses, others, or nonsense.
pub fn bus(u: &mut Unstructured<'_>) -> String {
    if one_in(u, 4) {
        return name(u);
    }
    pick(
        u,
        &[
            "spi0.0",
            "spi0.1",
            "spi1.0",
            "i2c-1",
            "i2c-0",
            "i2c-99",
            "spi9.9",
            "/dev/i2c-1",
        ],
    )
    .to_owned()
}

/// A path, relative or absolute, plain or hostile.
pub fn path(u: &mut Unstructured<'_>) -> String {
    if one_in(u, 5) {
        return name(u);
    }
    pick(
        u,
        &[
            "counter.wasm",
            "m.wasm",
            "/srv/m.wasm",
            "../../etc/passwd",
            "/dev/zero",
            "/dev/stdin",
            "/proc/self/mem",
            "",
            ".",
            "/",
            "dir/",
            "a\nb.wasm",
            "hello-oci",
            "image.tar.gz",
            "rootfs",
            "vmlinuz",
            "initrd.cpio.gz",
        ],
    )
    .to_owned()
}

/// A sha256 reference: well formed, upper case, short, long, or not hex.
pub fn digest_ref(u: &mut Unstructured<'_>) -> String {
    let hex: String = (0..64)
        .map(|_| pick(u, &['0', '1', '9', 'a', 'f']))
        .collect();
    match int(u, 0..=4) {
        0 | 1 => format!("sha256:{hex}"),
        2 => format!("sha256:{}", hex.to_ascii_uppercase().replace('A', "F")),
        3 => format!("sha256:{}", &hex[..int::<usize>(u, 0..=63)]),
        _ => pick(
            u,
            &[
                "sha256:",
                "sha256:zz",
                "sha512:00",
                "SHA256:00",
                "sha256:../../x",
            ],
        )
        .to_owned(),
    }
}

/// A small document tree, rendered as TOML or JSON.
#[derive(Debug, Clone, PartialEq)]
pub enum Doc {
    /// A string.
    Str(String),
    /// An integer.
    Int(i64),
    /// A float (NaN and infinities included).
    Float(f64),
    /// A boolean.
    Bool(bool),
    /// An array.
    Arr(Vec<Doc>),
    /// A table, keys in order (duplicates allowed, to test their refusal).
    Table(Vec<(String, Doc)>),
}

impl Doc {
    /// A string value.
    pub fn s(text: impl Into<String>) -> Doc {
        Doc::Str(text.into())
    }

    /// Renders a top-level table as a TOML document; anything else becomes `value = ...`.
    pub fn to_toml(&self) -> String {
        let mut out = String::new();
        match self {
            Doc::Table(entries) => {
                for (key, value) in entries {
                    out.push_str(&toml_key(key));
                    out.push_str(" = ");
                    value.toml_value(&mut out);
                    out.push('\n');
                }
            }
            other => {
                out.push_str("value = ");
                other.toml_value(&mut out);
                out.push('\n');
            }
        }
        out
    }

    fn toml_value(&self, out: &mut String) {
        match self {
            Doc::Str(s) => out.push_str(&toml_string(s)),
            Doc::Int(i) => out.push_str(&i.to_string()),
            Doc::Float(f) if f.is_nan() => out.push_str("nan"),
            Doc::Float(f) if f.is_infinite() => out.push_str(if *f > 0.0 { "inf" } else { "-inf" }),
            Doc::Float(f) => out.push_str(&format!("{f:?}")),
            Doc::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            Doc::Arr(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    item.toml_value(out);
                }
                out.push(']');
            }
            Doc::Table(entries) => {
                out.push('{');
                for (i, (key, value)) in entries.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push(' ');
                    out.push_str(&toml_key(key));
                    out.push_str(" = ");
                    value.toml_value(out);
                }
                out.push_str(" }");
            }
        }
    }

    /// Renders the tree as JSON (NaN and infinities become `null`, as JSON has neither).
    pub fn to_json(&self) -> String {
        let mut out = String::new();
        self.json_value(&mut out);
        out
    }

    fn json_value(&self, out: &mut String) {
        match self {
            Doc::Str(s) => out.push_str(&serde_json::Value::from(s.as_str()).to_string()),
            Doc::Int(i) => out.push_str(&i.to_string()),
            Doc::Float(f) => out.push_str(&serde_json::Value::from(*f).to_string()),
            Doc::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            Doc::Arr(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    item.json_value(out);
                }
                out.push(']');
            }
            Doc::Table(entries) => {
                out.push('{');
                for (i, (key, value)) in entries.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(&serde_json::Value::from(key.as_str()).to_string());
                    out.push(':');
                    value.json_value(out);
                }
                out.push('}');
            }
        }
    }
}

/// A TOML key: bare when it can be, quoted otherwise.
fn toml_key(key: &str) -> String {
    if !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        key.to_owned()
    } else {
        toml_string(key)
    }
}

/// A TOML basic string with every control character escaped.
fn toml_string(text: &str) -> String {
    let mut out = String::from("\"");
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Some value of any type, for a field given the wrong one.
pub fn any_value(u: &mut Unstructured<'_>, depth: u32) -> Doc {
    match int(u, 0..=6) {
        0 => Doc::Str(name(u)),
        1 => Doc::Int(number(u)),
        2 => Doc::Float(pick(
            u,
            &[
                0.0,
                0.001,
                0.01,
                0.5,
                1.0,
                64.0,
                1e9,
                -1.0,
                f64::NAN,
                f64::INFINITY,
                1e308,
            ],
        )),
        3 => Doc::Bool(u.arbitrary().unwrap_or(false)),
        4 if depth < 3 => {
            let n = int::<usize>(u, 0..=3);
            Doc::Arr((0..n).map(|_| any_value(u, depth + 1)).collect())
        }
        5 if depth < 3 => {
            let n = int::<usize>(u, 0..=3);
            Doc::Table((0..n).map(|_| (name(u), any_value(u, depth + 1))).collect())
        }
        _ => Doc::Str(duration(u)),
    }
}

/// Text from raw fuzzer bytes: valid UTF-8 kept as is, anything else decoded lossily (the
/// parsers take `&str`; invalid UTF-8 is refused before them, by the reader).
pub fn text(data: &[u8]) -> std::borrow::Cow<'_, str> {
    String::from_utf8_lossy(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_render_as_toml_and_json_that_parse_back() {
        let doc = Doc::Table(vec![
            ("name".into(), Doc::s("a\"b\n\u{202e}")),
            (
                "limits".into(),
                Doc::Table(vec![("queue".into(), Doc::Int(-1))]),
            ),
            (
                "list".into(),
                Doc::Arr(vec![Doc::Float(f64::NAN), Doc::Bool(true)]),
            ),
            ("odd key".into(), Doc::Float(1.5)),
        ]);
        let toml: toml::Table = toml::from_str(&doc.to_toml()).expect("TOML parses");
        assert_eq!(toml["name"].as_str(), Some("a\"b\n\u{202e}"));
        assert_eq!(toml["limits"]["queue"].as_integer(), Some(-1));
        assert_eq!(toml["odd key"].as_float(), Some(1.5));
        let json: serde_json::Value = serde_json::from_str(&doc.to_json()).expect("JSON parses");
        assert_eq!(json["list"][0], serde_json::Value::Null);
        assert_eq!(json["name"], "a\"b\n\u{202e}");
    }

    #[test]
    fn exhausted_bytes_still_give_values() {
        let mut u = Unstructured::new(&[]);
        assert_eq!(name(&mut u), "counter");
        assert_eq!(number(&mut u), 0);
    }
}
