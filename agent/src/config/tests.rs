use super::*;

#[test]
fn built_in_config_parses() {
    let config = AgentConfig::load(None).expect("built-in config is valid");
    let engine = config.engine_options().expect("sizes are valid");
    assert_eq!(engine.max_memory_bytes, 32 << 20);
    assert_eq!(engine.max_instances, 1024);
}

#[test]
fn hub_section_parses_with_defaults_and_refuses_unknown_keys() {
    let config: AgentConfig =
        toml::from_str("[hub]\nurl = \"mqtt://127.0.0.1:1883\"\nnode-id = \"n1\"\n")
            .expect("minimal hub section");
    let hub = config.hub.expect("hub section present");
    assert_eq!(hub.outbox_quota, "64MiB");
    assert!(!hub.insecure_dev);
    assert!(hub.trusted_keys.is_empty());
    let err = toml::from_str::<AgentConfig>("[hub]\nurl = \"x\"\nnode-id = \"n\"\nnode = 1\n")
        .expect_err("unknown key");
    assert!(err.to_string().contains("node"), "{err}");
    assert!(AgentConfig::load(None).expect("built-in").hub.is_none());
}

/// Loads `text` as a config file, through the same path as `lichen run --config`.
fn load_text(text: &str) -> Result<AgentConfig> {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("agent.toml");
    std::fs::write(&path, text).expect("write config");
    AgentConfig::load(Some(&path))
}

#[test]
fn each_wasm_and_logs_key_is_optional_on_its_own() {
    let config = load_text("[wasm]\nmax-instances = 8\n").expect("one key is enough");
    assert_eq!(config.wasm.max_instances, 8);
    assert_eq!(config.wasm.max_memory, "32MiB");
    assert_eq!(config.wasm.memory_guard, "64KiB");
    let config = load_text("[wasm]\nmax-memory = \"16MiB\"\n").expect("another one");
    assert_eq!(config.wasm.max_instances, 1024);
    assert_eq!(config.engine_options().unwrap().max_memory_bytes, 16 << 20);
    let config = load_text("[logs]\nlevel = \"debug\"\n").expect("logs too");
    assert_eq!(config.logs.ring_lines, 500);
    let empty = load_text("").expect("an empty file is the defaults");
    assert_eq!(empty, AgentConfig::load(None).unwrap());
}

#[test]
fn every_key_out_of_its_bound_is_refused_naming_it() {
    let hub = "[hub]\nurl = \"mqtt://h\"\nnode-id = \"n\"\n";
    let cases: Vec<(String, &str, &str)> = vec![
        ("board = \"pi9\"".into(), "board", "unknown board \"pi9\""),
        (
            format!("state-dir = \"/{}\"", "d".repeat(4096)),
            "state-dir",
            "at most 4096",
        ),
        (
            "[wasm]\nmax-instances = 0".into(),
            "wasm.max-instances",
            "1 to 16384",
        ),
        (
            "[wasm]\nmax-instances = 16385".into(),
            "wasm.max-instances",
            "1 to 16384",
        ),
        (
            "[wasm]\nmax-memory = \"8GiB\"".into(),
            "wasm.max-memory",
            "64KiB to 4GiB",
        ),
        (
            "[wasm]\nmax-memory = \"1KiB\"".into(),
            "wasm.max-memory",
            "64KiB to 4GiB",
        ),
        (
            "[wasm]\nmemory-guard = \"5GiB\"".into(),
            "wasm.memory-guard",
            "0 bytes to 4GiB",
        ),
        (
            "[wasm]\ntable-elements = 0".into(),
            "wasm.table-elements",
            "1 to 100000",
        ),
        (
            "[wasm]\ntable-elements = 100001".into(),
            "wasm.table-elements",
            "1 to 100000",
        ),
        (
            "[wasm]\ncore-instances-per-component = 257".into(),
            "wasm.core-instances-per-component",
            "1 to 256",
        ),
        (
            "[wasm]\ntables-per-component = 0".into(),
            "wasm.tables-per-component",
            "1 to 256",
        ),
        (
            "[threads]\nworkers = 65".into(),
            "threads.workers",
            "0 (one per core) to 64",
        ),
        (
            "[threads]\nworker-stack = \"64KiB\"".into(),
            "threads.worker-stack",
            "256KiB to 16MiB",
        ),
        (
            "[threads]\nmax-blocking = 0".into(),
            "threads.max-blocking",
            "1 to 512",
        ),
        (
            "[logs]\nring-lines = 0".into(),
            "logs.ring-lines",
            "1 to 10000",
        ),
        (
            "[logs]\nring-lines = 10001".into(),
            "logs.ring-lines",
            "1 to 10000",
        ),
        (
            "[logs]\nlines-per-second = nan".into(),
            "logs.lines-per-second",
            "0 to 10000",
        ),
        (
            "[logs]\nlines-per-second = -1.0".into(),
            "logs.lines-per-second",
            "0 to 10000",
        ),
        ("[logs]\nburst = inf".into(), "logs.burst", "1 to 100000"),
        (
            "[logs]\npersisted-lines = 100001".into(),
            "logs.persisted-lines",
            "0 to 100000",
        ),
        (
            "[logs]\nlevel = \"loud\"".into(),
            "logs.level",
            "unknown level",
        ),
        (
            "[images]\nmax-entries = 0".into(),
            "images.max-entries",
            "1 to 10000000",
        ),
        (
            "[images]\nmax-unpacked = \"2048GiB\"".into(),
            "images.max-unpacked",
            "1 bytes to 1TiB",
        ),
        (
            "[images]\nsetuid = \"allow\"".into(),
            "images.setuid",
            "unknown policy",
        ),
        (
            format!("[containerd]\ntask-socket = \"/{}\"", "s".repeat(107)),
            "containerd.task-socket",
            "at most 107",
        ),
        (
            "[containerd]\ntask-socket = \"run/task.sock\"".into(),
            "containerd.task-socket",
            "not an absolute path",
        ),
        (hub.replace("mqtt://h", ""), "hub.url", "expected 1 to 2048"),
        (hub.replace("\"n\"", "\"a/b\""), "hub.node-id", "'/'"),
        (
            format!("{hub}outbox-quota = \"1023\""),
            "hub.outbox-quota",
            "1KiB to 64GiB",
        ),
        (
            format!("{hub}outbox-quota = \"65GiB\""),
            "hub.outbox-quota",
            "1KiB to 64GiB",
        ),
        (
            format!("{hub}trusted-keys = [{}]", vec!["\"k\""; 65].join(", ")),
            "hub.trusted-keys",
            "at most 64",
        ),
        (
            format!("{hub}trusted-keys = [\"{}\"]", "a".repeat(257)),
            "hub.trusted-keys[0]",
            "at most 256",
        ),
        (
            format!(
                "{hub}username = \"u\"\npassword = \"{}\"",
                "p".repeat(65_536)
            ),
            "hub.password",
            "at most 65535",
        ),
        (
            format!("{UPDATE}health-deadline = \"1s\"\n"),
            "update.health-deadline",
            "outside 10s to 24h",
        ),
        (
            format!("{UPDATE}reboot-command = {:?}\n", vec!["r"; 33]),
            "update.reboot-command",
            "at most 32",
        ),
        (
            format!("{UPDATE}trusted-keys = [\"{}\"]\n", "a".repeat(257)),
            "update.trusted-keys",
            "at most 256",
        ),
        (
            UPDATE.replace("/b/grubenv", &format!("/{}", "b".repeat(4096))),
            "update.boot-state",
            "expected 1 to 4096",
        ),
        (
            UPDATE.replace("grub", "uboot") + "env-size = 2097152\n",
            "update.env-size",
            "expected 64 to 1048576",
        ),
    ];
    for (text, key, words) in cases {
        let error = load_text(&text).expect_err(&text[..text.len().min(60)]);
        let message = format!("{error:#}");
        assert!(
            message.contains(&format!(": {key}: ")) && message.contains(words),
            "{key}: {message}"
        );
    }
}

/// A minimal `[update]` section (the keys without a default).
const UPDATE: &str = "[update]\ntarget = \"x86_64\"\nboot = \"grub\"\nboot-state = [\"/b/grubenv\"]\n\
                          slots = { A = \"partlabel:rootfs-a\", B = \"partlabel:rootfs-b\" }\n";

#[test]
fn a_config_file_that_is_a_fifo_or_too_large_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let big = dir.path().join("big.toml");
    std::fs::write(&big, format!("# {}\n", "x".repeat(1 << 20))).unwrap();
    let message = format!("{:#}", AgentConfig::load(Some(&big)).unwrap_err());
    assert!(message.contains("more than the 1MiB"), "{message}");
    let message = format!(
        "{:#}",
        AgentConfig::load(Some(Path::new("/dev/zero"))).unwrap_err()
    );
    assert!(message.contains("not a regular file"), "{message}");
}

#[test]
fn the_effective_config_has_every_key_and_reads_back_the_same() {
    let mut config = load_text(&format!(
            "[hub]\nurl = \"mqtt://h\"\nnode-id = \"n\"\nusername = \"u\"\npassword = \"secret\"\n{UPDATE}"
        ))
        .unwrap();
    let text = config.effective_toml(Path::new("/var/lib/lichen")).unwrap();
    assert!(!text.contains("secret"), "{text}");
    let back: AgentConfig = toml::from_str(&text).expect("reads back");
    config.state_dir = Some(PathBuf::from("/var/lib/lichen"));
    if let Some(hub) = config.hub.as_mut() {
        hub.password = Some("<redacted>".into());
    }
    assert_eq!(back, config);
    for key in [
        "state-dir",
        "board",
        "[wasm]",
        "max-instances",
        "max-memory",
        "memory-guard",
        "table-elements",
        "core-instances-per-component",
        "tables-per-component",
        "[logs]",
        "ring-lines",
        "lines-per-second",
        "burst",
        "persisted-lines",
        "level",
        "[hub]",
        "url",
        "node-id",
        "trusted-keys",
        "outbox-quota",
        "insecure-dev",
        "[images]",
        "max-unpacked",
        "max-file",
        "max-entries",
        "max-path",
        "max-depth",
        "setuid",
        "[update]",
        "target",
        "boot-state",
        "health-deadline",
        "reboot-command",
        "system-file",
        "env-size",
    ] {
        assert!(text.contains(key), "{key} missing from:\n{text}");
    }
}

#[test]
fn docs_config_md_documents_every_key() {
    let docs = include_str!("../../../docs/config.md");
    let every = [
        "state-dir",
        "board",
        "max-instances",
        "max-memory",
        "memory-guard",
        "table-elements",
        "core-instances-per-component",
        "tables-per-component",
        "ring-lines",
        "lines-per-second",
        "burst",
        "persisted-lines",
        "level",
        "url",
        "node-id",
        "ca-file",
        "client-cert",
        "client-key",
        "username",
        "password",
        "trusted-keys",
        "outbox-quota",
        "insecure-dev",
        "max-unpacked",
        "max-file",
        "max-entries",
        "max-path",
        "max-depth",
        "setuid",
        "target",
        "boot",
        "boot-state",
        "slots",
        "health-deadline",
        "confirm-file",
        "reboot-command",
        "system-file",
        "cmdline",
        "sys-class-block",
        "dev-dir",
        "mounts",
        "env-size",
        "tryboot-partitions",
    ];
    for key in every {
        assert!(
            docs.contains(&format!("`{key}`")),
            "docs/config.md lacks `{key}`"
        );
    }
    // And nothing the config does not have: every key the docs table names parses.
    let full = "state-dir = \"/s\"\nboard = \"sim\"\n[wasm]\nmax-instances = 1\nmax-memory = \"64KiB\"\n\
                    memory-guard = \"0\"\ntable-elements = 1\ncore-instances-per-component = 1\n\
                    tables-per-component = 1\n[logs]\nring-lines = 1\nlines-per-second = 0.0\nburst = 1.0\n\
                    persisted-lines = 0\nlevel = \"info\"\n[hub]\nurl = \"mqtt://h\"\nnode-id = \"n\"\n\
                    ca-file = \"/c\"\nclient-cert = \"/c\"\nclient-key = \"/k\"\nusername = \"u\"\n\
                    password = \"p\"\ntrusted-keys = []\noutbox-quota = \"1KiB\"\ninsecure-dev = false\n\
                    [update]\ntarget = \"x\"\nboot = \"tryboot\"\nboot-state = [\"/a\"]\n\
                    slots = { A = \"/a\", B = \"/b\" }\ntrusted-keys = []\nhealth-deadline = \"10s\"\n\
                    confirm-file = \"/c\"\nreboot-command = [\"r\"]\nsystem-file = \"/s\"\ncmdline = \"/c\"\n\
                    sys-class-block = \"/s\"\ndev-dir = \"/d\"\nmounts = \"/m\"\nenv-size = 64\n\
                    tryboot-partitions = { A = 1, B = 2 }\n";
    load_text(full).expect("every documented key at its lower bound is accepted");
}

#[test]
fn image_bounds_default_and_out_of_range_values_are_named() {
    let config = AgentConfig::load(None).expect("built-in");
    assert_eq!(
        config.image_limits().expect("defaults are valid"),
        ImageLimits::default()
    );
    let config: AgentConfig =
        toml::from_str("[images]\nmax-file = \"1MiB\"\nsetuid = \"strip\"\n").expect("parses");
    let limits = config.image_limits().expect("valid");
    assert_eq!(limits.max_file_bytes, 1 << 20);
    assert_eq!(limits.setuid, SetuidPolicy::Strip);
    assert_eq!(limits.max_entries, 200_000, "unset keys keep their default");
    for (text, named) in [
        ("max-entries = 0", "images.max-entries = 0"),
        ("max-depth = 5000", "images.max-depth = 5000"),
        ("max-unpacked = \"0\"", "images.max-unpacked"),
        ("setuid = \"allow\"", "images.setuid \"allow\""),
    ] {
        let config: AgentConfig = toml::from_str(&format!("[images]\n{text}\n")).expect("parses");
        let err = format!("{:#}", config.image_limits().expect_err(text));
        assert!(err.contains(named), "{err}");
    }
}

#[test]
fn sizes_parse_and_bad_units_are_named() {
    assert_eq!(parse_size("64KiB").unwrap(), 65536);
    assert_eq!(parse_size("2048").unwrap(), 2048);
    assert!(format!("{:#}", parse_size("3MB").unwrap_err()).contains("\"MB\""));
}
