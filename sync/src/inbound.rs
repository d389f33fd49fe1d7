//! Inbound messages: what the session hands to the agent ([`Inbound`]), what it refuses
//! ([`InboundError`]), and the decisions in between ([`InboundState`]): de-duplicating
//! commands, holding a redelivered copy's PUBACK until the agent has the first, refusing
//! malformed and oversized commands with an answer rather than silence. No I/O here.

use std::collections::HashMap;

use serde::de::{IgnoredAny, MapAccess, Visitor};
use thiserror::Error;
use tokio::sync::mpsc;
use tracing::debug;

use crate::dedup::InboundDedup;
use crate::guard::Oversized;
use crate::message::{Envelope, MessageId};
use crate::topics::{TopicKind, Topics};

/// An inbound message from the hub that was accepted.
#[derive(Debug, Clone, PartialEq)]
pub enum Inbound {
    /// A deployment on `desired` (retained: it comes again on every connection; the agent
    /// applies it only if its version is newer).
    Desired(Envelope),
    /// A command for `workload`, seen for the first time. The broker gets its PUBACK only
    /// when the receiver calls [`InboundAck::ack`], once the command is durably handled; until
    /// then the broker keeps it and redelivers it after a reconnect.
    Command {
        /// The workload it is for.
        workload: String,
        /// The command.
        envelope: Envelope,
        /// Acknowledges the command's PUBLISH.
        ack: InboundAck,
    },
    /// A command that cannot run: its payload is not an envelope, or it is over the size
    /// limit. The agent answers it on `cmd-result/<workload>` with `error` (and `id`, when it
    /// could be read), then calls [`InboundAck::ack`].
    RefusedCommand {
        /// The workload it was for.
        workload: String,
        /// Its message id, if the payload started with one.
        id: Option<MessageId>,
        /// Why it was refused, naming the topic and the limit or the parse error.
        error: String,
        /// Acknowledges the command's PUBLISH.
        ack: InboundAck,
    },
    /// An artifact's chunk manifest (comes only after [`crate::SyncHandle::subscribe`] to it).
    ArtifactManifest {
        /// The artifact's sha256, from the topic.
        digest: String,
        /// The manifest, in its envelope (not yet checked).
        envelope: Envelope,
    },
    /// One chunk of an artifact (comes only after [`crate::SyncHandle::subscribe`] to it).
    ArtifactChunk {
        /// The artifact's sha256, from the topic.
        digest: String,
        /// The chunk's index, from the topic.
        index: u32,
        /// The raw bytes (not yet checked).
        bytes: Vec<u8>,
    },
}

/// The PUBACK of an inbound command, sent when the agent has made the command durable
/// (manual acknowledgement: a crash before that makes the broker deliver it again).
///
/// The session sends it on the connection it has then, for the copy that came on that
/// connection: a command redelivered after a reconnect while the agent still handled the first
/// copy is held until this ack, not acknowledged as a duplicate at once.
#[derive(Debug, Clone)]
pub struct InboundAck {
    key: AckKey,
    session: mpsc::UnboundedSender<AckKey>,
}

impl InboundAck {
    /// Tells the session to send the PUBACK. With no connection, nothing is sent and the broker
    /// redelivers the command on the next one (the agent's inbox de-duplicates it).
    pub fn ack(self) {
        let _ = self.session.send(self.key);
    }
}

impl PartialEq for InboundAck {
    fn eq(&self, other: &Self) -> bool {
        self.key == other.key
    }
}

/// What a command waiting for the agent's acknowledgement is known by: its message id, or, for
/// a refused command whose id could not be read, a number of the session's own.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum AckKey {
    Id(MessageId),
    Local(u64),
}

/// An inbound message that was refused; the session carries on.
#[derive(Debug, Error)]
pub enum InboundError {
    /// A message on a topic this node does not handle.
    #[error("message on unexpected topic {topic:?}")]
    UnexpectedTopic {
        /// The topic.
        topic: String,
    },
    /// The payload is not a Lichen envelope.
    #[error("malformed message on {topic:?}: {source}")]
    Malformed {
        /// The topic it came on.
        topic: String,
        /// What is wrong with it.
        #[source]
        source: serde_json::Error,
    },
    /// The message is over the size limit (read and dropped without being held whole).
    #[error(
        "message of {bytes} bytes on {topic:?} is over the {limit}-byte limit for messages from the hub"
    )]
    TooLarge {
        /// The topic it came on.
        topic: String,
        /// Its payload size.
        bytes: u64,
        /// The limit (`max_packet_bytes`).
        limit: u64,
    },
}

/// What to do with one inbound PUBLISH, decided by [`InboundState::decode`].
#[derive(Debug)]
pub(crate) enum Decoded {
    /// Hand it to the agent and acknowledge it now (desired state, artifacts).
    Deliver(Inbound),
    /// Hand it to the agent, which acknowledges it once durable (commands, refused commands).
    DeliverCommand(Inbound),
    /// A copy of a command the agent already has: acknowledge now if it is done, else the
    /// PUBACK waits for the agent (the copy is kept for it).
    Duplicate,
    /// Refuse it (report, acknowledge now).
    Refused(InboundError),
}

/// The session's memory of inbound commands (see the module docs).
#[derive(Debug)]
pub(crate) struct InboundState {
    topics: Topics,
    max_command_bytes: usize,
    max_packet_bytes: usize,
    dedup: InboundDedup,
    /// Commands handed to the agent and not yet acknowledged by it, with the copy to PUBACK on
    /// the current connection (`None`: it came on an earlier connection).
    pending: HashMap<AckKey, Option<rumqttc::Publish>>,
    next_local: u64,
    acks: mpsc::UnboundedSender<AckKey>,
}

impl InboundState {
    pub(crate) fn new(
        topics: Topics,
        max_command_bytes: usize,
        max_packet_bytes: usize,
        dedup_capacity: usize,
        acks: mpsc::UnboundedSender<AckKey>,
    ) -> Self {
        InboundState {
            topics,
            max_command_bytes,
            max_packet_bytes,
            dedup: InboundDedup::new(dedup_capacity),
            pending: HashMap::new(),
            next_local: 0,
            acks,
        }
    }

    /// Commands the agent has and has not acknowledged yet.
    pub(crate) fn pending(&self) -> usize {
        self.pending.len()
    }

    /// A new connection: copies from the old one can no longer be acknowledged.
    pub(crate) fn new_connection(&mut self) {
        self.pending.values_mut().for_each(|p| *p = None);
    }

    /// The agent acknowledged `key`: the copy to PUBACK on this connection, if there is one.
    pub(crate) fn acked(&mut self, key: &AckKey) -> Option<rumqttc::Publish> {
        self.pending.remove(key).flatten()
    }

    /// Whether `publish` is a copy held for a pending command (its PUBACK waits).
    pub(crate) fn is_held(&self, publish: &rumqttc::Publish) -> bool {
        self.pending.values().any(|h| {
            h.as_ref()
                .is_some_and(|h| h.pkid == publish.pkid && h.topic == publish.topic)
        })
    }

    /// Decides what to do with `publish`; `oversized` is the guard's record when `publish` is
    /// the stand-in of a message too large to read.
    pub(crate) fn decode(
        &mut self,
        publish: &rumqttc::Publish,
        oversized: Option<&Oversized>,
    ) -> Decoded {
        let topic = publish.topic.as_str();
        let payload = &publish.payload[..];
        let too_large = |bytes: u64| InboundError::TooLarge {
            topic: topic.to_owned(),
            bytes,
            limit: self.max_packet_bytes as u64,
        };
        let envelope = || {
            Envelope::from_bytes(payload).map_err(|source| InboundError::Malformed {
                topic: topic.to_owned(),
                source,
            })
        };
        let decoded = match self.topics.parse(topic) {
            Some(TopicKind::Cmd { workload }) => return self.command(workload, publish, oversized),
            Some(_) if oversized.is_some() => {
                Err(too_large(oversized.map_or(0, |o| o.payload_bytes)))
            }
            Some(TopicKind::Desired) => envelope().map(Inbound::Desired),
            Some(TopicKind::ArtifactManifest { digest }) => {
                envelope().map(|envelope| Inbound::ArtifactManifest { digest, envelope })
            }
            Some(TopicKind::ArtifactChunk { digest, index }) => Ok(Inbound::ArtifactChunk {
                digest,
                index,
                bytes: payload.to_vec(),
            }),
            _ => Err(InboundError::UnexpectedTopic {
                topic: topic.to_owned(),
            }),
        };
        match decoded {
            Ok(inbound) => Decoded::Deliver(inbound),
            Err(e) => Decoded::Refused(e),
        }
    }

    fn command(
        &mut self,
        workload: String,
        publish: &rumqttc::Publish,
        oversized: Option<&Oversized>,
    ) -> Decoded {
        let topic = publish.topic.as_str();
        let payload = &publish.payload[..];
        let refusal = if let Some(o) = oversized {
            Some((
                leading_id(&o.prefix),
                format!(
                    "command of {} bytes on {topic:?} is over the {}-byte limit for messages from the hub; it was not run",
                    o.payload_bytes, self.max_packet_bytes
                ),
            ))
        } else if payload.len() > self.max_command_bytes {
            Some((
                leading_id(payload),
                format!(
                    "command of {} bytes on {topic:?} is over the {}-byte limit for commands; it was not run",
                    payload.len(),
                    self.max_command_bytes
                ),
            ))
        } else {
            None
        };
        let (id, refusal) = match refusal {
            Some((id, error)) => (id, Some(error)),
            None => match Envelope::from_bytes(payload) {
                Ok(envelope) => return self.new_command(workload, envelope, publish),
                Err(e) => (
                    leading_id(payload),
                    Some(format!(
                        "malformed command on {topic:?}: {e} (expected {{\"id\": \"<origin>:<sequence>\", \"ts\": <ms>, \"payload\": {{\"command\": NAME, \"payload\": ...}}}}); it was not run"
                    )),
                ),
            },
        };
        let error = refusal.expect("set on every path that gets here");
        let key = match id.clone() {
            Some(id) => {
                if !self.dedup.is_new(&id) {
                    return self.duplicate(AckKey::Id(id), &workload, publish);
                }
                AckKey::Id(id)
            }
            None => {
                self.next_local += 1;
                AckKey::Local(self.next_local)
            }
        };
        self.pending.insert(key.clone(), Some(ack_copy(publish)));
        Decoded::DeliverCommand(Inbound::RefusedCommand {
            workload,
            id,
            error,
            ack: InboundAck {
                key,
                session: self.acks.clone(),
            },
        })
    }

    fn new_command(
        &mut self,
        workload: String,
        envelope: Envelope,
        publish: &rumqttc::Publish,
    ) -> Decoded {
        let key = AckKey::Id(envelope.id.clone());
        if !self.dedup.is_new(&envelope.id) {
            return self.duplicate(key, &workload, publish);
        }
        self.pending.insert(key.clone(), Some(ack_copy(publish)));
        Decoded::DeliverCommand(Inbound::Command {
            workload,
            envelope,
            ack: InboundAck {
                key,
                session: self.acks.clone(),
            },
        })
    }

    fn duplicate(&mut self, key: AckKey, workload: &str, publish: &rumqttc::Publish) -> Decoded {
        if let Some(copy) = self.pending.get_mut(&key) {
            // The agent still handles the first copy: this one is acknowledged with it.
            debug!(?key, %workload, "redelivered command held for its ack");
            *copy = Some(ack_copy(publish));
        } else {
            debug!(?key, %workload, "duplicate command ignored");
        }
        Decoded::Duplicate
    }
}

/// What a PUBACK needs of `publish` (topic, QoS, packet id), without its payload: a pending
/// command must not keep up to a packet's worth of memory.
fn ack_copy(publish: &rumqttc::Publish) -> rumqttc::Publish {
    let mut copy = rumqttc::Publish::new(publish.topic.clone(), publish.qos, Vec::new());
    copy.pkid = publish.pkid;
    copy.dup = publish.dup;
    copy
}

/// The envelope id a payload starts with, read from as much of it as there is: the `id` member
/// when every member before it is complete (every Lichen tool writes `id` first).
pub(crate) fn leading_id(bytes: &[u8]) -> Option<MessageId> {
    struct Find<'a>(&'a mut Option<String>);
    impl<'de> Visitor<'de> for Find<'_> {
        type Value = ();
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("an envelope object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
            while let Some(key) = map.next_key::<String>()? {
                if key == "id" {
                    *self.0 = Some(map.next_value::<String>()?);
                    return Ok(());
                }
                map.next_value::<IgnoredAny>()?;
            }
            Ok(())
        }
    }
    let mut found = None;
    let mut de = serde_json::Deserializer::from_slice(bytes);
    // The payload is cut short or malformed past the id: the error after it does not matter.
    let _ = serde::Deserializer::deserialize_map(&mut de, Find(&mut found));
    found?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rumqttc::QoS;

    fn state() -> (InboundState, mpsc::UnboundedReceiver<AckKey>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (
            InboundState::new(Topics::new("n1").unwrap(), 100, 1000, 16, tx),
            rx,
        )
    }

    fn publish(topic: &str, pkid: u16, payload: &[u8]) -> rumqttc::Publish {
        let mut p = rumqttc::Publish::new(topic, QoS::AtLeastOnce, payload.to_vec());
        p.pkid = pkid;
        p
    }

    #[test]
    fn leading_id_reads_the_id_of_a_cut_or_broken_envelope() {
        let id = Some(MessageId::new("hub", 7));
        assert_eq!(leading_id(br#"{"id":"hub:7","ts":1,"payload":{"x":"#), id);
        assert_eq!(leading_id(br#"{"ts":1, "id" : "hub:7", "payload":"#), id);
        assert_eq!(leading_id(br#"{"id":"hub:7","ts":"one"}"#), id);
        assert_eq!(leading_id(br#"{"payload":{"big":[1,2,3"#), None);
        assert_eq!(leading_id(br#"{"id":"not an id"}"#), None);
        assert_eq!(leading_id(b"not json"), None);
    }

    #[test]
    fn malformed_and_oversized_commands_are_refused_with_an_answer_not_dropped() {
        let (mut s, _acks) = state();
        let topic = "lichen/v1/n1/cmd/door";
        let Decoded::DeliverCommand(Inbound::RefusedCommand {
            workload,
            id,
            error,
            ..
        }) = s.decode(&publish(topic, 1, br#"{"id":"hub:1","ts":1}"#), None)
        else {
            panic!("a malformed command is refused with an answer");
        };
        assert_eq!(
            (workload.as_str(), id),
            ("door", Some(MessageId::new("hub", 1)))
        );
        assert!(
            error.starts_with("malformed command on \"lichen/v1/n1/cmd/door\": "),
            "{error}"
        );
        assert!(
            error.contains("payload"),
            "names the missing field: {error}"
        );

        let big = format!(r#"{{"id":"hub:2","ts":1,"payload":"{}"}}"#, "x".repeat(200));
        let Decoded::DeliverCommand(Inbound::RefusedCommand { id, error, .. }) =
            s.decode(&publish(topic, 2, big.as_bytes()), None)
        else {
            panic!("an oversized command is refused with an answer");
        };
        assert_eq!(id, Some(MessageId::new("hub", 2)));
        assert!(
            error.contains("over the 100-byte limit for commands"),
            "{error}"
        );

        let record = Oversized {
            seq: 0,
            topic: topic.into(),
            pkid: 3,
            payload_bytes: 50 << 20,
            prefix: br#"{"id":"hub:3","ts":1,"payl"#.to_vec(),
        };
        let Decoded::DeliverCommand(Inbound::RefusedCommand { id, error, .. }) =
            s.decode(&publish(topic, 3, &[0xff; 9]), Some(&record))
        else {
            panic!("a command dropped by the guard is refused with an answer");
        };
        assert_eq!(id, Some(MessageId::new("hub", 3)));
        assert!(
            error.contains("52428800 bytes") && error.contains("1000-byte limit"),
            "{error}"
        );
        assert_eq!(s.pending(), 3);
    }

    #[test]
    fn a_copy_of_a_pending_command_is_held_and_a_done_one_ignored() {
        let (mut s, mut acks) = state();
        let topic = "lichen/v1/n1/cmd/door";
        let body = br#"{"id":"hub:5","ts":1,"payload":{"command":"get"}}"#;
        let Decoded::DeliverCommand(Inbound::Command { ack, .. }) =
            s.decode(&publish(topic, 1, body), None)
        else {
            panic!("a new command is handed over");
        };
        s.new_connection();
        let copy = publish(topic, 9, body);
        assert!(matches!(s.decode(&copy, None), Decoded::Duplicate));
        assert!(s.is_held(&copy), "the redelivered copy waits for the agent");
        ack.ack();
        let key = acks.try_recv().unwrap();
        assert_eq!(
            s.acked(&key).map(|p| p.pkid),
            Some(9),
            "PUBACK the copy of this connection"
        );
        assert!(matches!(s.decode(&copy, None), Decoded::Duplicate));
        assert!(!s.is_held(&copy));
    }

    #[test]
    fn oversized_desired_state_is_refused_naming_the_limit() {
        let (mut s, _acks) = state();
        let record = Oversized {
            seq: 0,
            topic: "lichen/v1/n1/desired".into(),
            pkid: 1,
            payload_bytes: 2 << 20,
            prefix: Vec::new(),
        };
        let Decoded::Refused(e) = s.decode(
            &publish("lichen/v1/n1/desired", 1, &[0xff; 9]),
            Some(&record),
        ) else {
            panic!("refused");
        };
        assert_eq!(
            e.to_string(),
            "message of 2097152 bytes on \"lichen/v1/n1/desired\" is over the 1000-byte limit for messages from the hub"
        );
    }
}
