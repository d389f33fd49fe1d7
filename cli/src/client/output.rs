//! The human views of the client verbs' answers: aligned tables and lines (`--json` prints the
//! API's own documents instead).

use std::io::Write;

use lichen_agent::api::types::{
    DeployReport, DoctorReport, EventRecord, KvEntry, LogLine, SendReply, WorkloadStatus,
};
use lichen_agent::render::{self, Table};
use serde::Serialize;

pub(super) fn push_json_line<T: Serialize>(out: &mut Vec<u8>, value: &T) {
    serde_json::to_writer(&mut *out, value).expect("API types always serialise to JSON");
    out.push(b'\n');
}

// Writing to a Vec<u8> cannot fail: the `let _ =` below drop an always-Ok result.

pub(super) fn write_ps(out: &mut Vec<u8>, workloads: &[WorkloadStatus]) {
    if workloads.is_empty() {
        out.extend_from_slice(b"no workloads (deploy some with `lichen deploy FILE`)\n");
        return;
    }
    let mut table = Table::new(&[
        "NAME",
        "KIND",
        "STATE",
        "RESTARTS",
        "TRAPS",
        "EVENTS",
        "QUEUE",
        "MEMORY",
        "UPTIME",
        "SOURCE",
        "LAST-ERROR",
    ]);
    for w in workloads {
        let memory = match (w.memory_bytes, w.uptime_ms) {
            (0, None) => "-".to_string(),
            (bytes, _) => render::bytes(bytes),
        };
        // A microVM shows its accelerator: `microvm (tcg)`.
        let kind = match &w.accelerator {
            Some(accel) => format!("{} ({accel})", w.kind),
            None => w.kind.clone(),
        };
        table.row(vec![
            w.name.clone(),
            kind,
            w.state.to_string(),
            w.restarts.to_string(),
            w.traps.to_string(),
            w.events_handled.to_string(),
            w.queue_depth.to_string(),
            memory,
            w.uptime_ms.map_or_else(|| "-".into(), render::duration_ms),
            render::cell(&source_cell(w), 48),
            render::cell(w.last_error.as_deref().unwrap_or(""), 60),
        ]);
    }
    let _ = table.write(out);
}

/// `operator`, or `pods:namespace=default,pod=web,container=app`.
fn source_cell(w: &WorkloadStatus) -> String {
    let source = if w.source.is_empty() {
        "operator"
    } else {
        &w.source
    };
    if w.labels.is_empty() {
        return source.to_owned();
    }
    let labels: Vec<String> = w.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    format!("{source}:{}", labels.join(","))
}

pub(super) fn write_deploy(out: &mut Vec<u8>, report: &DeployReport) {
    let _ = writeln!(out, "deployment version {} applied", report.version);
    let groups = [
        ("started", &report.started),
        ("reloaded", &report.reloaded),
        ("stopped", &report.stopped),
        ("unchanged", &report.unchanged),
    ];
    for (what, names) in groups {
        if !names.is_empty() {
            let _ = writeln!(out, "  {what:<10} {}", names.join(", "));
        }
    }
    for failure in &report.failures {
        let _ = writeln!(
            out,
            "  {:<10} {}: {}",
            "failed", failure.workload, failure.message
        );
    }
}

pub(super) fn write_log_line(out: &mut Vec<u8>, line: &LogLine) {
    let time = render::time_ms(line.at_ms);
    let level = line.level.to_uppercase();
    let _ = if line.context.is_empty() {
        writeln!(out, "{time} {level:<5} {}", line.message)
    } else {
        writeln!(out, "{time} {level:<5} [{}] {}", line.context, line.message)
    };
}

pub(super) fn write_kv(out: &mut Vec<u8>, entries: &[KvEntry]) {
    let mut table = Table::new(&["BUCKET", "KEY", "VALUE"]);
    for entry in entries {
        table.row(vec![
            entry.bucket.clone(),
            render::cell(&entry.key, 40),
            render::cell(&entry.value, 80),
        ]);
    }
    let _ = table.write(out);
}

pub(super) fn write_events(out: &mut Vec<u8>, events: &[EventRecord]) {
    let mut table = Table::new(&["ID", "TIME", "WORKLOAD", "KIND", "DETAIL"]);
    for event in events {
        table.row(event_cells(event));
    }
    let _ = table.write(out);
}

fn event_cells(event: &EventRecord) -> Vec<String> {
    vec![
        event.id.to_string(),
        render::time_s(event.at_ms),
        event.workload.clone().unwrap_or_else(|| "-".into()),
        event.kind.clone(),
        render::cell(&event.detail, 100),
    ]
}

/// One row of `events --follow`, in fixed widths since later rows are not known yet; the
/// header when `event` is `None`.
pub(super) fn write_event_row(out: &mut Vec<u8>, event: Option<&EventRecord>) {
    let cells = match event {
        Some(event) => event_cells(event),
        None => ["ID", "TIME", "WORKLOAD", "KIND", "DETAIL"]
            .map(String::from)
            .to_vec(),
    };
    let line = format!(
        "{:<6}  {:<20}  {:<16}  {:<14}  {}",
        cells[0], cells[1], cells[2], cells[3], cells[4]
    );
    let _ = writeln!(out, "{}", line.trim_end());
}

pub(super) fn write_reply(out: &mut Vec<u8>, reply: &SendReply) {
    let _ = match &reply.reply {
        Some(text) => writeln!(out, "{text}"),
        None => writeln!(out, "command {} delivered; no reply", reply.id),
    };
}

pub(super) fn write_doctor(out: &mut Vec<u8>, report: &DoctorReport) {
    let _ = writeln!(out, "lichen {} on board {}", report.version, report.board);
    let mut table = Table::new(&["CHECK", "STATUS", "DETAIL"]);
    for check in &report.checks {
        table.row(vec![
            check.name.clone(),
            check.status.clone(),
            check.detail.clone(),
        ]);
    }
    let _ = table.write(out);
}
