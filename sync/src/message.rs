//! Message ids and the JSON envelope every Lichen message travels in.
//!
//! MQTT 3.1.1 has no user properties, so the id rides in the payload. Every payload, in both
//! directions, is one JSON object:
//!
//! ```json
//! {"id": "pi-7:42", "ts": 1767225600123, "payload": {"celsius": 21.5}}
//! ```
//!
//! - `id`: the [`MessageId`], `<node>:<sequence>`. The node's sequence is its outbox row id, which
//!   never goes backwards, so a record sent twice (after a reconnect or a restart) carries the same
//!   id both times and the hub de-duplicates on it. Ids the hub sends use the hub's own name.
//! - `ts`: when the record was made, milliseconds since the Unix epoch (not when it was sent: a
//!   record buffered offline for a day keeps its time).
//! - `payload`: any JSON value; its schema belongs to the topic (deployment, telemetry, ...).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use thiserror::Error;

/// A message id: who made the message and its sequence number there.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MessageId {
    /// The node (or hub) that made the message.
    pub node: String,
    /// Its sequence number at that node, strictly increasing.
    pub seq: u64,
}

impl MessageId {
    /// The id of message `seq` made by `node`.
    pub fn new(node: impl Into<String>, seq: u64) -> Self {
        MessageId {
            node: node.into(),
            seq,
        }
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.node, self.seq)
    }
}

/// A string that is not a `<node>:<sequence>` message id.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("message id {0:?} is not of the form <node>:<sequence>")]
pub struct BadMessageId(pub String);

impl FromStr for MessageId {
    type Err = BadMessageId;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || BadMessageId(s.to_owned());
        let (node, seq) = s.rsplit_once(':').ok_or_else(bad)?;
        if node.is_empty() || seq.is_empty() || !seq.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        Ok(MessageId {
            node: node.to_owned(),
            seq: seq.parse().map_err(|_| bad())?,
        })
    }
}

impl Serialize for MessageId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MessageId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// The JSON envelope around every payload (see the module docs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Envelope {
    /// The message id.
    pub id: MessageId,
    /// When the record was made, milliseconds since the Unix epoch.
    pub ts: u64,
    /// The topic-specific content.
    pub payload: serde_json::Value,
}

impl Envelope {
    /// The envelope as JSON bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("an envelope of a JSON value always serialises")
    }

    /// Parses an envelope from a message payload.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn message_id_round_trips_through_its_text() {
        let id = MessageId::new("pi-7", 42);
        assert_eq!(id.to_string(), "pi-7:42");
        assert_eq!("pi-7:42".parse::<MessageId>().unwrap(), id);
        // The sequence is after the last colon, so node names may hold colons.
        assert_eq!(
            "hub:eu:7".parse::<MessageId>().unwrap(),
            MessageId::new("hub:eu", 7)
        );
    }

    #[test]
    fn malformed_message_ids_are_rejected() {
        for bad in [
            "",
            "n1",
            ":5",
            "n1:",
            "n1:-3",
            "n1:x",
            "n1:99999999999999999999999",
        ] {
            assert!(bad.parse::<MessageId>().is_err(), "{bad}");
        }
    }

    #[test]
    fn envelope_has_the_documented_shape() {
        let env = Envelope {
            id: MessageId::new("n1", 3),
            ts: 1000,
            payload: json!({"celsius": 21.5}),
        };
        let text = String::from_utf8(env.to_bytes()).unwrap();
        assert_eq!(
            text,
            r#"{"id":"n1:3","ts":1000,"payload":{"celsius":21.5}}"#
        );
        assert_eq!(Envelope::from_bytes(text.as_bytes()).unwrap(), env);
    }

    #[test]
    fn envelope_without_id_or_with_extra_fields_is_refused() {
        assert!(Envelope::from_bytes(br#"{"ts":1,"payload":{}}"#).is_err());
        assert!(Envelope::from_bytes(br#"{"id":"bad","ts":1,"payload":{}}"#).is_err());
        assert!(Envelope::from_bytes(br#"{"id":"h:1","ts":1,"payload":{},"x":1}"#).is_err());
        assert!(Envelope::from_bytes(b"not json").is_err());
    }
}
