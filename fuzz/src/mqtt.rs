//! The inbound MQTT size guard (`lichen_sync::guard`): the bytes a broker sends, fed to the
//! guard in pieces split anywhere, as they come off a socket.
//!
//! The first byte picks the mode: even, the rest is the byte stream as it is (after two bytes
//! that pick the limit and the piece sizes); odd, the rest drives a generator of well-formed
//! MQTT 3.1.1 packets as rumqttc encodes them (PUBLISH at every QoS, retained or not, with
//! payloads around the limit; acknowledgements; pings), some over the limit.
//!
//! Properties beyond "no panic":
//! - the output, the records of refused messages and the error do not depend on how the
//!   stream is split into pieces;
//! - the output grows by at most a stand-in per refused message beyond the input, and a
//!   record keeps at most `PREFIX_BYTES` of a payload;
//! - for well-formed packets: every packet within the limit comes out byte for byte; every
//!   PUBLISH over it comes out as a stand-in rumqttc reads, with its topic, QoS, retain flag
//!   and packet id, and a payload naming the record (numbered in order) that holds its topic,
//!   packet id, size and first bytes; any other packet over the limit ends the stream with an
//!   error naming its type.

use arbitrary::Unstructured;
use bytes::BytesMut;
use lichen_sync::guard::{GuardError, InboundGuard, MAX_STAND_IN, Oversized, PREFIX_BYTES};
use rumqttc::{
    ConnAck, ConnectReturnCode, Packet, PubAck, PubComp, PubRec, PubRel, Publish, QoS, SubAck,
    SubscribeReasonCode, UnsubAck,
};

use crate::input::{self, int, one_in, pick};

/// Limits the guard runs with here (the node's is 1 MiB): small, so oversized packets are
/// common.
const LIMITS: &[usize] = &[0, 1, 2, 16, 100, 1000, 4096];

/// What a run of the guard gave.
#[derive(Debug, PartialEq, Eq)]
struct Run {
    out: Vec<u8>,
    refused: Vec<Oversized>,
    error: Option<GuardError>,
}

/// Feeds `input` to a new guard in pieces of the sizes `steps` cycles through.
fn run(limit: usize, input: &[u8], steps: &[usize]) -> Run {
    let mut guard = InboundGuard::new(limit);
    let mut run = Run {
        out: Vec::new(),
        refused: Vec::new(),
        error: None,
    };
    let mut rest = input;
    let mut i = 0;
    while !rest.is_empty() {
        let step = steps
            .get(i % steps.len().max(1))
            .copied()
            .unwrap_or(rest.len());
        let (piece, after) = rest.split_at(step.clamp(1, rest.len()));
        rest = after;
        i += 1;
        if let Err(e) = guard.feed(piece, &mut run.out, &mut run.refused) {
            run.error = Some(e);
            break;
        }
    }
    run
}

/// The `mqtt_guard` target.
pub fn mqtt_guard(data: &[u8]) {
    let Some((mode, rest)) = data.split_first() else {
        return;
    };
    let mut u = Unstructured::new(rest);
    let limit = pick(&mut u, LIMITS);
    let steps: Vec<usize> = (0..int(&mut u, 1..=4))
        .map(|_| int::<usize>(&mut u, 1..=300))
        .collect();
    if mode % 2 == 0 {
        let input = u.take_rest();
        let whole = run(limit, input, &[input.len()]);
        check_bounds(input, &whole);
        assert_eq!(
            run(limit, input, &steps),
            whole,
            "the guard's verdict depends on how the stream is split (limit {limit}, pieces {steps:?})"
        );
        return;
    }
    let packets: Vec<Packet> = (0..int(&mut u, 1..=6))
        .map(|_| packet(&mut u, limit))
        .collect();
    let mut input = Vec::new();
    let mut encoded = Vec::new();
    for p in &packets {
        let mut buf = BytesMut::new();
        p.write(&mut buf, usize::MAX)
            .expect("rumqttc encodes its own packets");
        input.extend_from_slice(&buf);
        encoded.push(buf.to_vec());
    }
    let result = run(limit, &input, &steps);
    check_bounds(&input, &result);
    assert_eq!(
        run(limit, &input, &[input.len()]),
        result,
        "the guard's verdict depends on how the stream is split (limit {limit}, pieces {steps:?})"
    );
    check_packets(limit, &packets, &encoded, &result);
}

/// Bounds that hold for any stream.
fn check_bounds(input: &[u8], run: &Run) {
    for r in &run.refused {
        assert!(
            r.prefix.len() <= PREFIX_BYTES,
            "a record keeps {} payload bytes",
            r.prefix.len()
        );
    }
    let most = input.len() + run.refused.len() * (MAX_STAND_IN + 5);
    assert!(
        run.out.len() <= most,
        "the guard made {} bytes of {} bytes ({} refused)",
        run.out.len(),
        input.len(),
        run.refused.len()
    );
}

/// The remaining length of an encoded packet.
fn remaining(encoded: &[u8]) -> usize {
    let mut value = 0usize;
    for (i, b) in encoded[1..].iter().enumerate().take(4) {
        value |= usize::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            break;
        }
    }
    value
}

/// Well-formed packets through the guard: each passed as it is or stood in for, in order.
fn check_packets(limit: usize, packets: &[Packet], encoded: &[Vec<u8>], run: &Run) {
    let mut out = BytesMut::from(&run.out[..]);
    let mut refused = run.refused.iter();
    let mut seq = 0u64;
    for (packet, bytes) in packets.iter().zip(encoded) {
        let size = remaining(bytes);
        if size <= limit {
            assert!(
                out.len() >= bytes.len() && out[..bytes.len()] == bytes[..],
                "a packet of {size} bytes within the {limit}-byte limit did not pass as it is: {packet:?}"
            );
            let _ = out.split_to(bytes.len());
            continue;
        }
        let Packet::Publish(original) = packet else {
            assert!(
                matches!(run.error, Some(GuardError::TooLarge { kind, bytes: n, .. }) if kind == bytes[0] >> 4 && n == size),
                "a {size}-byte non-PUBLISH packet over the {limit}-byte limit gave {:?}",
                run.error
            );
            assert!(
                out.is_empty(),
                "bytes after the packet that ended the stream"
            );
            return;
        };
        let stand_in = Packet::read(&mut out, usize::MAX)
            .unwrap_or_else(|e| panic!("the stand-in of {original:?} does not read: {e}"));
        let Packet::Publish(stand_in) = stand_in else {
            panic!("the stand-in of {original:?} is {stand_in:?}");
        };
        assert_eq!(
            (
                &stand_in.topic,
                stand_in.qos,
                stand_in.retain,
                stand_in.pkid
            ),
            (
                &original.topic,
                original.qos,
                original.retain,
                original.pkid
            ),
            "the stand-in does not keep the original's topic, QoS, retain flag and packet id"
        );
        assert_eq!(
            lichen_sync::guard::stand_in_seq(&stand_in.payload),
            Some(seq),
            "the stand-in's payload does not name record {seq}"
        );
        let record = refused
            .next()
            .unwrap_or_else(|| panic!("no record for the stand-in {seq}"));
        let keep = original.payload.len().min(PREFIX_BYTES);
        assert_eq!(
            (
                record.seq,
                record.topic.as_str(),
                record.pkid,
                record.payload_bytes,
                &record.prefix[..]
            ),
            (
                seq,
                original.topic.as_str(),
                original.pkid,
                original.payload.len() as u64,
                &original.payload[..keep]
            ),
            "the record of an oversized PUBLISH is wrong"
        );
        seq += 1;
    }
    assert!(
        run.error.is_none(),
        "well-formed packets gave {:?}",
        run.error
    );
    assert!(out.is_empty(), "{} bytes more than the packets", out.len());
    assert!(refused.next().is_none(), "a record without its stand-in");
}

fn qos(u: &mut Unstructured<'_>) -> QoS {
    pick(u, &[QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce])
}

/// A packet a broker sends a client, its size around `limit`.
fn packet(u: &mut Unstructured<'_>, limit: usize) -> Packet {
    let pkid = int(u, 1..=u16::MAX);
    match int(u, 0..=9) {
        0..=4 => {
            let topic = if one_in(u, 4) {
                input::name(u)
            } else {
                pick(
                    u,
                    &[
                        "lichen/v1/node-1/desired",
                        "lichen/v1/node-1/cmd/door",
                        "lichen/v1/node-1/artifact/ab/0",
                        "x",
                    ],
                )
                .to_owned()
            };
            let len = match int(u, 0..=3) {
                0 => int::<usize>(u, 0..=16),
                1 => limit.saturating_sub(topic.len() + 4) + int::<usize>(u, 0..=6),
                2 => limit + int::<usize>(u, 0..=3000),
                _ => PREFIX_BYTES + int::<usize>(u, 0..=2),
            };
            let byte = int::<u8>(u, 0..=255);
            let mut p = Publish::new(topic, qos(u), vec![byte; len]);
            p.retain = one_in(u, 3);
            p.dup = one_in(u, 6);
            if p.qos != QoS::AtMostOnce {
                p.pkid = pkid;
            }
            Packet::Publish(p)
        }
        5 => Packet::PubAck(PubAck::new(pkid)),
        6 => match int(u, 0..=2) {
            0 => Packet::PubRec(PubRec::new(pkid)),
            1 => Packet::PubRel(PubRel::new(pkid)),
            _ => Packet::PubComp(PubComp::new(pkid)),
        },
        7 => Packet::SubAck(SubAck::new(
            pkid,
            (0..int(u, 1..=40))
                .map(|_| SubscribeReasonCode::Success(qos(u)))
                .collect(),
        )),
        8 => Packet::UnsubAck(UnsubAck::new(pkid)),
        _ => {
            if one_in(u, 2) {
                Packet::PingResp
            } else {
                Packet::ConnAck(ConnAck::new(ConnectReturnCode::Success, one_in(u, 2)))
            }
        }
    }
}
