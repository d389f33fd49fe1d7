//! Commands from the hub: each runs once in effect, in the order it came for its workload, and
//! gets a result on `cmd-result/<workload>`, whatever it was.
//!
//! - A command whose id the inbox holds (a redelivery after a restart) does not run again: its
//!   result went to the outbox with the inbox id when it ran.
//! - Otherwise it is queued for its workload (waiting up to [`ROOM_WAIT`] for room in the
//!   workload's event queue: a flood is held back, not refused), after the command before it
//!   for the same workload. The worker commits the event's key-value writes and telemetry, the
//!   inbox id and the result in one SQLite transaction ([`HubCommand`]); only then does the
//!   broker get the PUBACK. A crash before that commit leaves nothing of the command behind,
//!   and the broker delivers it again.
//! - A command that cannot run (unknown or stopped workload, a kind that takes no commands, a
//!   payload without `command`, a guest that traps, no answer within [`REPLY_WAIT`]) gets
//!   `ok: false` and the reason, recorded with the inbox id in one transaction too. Whichever
//!   commits first, that answer or the worker's, wins: the other finds the id in the inbox. So do commands the session refused (malformed,
//!   over the size limit): with their id when it could be read, else `"cmd": null`.
//!
//! The guest sees the command's message id (`command.id`), stable across redeliveries, so a
//! guest with effects outside its key-value store (an actuator, a message elsewhere) can
//! de-duplicate them itself.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use lichen_sync::{Envelope, InboundAck, MessageId, RowKind};
use serde_json::json;
use tokio::sync::oneshot;

use crate::runtime::{Delivery, DeliveryError, HubCommand, Reply};
use crate::store::{OutboxRecord, StateStore};
use crate::supervisor::Agent;

/// Longest wait for room in a workload's event queue (a workload in back-off takes no events
/// until it restarts); past it the command is answered with an error, not run.
pub const ROOM_WAIT: Duration = Duration::from_secs(30);
/// Longest wait for a queued command to be handled (a workload that failed for good never
/// takes its queue). Past it the command is answered with an error; if the workload handles it
/// later all the same, its commit finds the command's id in the inbox and writes nothing, so
/// the answer stays true.
pub const REPLY_WAIT: Duration = Duration::from_secs(120);
/// Largest reply of a guest sent in a result; a longer one is answered with an error (a result
/// must fit in an MQTT message of the session's 1 MiB limit, with room to spare).
pub const MAX_REPLY_BYTES: usize = 64 << 10;
/// Workloads whose command order is tracked before finished entries are swept.
const LANES: usize = 256;

/// The hub link's command dispatcher (see the module docs).
pub(super) struct Commands {
    agent: Agent,
    store: StateStore,
    /// Commands answered since the agent started (`counters.commands`).
    answered: Arc<AtomicU64>,
    /// Per workload, resolved once the latest command for it is queued (or given up), so the
    /// next one waits its turn.
    lanes: HashMap<String, oneshot::Receiver<()>>,
}

impl Commands {
    pub(super) fn new(agent: Agent, store: StateStore, answered: Arc<AtomicU64>) -> Self {
        Commands {
            agent,
            store,
            answered,
            lanes: HashMap::new(),
        }
    }

    /// Runs command `envelope` for `workload` (in a task of its own); `ack` once it is durable.
    pub(super) fn command(&mut self, workload: String, envelope: Envelope, ack: InboundAck) {
        let (queued, turn) = oneshot::channel();
        let previous = self.lanes.insert(workload.clone(), turn);
        if self.lanes.len() > LANES {
            // Finished lanes (their last command is queued) need no memory.
            self.lanes
                .retain(|_, rx| matches!(rx.try_recv(), Err(oneshot::error::TryRecvError::Empty)));
        }
        let (agent, store, answered) = (
            self.agent.clone(),
            self.store.clone(),
            self.answered.clone(),
        );
        tokio::spawn(async move {
            let id = envelope.id.to_string();
            match store.reads().inbox_contains(&id).await {
                Ok(true) => {
                    // Handled before a restart: its result is in the outbox already.
                    tracing::debug!(%id, %workload, "hub command already handled");
                    let _ = queued.send(());
                    ack.ack();
                    return;
                }
                Ok(false) => {}
                Err(e) => tracing::warn!(%id, "cannot read the inbox: {e}"),
            }
            let outcome = run(&agent, &workload, &id, &envelope.payload, previous, queued).await;
            answered.fetch_add(1, Ordering::Relaxed);
            match outcome {
                Ok(()) => ack.ack(),
                Err(error) => {
                    let error = error.to_string();
                    record_failure(&store, Some(&id), &workload, error, ack).await
                }
            }
        });
    }

    /// Answers a command the session refused (malformed, too large) with `error`.
    pub(super) fn refused(
        &mut self,
        workload: String,
        id: Option<MessageId>,
        error: String,
        ack: InboundAck,
    ) {
        let store = self.store.clone();
        self.answered.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(async move {
            let id = id.map(|i| i.to_string());
            record_failure(&store, id.as_deref(), &workload, error, ack).await;
        });
    }
}

/// Why a hub command was not run (or its result not recorded by the worker): the `error` of
/// its `cmd-result`.
#[derive(Debug, thiserror::Error)]
enum CommandError {
    /// The payload has no command name.
    #[error(transparent)]
    Parse(#[from] ParseError),
    /// The agent has no command queue for the workload (unknown, stopped, another kind): the
    /// agent API's error text.
    #[error("{0}")]
    NoQueue(String),
    /// The workload's queue did not take it.
    #[error("workload {workload:?} did not take command {id}: {source}")]
    NotTaken {
        /// The workload.
        workload: String,
        /// The command's message id.
        id: String,
        /// Why.
        #[source]
        source: DeliveryError,
    },
    /// The guest answered with an error: its own words.
    #[error("{0}")]
    Guest(String),
    /// The guest answered but its result was not committed.
    #[error("workload {workload:?} handled command {id} but did not record it")]
    NotRecorded {
        /// The workload.
        workload: String,
        /// The command's message id.
        id: String,
    },
    /// The worker dropped it.
    #[error("workload {workload:?} dropped command {id} (it stopped or restarted)")]
    Dropped {
        /// The workload.
        workload: String,
        /// The command's message id.
        id: String,
    },
    /// No answer in time.
    #[error(
        "workload {workload:?} did not handle command {id} within {REPLY_WAIT:?}; it was not run"
    )]
    TimedOut {
        /// The workload.
        workload: String,
        /// The command's message id.
        id: String,
    },
}

/// Delivers one command after `previous` (the one before it for the workload) is queued;
/// `Ok` once the worker committed it with its result, or the error to answer with.
async fn run(
    agent: &Agent,
    workload: &str,
    id: &str,
    payload: &serde_json::Value,
    previous: Option<oneshot::Receiver<()>>,
    queued: oneshot::Sender<()>,
) -> Result<(), CommandError> {
    let parsed = parse_command(payload);
    if let Some(previous) = previous {
        let _ = previous.await;
    }
    let (name, text) = match parsed {
        Ok(p) => p,
        Err(e) => {
            let _ = queued.send(());
            return Err(e.into());
        }
    };
    let hub = HubCommand {
        result: Arc::new({
            let (id, workload) = (id.to_owned(), workload.to_owned());
            move |reply: &Reply| result_record(Some(&id), &workload, reply)
        }),
        done: Arc::default(),
    };
    let delivery = Delivery::Command {
        id: id.to_owned(),
        name,
        payload: text.into_bytes(),
        hub: Some(hub.clone()),
    };
    let (reply, answer) = oneshot::channel();
    let delivered = match agent.command_queue(workload).await {
        Ok(queue) => queue
            .deliver_within(delivery, reply, ROOM_WAIT)
            .await
            .map_err(|source| CommandError::NotTaken {
                workload: workload.to_owned(),
                id: id.to_owned(),
                source,
            }),
        Err(e) => Err(CommandError::NoQueue(e.error)),
    };
    // The next command for this workload may be queued now, behind this one.
    let _ = queued.send(());
    delivered?;
    let answer = tokio::time::timeout(REPLY_WAIT, answer).await;
    if hub.done.get().is_some() {
        return Ok(());
    }
    // Nothing was committed: answer with why.
    let (workload, id) = (workload.to_owned(), id.to_owned());
    Err(match answer {
        Ok(Ok(Err(e))) => CommandError::Guest(e),
        Ok(Ok(Ok(_))) => CommandError::NotRecorded { workload, id },
        Ok(Err(_)) => CommandError::Dropped { workload, id },
        Err(_) => CommandError::TimedOut { workload, id },
    })
}

/// Records an `ok: false` result (with the inbox id when there is one, in one transaction),
/// then acknowledges; a store failure leaves the command to be redelivered.
async fn record_failure(
    store: &StateStore,
    id: Option<&str>,
    workload: &str,
    error: String,
    ack: InboundAck,
) {
    let record = result_record(id, workload, &Err(error));
    let stored = match id {
        Some(id) => store.command_done(id, record).await.map(|_| ()),
        None => store.push_outbox(record).await.map(|_| ()),
    };
    match stored {
        Ok(()) => ack.ack(),
        // Not acknowledged: the broker delivers it again after a reconnect.
        Err(e) => tracing::warn!(?id, %workload, "cannot queue the command result: {e}"),
    }
}

/// The `cmd-result` record of command `id` answered with `reply`.
fn result_record(id: Option<&str>, workload: &str, reply: &Reply) -> OutboxRecord {
    let payload = match reply {
        Ok(Some(r)) if r.len() > MAX_REPLY_BYTES => json!({
            "cmd": id,
            "ok": false,
            "error": format!(
                "the reply of workload {workload:?} is {} bytes, over the {MAX_REPLY_BYTES}-byte limit for command replies (the command ran)",
                r.len()
            ),
        }),
        Ok(r) => json!({
            "cmd": id,
            "ok": true,
            "reply": r.as_ref().map(|r| String::from_utf8_lossy(r).into_owned()),
        }),
        Err(e) => json!({
            "cmd": id,
            "ok": false,
            "error": truncate(e, MAX_REPLY_BYTES),
        }),
    };
    OutboxRecord {
        kind: RowKind::CmdResult.as_str().to_owned(),
        workload: workload.to_owned(),
        stream: String::new(),
        payload: payload.to_string().into_bytes(),
        created_at_ms: super::now_ms(),
    }
}

/// A hub command's payload, `{"command": NAME, "payload": TEXT or any JSON}`, as the name and
/// the payload text the guest gets.
pub(super) fn parse_command(payload: &serde_json::Value) -> Result<(String, String), ParseError> {
    let command = payload
        .get("command")
        .and_then(|c| c.as_str())
        .ok_or(ParseError)?;
    let payload = match payload.get("payload") {
        None | Some(serde_json::Value::Null) => String::new(),
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    };
    Ok((command.to_owned(), payload))
}

/// A command payload without its name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "command message has no \"command\" string (expected {{\"command\": NAME, \"payload\": ...}})"
)]
pub(super) struct ParseError;

/// `text` cut to at most `max` bytes (on a character boundary), marked when cut.
fn truncate(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}... ({} bytes cut)", &text[..end], text.len() - end)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(record: &OutboxRecord) -> serde_json::Value {
        serde_json::from_slice(&record.payload).unwrap()
    }

    #[test]
    fn results_carry_the_id_and_stay_within_the_limits() {
        let ok = result_record(Some("hub:1"), "door", &Ok(Some(b"42".to_vec())));
        assert_eq!(ok.kind, "cmd-result");
        assert_eq!(
            payload(&ok),
            json!({"cmd": "hub:1", "ok": true, "reply": "42"})
        );
        let none = result_record(None, "door", &Err("bad".into()));
        assert_eq!(
            payload(&none),
            json!({"cmd": null, "ok": false, "error": "bad"})
        );
        let big = result_record(
            Some("hub:2"),
            "door",
            &Ok(Some(vec![b'x'; MAX_REPLY_BYTES + 1])),
        );
        let v = payload(&big);
        assert_eq!(v["ok"], false);
        assert!(
            v["error"]
                .as_str()
                .unwrap()
                .contains("65537 bytes, over the 65536-byte limit")
        );
        let long = result_record(Some("hub:3"), "door", &Err("é".repeat(MAX_REPLY_BYTES)));
        assert!(long.payload.len() < MAX_REPLY_BYTES + 100);
    }

    #[test]
    fn command_payloads_parse_into_name_and_text() {
        let p = |v| parse_command(&v);
        assert_eq!(
            p(json!({"command": "get"})).unwrap(),
            ("get".to_owned(), String::new())
        );
        assert_eq!(
            p(json!({"command": "set", "payload": {"t": 5}})).unwrap(),
            ("set".to_owned(), "{\"t\":5}".to_owned())
        );
        let err = p(json!({"name": "get"})).unwrap_err();
        assert_eq!(
            err.to_string(),
            r#"command message has no "command" string (expected {"command": NAME, "payload": ...})"#
        );
    }
}
