//! The topic scheme: every topic a node publishes or subscribes to, and parsing one back.
//!
//! For node `N` (all under the prefix `lichen/v1/N`):
//!
//! | topic | direction | retained | what |
//! | --- | --- | --- | --- |
//! | `lichen/v1/N/desired` | hub -> node | yes | the deployment the node should run |
//! | `lichen/v1/N/reported` | node -> hub | yes | applied version, workload status, errors, counters |
//! | `lichen/v1/N/telemetry/<workload>/<stream>` | node -> hub | no | telemetry records |
//! | `lichen/v1/N/cmd/<workload>` | hub -> node | no | commands for a workload |
//! | `lichen/v1/N/cmd-result/<workload>` | node -> hub | no | results of those commands |
//! | `lichen/v1/N/events` | node -> hub | no | the node's event log |
//! | `lichen/v1/N/artifact/<sha256>` | hub -> node | yes | an artifact's chunk manifest |
//! | `lichen/v1/N/artifact/<sha256>/<index>` | hub -> node | yes | one chunk (raw bytes) |
//!
//! Node, workload and stream names are one topic level each: they must be non-empty and may not
//! contain `/`, `+`, `#` or NUL, so that a name can never add a level or act as a wildcard.

use thiserror::Error;

/// The first two levels of every Lichen topic: product and scheme version.
pub const PREFIX: &str = "lichen/v1";

/// Longest accepted node, workload or stream name, in bytes.
pub const MAX_NAME_LEN: usize = 128;

/// A name that cannot be one topic level.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum NameError {
    /// The name is empty.
    #[error("{what} name is empty")]
    Empty {
        /// What was named: `node`, `workload` or `stream`.
        what: &'static str,
    },
    /// The name holds a character that would break the topic scheme.
    #[error("{what} name {name:?} contains {found:?}, which MQTT topic levels cannot hold")]
    BadChar {
        /// What was named: `node`, `workload` or `stream`.
        what: &'static str,
        /// The rejected name.
        name: String,
        /// The offending character.
        found: char,
    },
    /// The name is longer than [`MAX_NAME_LEN`].
    #[error("{what} name {name:?} is {len} bytes long, more than {MAX_NAME_LEN}")]
    TooLong {
        /// What was named: `node`, `workload` or `stream`.
        what: &'static str,
        /// The rejected name.
        name: String,
        /// Its length in bytes.
        len: usize,
    },
}

/// Checks that `name` can be one topic level; `what` names it in the error.
pub fn validate_name(what: &'static str, name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty { what });
    }
    if let Some(found) = name.chars().find(|c| matches!(c, '/' | '+' | '#' | '\0')) {
        return Err(NameError::BadChar {
            what,
            name: name.to_owned(),
            found,
        });
    }
    if name.len() > MAX_NAME_LEN {
        return Err(NameError::TooLong {
            what,
            name: name.to_owned(),
            len: name.len(),
        });
    }
    Ok(())
}

/// What a topic of this node's scheme is, parsed by [`Topics::parse`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TopicKind {
    /// `.../desired`
    Desired,
    /// `.../reported`
    Reported,
    /// `.../telemetry/<workload>/<stream>`
    Telemetry {
        /// The workload that published.
        workload: String,
        /// Its stream.
        stream: String,
    },
    /// `.../cmd/<workload>`
    Cmd {
        /// The workload the command is for.
        workload: String,
    },
    /// `.../cmd-result/<workload>`
    CmdResult {
        /// The workload that answered.
        workload: String,
    },
    /// `.../events`
    Events,
    /// `.../artifact/<sha256>`: the chunk manifest of an artifact.
    ArtifactManifest {
        /// The artifact's sha256, 64 lowercase hex digits.
        digest: String,
    },
    /// `.../artifact/<sha256>/<index>`: one chunk of an artifact.
    ArtifactChunk {
        /// The artifact's sha256, 64 lowercase hex digits.
        digest: String,
        /// The chunk's index, from 0.
        index: u32,
    },
}

/// Whether `digest` is a sha256 written as 64 lowercase hex digits.
pub fn is_digest(digest: &str) -> bool {
    digest.len() == 64
        && digest
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// The topics of one node. Built once from a validated node id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    node: String,
    base: String,
}

impl Topics {
    /// The topics of node `node`; fails if the id cannot be one topic level.
    pub fn new(node: &str) -> Result<Self, NameError> {
        validate_name("node", node)?;
        Ok(Topics {
            node: node.to_owned(),
            base: format!("{PREFIX}/{node}"),
        })
    }

    /// The node id.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// `lichen/v1/N/desired`
    pub fn desired(&self) -> String {
        format!("{}/desired", self.base)
    }

    /// `lichen/v1/N/reported`
    pub fn reported(&self) -> String {
        format!("{}/reported", self.base)
    }

    /// `lichen/v1/N/events`
    pub fn events(&self) -> String {
        format!("{}/events", self.base)
    }

    /// `lichen/v1/N/telemetry/<workload>/<stream>`
    pub fn telemetry(&self, workload: &str, stream: &str) -> Result<String, NameError> {
        validate_name("workload", workload)?;
        validate_name("stream", stream)?;
        Ok(format!("{}/telemetry/{workload}/{stream}", self.base))
    }

    /// `lichen/v1/N/cmd/<workload>`
    pub fn cmd(&self, workload: &str) -> Result<String, NameError> {
        validate_name("workload", workload)?;
        Ok(format!("{}/cmd/{workload}", self.base))
    }

    /// `lichen/v1/N/cmd/+`: the filter the node subscribes to for all its workloads' commands.
    pub fn cmd_filter(&self) -> String {
        format!("{}/cmd/+", self.base)
    }

    /// `lichen/v1/N/cmd-result/<workload>`
    pub fn cmd_result(&self, workload: &str) -> Result<String, NameError> {
        validate_name("workload", workload)?;
        Ok(format!("{}/cmd-result/{workload}", self.base))
    }

    /// `lichen/v1/N/artifact/<digest>`: the manifest of an artifact (`digest` as 64 lowercase
    /// hex digits; the caller checks it with [`is_digest`]).
    pub fn artifact_manifest(&self, digest: &str) -> String {
        format!("{}/artifact/{digest}", self.base)
    }

    /// `lichen/v1/N/artifact/<digest>/<index>`: one chunk of an artifact.
    pub fn artifact_chunk(&self, digest: &str, index: u32) -> String {
        format!("{}/artifact/{digest}/{index}", self.base)
    }

    /// What `topic` is, if it belongs to this node's scheme; `None` for anything else
    /// (another node, another prefix, an unknown suffix, a bad name).
    pub fn parse(&self, topic: &str) -> Option<TopicKind> {
        let rest = topic.strip_prefix(self.base.as_str())?.strip_prefix('/')?;
        let levels: Vec<&str> = rest.split('/').collect();
        let name_ok = |what, name: &str| validate_name(what, name).is_ok();
        match levels.as_slice() {
            ["desired"] => Some(TopicKind::Desired),
            ["reported"] => Some(TopicKind::Reported),
            ["events"] => Some(TopicKind::Events),
            ["telemetry", w, s] if name_ok("workload", w) && name_ok("stream", s) => {
                Some(TopicKind::Telemetry {
                    workload: (*w).to_owned(),
                    stream: (*s).to_owned(),
                })
            }
            ["cmd", w] if name_ok("workload", w) => Some(TopicKind::Cmd {
                workload: (*w).to_owned(),
            }),
            ["cmd-result", w] if name_ok("workload", w) => Some(TopicKind::CmdResult {
                workload: (*w).to_owned(),
            }),
            ["artifact", d] if is_digest(d) => Some(TopicKind::ArtifactManifest {
                digest: (*d).to_owned(),
            }),
            ["artifact", d, i]
                if is_digest(d) && !i.is_empty() && i.bytes().all(|b| b.is_ascii_digit()) =>
            {
                Some(TopicKind::ArtifactChunk {
                    digest: (*d).to_owned(),
                    index: i.parse().ok()?,
                })
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_every_topic_of_the_scheme() {
        let t = Topics::new("pi-7").unwrap();
        assert_eq!(t.desired(), "lichen/v1/pi-7/desired");
        assert_eq!(t.reported(), "lichen/v1/pi-7/reported");
        assert_eq!(t.events(), "lichen/v1/pi-7/events");
        assert_eq!(
            t.telemetry("door", "temp").unwrap(),
            "lichen/v1/pi-7/telemetry/door/temp"
        );
        assert_eq!(t.cmd("door").unwrap(), "lichen/v1/pi-7/cmd/door");
        assert_eq!(t.cmd_filter(), "lichen/v1/pi-7/cmd/+");
        assert_eq!(
            t.cmd_result("door").unwrap(),
            "lichen/v1/pi-7/cmd-result/door"
        );
    }

    #[test]
    fn parses_its_own_topics_back() {
        let t = Topics::new("n1").unwrap();
        let cases = [
            (t.desired(), TopicKind::Desired),
            (t.reported(), TopicKind::Reported),
            (t.events(), TopicKind::Events),
            (
                t.telemetry("w", "s").unwrap(),
                TopicKind::Telemetry {
                    workload: "w".into(),
                    stream: "s".into(),
                },
            ),
            (
                t.cmd("w").unwrap(),
                TopicKind::Cmd {
                    workload: "w".into(),
                },
            ),
            (
                t.cmd_result("w").unwrap(),
                TopicKind::CmdResult {
                    workload: "w".into(),
                },
            ),
        ];
        for (topic, kind) in cases {
            assert_eq!(t.parse(&topic), Some(kind), "{topic}");
        }
        let d = "0123456789abcdef".repeat(4);
        assert_eq!(
            t.parse(&t.artifact_manifest(&d)),
            Some(TopicKind::ArtifactManifest { digest: d.clone() })
        );
        assert_eq!(
            t.parse(&t.artifact_chunk(&d, 7)),
            Some(TopicKind::ArtifactChunk {
                digest: d.clone(),
                index: 7
            })
        );
    }

    #[test]
    fn parse_refuses_foreign_or_broken_topics() {
        let t = Topics::new("n1").unwrap();
        for topic in [
            "lichen/v1/n2/desired",
            "lichen/v1/n1",
            "lichen/v1/n1/",
            "lichen/v1/n10/desired",
            "lichen/v2/n1/desired",
            "lichen/v1/n1/desired/extra",
            "lichen/v1/n1/cmd",
            "lichen/v1/n1/cmd/",
            "lichen/v1/n1/cmd/a/b",
            "lichen/v1/n1/telemetry/w",
            "lichen/v1/n1/unknown",
            "lichen/v1/n1/artifact/abc",
            "lichen/v1/n1/artifact/ABCDEF0123456789ABCDEF0123456789ABCDEF0123456789ABCDEF0123456789",
            "lichen/v1/n1/artifact/0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef/x",
            "lichen/v1/n1/artifact/0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef/99999999999",
        ] {
            assert_eq!(t.parse(topic), None, "{topic}");
        }
    }

    #[test]
    fn names_that_would_break_the_scheme_are_rejected() {
        for bad in ["a/b", "a+", "#", "nul\0"] {
            let err = Topics::new(bad).unwrap_err();
            assert!(matches!(err, NameError::BadChar { .. }), "{bad}: {err}");
        }
        assert_eq!(
            Topics::new("").unwrap_err().to_string(),
            "node name is empty"
        );
        let t = Topics::new("n1").unwrap();
        assert_eq!(
            t.telemetry("door", "a/b").unwrap_err().to_string(),
            "stream name \"a/b\" contains '/', which MQTT topic levels cannot hold"
        );
        assert!(t.cmd("+").is_err());
        assert!(t.cmd_result("x#").is_err());
        assert!(matches!(
            Topics::new(&"x".repeat(MAX_NAME_LEN + 1)),
            Err(NameError::TooLong { .. })
        ));
    }
}
