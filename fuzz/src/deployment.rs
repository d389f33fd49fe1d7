//! Deployment files (TOML and JSON): parsed and validated as `lichen deploy` and the hub link
//! do, then checked against the simulated board and opened on it. The generator of documents
//! is in `deployment/generate.rs`.
//!
//! The first byte picks the mode: even, the rest is the file's text as it is (the parser meets
//! anything); odd, the rest drives a generator of deployment documents whose keys are the
//! schema's and whose values sit at every edge (so validation, not only the syntax, is reached).
//!
//! Properties beyond "no panic":
//! - an accepted deployment's canonical JSON (what the agent stores and compares) parses back
//!   to the same deployment;
//! - every duration of an accepted deployment can be added to a clock reading, and its event
//!   queue fits a tokio channel (an accepted file must not crash the worker that runs it);
//! - a refused file gets an error that names a line or a field, and whose text holds no raw
//!   control or bidirectional-override characters (names are quoted);
//! - the grant check and opening the granted devices on the simulated board never panic.

use std::path::Path;
use std::time::Duration;

use arbitrary::Unstructured;
use lichen_agent::deployment::{self, DeploymentError, DeploymentSpec, ParsedDeployment, Trigger};
use lichen_agent::grants::{self, DeviceHub};
use lichen_devices::board::BoardProfile;

use crate::input;

mod generate;

pub use generate::document;

/// `deploy.toml`, raw or generated.
pub fn toml(data: &[u8]) {
    run(data, false);
}

/// `deploy.json`, raw or generated.
pub fn json(data: &[u8]) {
    run(data, true);
}

fn run(data: &[u8], json: bool) {
    let Some((mode, rest)) = data.split_first() else {
        return check(file_name(json), "");
    };
    let text = if mode & 1 == 0 {
        input::text(rest).into_owned()
    } else {
        let doc = document(&mut Unstructured::new(rest));
        if json { doc.to_json() } else { doc.to_toml() }
    };
    check(file_name(json), &text);
}

/// The raw-mode form of a generated input (an even first byte, then the document's text),
/// which does not depend on the generator: what a regression input should be.
pub fn as_raw(data: &[u8], json: bool) -> Option<Vec<u8>> {
    let (mode, rest) = data.split_first()?;
    if mode & 1 == 0 {
        return None;
    }
    let doc = document(&mut Unstructured::new(rest));
    let text = if json { doc.to_json() } else { doc.to_toml() };
    Some([&[0u8][..], text.as_bytes()].concat())
}

fn file_name(json: bool) -> &'static str {
    if json { "deploy.json" } else { "deploy.toml" }
}

/// Parses `text` as the file `file` and checks the properties of the module docs.
pub fn check(file: &str, text: &str) {
    match deployment::parse(file, text, Path::new("/srv/lichen")) {
        Ok(parsed) => accepted(&parsed),
        Err(error) => refused(&error, text),
    }
}

fn accepted(parsed: &ParsedDeployment) {
    let spec = &parsed.spec;
    let canonical = serde_json::to_string(spec).expect("a validated deployment serialises");
    let back: DeploymentSpec = serde_json::from_str(&canonical).unwrap_or_else(|e| {
        panic!("the canonical form of an accepted deployment does not parse back: {e}\n{canonical}")
    });
    assert_eq!(
        &back, spec,
        "the canonical form does not round-trip: {canonical}"
    );
    assert_eq!(
        serde_json::to_string(&back).expect("serialises"),
        canonical,
        "the canonical form is not stable"
    );

    if let Err(problem) = usable(spec) {
        panic!("an accepted deployment would crash the agent that runs it: {problem}");
    }

    for index in 0..=spec.workloads.len() {
        for field in ["", "module", "limits.memory", "triggers[0]", "gpio[3].pin"] {
            let error = parsed.error_at(index, field, "x");
            if index == spec.workloads.len() {
                assert_eq!(
                    error.line, None,
                    "an index past the last workload has no line"
                );
            }
        }
    }

    let board = BoardProfile::builtin("sim").expect("the sim board profile is built in");
    if grants::check(parsed, &board).is_ok() {
        let hub = DeviceHub::from_profile(board).expect("the sim board opens");
        for workload in &spec.workloads {
            // Refusals are fine (two workloads may want one pin); panics are not.
            let _ = hub.open_grants(workload);
        }
    }
}

/// Whether the values of an accepted deployment can be used as the agent uses them: every
/// duration added to `Instant::now()` (interval timers, time slices, debounce, boot
/// deadlines), the queue as a tokio channel's capacity.
fn usable(spec: &DeploymentSpec) -> anyhow::Result<()> {
    let now = tokio::time::Instant::now();
    let fits = |what: String, d: Duration| -> anyhow::Result<()> {
        if now.checked_add(d).is_none() {
            anyhow::bail!("{what} = {d:?} overflows a clock reading");
        }
        Ok(())
    };
    for (i, w) in spec.workloads.iter().enumerate() {
        for (t, trigger) in w.triggers.iter().enumerate() {
            match trigger {
                Trigger::Interval(d) => fits(format!("workloads[{i}].triggers[{t}].interval"), *d)?,
                Trigger::GpioEdge(edge) => {
                    if let Some(d) = edge.debounce {
                        fits(format!("workloads[{i}].triggers[{t}].debounce"), d)?;
                    }
                }
            }
        }
        if let Some(d) = w.limits.time_slice {
            fits(format!("workloads[{i}].limits.time-slice"), d)?;
        }
        for (g, grant) in w.gpio.iter().enumerate() {
            if let Some(d) = grant.debounce {
                fits(format!("workloads[{i}].gpio[{g}].debounce"), d)?;
            }
        }
        if let deployment::Artifact::Microvm(vm) = &w.artifact
            && let Some(d) = vm.boot_timeout
        {
            fits(format!("workloads[{i}].boot-timeout"), d)?;
        }
        if let Some(queue) = w.limits.queue {
            // tokio::sync::mpsc::channel panics above this (its semaphore's MAX_PERMITS).
            if queue == 0 || queue > usize::MAX >> 3 {
                anyhow::bail!("workloads[{i}].limits.queue = {queue} is not a channel capacity");
            }
        }
    }
    Ok(())
}

fn refused(error: &DeploymentError, text: &str) {
    assert!(
        error.line.is_some() || error.field.is_some(),
        "a refusal names neither a line nor a field: {error}\ninput: {text:?}"
    );
    assert!(!error.message.is_empty(), "a refusal without a message");
    let shown = error.to_string();
    if let Some(c) = shown.chars().find(|&c| raw_hazard(c)) {
        panic!(
            "a refusal echoes the raw character {c:?} (names must be quoted): {shown:?}\ninput: {text:?}"
        );
    }
}

/// Characters that must not reach a terminal or a log raw: controls (a newline forges a log
/// line) and bidirectional overrides (they reorder what a reader sees).
pub fn raw_hazard(c: char) -> bool {
    c.is_control() || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}
