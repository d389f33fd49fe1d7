//! Reading and commanding nodes through the broker: `lichen hub status` (every node's retained
//! reported state), `lichen hub watch` (telemetry, events and command results as they come) and
//! `lichen hub send` (a command and its result).

use std::collections::BTreeMap;
use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use lichen_sync::{Envelope, MessageId, Topics};
use rumqttc::{AsyncClient, Event, Packet, QoS};

use lichen_agent::api::types::WorkloadState;
use lichen_agent::render::{self, Table, emit, push_json};

use crate::{HubSendArgs, HubStatusArgs, HubWatchArgs, options};

pub(crate) async fn status(args: HubStatusArgs, json: bool) -> Result<ExitCode> {
    let url = args.broker.url.clone();
    let (client, mut eventloop) = AsyncClient::new(options(&args.broker, "status")?, 10);
    let filter = format!("{}/+/reported", lichen_sync::topics::PREFIX);
    client
        .subscribe(&filter, QoS::AtLeastOnce)
        .await
        .context("queueing the subscription")?;
    let mut nodes: BTreeMap<String, serde_json::Value> = BTreeMap::new();
    let mut subscribed = false;
    let deadline = tokio::time::Instant::now() + args.wait + Duration::from_secs(10);
    let mut collect_until = None;
    loop {
        let until = collect_until.unwrap_or(deadline);
        match tokio::time::timeout_at(until, eventloop.poll()).await {
            Err(_) if subscribed => break,
            Err(_) => bail!("{url}: not subscribed within 10 s"),
            Ok(Err(e)) => bail!("{url}: {e}"),
            Ok(Ok(Event::Incoming(Packet::SubAck(_)))) => {
                subscribed = true;
                collect_until = Some(tokio::time::Instant::now() + args.wait);
            }
            Ok(Ok(Event::Incoming(Packet::Publish(p)))) => {
                let node = p.topic.split('/').nth(2).unwrap_or_default().to_owned();
                let value = match Envelope::from_bytes(&p.payload) {
                    Ok(env) => env.payload,
                    Err(e) => {
                        serde_json::json!({"error": format!("malformed reported state: {e}")})
                    }
                };
                nodes.insert(node, value);
            }
            Ok(Ok(_)) => {}
        }
    }
    let _ = client.disconnect().await;
    let mut out = Vec::new();
    if json {
        push_json(&mut out, &nodes);
    } else {
        write_status(&mut out, &nodes);
    }
    emit(&out)?;
    Ok(ExitCode::SUCCESS)
}

fn write_status(out: &mut Vec<u8>, nodes: &BTreeMap<String, serde_json::Value>) {
    if nodes.is_empty() {
        out.extend_from_slice(b"no node has reported state on this broker\n");
        return;
    }
    let mut table = Table::new(&[
        "NODE",
        "APPLIED",
        "CONNECTED",
        "WORKLOADS",
        "OUTBOX",
        "DROPPED",
        "INSECURE",
        "LAST-REJECTION",
    ]);
    for (node, r) in nodes {
        let workloads = r["workloads"].as_array().map_or_else(
            || "-".to_owned(),
            |w| {
                let running = w
                    .iter()
                    .filter(|w| {
                        w["state"].as_str().map(WorkloadState::from_name)
                            == Some(WorkloadState::Running)
                    })
                    .count();
                format!("{running}/{} running", w.len())
            },
        );
        let dropped: u64 = r["counters"]["dropped-telemetry"]
            .as_object()
            .map_or(0, |m| m.values().filter_map(|v| v.as_u64()).sum());
        table.row(vec![
            node.clone(),
            r["applied-version"]
                .as_u64()
                .map_or_else(|| "-".into(), |v| v.to_string()),
            r["connection"]["connected"]
                .as_bool()
                .map_or_else(|| "-".into(), |c| if c { "yes" } else { "no" }.into()),
            workloads,
            r["counters"]["outbox-rows"]
                .as_u64()
                .map_or_else(|| "-".into(), |v| v.to_string()),
            dropped.to_string(),
            if r["insecure-dev"] == true {
                "YES"
            } else {
                "no"
            }
            .into(),
            render::cell(
                r["last-rejection"]["reason"]
                    .as_str()
                    .or(r["error"].as_str())
                    .unwrap_or(""),
                80,
            ),
        ]);
    }
    let _ = table.write(out);
}

/// One message `hub watch` prints.
#[derive(Debug, serde::Serialize)]
struct Watched {
    topic: String,
    node: String,
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    workload: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    stream: Option<String>,
    id: Option<String>,
    ts: Option<u64>,
    payload: serde_json::Value,
}

/// What a watched topic is, or `None` for topics `hub watch` does not print.
fn watched(topic: &str, payload: &[u8]) -> Option<Watched> {
    let node = topic
        .strip_prefix(lichen_sync::topics::PREFIX)?
        .strip_prefix('/')?
        .split('/')
        .next()?;
    let topics = Topics::new(node).ok()?;
    let (kind, workload, stream) = match topics.parse(topic)? {
        lichen_sync::TopicKind::Telemetry { workload, stream } => {
            ("telemetry", Some(workload), Some(stream))
        }
        lichen_sync::TopicKind::Events => ("event", None, None),
        lichen_sync::TopicKind::CmdResult { workload } => ("cmd-result", Some(workload), None),
        _ => return None,
    };
    let (id, ts, payload) = match Envelope::from_bytes(payload) {
        Ok(env) => (Some(env.id.to_string()), Some(env.ts), env.payload),
        Err(e) => (
            None,
            None,
            serde_json::json!({"malformed": e.to_string(), "bytes": String::from_utf8_lossy(payload)}),
        ),
    };
    Some(Watched {
        topic: topic.to_owned(),
        node: node.to_owned(),
        kind,
        workload,
        stream,
        id,
        ts,
        payload,
    })
}

fn write_watched(out: &mut Vec<u8>, w: &Watched) {
    let time = w.ts.map_or_else(|| "-".to_owned(), render::time_ms);
    let what = match (&w.workload, &w.stream) {
        (Some(wl), Some(s)) => format!("{wl}/{s}"),
        (Some(wl), None) => wl.clone(),
        _ => "-".to_owned(),
    };
    let _ = writeln!(
        out,
        "{time} {} {:<10} {what} {} {}",
        w.node,
        w.kind,
        w.id.as_deref().unwrap_or("-"),
        w.payload
    );
}

pub(crate) async fn watch(args: HubWatchArgs, json: bool) -> Result<ExitCode> {
    let node = match &args.node {
        Some(n) => {
            Topics::new(n).map_err(|e| anyhow!("--node: {e}"))?;
            n.as_str()
        }
        None => "+",
    };
    let base = format!("{}/{node}", lichen_sync::topics::PREFIX);
    let filters = [
        format!("{base}/telemetry/#"),
        format!("{base}/events"),
        format!("{base}/cmd-result/+"),
    ];
    let url = args.broker.url.clone();
    let (client, mut eventloop) = AsyncClient::new(options(&args.broker, "watch")?, 10);
    let until = args.duration.map(|d| tokio::time::Instant::now() + d);
    let mut printed = 0u64;
    loop {
        if args.count.is_some_and(|c| printed >= c) {
            break;
        }
        let ev = match until {
            Some(t) => match tokio::time::timeout_at(t, eventloop.poll()).await {
                Ok(ev) => ev,
                Err(_) => break,
            },
            None => eventloop.poll().await,
        };
        match ev {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                // A clean session: subscribe on every connection.
                for f in &filters {
                    client
                        .subscribe(f.clone(), QoS::AtLeastOnce)
                        .await
                        .context("queueing the subscription")?;
                }
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                if let Some(w) = watched(&p.topic, &p.payload) {
                    let mut out = Vec::new();
                    if json {
                        serde_json::to_writer(&mut out, &w).context("encoding a message")?;
                        out.push(b'\n');
                    } else {
                        write_watched(&mut out, &w);
                    }
                    emit(&out)?;
                    printed += 1;
                }
            }
            Ok(_) => {}
            Err(e) => {
                eprintln!("{url}: {e}; reconnecting");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
    let _ = client.disconnect().await;
    Ok(ExitCode::SUCCESS)
}

pub(crate) async fn send(args: HubSendArgs, json: bool) -> Result<ExitCode> {
    let topics = Topics::new(&args.node).map_err(|e| anyhow!("--node: {e}"))?;
    let cmd_topic = topics
        .cmd(&args.workload)
        .map_err(|e| anyhow!("workload: {e}"))?;
    let result_topic = topics
        .cmd_result(&args.workload)
        .map_err(|e| anyhow!("workload: {e}"))?;
    let options = options(&args.broker, "send")?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let ts = u64::try_from(now.as_millis()).unwrap_or(u64::MAX);
    let id = MessageId::new(options.client_id(), ts);
    let envelope = Envelope {
        id: id.clone(),
        ts,
        payload: serde_json::json!({"command": args.command, "payload": args.payload}),
    };
    let url = args.broker.url.clone();
    let (client, mut eventloop) = AsyncClient::new(options, 10);
    // Subscribe to the results first, publish once the broker confirmed it.
    client
        .subscribe(&result_topic, QoS::AtLeastOnce)
        .await
        .context("queueing the subscription")?;
    let id_text = id.to_string();
    let found = tokio::time::timeout(args.timeout, async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    client
                        .publish(&cmd_topic, QoS::AtLeastOnce, false, envelope.to_bytes())
                        .await
                        .context("queueing the command")?;
                }
                Ok(Event::Incoming(Packet::Publish(p))) if p.topic == result_topic => {
                    if let Ok(env) = Envelope::from_bytes(&p.payload)
                        && env.payload["cmd"] == id_text.as_str()
                    {
                        return Ok(env.payload);
                    }
                }
                Ok(_) => {}
                Err(e) => return Err(anyhow!("{url}: {e}")),
            }
        }
    })
    .await
    .map_err(|_| {
        anyhow!(
            "no result for command {id_text} from workload {} on node {} within {:?} (is the node connected?)",
            args.workload,
            args.node,
            args.timeout
        )
    })??;
    let _ = client.disconnect().await;
    let _ = tokio::time::timeout(Duration::from_millis(500), eventloop.poll()).await;
    let mut out = Vec::new();
    if json {
        push_json(&mut out, &found);
    } else if found["ok"] == true {
        match found["reply"].as_str() {
            Some(reply) => {
                let _ = writeln!(out, "{reply}");
            }
            None => {
                let _ = writeln!(out, "command {id_text} delivered; no reply");
            }
        }
    }
    emit(&out)?;
    if found["ok"] == true {
        Ok(ExitCode::SUCCESS)
    } else {
        Err(anyhow!(
            "workload {} on node {} refused command {id_text}: {}",
            args.workload,
            args.node,
            found["error"].as_str().unwrap_or("no reason given")
        ))
    }
}
