//! Which outbox rows to publish next, which are acknowledged, which to resend.
//!
//! No I/O here: the session feeds in rows read from the outbox and the MQTT events of one
//! connection, and [`Drain`] answers what to publish and which rows may be deleted.
//!
//! - Rows go out in row-id order, hence in order per stream, with at most `max_inflight`
//!   handed to the client and not yet acknowledged.
//! - The MQTT client assigns packet ids itself, in the order it sends: each
//!   `Outgoing::Publish(pkid)` event matches the oldest publish handed over without a packet id
//!   yet ([`Drain::on_sent`]); a PUBACK then names the row ([`Drain::on_puback`]).
//! - A row may be deleted only once its PUBACK arrived. When the connection drops, every row
//!   not acknowledged is published again, first and in order, with the same message id
//!   ([`Drain::on_disconnect`]).

use std::collections::{BTreeMap, HashMap, VecDeque};

use crate::message::{Envelope, MessageId};
use crate::outbox::{Row, RowId, RowKind};
use crate::topics::{NameError, Topics};

/// A publish the session should hand to the MQTT client (QoS 1).
#[derive(Debug, Clone, PartialEq)]
pub struct PublishRequest {
    /// The row it carries.
    pub row: RowId,
    /// Where to publish.
    pub topic: String,
    /// The envelope bytes.
    pub payload: Vec<u8>,
    /// Whether the broker keeps it as the topic's last value (reported state).
    pub retain: bool,
}

/// A row that can never be published: its names do not fit the topic scheme, or its message
/// is larger than the broker may be sent.
#[derive(Debug, thiserror::Error)]
#[error("outbox row {} cannot be published: {source}", row.0)]
pub struct UnpublishableRow {
    /// The row.
    pub row: RowId,
    /// Why.
    #[source]
    pub source: Unpublishable,
}

/// Why a row cannot be published.
#[derive(Debug, thiserror::Error)]
pub enum Unpublishable {
    /// A name breaks the topic scheme.
    #[error(transparent)]
    Name(#[from] NameError),
    /// The message is over the session's packet limit (sending it would end every connection).
    #[error("its message is {bytes} bytes, over the {limit}-byte packet limit")]
    TooLarge {
        /// Topic and envelope bytes.
        bytes: usize,
        /// `max_packet_bytes`.
        limit: usize,
    },
}

/// The store-and-forward decisions of one node (see the module docs).
#[derive(Debug)]
pub struct Drain {
    topics: Topics,
    max_inflight: usize,
    max_packet_bytes: usize,
    /// Highest row id read from the outbox.
    cursor: RowId,
    /// Every row read and not yet acknowledged.
    held: BTreeMap<RowId, Row>,
    /// Rows to publish, in order (resends first).
    queued: VecDeque<RowId>,
    /// Handed to the client, packet id not known yet, oldest first.
    submitted: VecDeque<RowId>,
    /// Packet id -> row, waiting for the PUBACK.
    inflight: HashMap<u16, RowId>,
}

impl Drain {
    /// A drain for `topics`'s node with at most `max_inflight` (at least 1) publishes
    /// unacknowledged, none of more than `max_packet_bytes` (topic and payload).
    pub fn new(topics: Topics, max_inflight: usize, max_packet_bytes: usize) -> Self {
        Drain {
            topics,
            max_inflight: max_inflight.max(1),
            max_packet_bytes,
            cursor: RowId(0),
            held: BTreeMap::new(),
            queued: VecDeque::new(),
            submitted: VecDeque::new(),
            inflight: HashMap::new(),
        }
    }

    /// Read the outbox after this row id.
    pub fn cursor(&self) -> RowId {
        self.cursor
    }

    /// How many more rows to read from the outbox now (0: enough are held). Reads one window
    /// ahead so publishing does not wait on the outbox.
    pub fn wanted(&self) -> usize {
        (2 * self.max_inflight).saturating_sub(self.held.len())
    }

    /// Takes rows read with `next_rows(self.cursor(), ..)`. Rows at or below the cursor (already
    /// held or acknowledged) are ignored.
    pub fn add_rows(&mut self, rows: impl IntoIterator<Item = Row>) {
        for row in rows {
            if row.id <= self.cursor {
                continue;
            }
            self.cursor = row.id;
            self.queued.push_back(row.id);
            self.held.insert(row.id, row);
        }
    }

    /// Publishes handed to the client and not yet acknowledged.
    pub fn inflight(&self) -> usize {
        self.submitted.len() + self.inflight.len()
    }

    /// Rows held in memory: queued, in flight, or waiting for a resend.
    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// Ids of rows held and not acknowledged, oldest first.
    pub fn unacknowledged(&self) -> impl Iterator<Item = RowId> + '_ {
        self.held.keys().copied()
    }

    /// The next publish, if one is queued and the in-flight window has room; the row counts as
    /// handed to the client from now on. A row whose names break the topic scheme is returned as
    /// an error and forgotten (it can never be sent); delete it from the outbox and report it.
    pub fn next_publish(&mut self) -> Option<Result<PublishRequest, UnpublishableRow>> {
        if self.inflight() >= self.max_inflight {
            return None;
        }
        let id = self.queued.pop_front()?;
        let row = self
            .held
            .get(&id)
            .expect("every queued row id is held until acknowledged");
        let topic = match row.kind {
            RowKind::Telemetry => self.topics.telemetry(&row.workload, &row.stream),
            RowKind::State => Ok(self.topics.reported()),
            RowKind::CmdResult => self.topics.cmd_result(&row.workload),
            RowKind::Event => Ok(self.topics.events()),
        };
        let topic = match topic {
            Ok(topic) => topic,
            Err(source) => {
                self.held.remove(&id);
                return Some(Err(UnpublishableRow {
                    row: id,
                    source: source.into(),
                }));
            }
        };
        let envelope = Envelope {
            id: MessageId::new(self.topics.node(), id.0),
            ts: row.created_ms,
            payload: row.payload.clone(),
        };
        let payload = envelope.to_bytes();
        // A PUBLISH's remaining length: topic length, topic, packet id, payload.
        let bytes = 2 + topic.len() + 2 + payload.len();
        if bytes > self.max_packet_bytes {
            self.held.remove(&id);
            return Some(Err(UnpublishableRow {
                row: id,
                source: Unpublishable::TooLarge {
                    bytes,
                    limit: self.max_packet_bytes,
                },
            }));
        }
        self.submitted.push_back(id);
        Some(Ok(PublishRequest {
            row: id,
            topic,
            payload,
            retain: row.kind == RowKind::State,
        }))
    }

    /// Takes back the publish [`Drain::next_publish`] just returned, which the client had no
    /// room for: it goes first next time. Returns whether there was one.
    pub fn unsubmit(&mut self) -> bool {
        match self.submitted.pop_back() {
            Some(id) => {
                self.queued.push_front(id);
                true
            }
            None => false,
        }
    }

    /// The client sent the oldest handed-over publish with packet id `pkid`
    /// (`Outgoing::Publish(pkid)`). Returns the row, or `None` if nothing was waiting for an id.
    pub fn on_sent(&mut self, pkid: u16) -> Option<RowId> {
        let id = self.submitted.pop_front()?;
        if let Some(old) = self.inflight.insert(pkid, id) {
            // The client reuses a packet id only after its PUBACK; keep the old row for resend.
            self.queued.push_front(old);
            self.sort_queue();
        }
        Some(id)
    }

    /// The broker acknowledged packet `pkid`: returns the row that may now be deleted, or `None`
    /// for an unknown packet id (already acknowledged, or from before a reconnect).
    pub fn on_puback(&mut self, pkid: u16) -> Option<RowId> {
        let id = self.inflight.remove(&pkid)?;
        self.held.remove(&id);
        Some(id)
    }

    /// The connection dropped: every row not acknowledged goes back to the front of the queue,
    /// in order, to be published again on the next connection. Returns how many will be resent.
    pub fn on_disconnect(&mut self) -> usize {
        let resend = self.submitted.len() + self.inflight.len();
        self.queued.extend(self.submitted.drain(..));
        self.queued.extend(self.inflight.drain().map(|(_, id)| id));
        self.sort_queue();
        resend
    }

    fn sort_queue(&mut self) {
        self.queued.make_contiguous().sort_unstable();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn row(id: u64, kind: RowKind, stream: &str) -> Row {
        Row {
            id: RowId(id),
            workload: "w".into(),
            stream: stream.into(),
            kind,
            created_ms: 1000 + id,
            payload: json!({ "n": id }),
        }
    }

    fn telemetry(ids: std::ops::RangeInclusive<u64>) -> Vec<Row> {
        ids.map(|i| row(i, RowKind::Telemetry, "s")).collect()
    }

    fn drain(max_inflight: usize) -> Drain {
        Drain::new(Topics::new("n1").unwrap(), max_inflight, 1 << 20)
    }

    fn publish_all(d: &mut Drain) -> Vec<u64> {
        let mut out = Vec::new();
        while let Some(p) = d.next_publish() {
            out.push(p.unwrap().row.0);
        }
        out
    }

    #[test]
    fn publishes_in_row_order_up_to_max_inflight() {
        let mut d = drain(3);
        d.add_rows(telemetry(1..=5));
        assert_eq!(publish_all(&mut d), [1, 2, 3]);
        assert_eq!(d.inflight(), 3);
        assert_eq!(d.on_sent(7), Some(RowId(1)));
        assert_eq!(d.on_puback(7), Some(RowId(1)));
        assert_eq!(publish_all(&mut d), [4]);
    }

    #[test]
    fn a_row_is_deletable_only_after_its_puback() {
        let mut d = drain(10);
        d.add_rows(telemetry(1..=3));
        publish_all(&mut d);
        d.on_sent(1);
        d.on_sent(2);
        d.on_sent(3);
        // PUBACKs by packet id, out of order.
        assert_eq!(d.on_puback(2), Some(RowId(2)));
        assert_eq!(d.unacknowledged().collect::<Vec<_>>(), [RowId(1), RowId(3)]);
        assert_eq!(d.on_puback(2), None, "a second PUBACK deletes nothing");
        assert_eq!(d.on_puback(9), None, "an unknown packet id deletes nothing");
        assert_eq!(d.on_puback(1), Some(RowId(1)));
        assert_eq!(d.on_puback(3), Some(RowId(3)));
        assert_eq!(d.held(), 0);
    }

    #[test]
    fn reconnect_resends_unacknowledged_rows_first_in_order_with_the_same_id() {
        let mut d = drain(4);
        d.add_rows(telemetry(1..=6));
        let first: Vec<_> = std::iter::from_fn(|| d.next_publish())
            .map(|p| p.unwrap())
            .collect();
        d.on_sent(1);
        d.on_sent(2);
        d.on_puback(1);
        // Row 2 sent without PUBACK, rows 3 and 4 handed over but never sent.
        assert_eq!(d.on_disconnect(), 3);
        assert_eq!(d.on_puback(2), None, "acks of the old connection are void");
        let again: Vec<_> = std::iter::from_fn(|| d.next_publish())
            .map(|p| p.unwrap())
            .collect();
        assert_eq!(
            again.iter().map(|p| p.row.0).collect::<Vec<_>>(),
            [2, 3, 4, 5]
        );
        // Same row, same bytes: same message id.
        assert_eq!(again[0], first[1]);
    }

    #[test]
    fn topics_and_retain_follow_the_row_kind() {
        let mut d = drain(10);
        d.add_rows([
            row(1, RowKind::Telemetry, "temp"),
            row(2, RowKind::State, ""),
            row(3, RowKind::CmdResult, ""),
            row(4, RowKind::Event, ""),
        ]);
        let got: Vec<_> = std::iter::from_fn(|| d.next_publish())
            .map(|p| {
                let p = p.unwrap();
                (p.topic, p.retain)
            })
            .collect();
        assert_eq!(
            got,
            [
                ("lichen/v1/n1/telemetry/w/temp".to_string(), false),
                ("lichen/v1/n1/reported".to_string(), true),
                ("lichen/v1/n1/cmd-result/w".to_string(), false),
                ("lichen/v1/n1/events".to_string(), false),
            ]
        );
    }

    #[test]
    fn payload_is_the_envelope_with_node_and_row_id() {
        let mut d = drain(1);
        d.add_rows([row(42, RowKind::Telemetry, "s")]);
        let p = d.next_publish().unwrap().unwrap();
        let env = Envelope::from_bytes(&p.payload).unwrap();
        assert_eq!(env.id, MessageId::new("n1", 42));
        assert_eq!(env.ts, 1042);
        assert_eq!(env.payload, json!({"n": 42}));
    }

    #[test]
    fn rows_already_read_are_not_taken_twice() {
        let mut d = drain(10);
        d.add_rows(telemetry(1..=3));
        assert_eq!(d.cursor(), RowId(3));
        d.add_rows(telemetry(2..=4));
        assert_eq!(publish_all(&mut d), [1, 2, 3, 4]);
    }

    #[test]
    fn a_row_with_a_bad_name_is_reported_and_does_not_block_the_rest() {
        let mut d = drain(10);
        d.add_rows([
            row(1, RowKind::Telemetry, "a/b"),
            row(2, RowKind::Telemetry, "ok"),
        ]);
        let err = d.next_publish().unwrap().unwrap_err();
        assert_eq!(err.row, RowId(1));
        assert!(err.to_string().contains("stream name \"a/b\""), "{err}");
        assert_eq!(d.next_publish().unwrap().unwrap().row, RowId(2));
    }

    #[test]
    fn a_row_over_the_packet_limit_is_reported_and_does_not_block_the_rest() {
        let mut d = Drain::new(Topics::new("n1").unwrap(), 10, 1000);
        let mut big = row(1, RowKind::CmdResult, "");
        big.payload = json!({"reply": "x".repeat(2000)});
        d.add_rows([big, row(2, RowKind::Telemetry, "ok")]);
        let err = d.next_publish().unwrap().unwrap_err();
        assert_eq!(err.row, RowId(1));
        assert!(
            err.to_string().contains("over the 1000-byte packet limit"),
            "{err}"
        );
        assert_eq!(d.next_publish().unwrap().unwrap().row, RowId(2));
    }

    #[test]
    fn unsubmit_puts_a_publish_back_first() {
        let mut d = drain(10);
        d.add_rows(telemetry(1..=2));
        assert_eq!(d.next_publish().unwrap().unwrap().row, RowId(1));
        assert!(d.unsubmit());
        assert_eq!(d.inflight(), 0);
        assert_eq!(publish_all(&mut d), [1, 2]);
    }

    #[test]
    fn wanted_reads_one_window_ahead() {
        let mut d = drain(4);
        assert_eq!(d.wanted(), 8);
        d.add_rows(telemetry(1..=8));
        assert_eq!(d.wanted(), 0);
        publish_all(&mut d);
        d.on_sent(1);
        d.on_puback(1);
        assert_eq!(d.wanted(), 1);
    }
}
