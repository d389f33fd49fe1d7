//! The inbound size guard: the bytes the broker sends, with every PUBLISH too large for the node
//! read and dropped on the way, in constant memory, and a small stand-in put in its place.
//!
//! rumqttc (0.25) reads each incoming packet whole into memory and, when a packet is larger than
//! its `max_incoming_packet_size`, fails the whole connection. A 50 MiB command or a 2 MiB
//! retained desired state then breaks every connection the node makes, for as long as the
//! broker keeps the message. MQTT 3.1.1 has no way for a client to tell the broker its limit
//! (MQTT 5's Maximum Packet Size makes the broker drop such messages silently, so the node could
//! not answer them). The guard sits between the broker's socket and rumqttc instead:
//!
//! - packets whose remaining length is within the limit pass byte for byte;
//! - a PUBLISH over the limit is read (its topic and packet id kept, the first
//!   [`PREFIX_BYTES`] of its payload kept, the rest thrown away as it streams past) and replaced
//!   by a stand-in PUBLISH with the same flags, topic and packet id and a 9-byte payload:
//!   [`STAND_IN_TAG`] and the big-endian sequence number of the [`Oversized`] record that
//!   describes the original. The session answers the stand-in like any message (its PUBACK
//!   acknowledges the original), so the oversized message is refused, reported and acknowledged
//!   and the connection stays up;
//! - any other packet over the limit, or a malformed fixed header, is an error: no broker sends
//!   one, and the connection is closed naming it.
//!
//! Plain decisions on bytes, no I/O: [`crate::link`] runs it on a socket.

use thiserror::Error;

/// First byte of a stand-in's payload (never the first byte of JSON text, so no real Lichen
/// message looks like a stand-in).
pub const STAND_IN_TAG: u8 = 0xff;
/// Bytes of an oversized message's payload kept for the report (enough for the envelope's `id`
/// when it comes first, as every Lichen tool writes it).
pub const PREFIX_BYTES: usize = 1024;
/// The largest stand-in packet's remaining length: a 65,535-byte topic, a packet id and the
/// 9-byte payload.
pub const MAX_STAND_IN: usize = 2 + 65_535 + 2 + 9;

/// MQTT control packet type of PUBLISH (high nibble of the first byte).
const PUBLISH: u8 = 3;

/// A PUBLISH over the limit, read and dropped by the guard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Oversized {
    /// Sequence number, carried by its stand-in.
    pub seq: u64,
    /// Its topic (invalid UTF-8 replaced).
    pub topic: String,
    /// Its packet id (0 at QoS 0).
    pub pkid: u16,
    /// Its payload size in bytes.
    pub payload_bytes: u64,
    /// The first bytes of its payload.
    pub prefix: Vec<u8>,
}

/// Bytes the guard cannot pass on: the connection must close.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum GuardError {
    /// The remaining length of a fixed header takes more than 4 bytes.
    #[error("the broker sent a malformed packet header (remaining length over 4 bytes)")]
    BadLength,
    /// A packet other than PUBLISH over the limit.
    #[error(
        "the broker sent a packet of type {kind} of {bytes} bytes, over the {limit}-byte limit"
    )]
    TooLarge {
        /// Its control packet type.
        kind: u8,
        /// Its remaining length.
        bytes: usize,
        /// The limit.
        limit: usize,
    },
    /// A PUBLISH whose variable header does not fit in it, or with QoS 3.
    #[error("the broker sent a malformed PUBLISH header")]
    BadPublish,
}

/// Where the guard is in the byte stream.
#[derive(Debug)]
enum State {
    /// Reading a fixed header: the first byte and up to 4 remaining-length bytes.
    Header { buf: [u8; 5], len: usize },
    /// Passing on `left` more bytes of a packet within the limit.
    Copy { left: usize },
    /// Collecting the variable header (topic length, topic, packet id) of an oversized PUBLISH.
    VarHeader {
        flags: u8,
        remaining: usize,
        buf: Vec<u8>,
    },
    /// Dropping the payload of an oversized PUBLISH, keeping its first bytes.
    Skip {
        flags: u8,
        left: usize,
        record: Oversized,
    },
}

/// The guard for one connection (see the module docs).
#[derive(Debug)]
pub struct InboundGuard {
    limit: usize,
    state: State,
    next_seq: u64,
}

impl InboundGuard {
    /// A guard passing packets whose remaining length is at most `limit` bytes.
    pub fn new(limit: usize) -> Self {
        InboundGuard {
            limit,
            state: State::Header {
                buf: [0; 5],
                len: 0,
            },
            next_seq: 0,
        }
    }

    /// Takes the next bytes from the broker: appends what the client may read to `out` and the
    /// oversized messages completed in these bytes to `refused` (before their stand-ins are in
    /// `out`, so a reader of `out` always finds the record of a stand-in it meets).
    pub fn feed(
        &mut self,
        mut input: &[u8],
        out: &mut Vec<u8>,
        refused: &mut Vec<Oversized>,
    ) -> Result<(), GuardError> {
        while !input.is_empty() {
            match &mut self.state {
                State::Header { buf, len } => {
                    buf[*len] = input[0];
                    *len += 1;
                    input = &input[1..];
                    if let Some(remaining) = remaining_length(&buf[..*len])? {
                        let header = &buf[..*len];
                        let first = header[0];
                        if remaining <= self.limit {
                            out.extend_from_slice(header);
                            self.state = State::Copy { left: remaining };
                            self.settle();
                        } else if first >> 4 == PUBLISH {
                            self.state = State::VarHeader {
                                flags: first & 0x0f,
                                remaining,
                                buf: Vec::new(),
                            };
                        } else {
                            return Err(GuardError::TooLarge {
                                kind: first >> 4,
                                bytes: remaining,
                                limit: self.limit,
                            });
                        }
                    }
                }
                State::Copy { left } => {
                    let n = (*left).min(input.len());
                    out.extend_from_slice(&input[..n]);
                    *left -= n;
                    input = &input[n..];
                    self.settle();
                }
                State::VarHeader {
                    flags,
                    remaining,
                    buf,
                } => {
                    let qos = (*flags >> 1) & 3;
                    if qos == 3 {
                        return Err(GuardError::BadPublish);
                    }
                    let need = if buf.len() < 2 {
                        2
                    } else {
                        2 + usize::from(u16::from_be_bytes([buf[0], buf[1]]))
                            + if qos > 0 { 2 } else { 0 }
                    };
                    if need > *remaining {
                        return Err(GuardError::BadPublish);
                    }
                    let n = (need - buf.len()).min(input.len());
                    buf.extend_from_slice(&input[..n]);
                    input = &input[n..];
                    if buf.len() >= 2 && header_len(buf, qos) > *remaining {
                        return Err(GuardError::BadPublish);
                    }
                    if buf.len() >= 2 && buf.len() == header_len(buf, qos) {
                        let topic_len = usize::from(u16::from_be_bytes([buf[0], buf[1]]));
                        let topic = String::from_utf8_lossy(&buf[2..2 + topic_len]).into_owned();
                        let pkid = if qos > 0 {
                            u16::from_be_bytes([buf[2 + topic_len], buf[3 + topic_len]])
                        } else {
                            0
                        };
                        let left = *remaining - buf.len();
                        let record = Oversized {
                            seq: self.next_seq,
                            topic,
                            pkid,
                            payload_bytes: left as u64,
                            prefix: Vec::new(),
                        };
                        self.next_seq += 1;
                        self.state = State::Skip {
                            flags: *flags,
                            left,
                            record,
                        };
                        self.finish_skip(out, refused);
                    }
                }
                State::Skip { left, record, .. } => {
                    let n = (*left).min(input.len());
                    let keep = (PREFIX_BYTES - record.prefix.len()).min(n);
                    record.prefix.extend_from_slice(&input[..keep]);
                    *left -= n;
                    input = &input[n..];
                    self.finish_skip(out, refused);
                }
            }
        }
        Ok(())
    }

    /// After a packet's last byte passed: back to reading a header.
    fn settle(&mut self) {
        if matches!(self.state, State::Copy { left: 0 }) {
            self.state = State::Header {
                buf: [0; 5],
                len: 0,
            };
        }
    }

    /// After an oversized payload's last byte: the record, then its stand-in.
    fn finish_skip(&mut self, out: &mut Vec<u8>, refused: &mut Vec<Oversized>) {
        if !matches!(self.state, State::Skip { left: 0, .. }) {
            return;
        }
        let done = std::mem::replace(
            &mut self.state,
            State::Header {
                buf: [0; 5],
                len: 0,
            },
        );
        let State::Skip { flags, record, .. } = done else {
            unreachable!("matched above");
        };
        stand_in(flags, &record, out);
        refused.push(record);
    }
}

/// The variable header length of a PUBLISH whose first bytes are `buf` (at least 2).
fn header_len(buf: &[u8], qos: u8) -> usize {
    2 + usize::from(u16::from_be_bytes([buf[0], buf[1]])) + if qos > 0 { 2 } else { 0 }
}

/// The remaining length encoded after the first byte of `header`, once complete.
fn remaining_length(header: &[u8]) -> Result<Option<usize>, GuardError> {
    let mut value = 0usize;
    for (i, &b) in header.iter().skip(1).enumerate() {
        value |= usize::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Ok(Some(value));
        }
        if i == 3 {
            return Err(GuardError::BadLength);
        }
    }
    Ok(None)
}

/// Appends the stand-in PUBLISH of `record` to `out`.
fn stand_in(flags: u8, record: &Oversized, out: &mut Vec<u8>) {
    let qos = (flags >> 1) & 3;
    let topic = record.topic.as_bytes();
    // A topic that was not UTF-8 grew by its replacement characters; cut it back to a level
    // that still fits the 16-bit length (it is refused as an unexpected topic anyway).
    let topic = &topic[..topic.len().min(usize::from(u16::MAX))];
    let remaining = 2 + topic.len() + if qos > 0 { 2 } else { 0 } + 9;
    out.push((PUBLISH << 4) | flags);
    let mut len = remaining;
    loop {
        let mut b = (len & 0x7f) as u8;
        len >>= 7;
        if len > 0 {
            b |= 0x80;
        }
        out.push(b);
        if len == 0 {
            break;
        }
    }
    let topic_len = u16::try_from(topic.len()).expect("topic cut to 65535 bytes above");
    out.extend_from_slice(&topic_len.to_be_bytes());
    out.extend_from_slice(topic);
    if qos > 0 {
        out.extend_from_slice(&record.pkid.to_be_bytes());
    }
    out.push(STAND_IN_TAG);
    out.extend_from_slice(&record.seq.to_be_bytes());
}

/// The sequence number a stand-in payload carries, if `payload` is one.
pub fn stand_in_seq(payload: &[u8]) -> Option<u64> {
    let (&tag, seq) = payload.split_first()?;
    if tag != STAND_IN_TAG {
        return None;
    }
    Some(u64::from_be_bytes(seq.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;
    use rumqttc::{Packet, Publish, QoS};

    fn publish(topic: &str, qos: QoS, pkid: u16, payload: Vec<u8>) -> Vec<u8> {
        let mut p = Publish::new(topic, qos, payload);
        p.pkid = pkid;
        let mut buf = BytesMut::new();
        p.write(&mut buf).expect("encodes");
        buf.to_vec()
    }

    fn decode_all(bytes: &[u8]) -> Vec<Packet> {
        let mut buf = BytesMut::from(bytes);
        let mut packets = Vec::new();
        while !buf.is_empty() {
            packets.push(Packet::read(&mut buf, usize::MAX).expect("a whole packet"));
        }
        packets
    }

    /// Feeds `input` in pieces of `step` bytes.
    fn run(limit: usize, input: &[u8], step: usize) -> (Vec<u8>, Vec<Oversized>) {
        let mut guard = InboundGuard::new(limit);
        let (mut out, mut refused) = (Vec::new(), Vec::new());
        for piece in input.chunks(step) {
            guard
                .feed(piece, &mut out, &mut refused)
                .expect("valid stream");
        }
        (out, refused)
    }

    #[test]
    fn packets_within_the_limit_pass_byte_for_byte_however_they_are_split() {
        let mut input = publish("a/b", QoS::AtLeastOnce, 7, b"{\"id\":1}".to_vec());
        input.extend(publish("c", QoS::AtMostOnce, 0, vec![1; 300]));
        input.extend([0xd0, 0x00]); // PINGRESP
        for step in [1, 2, 3, 7, 1000] {
            let (out, refused) = run(1024, &input, step);
            assert_eq!(out, input, "step {step}");
            assert!(refused.is_empty());
        }
    }

    #[test]
    fn an_oversized_publish_becomes_a_stand_in_with_its_topic_and_packet_id() {
        let big = {
            let mut p = b"{\"id\":\"hub:9\",\"ts\":1,\"payload\":\"".to_vec();
            p.extend(std::iter::repeat_n(b'x', 50_000));
            p
        };
        let mut input = publish("lichen/v1/n1/cmd/door", QoS::AtLeastOnce, 42, big.clone());
        let after = publish(
            "lichen/v1/n1/cmd/door",
            QoS::AtLeastOnce,
            43,
            b"{}".to_vec(),
        );
        input.extend(&after);
        for step in [1, 5, 4096, 1 << 20] {
            let (out, refused) = run(1000, &input, step);
            assert_eq!(refused.len(), 1, "step {step}");
            let r = &refused[0];
            assert_eq!((r.topic.as_str(), r.pkid), ("lichen/v1/n1/cmd/door", 42));
            assert_eq!(r.payload_bytes, big.len() as u64);
            assert_eq!(r.prefix, big[..PREFIX_BYTES]);
            let packets = decode_all(&out);
            assert_eq!(packets.len(), 2, "step {step}");
            let Packet::Publish(p) = &packets[0] else {
                panic!("a stand-in publish: {packets:?}");
            };
            assert_eq!((p.topic.as_str(), p.pkid), ("lichen/v1/n1/cmd/door", 42));
            assert_eq!(p.qos, QoS::AtLeastOnce);
            assert_eq!(stand_in_seq(&p.payload), Some(0));
            assert_eq!(
                out[out.len() - after.len()..],
                after[..],
                "the next packet intact"
            );
        }
    }

    #[test]
    fn retain_and_qos0_flags_survive_and_records_are_numbered() {
        let mut input = Vec::new();
        let mut retained = Publish::new("lichen/v1/n1/desired", QoS::AtLeastOnce, vec![b'{'; 5000]);
        retained.retain = true;
        retained.pkid = 3;
        let mut buf = BytesMut::new();
        retained.write(&mut buf).unwrap();
        input.extend_from_slice(&buf);
        input.extend(publish("x", QoS::AtMostOnce, 0, vec![0; 5000]));
        let (out, refused) = run(100, &input, 333);
        assert_eq!(refused.iter().map(|r| r.seq).collect::<Vec<_>>(), [0, 1]);
        let packets = decode_all(&out);
        let [Packet::Publish(a), Packet::Publish(b)] = &packets[..] else {
            panic!("{packets:?}");
        };
        assert!(a.retain && a.qos == QoS::AtLeastOnce && a.pkid == 3);
        assert_eq!(stand_in_seq(&a.payload), Some(0));
        assert!(!b.retain && b.qos == QoS::AtMostOnce);
        assert_eq!(stand_in_seq(&b.payload), Some(1));
    }

    #[test]
    fn other_oversized_packets_and_bad_headers_are_errors() {
        let mut guard = InboundGuard::new(10);
        let suback = [0x90, 0x7f];
        let err = guard
            .feed(&suback, &mut Vec::new(), &mut Vec::new())
            .unwrap_err();
        assert_eq!(
            err,
            GuardError::TooLarge {
                kind: 9,
                bytes: 127,
                limit: 10
            }
        );
        let mut guard = InboundGuard::new(10);
        let err = guard
            .feed(
                &[0x30, 0xff, 0xff, 0xff, 0xff],
                &mut Vec::new(),
                &mut Vec::new(),
            )
            .unwrap_err();
        assert_eq!(err, GuardError::BadLength);
        // A topic longer than the packet.
        let mut guard = InboundGuard::new(10);
        let err = guard
            .feed(&[0x32, 20, 0xff, 0xff], &mut Vec::new(), &mut Vec::new())
            .unwrap_err();
        assert_eq!(err, GuardError::BadPublish);
    }

    #[test]
    fn json_never_looks_like_a_stand_in() {
        assert_eq!(stand_in_seq(b"{\"id\":\"hub:1\"}"), None);
        assert_eq!(stand_in_seq(&[STAND_IN_TAG, 0, 0]), None);
        let mut p = vec![STAND_IN_TAG];
        p.extend(5u64.to_be_bytes());
        assert_eq!(stand_in_seq(&p), Some(5));
    }
}
