//! `devices`: device access from Wasm on the simulated board, against native loops on the
//! same simulated devices.
//!
//! - GPIO toggles per second: `toggle-n` commands to `blinky`, each toggling the pin
//!   [`TOGGLES_PER_EVENT`] times through the host API within one Wasm event, against a native
//!   loop toggling another line of the same simulated chip through embedded-hal: the ratio is
//!   the cost of a host call. Beside it the command-per-toggle figures: `toggle` commands, each
//!   awaited (one Wasm event that toggles the pin, reads it back and counts in its key-value
//!   bucket), and `level` commands (the same round trip, one pin read, nothing written).
//! - GPIO edge to `on-event`: the bench drives `button-led`'s input in-process; the latency is
//!   read from the simulated chip's own clock, from the edge to the moment the guest's
//!   `on-event` drove the LED (the chip stamps both).
//! - SPI transactions per second: `read-n` commands to `adc-sampler` ([`SPI_PER_EVENT`]
//!   MCP3008 conversions through the host API within one event), and `read` commands (one
//!   each), against a native loop of the same transaction.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use lichen_devices::embedded_hal::digital::StatefulOutputPin;
use lichen_devices::embedded_hal::spi::{Operation, SpiDevice};
use lichen_devices::{Level, OutputConfig, SpiConfig};

use super::{Samples, Table, api, fmt_duration, fmt_rate, open_agent};
use crate::BenchArgs;
use lichen_agent::api::control::Control;
use lichen_agent::api::types::SendRequest;
use lichen_agent::runtime::wasm::ArtifactStore;
use lichen_agent::supervisor::Agent;

/// The pin `blinky` toggles.
const LED: &str = "GPIO17";
/// The input `button-led` watches, and the LED it drives.
const BUTTON: &str = "GPIO27";
const BUTTON_LED: &str = "GPIO22";
/// The line the native loop toggles.
const NATIVE_PIN: &str = "GPIO23";
/// Toggles one `toggle-n` event makes: small enough for the default 100 ms time slice on a
/// slow board.
const TOGGLES_PER_EVENT: u64 = 10_000;
/// SPI transactions one `read-n` event makes.
const SPI_PER_EVENT: u64 = 2_000;
/// How long each native loop runs.
const NATIVE_TIME: Duration = Duration::from_millis(500);
/// Pause between two edges, so that each is handled before the next.
const EDGE_GAP: Duration = Duration::from_millis(3);

/// Where the example guest `name` (`blinky`, `button-led`, `adc-sampler`, `env-sensor`,
/// `misbehave`) is read from: `<name>.wasm` in the directory `LICHEN_EXAMPLE_GUESTS` names, or
/// else in `examples/` under the current directory, where `scripts/build-examples` puts them.
///
/// The node binary embeds only its default deployment's two guests; the benchmarks that need
/// the other examples read them from a checkout, so building `lichen` builds no guest.
pub(super) fn example_guest_file(name: &str) -> PathBuf {
    std::env::var_os("LICHEN_EXAMPLE_GUESTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("examples"))
        .join(format!("{name}.wasm"))
}

/// Reads the example guest `name` ([`example_guest_file`]) and stores it; returns its digest.
pub(super) async fn add_guest(agent: &Agent, name: &str) -> Result<String> {
    let path = example_guest_file(name);
    let bytes = lichen_agent::files::read_bounded(&path, ArtifactStore::MAX_MODULE_BYTES)
        .with_context(|| {
            format!(
                "cannot read the {name} guest {}: build the examples with scripts/build-examples \
                 (run from the repository, or set LICHEN_EXAMPLE_GUESTS to their directory)",
                path.display()
            )
        })?;
    let artifact = agent
        .artifacts()
        .add(bytes)
        .await
        .with_context(|| format!("cannot add the {name} guest"))?;
    Ok(artifact.digest().to_string())
}

/// Sends `count` commands `command` to `workload`, each awaited; returns commands per second.
async fn command_rate(agent: &Agent, workload: &str, command: &str, count: u64) -> Result<f64> {
    let started = Instant::now();
    for _ in 0..count {
        agent
            .send(
                workload,
                SendRequest {
                    command: command.into(),
                    payload: String::new(),
                },
            )
            .await
            .map_err(|e| anyhow::anyhow!("{workload} {command}: {}", e.error))?;
    }
    Ok(count as f64 / started.elapsed().as_secs_f64())
}

/// Sends `events` commands `command` to `workload` with the payload `per_event` (the count of
/// device operations the guest makes in that one event), each awaited; returns operations per
/// second.
async fn batched_rate(
    agent: &Agent,
    workload: &str,
    command: &str,
    per_event: u64,
    events: u64,
) -> Result<f64> {
    let started = Instant::now();
    for _ in 0..events {
        agent
            .send(
                workload,
                SendRequest {
                    command: command.into(),
                    payload: per_event.to_string(),
                },
            )
            .await
            .map_err(|e| anyhow::anyhow!("{workload} {command} {per_event}: {}", e.error))?;
    }
    Ok((events * per_event) as f64 / started.elapsed().as_secs_f64())
}

/// Runs `step` in a loop for [`NATIVE_TIME`]; returns steps per second.
fn native_rate(mut step: impl FnMut() -> Result<()>) -> Result<f64> {
    let started = Instant::now();
    let mut n = 0u64;
    while started.elapsed() < NATIVE_TIME {
        for _ in 0..1000 {
            step()?;
        }
        n += 1000;
    }
    Ok(n as f64 / started.elapsed().as_secs_f64())
}

pub(super) async fn run(dir: &Path, args: &BenchArgs) -> Result<Vec<String>> {
    let commands = args.events.unwrap_or(5_000).max(1);
    let edges = args.iterations.unwrap_or(300).max(1);
    let agent = open_agent(dir, Some(16)).await?;
    let blinky = add_guest(&agent, "blinky").await?;
    let button_led = add_guest(&agent, "button-led").await?;
    let sampler = add_guest(&agent, "adc-sampler").await?;
    // No interval triggers: everything moves only when the bench says so.
    let text = format!(
        "description = \"bench devices\"\n\n\
         [[workloads]]\nname = \"blinky\"\nmodule = \"sha256:{blinky}\"\n\
         gpio = [{{ name = \"led\", pin = \"{LED}\", mode = \"output\", initial = \"low\" }}]\n\n\
         [[workloads]]\nname = \"button-led\"\nmodule = \"sha256:{button_led}\"\n\
         triggers = [{{ gpio-edge = \"button\", edge = \"both\" }}]\n\
         gpio = [{{ name = \"button\", pin = \"{BUTTON}\", mode = \"input\", bias = \"pull-up\" }},\n\
         {{ name = \"led\", pin = \"{BUTTON_LED}\", mode = \"output\", initial = \"low\" }}]\n\n\
         [[workloads]]\nname = \"adc-sampler\"\nmodule = \"sha256:{sampler}\"\n\
         spi = [{{ name = \"adc\", bus = \"spi0.0\", max-hz = 1000000 }}]\n"
    );
    agent
        .deploy_text("bench-devices.toml", &text, Path::new("/"))
        .await
        .map_err(api)?;
    let sim = agent
        .devices()
        .sim()
        .context("the bench needs the simulated board")?
        .clone();
    let chip = sim.chip().clone();

    // GPIO toggles: many per event, then one command per toggle.
    batched_rate(&agent, "blinky", "toggle-n", TOGGLES_PER_EVENT, 2).await?; // warm-up
    let batch_events = (commands / 250).max(4);
    let wasm_loop_toggles = batched_rate(
        &agent,
        "blinky",
        "toggle-n",
        TOGGLES_PER_EVENT,
        batch_events,
    )
    .await?;
    command_rate(&agent, "blinky", "toggle", commands.min(200)).await?; // warm-up
    let wasm_toggles = command_rate(&agent, "blinky", "toggle", commands).await?;
    let wasm_reads = command_rate(&agent, "blinky", "level", commands).await?;
    let mut native_pin = sim
        .output(NATIVE_PIN, "bench", &OutputConfig::default())
        .context("cannot open the native loop's pin")?;
    let native_toggles = native_rate(|| Ok(native_pin.toggle()?))?;
    drop(native_pin);

    // SPI transactions.
    batched_rate(&agent, "adc-sampler", "read-n", SPI_PER_EVENT, 2).await?; // warm-up
    let wasm_loop_spi =
        batched_rate(&agent, "adc-sampler", "read-n", SPI_PER_EVENT, batch_events).await?;
    command_rate(&agent, "adc-sampler", "read", commands.min(200)).await?; // warm-up
    let wasm_spi = command_rate(&agent, "adc-sampler", "read", commands).await?;
    let mut adc = sim
        .spi(
            "spi0.0",
            SpiConfig {
                max_hz: 1_000_000,
                ..SpiConfig::default()
            },
        )
        .context("cannot open the native loop's SPI device")?;
    let native_spi = native_rate(|| {
        let mut frame = [0x01, 0x80, 0x00];
        adc.transaction(&mut [Operation::TransferInPlace(&mut frame)])?;
        Ok(())
    })?;

    // Edge to on-event: press (falling: LED on), release (rising: LED off), alternately.
    let mut latencies = Vec::with_capacity(edges);
    let mut missed = 0u64;
    for i in 0..edges {
        let press = i % 2 == 0;
        let at = chip.now_ns();
        chip.drive(BUTTON, if press { Level::Low } else { Level::High })?;
        let want = if press { Level::High } else { Level::Low };
        let deadline = Instant::now() + Duration::from_secs(2);
        let seen = loop {
            // The chip stamps every level the LED is driven to; the first one at `want` since
            // the edge is the guest's answer.
            let new = chip
                .history(BUTTON_LED)?
                .into_iter()
                .find(|(t, level)| *t >= at && *level == want)
                .map(|(t, _)| t);
            if let Some(t) = new {
                break Some(t);
            }
            if Instant::now() > deadline {
                break None;
            }
            tokio::time::sleep(Duration::from_micros(200)).await;
        };
        match seen {
            Some(t) => latencies.push(Duration::from_nanos(t - at)),
            None => missed += 1,
        }
        tokio::time::sleep(EDGE_GAP).await;
    }
    if latencies.is_empty() {
        bail!("button-led never followed an edge ({missed} edges driven)");
    }
    agent.shutdown().await;

    let latencies = Samples::new(latencies);
    let per_sec = |rate: f64| format!("{}/s", fmt_rate(rate));
    let mut table = Table::new(format!(
        "devices: GPIO, edges and SPI from Wasm on the simulated board ({commands} commands per figure, {edges} edges)"
    ));
    table.row(
        format!("GPIO toggles from Wasm, {TOGGLES_PER_EVENT} per event (`toggle-n`)"),
        per_sec(wasm_loop_toggles),
        "-",
        "-",
    );
    table.row(
        "GPIO toggles, native loop (embedded-hal on the sim chip)",
        per_sec(native_toggles),
        "-",
        "-",
    );
    table.row(
        "native / Wasm toggle ratio (the cost of a GPIO host call)",
        format!(
            "{:.1}x ({} per Wasm toggle, {} native)",
            native_toggles / wasm_loop_toggles,
            fmt_duration(Duration::from_secs_f64(1.0 / wasm_loop_toggles)),
            fmt_duration(Duration::from_secs_f64(1.0 / native_toggles))
        ),
        "-",
        "-",
    );
    table.row(
        "GPIO toggles from Wasm, one per command (`toggle` to blinky, awaited)",
        per_sec(wasm_toggles),
        "-",
        "-",
    );
    table.row(
        "GPIO reads from Wasm (`level` command to blinky, awaited)",
        per_sec(wasm_reads),
        "-",
        "-",
    );
    table.row(
        "native / command-per-toggle ratio (a whole event per toggle)",
        format!(
            "{:.0}x ({} per command)",
            native_toggles / wasm_toggles,
            fmt_duration(Duration::from_secs_f64(1.0 / wasm_toggles))
        ),
        "-",
        "-",
    );
    table.row(
        "GPIO edge to on-event (LED driven), p50",
        fmt_duration(latencies.percentile(50.0)),
        "-",
        "-",
    );
    table.row(
        "GPIO edge to on-event, p99",
        fmt_duration(latencies.percentile(99.0)),
        "-",
        "-",
    );
    table.row(
        "GPIO edge to on-event, max",
        fmt_duration(latencies.max()),
        "-",
        "-",
    );
    table.row(
        format!("SPI transactions from Wasm, {SPI_PER_EVENT} per event (`read-n`)"),
        per_sec(wasm_loop_spi),
        "-",
        "-",
    );
    table.row(
        "SPI transactions from Wasm, one per command (`read` to adc-sampler, awaited)",
        per_sec(wasm_spi),
        "-",
        "-",
    );
    table.row(
        "SPI transactions, native loop (MCP3008 model)",
        per_sec(native_spi),
        "-",
        "-",
    );
    table.note(
        "a per-event figure counts device operations made by one guest in a loop within one `on-event` (a workload holding device grants is called from tokio's blocking pool, once per event); a one-per-command figure is a whole command round trip: queue to the workload's worker, one `on-event` call, the reply; blinky's `toggle` also opens the pin, reads it back and writes two key-value entries (committed to SQLite), `level` writes nothing",
    );
    table.note(format!(
        "edge latency is measured on the simulated chip's clock, from the bench driving {BUTTON} to button-led driving {BUTTON_LED} in `on-event`; the edge watcher sleeps until the chip has the event queued (no polling), then the worker calls the guest; edges {} apart{}",
        fmt_duration(EDGE_GAP),
        if missed > 0 {
            format!(", {missed} edges not followed within 2 s")
        } else {
            String::new()
        }
    ));
    table.print();
    Ok(vec![
        format!(
            "- GPIO from Wasm (sim): {} toggles/s in a guest loop vs {} native, {:.1}x; {} toggles/s by command; edge to on-event p50 {}, p99 {}.",
            fmt_rate(wasm_loop_toggles),
            fmt_rate(native_toggles),
            native_toggles / wasm_loop_toggles,
            fmt_rate(wasm_toggles),
            fmt_duration(latencies.percentile(50.0)),
            fmt_duration(latencies.percentile(99.0)),
        ),
        format!(
            "- SPI from Wasm (sim MCP3008): {} transactions/s in a guest loop, {} by command, vs {} native.",
            fmt_rate(wasm_loop_spi),
            fmt_rate(wasm_spi),
            fmt_rate(native_spi),
        ),
    ])
}
