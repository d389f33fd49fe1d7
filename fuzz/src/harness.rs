//! The stable fuzzing pass: a deterministic driver for the targets that needs no nightly
//! toolchain and no libFuzzer, run by `cargo test -p lichen-fuzz` (and so by CI).
//!
//! For one target it runs, in order:
//! 1. every input under `regressions/<target>/` (crashes found before, now fixed);
//! 2. every input under `seeds/<target>/` (small valid and near-valid inputs);
//! 3. `cases` inputs, each a seed mutated a few times (bit flips, edge bytes, insertions,
//!    deletions, duplications, splices with another seed) or random bytes, drawn from a
//!    SplitMix64 stream whose seed is fixed (so CI is repeatable) unless `LICHEN_FUZZ_SEED`
//!    says otherwise.
//!
//! `LICHEN_FUZZ_CASES` overrides `cases` (for a longer run on a developer's machine). Every
//! input that fails is written to `$TMPDIR/lichen-fuzz-failures/<target>/<sha256>`; the pass
//! goes on and fails at the end with one line per distinct failure and where its input is.
//! A failing input becomes a regression test by moving it under `regressions/<target>/`.

use std::any::Any;
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::Once;
use std::sync::atomic::{AtomicBool, Ordering};

use sha2::{Digest as _, Sha256};

/// Longest input the pass generates (libFuzzer's default maximum is 4096 too).
const MAX_LEN: usize = 4096;

/// The seed of the pass unless `LICHEN_FUZZ_SEED` gives another (a number, or `random`).
const DEFAULT_SEED: u64 = 0x11c4_e2f0_22d5_0001;

/// SplitMix64: a tiny, well-known generator (Steele, Lea and Flood 2014); plenty for choosing
/// mutations, and it keeps the pass free of a `rand` dependency.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A stream from `seed`.
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    /// The low byte of the next number.
    pub fn next_u8(&mut self) -> u8 {
        self.next_u64().to_le_bytes()[0]
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number below `n` (0 when `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            // Below `n`, a usize, so it fits.
            usize::try_from(self.next_u64() % n as u64).unwrap_or(0)
        }
    }
}

thread_local! {
    /// Where the last panic on this thread happened.
    static LOCATION: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Whether the panic hook stays quiet (a pass reports its failures once, at its end).
static QUIET: AtomicBool = AtomicBool::new(false);

/// Installs (once) a panic hook that remembers where each panic happened, for [`describe`],
/// and prints as the default hook does unless a pass is running.
pub fn install_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let location = info.location().map(|l| l.to_string());
            LOCATION.with(|cell| *cell.borrow_mut() = location);
            if !QUIET.load(Ordering::Relaxed) {
                default(info);
            }
        }));
    });
}

/// A caught panic's message, with where it happened when this thread's hook saw it.
pub fn describe(panic: &(dyn Any + Send)) -> String {
    let message = panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
        .unwrap_or_else(|| "a panic without a message".to_owned());
    match LOCATION.with(|cell| cell.borrow_mut().take()) {
        Some(location) if !message.contains(" (at ") => format!("{message} (at {location})"),
        _ => message,
    }
}

/// The checked-in inputs of `target` under `kind` (`seeds` or `regressions`), by file name.
pub fn inputs(kind: &str, target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(kind)
        .join(target);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut out: Vec<(PathBuf, Vec<u8>)> = entries
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .filter(|e| e.file_name() != "README.md")
        .map(|e| {
            let bytes = std::fs::read(e.path())
                .unwrap_or_else(|err| panic!("reading {}: {err}", e.path().display()));
            (e.path(), bytes)
        })
        .collect();
    out.sort();
    out
}

/// One failure of the pass.
struct Failure {
    message: String,
    input: PathBuf,
    count: usize,
}

/// Runs the pass of `target` (see the module docs) and panics if any input failed.
pub fn pass(name: &str, target: fn(&[u8]), cases: u64) {
    let cases = std::env::var("LICHEN_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(cases);
    let seed = match std::env::var("LICHEN_FUZZ_SEED").ok().as_deref() {
        None => DEFAULT_SEED,
        Some("random") => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            // The low 64 bits of the nanoseconds since the epoch.
            .map_or(1, |d| {
                d.as_secs()
                    .wrapping_mul(1_000_000_000)
                    .wrapping_add(u64::from(d.subsec_nanos()))
            }),
        Some(text) => text.parse().unwrap_or_else(|_| {
            panic!("LICHEN_FUZZ_SEED={text:?} is neither a number nor `random`")
        }),
    };
    run_pass(name, target, cases, seed);
}

/// [`pass`] with the case count and seed given.
pub fn run_pass(name: &str, target: fn(&[u8]), cases: u64, seed: u64) {
    install_hook();
    QUIET.store(true, Ordering::Relaxed);
    let mut failures: BTreeMap<String, Failure> = BTreeMap::new();
    let mut run = |input: &[u8], origin: &str| {
        if let Err(panic) = catch_unwind(AssertUnwindSafe(|| target(input))) {
            let message = describe(panic.as_ref());
            let first_line = message.lines().next().unwrap_or_default().to_owned();
            let location = message.rsplit_once(" (at ").map_or("", |(_, l)| l);
            let key = format!("{}{location}", failure_kind(&first_line));
            let entry = failures.entry(key).or_insert_with(|| Failure {
                message: format!(
                    "{origin}: {}",
                    message
                        .replace('\n', " / ")
                        .chars()
                        .take(600)
                        .collect::<String>()
                ),
                input: save(name, input),
                count: 0,
            });
            entry.count += 1;
        }
    };

    let regressions = inputs("regressions", name);
    let seeds = inputs("seeds", name);
    for (path, bytes) in regressions.iter().chain(&seeds) {
        run(bytes, &path.display().to_string());
    }
    let corpus: Vec<&[u8]> = seeds.iter().map(|(_, b)| b.as_slice()).collect();
    let mut rng = SplitMix64::new(seed ^ fnv(name));
    for case in 0..cases {
        let input = generate(&mut rng, &corpus);
        run(&input, &format!("case {case} of seed {seed}"));
    }

    if !failures.is_empty() {
        let mut report = format!(
            "fuzz target {name}: {} distinct failures ({} regression inputs, {} seeds, {cases} generated cases, seed {seed}):\n",
            failures.len(),
            regressions.len(),
            seeds.len()
        );
        for failure in failures.values() {
            report.push_str(&format!(
                "  {} [x{}]\n    input: {}\n",
                failure.message,
                failure.count,
                failure.input.display()
            ));
        }
        report.push_str(&format!(
            "  replay one: cp INPUT fuzz/regressions/{name}/ && cargo test -p lichen-fuzz --test pass {name}\n"
        ));
        // The hook is quiet during passes: say it here, then fail.
        eprintln!("{report}");
        panic!("{report}");
    }
}

/// What a failure is, for counting failures once each: the start of its message with digests,
/// numbers and temporary names (which differ between inputs) left out.
fn failure_kind(message: &str) -> String {
    let mut out = String::new();
    for word in message.split_inclusive(|c: char| !c.is_ascii_alphanumeric() && c != '.') {
        let (token, rest) = word.split_at(
            word.find(|c: char| !c.is_ascii_alphanumeric() && c != '.')
                .unwrap_or(word.len()),
        );
        if token.starts_with(".tmp") || token.bytes().any(|b| b.is_ascii_digit()) {
            out.push('#');
        } else {
            out.push_str(token);
        }
        out.push_str(rest);
        if out.len() > 60 {
            break;
        }
    }
    out
}

/// Writes a failing input where the report can point at it.
fn save(name: &str, input: &[u8]) -> PathBuf {
    let dir = std::env::temp_dir().join("lichen-fuzz-failures").join(name);
    let path = dir.join(hex::encode(Sha256::digest(input)));
    let _ = std::fs::create_dir_all(&dir);
    let _ = std::fs::write(&path, input);
    path
}

/// FNV-1a of a name, to give every target its own stream from one seed.
fn fnv(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |hash, b| {
        (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Bytes a mutation writes: the edges of integers in one byte and in text.
const EDGE_BYTES: &[u8] = &[
    0, 1, 0x7f, 0x80, 0xff, b'0', b'9', b'"', b'\\', b'\n', b'[', b'{',
];

/// One generated input: mostly a mutated seed, sometimes random bytes.
pub fn generate(rng: &mut SplitMix64, corpus: &[&[u8]]) -> Vec<u8> {
    if corpus.is_empty() || rng.below(8) == 0 {
        let len = rng
            .below(MAX_LEN + 1)
            .min(if rng.below(2) == 0 { 64 } else { MAX_LEN });
        return (0..len).map(|_| rng.next_u8()).collect();
    }
    let mut input = corpus[rng.below(corpus.len())].to_vec();
    for _ in 0..1 + rng.below(8) {
        mutate(rng, &mut input, corpus);
    }
    input.truncate(MAX_LEN);
    input
}

fn mutate(rng: &mut SplitMix64, input: &mut Vec<u8>, corpus: &[&[u8]]) {
    let len = input.len();
    match rng.below(8) {
        0 if len > 0 => {
            let at = rng.below(len);
            input[at] ^= 1 << rng.below(8);
        }
        1 if len > 0 => {
            let at = rng.below(len);
            input[at] = EDGE_BYTES[rng.below(EDGE_BYTES.len())];
        }
        2 if len > 0 => {
            let at = rng.below(len);
            input[at] = rng.next_u8();
        }
        3 => {
            let at = rng.below(len + 1);
            let n = 1 + rng.below(16);
            let bytes: Vec<u8> = (0..n).map(|_| rng.next_u8()).collect();
            input.splice(at..at, bytes);
        }
        4 if len > 0 => {
            let at = rng.below(len);
            let end = (at + 1 + rng.below(32)).min(len);
            input.drain(at..end);
        }
        5 if len > 0 => {
            let at = rng.below(len);
            let end = (at + 1 + rng.below(64)).min(len);
            let copy = input[at..end].to_vec();
            let to = rng.below(input.len() + 1);
            input.splice(to..to, copy);
        }
        6 => {
            let other = corpus[rng.below(corpus.len())];
            let cut = rng.below(len + 1);
            let from = rng.below(other.len() + 1);
            input.truncate(cut);
            input.extend_from_slice(&other[from..]);
        }
        _ => {
            // The first byte picks a target's mode: change it, keep the rest.
            if let Some(first) = input.first_mut() {
                *first = rng.next_u8();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stream_is_repeatable_and_mutations_stay_bounded() {
        let corpus: Vec<&[u8]> = vec![b"[[workloads]]\n", b"{}"];
        let mut a = SplitMix64::new(42);
        let mut b = SplitMix64::new(42);
        for _ in 0..200 {
            let x = generate(&mut a, &corpus);
            assert_eq!(x, generate(&mut b, &corpus));
            assert!(x.len() <= MAX_LEN);
        }
        assert_ne!(SplitMix64::new(1).next_u64(), SplitMix64::new(2).next_u64());
    }

    #[test]
    fn failures_that_differ_only_in_numbers_and_digests_count_once() {
        assert_eq!(
            failure_kind("set-uid file /store/0176d965aa45/rootfs/etc (mode 104755)"),
            failure_kind("set-uid file /store/ba2ff8909/rootfs/etc (mode 44755)")
        );
        assert_eq!(
            failure_kind("read did not return within 10s on /tmp/.tmp3KKXPp/bundle"),
            failure_kind("read did not return within 10s on /tmp/.tmpX3vdX6/bundle")
        );
        assert_ne!(
            failure_kind("raw character '\\n'"),
            failure_kind("raw character '\\t'")
        );
    }

    #[test]
    fn a_failing_target_fails_the_pass_and_names_the_input() {
        fn target(data: &[u8]) {
            assert!(!data.contains(&b'!'), "found a bang");
        }
        let outcome = catch_unwind(|| run_pass("harness_self_test", target, 2000, 7));
        let report = outcome
            .expect_err("random bytes hold a '!' in 2000 cases")
            .downcast::<String>()
            .expect("a report");
        assert!(report.contains("found a bang"), "{report}");
        assert!(
            report.contains("lichen-fuzz-failures/harness_self_test/"),
            "{report}"
        );
    }
}
