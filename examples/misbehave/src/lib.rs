//! # misbehave
//!
//! A test fixture: a device function that fails on purpose, in the way config `mode` asks, so
//! the agent's tests can prove that a bad guest is contained.
//!
//! | `mode` | behaviour |
//! | --- | --- |
//! | `echo` (default) | normal: every event increments kv `events`; a command replies its payload |
//! | `fail-init` | `init` returns `Err("init refused: fail-init mode")` |
//! | `trap-in-init` | `init` panics, so the instance traps |
//! | `trap-on-event` | `init` succeeds; every event panics |
//! | `loop-forever` | `init` succeeds; a tick spins forever (only preemption stops it) |
//! | `grow-memory` | each tick leaks 1 MiB more, touched, until the memory limit traps it |
//! | `log-flood` | each tick logs 20000 lines at info level |
//! | `write-then-trap` | each tick sets kv `partial` to the tick sequence and publishes on stream `partial`, then panics |
//!
//! In every mode but `trap-on-event`, the events a mode does not mention (commands, `stop`,
//! and ticks in `echo`) behave as in `echo`. An unknown mode fails `init`, naming it.
//!
//! A command named `count` whose payload is a sequence number (sent in increasing order, one
//! at a time, as `lichen bench reload` does) is also tallied, so that lost and duplicated
//! handling can be told apart: kv `count-last` holds the highest number handled, a number not
//! above it adds one to `count-twice`, and the numbers a new highest one skipped are appended
//! to `count-skipped` (comma-separated; past [`MAX_SKIPPED`] of them only
//! `count-skipped-more` counts them).
//!
//! If config has `init-kv-key`, `init` first writes that key with the value `from-init`, so
//! tests can see whether the writes of an `init` were kept or discarded.
//!
//! Build with `cargo build --release --target wasm32-wasip2 -p misbehave` in `examples/`.

use std::hint::black_box;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU8, Ordering};

use crate::lichen::device::telemetry;
use crate::lichen::device::types::Tick;
use crate::wasi::keyvalue::{atomics, store};
use crate::wasi::logging::logging::{Level, log};

wit_bindgen::generate!({
    path: "../../host-apis/wit",
    world: "lichen:device/device-function",
    generate_all,
});

/// Log context of every record this function writes.
const CONTEXT: &str = "misbehave";
/// How much `grow-memory` leaks per tick.
const MIB: usize = 1 << 20;
/// How many lines `log-flood` writes per tick.
const FLOOD_LINES: u32 = 20_000;
/// Most skipped `count` numbers listed in kv `count-skipped`.
const MAX_SKIPPED: usize = 1000;

/// The ways this function can misbehave; see the crate docs.
#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Mode {
    Echo,
    FailInit,
    TrapInInit,
    TrapOnEvent,
    LoopForever,
    GrowMemory,
    LogFlood,
    WriteThenTrap,
}

impl Mode {
    const ALL: [Mode; 8] = [
        Mode::Echo,
        Mode::FailInit,
        Mode::TrapInInit,
        Mode::TrapOnEvent,
        Mode::LoopForever,
        Mode::GrowMemory,
        Mode::LogFlood,
        Mode::WriteThenTrap,
    ];

    fn name(self) -> &'static str {
        match self {
            Mode::Echo => "echo",
            Mode::FailInit => "fail-init",
            Mode::TrapInInit => "trap-in-init",
            Mode::TrapOnEvent => "trap-on-event",
            Mode::LoopForever => "loop-forever",
            Mode::GrowMemory => "grow-memory",
            Mode::LogFlood => "log-flood",
            Mode::WriteThenTrap => "write-then-trap",
        }
    }

    fn parse(name: &str) -> Option<Mode> {
        Mode::ALL.into_iter().find(|mode| mode.name() == name)
    }
}

/// The mode `init` chose, as `Mode as u8`.
static MODE: AtomicU8 = AtomicU8::new(Mode::Echo as u8);
/// What `grow-memory` has leaked so far.
static LEAKED: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

fn mode() -> Mode {
    let value = MODE.load(Ordering::Relaxed);
    Mode::ALL
        .into_iter()
        .find(|mode| *mode as u8 == value)
        .unwrap_or(Mode::Echo)
}

struct Misbehave;

impl Guest for Misbehave {
    fn init(config: Vec<(String, String)>) -> Result<(), String> {
        let setting = |key: &str| {
            config
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.as_str())
        };
        let name = setting("mode").unwrap_or("echo");
        let mode = Mode::parse(name).ok_or_else(|| {
            let known: Vec<_> = Mode::ALL.iter().map(|m| m.name()).collect();
            format!("unknown mode {name:?} (known: {})", known.join(", "))
        })?;
        MODE.store(mode as u8, Ordering::Relaxed);
        if let Some(key) = setting("init-kv-key") {
            bucket()?
                .set(key, b"from-init")
                .map_err(|e| format!("cannot write {key:?}: {e:?}"))?;
        }
        match mode {
            Mode::FailInit => Err("init refused: fail-init mode".to_string()),
            Mode::TrapInInit => panic!("misbehave: trap-in-init mode"),
            _ => {
                log(Level::Info, CONTEXT, &format!("mode {}", mode.name()));
                Ok(())
            }
        }
    }

    fn on_event(event: Event) -> Result<Option<Vec<u8>>, String> {
        let mode = mode();
        match (mode, event) {
            (Mode::TrapOnEvent, _) => panic!("misbehave: trap-on-event mode"),
            (Mode::LoopForever, Event::Tick(_)) => spin_forever(),
            (Mode::GrowMemory, Event::Tick(tick)) => {
                grow_memory(&tick);
                Ok(None)
            }
            (Mode::LogFlood, Event::Tick(tick)) => {
                for line in 0..FLOOD_LINES {
                    log(
                        Level::Info,
                        CONTEXT,
                        &format!("tick {} flood line {line}", tick.sequence),
                    );
                }
                Ok(None)
            }
            (Mode::WriteThenTrap, Event::Tick(tick)) => write_then_trap(&tick),
            (_, event) => echo(event),
        }
    }
}

fn bucket() -> Result<store::Bucket, String> {
    store::open("default").map_err(|e| format!("cannot open the default bucket: {e:?}"))
}

/// Normal behaviour: count the event, reply to a command with its payload.
fn echo(event: Event) -> Result<Option<Vec<u8>>, String> {
    atomics::increment(&bucket()?, "events", 1)
        .map_err(|e| format!("cannot increment \"events\": {e:?}"))?;
    match event {
        Event::Command(command) => {
            if command.name == "count" {
                tally(&command.payload)?;
            }
            Ok(Some(command.payload))
        }
        Event::Tick(_) | Event::GpioEdge(_) | Event::Stop => Ok(None),
    }
}

/// Tallies a `count` command's sequence number (see the crate docs).
fn tally(payload: &[u8]) -> Result<(), String> {
    let number: u64 = std::str::from_utf8(payload)
        .ok()
        .and_then(|text| text.parse().ok())
        .ok_or("a count command's payload must be a decimal number")?;
    let bucket = bucket()?;
    let fail = |key: &str, e| format!("cannot update {key:?}: {e:?}");
    let read = |key: &str| -> Result<Option<String>, String> {
        Ok(bucket
            .get(key)
            .map_err(|e| fail(key, e))?
            .map(|v| String::from_utf8_lossy(&v).into_owned()))
    };
    let last: u64 = read("count-last")?
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    if number <= last {
        atomics::increment(&bucket, "count-twice", 1).map_err(|e| fail("count-twice", e))?;
        return Ok(());
    }
    if number > last + 1 {
        let mut skipped = read("count-skipped")?.unwrap_or_default();
        let mut listed = skipped.split(',').filter(|s| !s.is_empty()).count();
        let mut more = 0u64;
        for missing in last + 1..number {
            if listed < MAX_SKIPPED {
                if !skipped.is_empty() {
                    skipped.push(',');
                }
                skipped.push_str(&missing.to_string());
                listed += 1;
            } else {
                more += 1;
            }
        }
        bucket
            .set("count-skipped", skipped.as_bytes())
            .map_err(|e| fail("count-skipped", e))?;
        if more > 0 {
            atomics::increment(&bucket, "count-skipped-more", more)
                .map_err(|e| fail("count-skipped-more", e))?;
        }
    }
    bucket
        .set("count-last", number.to_string().as_bytes())
        .map_err(|e| fail("count-last", e))
}

/// Never returns; `black_box` keeps the optimiser from proving the loop does nothing.
fn spin_forever() -> ! {
    let mut spins = 0u64;
    loop {
        spins = black_box(spins.wrapping_add(1));
    }
}

/// Leaks 1 MiB more, writing every byte so the pages are really used. When the host's memory
/// limit refuses to grow the linear memory, the allocator fails and the guest traps.
fn grow_memory(tick: &Tick) {
    let block = black_box(vec![(tick.sequence % 255) as u8 + 1; MIB]);
    let mut leaked = LEAKED
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    leaked.push(block);
    log(
        Level::Debug,
        CONTEXT,
        &format!("tick {}: holding {} MiB", tick.sequence, leaked.len()),
    );
}

/// Writes state and telemetry, then traps: the host must discard both.
fn write_then_trap(tick: &Tick) -> ! {
    let sequence = tick.sequence.to_string();
    if let Ok(bucket) = bucket() {
        let _ = bucket.set("partial", sequence.as_bytes());
    }
    let record = format!("{{\"partial\":{sequence}}}");
    let _ = telemetry::publish("partial", record.as_bytes());
    panic!("misbehave: write-then-trap mode at tick {sequence}")
}

export!(Misbehave);
