//! Every bound of a deployment: one past it is refused naming the field and the bound, at it is
//! accepted; and a typed (stored) spec out of bounds is refused by `check_bounds`.

use std::path::Path;
use std::time::Duration;

use super::super::{DeploymentError, DeploymentSpec, Limits, WorkloadSpec, parse};

fn parsed(file: &str, text: &str) -> Result<DeploymentSpec, DeploymentError> {
    parse(file, text, Path::new("/srv")).map(|parsed| parsed.spec)
}

/// Asserts `text` is refused at `field`, with every one of `words` in the message.
#[track_caller]
fn refused(file: &str, text: &str, field: &str, words: &[&str]) -> DeploymentError {
    let error = match parsed(file, text) {
        Ok(spec) => panic!("{file} must be refused at {field}, got {spec:?}"),
        Err(error) => error,
    };
    assert_eq!(error.field.as_deref(), Some(field), "field of: {error}");
    for word in words {
        assert!(error.message.contains(word), "{error} should say {word:?}");
    }
    error
}

#[track_caller]
fn accepted(file: &str, text: &str) -> DeploymentSpec {
    parsed(file, text).unwrap_or_else(|error| panic!("{file} must be accepted: {error}"))
}

fn wasm(body: &str) -> String {
    format!("[[workloads]]\nname = \"w\"\nmodule = \"w.wasm\"\n{body}")
}

fn container(body: &str) -> String {
    format!("[[workloads]]\nname = \"c\"\nkind = \"container\"\nimage = \"img\"\n{body}")
}

fn microvm(body: &str) -> String {
    format!(
        "[[workloads]]\nname = \"v\"\nkind = \"microvm\"\nkernel = \"k\"\ninitramfs = \"i\"\n{body}"
    )
}

#[test]
fn an_interval_of_500000000000_years_is_refused_naming_the_field() {
    let text = wasm("triggers = [{ interval = \"500000000000y\" }]\n");
    let error = refused(
        "deploy.toml",
        &text,
        "workloads[0].triggers[0].interval",
        &["\"500000000000y\"", "too long", "at most 1year"],
    );
    assert_eq!(error.line, Some(4));

    let json = r#"{"workloads": [{"name": "w", "module": "w.wasm",
        "triggers": [{"interval": "500000000000y"}]}]}"#;
    let error = refused(
        "deploy.json",
        json,
        "workloads[0].triggers[0].interval",
        &["at most 1year"],
    );
    assert_eq!(error.line, Some(2));
    accepted("deploy.toml", &wasm("triggers = [{ interval = \"1y\" }]\n"));
}

#[test]
fn a_queue_of_4000000000000000000_is_refused_naming_the_field() {
    let text = wasm("[workloads.limits]\nqueue = 4000000000000000000\n");
    let error = refused(
        "deploy.toml",
        &text,
        "workloads[0].limits.queue",
        &["4000000000000000000", "at most 4096 events"],
    );
    assert_eq!(error.line, Some(5));
    let json = r#"{"workloads": [{"name": "w", "module": "w.wasm",
        "limits": {"queue": 4000000000000000000}}]}"#;
    refused(
        "deploy.json",
        json,
        "workloads[0].limits.queue",
        &["at most 4096"],
    );
    let spec = accepted("deploy.toml", &wasm("[workloads.limits]\nqueue = 4096\n"));
    assert_eq!(spec.workloads[0].limits.queue, Some(Limits::MAX_QUEUE));
}

#[test]
fn a_huge_microvm_boot_timeout_is_refused_naming_the_field() {
    let text = microvm("boot-timeout = \"500000000000y\"\n");
    let error = refused(
        "deploy.toml",
        &text,
        "workloads[0].boot-timeout",
        &["boot-timeout \"500000000000y\" is too long", "at most 1h"],
    );
    assert_eq!(error.line, Some(6));
    let json = r#"{"workloads": [{"name": "v", "kind": "microvm", "kernel": "k",
        "initramfs": "i", "boot-timeout": "99999999s"}]}"#;
    refused(
        "deploy.json",
        json,
        "workloads[0].boot-timeout",
        &["at most 1h"],
    );
    accepted("deploy.toml", &microvm("boot-timeout = \"1h\"\n"));
}

#[test]
fn each_duration_and_number_is_refused_past_its_bound_and_accepted_at_it() {
    let input =
        "gpio = [{ name = \"b\", pin = \"GPIO17\", mode = \"input\", debounce = \"{}\" }]\n";
    let edge = "gpio = [{ name = \"b\", pin = \"GPIO17\", mode = \"input\" }]\n\
                triggers = [{ gpio-edge = \"b\", debounce = \"{}\" }]\n";
    let cases: Vec<(String, String, &str, &str)> = vec![
        (
            wasm(&input.replace("{}", "11s")),
            wasm(&input.replace("{}", "10s")),
            "workloads[0].gpio[0].debounce",
            "at most 10s",
        ),
        (
            wasm(&edge.replace("{}", "11s")),
            wasm(&edge.replace("{}", "10s")),
            "workloads[0].triggers[0].debounce",
            "at most 10s",
        ),
        (
            wasm("[workloads.limits]\ntime-slice = \"61m\"\n"),
            wasm("[workloads.limits]\ntime-slice = \"1h\"\n"),
            "workloads[0].limits.time-slice",
            "at most 1h",
        ),
        (
            wasm("[workloads.limits]\nmemory = \"1025GiB\"\n"),
            wasm("[workloads.limits]\nmemory = \"1024GiB\"\n"),
            "workloads[0].limits.memory",
            "at most 1TiB",
        ),
        (
            wasm("spi = [{ name = \"a\", bus = \"spi0.0\", max-hz = 1000000001 }]\n"),
            wasm("spi = [{ name = \"a\", bus = \"spi0.0\", max-hz = 1000000000 }]\n"),
            "workloads[0].spi[0].max-hz",
            "1 to 1000000000 Hz",
        ),
        (
            container("[workloads.limits]\ncpus = 1024.001\n"),
            container("[workloads.limits]\ncpus = 1024\n"),
            "workloads[0].limits.cpus",
            "at most 1024 cores",
        ),
        (
            container("[workloads.limits]\npids = 4194305\n"),
            container("[workloads.limits]\npids = 4194304\n"),
            "workloads[0].limits.pids",
            "1 to 4194304",
        ),
        (
            microvm("vcpus = 65\n"),
            microvm("vcpus = 64\n"),
            "workloads[0].vcpus",
            "1 to 64",
        ),
    ];
    for (over, at, field, words) in cases {
        refused("deploy.toml", &over, field, &[words]);
        accepted("deploy.toml", &at);
    }
}

#[test]
fn each_count_and_length_is_refused_past_its_bound_and_accepted_at_it() {
    let config = |entries: usize| {
        let mut text = wasm("[workloads.config]\n");
        for i in 0..entries {
            text.push_str(&format!("k{i} = 1\n"));
        }
        text
    };
    let gpio = |count: usize| {
        let pins: Vec<String> = (0..count)
            .map(|i| format!("{{ name = \"p{i}\", pin = \"GPIO{i}\", mode = \"output\" }}"))
            .collect();
        wasm(&format!("gpio = [{}]\n", pins.join(", ")))
    };
    let strings = |field: &str, count: usize, len: usize| {
        let items = vec![format!("\"{}\"", "a".repeat(len)); count];
        container(&format!("{field} = [{}]\n", items.join(", ")))
    };
    let env = |count: usize, name_len: usize, value_len: usize| {
        let vars: Vec<String> = (0..count)
            .map(|i| {
                format!(
                    "{}{i} = \"{}\"",
                    "E".repeat(name_len - i.to_string().len()),
                    "v".repeat(value_len)
                )
            })
            .collect();
        container(&format!("env = {{ {} }}\n", vars.join(", ")))
    };
    let long = |n: usize| "x".repeat(n);
    let cases: Vec<(String, String, &str, &str)> = vec![
        (
            format!("description = \"{}\"\n{}", long(4097), wasm("")),
            format!("description = \"{}\"\n{}", long(4096), wasm("")),
            "description",
            "at most 4KiB",
        ),
        (
            config(257),
            config(256),
            "workloads[0].config",
            "at most 256",
        ),
        (
            wasm(&format!("[workloads.config]\nk = \"{}\"\n", long(65537))),
            wasm(&format!("[workloads.config]\nk = \"{}\"\n", long(65536))),
            "workloads[0].config.k",
            "at most 64KiB",
        ),
        (
            wasm(&format!("[workloads.config]\n{} = 1\n", long(257))),
            wasm(&format!("[workloads.config]\n{} = 1\n", long(256))),
            "workloads[0].config",
            "at most 256 bytes",
        ),
        (gpio(65), gpio(64), "workloads[0].gpio", "at most 64"),
        (
            wasm(&format!(
                "gpio = [{{ name = \"p\", pin = \"{}\", mode = \"output\" }}]\n",
                long(65)
            )),
            wasm(&format!(
                "gpio = [{{ name = \"p\", pin = \"{}\", mode = \"output\" }}]\n",
                long(64)
            )),
            "workloads[0].gpio[0].pin",
            "at most 64 bytes",
        ),
        (
            strings("args", 1025, 1),
            strings("args", 1024, 1),
            "workloads[0].args",
            "at most 1024",
        ),
        (
            strings("command", 1, 128 * 1024 + 1),
            strings("command", 1, 128 * 1024),
            "workloads[0].command[0]",
            "at most 128KiB",
        ),
        (
            env(257, 4, 1),
            env(256, 4, 1),
            "workloads[0].env",
            "at most 256",
        ),
        (
            env(1, 257, 1),
            env(1, 256, 1),
            "workloads[0].env",
            "at most 256 bytes",
        ),
        (
            microvm(&format!("cmdline = \"{}\"\n", long(1025))),
            microvm(&format!("cmdline = \"{}\"\n", long(1024))),
            "workloads[0].cmdline",
            "at most 1KiB",
        ),
        (
            microvm(&format!("ready-marker = \"{}\"\n", long(257))),
            microvm(&format!("ready-marker = \"{}\"\n", long(256))),
            "workloads[0].ready-marker",
            "at most 256 bytes",
        ),
        (
            format!("[[workloads]]\nname = \"w\"\nmodule = \"{}\"\n", long(4096)),
            format!("[[workloads]]\nname = \"w\"\nmodule = \"{}\"\n", long(4090)),
            "workloads[0].module",
            "at most 4096 bytes",
        ),
    ];
    for (over, at, field, words) in cases {
        refused("deploy.toml", &over, field, &[words]);
        accepted("deploy.toml", &at);
    }
}

#[test]
fn more_workloads_than_the_bound_are_refused_before_each_is_checked() {
    let many = |n: usize| {
        let mut text = String::new();
        for i in 0..n {
            text.push_str(&format!(
                "[[workloads]]\nname = \"w{i}\"\nmodule = \"m.wasm\"\n"
            ));
        }
        text
    };
    let error = refused(
        "deploy.toml",
        &many(DeploymentSpec::MAX_WORKLOADS + 1),
        "workloads",
        &["4097 workloads are too many", "at most 4096"],
    );
    assert_eq!(error.line, Some(1));
    assert_eq!(
        accepted("deploy.toml", &many(DeploymentSpec::MAX_WORKLOADS))
            .workloads
            .len(),
        DeploymentSpec::MAX_WORKLOADS
    );
}

#[test]
fn a_text_over_4_mib_is_refused_before_it_is_parsed() {
    let mut text = wasm("");
    text.push_str(&format!(
        "# {}\n",
        "x".repeat(DeploymentSpec::MAX_TEXT_BYTES)
    ));
    let error = parsed("big.toml", &text).expect_err("too large");
    assert_eq!((error.line, error.field.as_deref()), (None, None));
    assert!(
        error
            .message
            .contains("the largest accepted is 4MiB (4194304 bytes)"),
        "{error}"
    );
}

#[test]
fn a_stored_spec_out_of_bounds_is_refused_by_check_bounds() {
    // What an agent with looser rules could have stored: the agent checks it before starting.
    let stored = [
        (
            r#"{"name":"w","module":{"path":"/w.wasm"},"triggers":[{"interval":"500000000000years"}]}"#,
            "triggers[0].interval",
            "at most 1year",
        ),
        (
            r#"{"name":"w","module":{"path":"/w.wasm"},"triggers":[{"interval":"0s"}]}"#,
            "triggers[0].interval",
            "at least 1ms",
        ),
        (
            r#"{"name":"w","module":{"path":"/w.wasm"},"limits":{"queue":4000000000000000000}}"#,
            "limits.queue",
            "1 to 4096",
        ),
        (
            r#"{"name":"w","module":{"path":"/w.wasm"},"limits":{"time-slice":"0s"}}"#,
            "limits.time-slice",
            "at least 1ms",
        ),
        (
            r#"{"name":"v","kind":"microvm","microvm":{"kernel":"/k","root":{"initramfs":"/i"},
                "vcpus":1,"boot-timeout":"500000000000years"}}"#,
            "boot-timeout",
            "at most 1h",
        ),
        (
            r#"{"name":"v","kind":"microvm","microvm":{"kernel":"/k","root":{"initramfs":"/i"},
                "vcpus":0}}"#,
            "vcpus",
            "1 to 64",
        ),
        (
            r#"{"name":"Bad\nName","module":{"path":"/w.wasm"}}"#,
            "name",
            "\"Bad\\nName\"",
        ),
    ];
    for (json, field, words) in stored {
        let spec: WorkloadSpec = serde_json::from_str(json).expect("the stored form reads");
        let error = spec.check_bounds().expect_err("out of bounds");
        assert_eq!(error.field, field, "{error}");
        assert!(
            error.message.contains(words),
            "{error} should say {words:?}"
        );
    }
    let good: WorkloadSpec = serde_json::from_str(
        r#"{"name":"w","module":{"path":"/w.wasm"},"triggers":[{"interval":"1s"}]}"#,
    )
    .expect("reads");
    assert_eq!(good.check_bounds(), Ok(()));
    assert_eq!(
        Duration::from_secs(31_557_600),
        super::super::Trigger::MAX_INTERVAL
    );
}
