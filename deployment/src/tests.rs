use std::path::{Path, PathBuf};
use std::time::Duration;

use super::*;

const EXAMPLE_TOML: &str = include_str!("../../examples/deploy.toml");
const EXAMPLE_JSON: &str = include_str!("../../examples/deploy.json");

fn ok(file: &str, text: &str) -> ParsedDeployment {
    match parse(file, text, Path::new("/srv/demo")) {
        Ok(parsed) => parsed,
        Err(error) => panic!("{file} must parse, got: {error}"),
    }
}

fn err(file: &str, text: &str) -> DeploymentError {
    match parse(file, text, Path::new("/srv/demo")) {
        Ok(parsed) => panic!("{file} must be rejected, got: {:?}", parsed.spec),
        Err(error) => error,
    }
}

/// Asserts the line, the field path and that the message contains each of `words`.
fn assert_error(error: &DeploymentError, line: usize, field: &str, words: &[&str]) {
    assert_eq!(error.line, Some(line), "line of: {error}");
    assert!(error.column.is_some(), "column of: {error}");
    assert_eq!(error.field.as_deref(), Some(field), "field of: {error}");
    for word in words {
        assert!(
            error.message.contains(word),
            "{error} should mention {word:?}"
        );
    }
}

fn workload(body: &str) -> String {
    format!("[[workloads]]\nname = \"counter\"\nmodule = \"counter.wasm\"\n{body}")
}

#[test]
fn toml_and_json_examples_give_equal_specs() {
    let from_toml = ok("deploy.toml", EXAMPLE_TOML).spec;
    let from_json = ok("deploy.json", EXAMPLE_JSON).spec;
    assert_eq!(from_toml, from_json);

    assert_eq!(
        from_toml.description.as_deref(),
        Some("demo on the simulated board")
    );
    let counter = &from_toml.workloads[0];
    assert_eq!(counter.name, "counter");
    assert_eq!(counter.restart, RestartPolicy::OnFailure);
    assert_eq!(
        counter.triggers,
        vec![Trigger::Interval(Duration::from_millis(500))]
    );
    assert_eq!(
        counter.limits,
        Limits {
            memory_bytes: Some(16 * 1024 * 1024),
            time_slice: Some(Duration::from_millis(100)),
            queue: Some(64),
            ..Limits::default()
        }
    );
    let thermostat = &from_toml.workloads[1];
    assert_eq!(thermostat.restart, RestartPolicy::Always);
    assert_eq!(thermostat.config["target"], "21.5");
}

#[test]
fn defaults_apply_when_fields_are_absent() {
    let spec = ok("deploy.toml", &workload("")).spec;
    let counter = &spec.workloads[0];
    assert_eq!(counter.restart, RestartPolicy::OnFailure);
    assert!(counter.triggers.is_empty());
    assert!(counter.config.is_empty());
    assert_eq!(counter.limits, Limits::default());
    assert_eq!(spec.description, None);
}

#[test]
fn relative_module_path_is_joined_with_base_dir() {
    let spec = ok("deploy.toml", EXAMPLE_TOML).spec;
    assert_eq!(
        spec.workloads[0].module(),
        Some(&ModuleRef::Path(PathBuf::from("/srv/demo/counter.wasm")))
    );
    let text = "[[workloads]]\nname = \"a\"\nmodule = \"/opt/a.wasm\"\n";
    assert_eq!(
        ok("deploy.toml", text).spec.workloads[0].module(),
        Some(&ModuleRef::Path(PathBuf::from("/opt/a.wasm")))
    );
}

#[test]
fn digest_reference_is_parsed_and_lowercased() {
    let hex = "ab".repeat(32);
    let text = format!(
        "[[workloads]]\nname = \"a\"\nmodule = \"sha256:{}\"\n",
        hex.to_uppercase()
    );
    assert_eq!(
        ok("deploy.toml", &text).spec.workloads[0].module(),
        Some(&ModuleRef::Digest(hex))
    );
}

#[test]
fn malformed_digest_and_empty_module_are_rejected() {
    let text = "[[workloads]]\nname = \"a\"\nmodule = \"sha256:abc\"\n";
    let error = err("deploy.toml", text);
    assert_error(
        &error,
        3,
        "workloads[0].module",
        &["sha256:abc", "64 hexadecimal digits"],
    );

    let text = "[[workloads]]\nname = \"a\"\nmodule = \"\"\n";
    let error = err("deploy.toml", text);
    assert_error(
        &error,
        3,
        "workloads[0].module",
        &["module is empty", "path"],
    );
}

#[test]
fn toml_syntax_error_has_line_and_column() {
    let text = "description = \"x\"\n[[workloads]]\nname = \"a\"\nmodule = \n";
    let error = err("deploy.toml", text);
    assert_eq!((error.line, error.column), (Some(4), Some(10)));
    assert!(error.message.starts_with("invalid TOML: "), "{error}");
    assert!(
        error
            .to_string()
            .starts_with("deploy.toml:4:10: invalid TOML"),
        "{error}"
    );
}

#[test]
fn toml_duplicate_key_names_the_key() {
    let error = err("deploy.toml", &workload("name = \"again\"\n"));
    assert_eq!(error.line, Some(4));
    assert!(error.message.contains("duplicate key `name`"), "{error}");
}

#[test]
fn json_syntax_error_has_line_and_column() {
    let text = "{\n  \"workloads\": [\n    { \"name\": \"a\" \"module\": \"a.wasm\" }\n  ]\n}\n";
    let error = err("deploy.json", text);
    assert_eq!(error.line, Some(3), "{error}");
    assert!(error.column.is_some(), "{error}");
    assert!(error.message.starts_with("invalid JSON: "), "{error}");
    assert!(
        !error.message.contains(" at line "),
        "position is not repeated: {error}"
    );
}

#[test]
fn unknown_field_is_named_with_its_line() {
    let text = "[[workloads]]\nname = \"a\"\nmodule = \"a.wasm\"\n\n[[workloads]]\nname = \"b\"\nmodul = \"b.wasm\"\n";
    let error = err("deploy.toml", text);
    assert_error(
        &error,
        7,
        "workloads[1].modul",
        &["unknown field `modul`", "did you mean `module`"],
    );
    assert_eq!(error.column, Some(1));
    assert!(
        error
            .to_string()
            .starts_with("deploy.toml:7:1: workloads[1].modul: unknown field"),
        "{error}"
    );
}

#[test]
fn unknown_fields_are_rejected_at_every_level() {
    let error = err(
        "deploy.toml",
        &format!("descripton = \"x\"\n{}", workload("")),
    );
    assert_error(&error, 1, "descripton", &["unknown field `descripton`"]);

    let error = err(
        "deploy.toml",
        &workload("[workloads.limits]\nmemroy = \"1MiB\"\n"),
    );
    assert_error(
        &error,
        5,
        "workloads[0].limits.memroy",
        &["unknown limit `memroy`", "`memory`"],
    );

    let error = err("deploy.toml", &workload("triggers = [{ gpio = \"x\" }]\n"));
    assert_error(
        &error,
        4,
        "workloads[0].triggers[0].gpio",
        &["unknown trigger kind `gpio`"],
    );
}

#[test]
fn missing_required_field_is_located_at_the_workload() {
    let text =
        "[[workloads]]\nname = \"a\"\nmodule = \"a.wasm\"\n\n[[workloads]]\nmodule = \"b.wasm\"\n";
    let error = err("deploy.toml", text);
    assert_error(&error, 5, "workloads[1].name", &["missing field `name`"]);

    let error = err("deploy.toml", "[[workloads]]\nname = \"a\"\n");
    assert_error(
        &error,
        1,
        "workloads[0].module",
        &["missing field `module`"],
    );
}

#[test]
fn missing_workloads_is_an_error_but_an_empty_list_runs_nothing() {
    let error = err("deploy.toml", "description = \"nothing\"\n");
    assert_eq!(error.field.as_deref(), Some("workloads"));
    assert!(
        error.message.contains("missing field `workloads`"),
        "{error}"
    );

    assert!(
        ok("deploy.toml", "workloads = []\n")
            .spec
            .workloads
            .is_empty()
    );
    assert!(
        ok("deploy.json", "{\"workloads\": []}")
            .spec
            .workloads
            .is_empty()
    );
}

#[test]
fn duplicate_names_are_located_at_the_second_and_name_the_first_line() {
    let text = "[[workloads]]\nname = \"counter\"\nmodule = \"a.wasm\"\n\n[[workloads]]\nname = \"other\"\nmodule = \"b.wasm\"\n\n[[workloads]]\nname = \"counter\"\nmodule = \"c.wasm\"\n";
    let error = err("deploy.toml", text);
    assert_error(
        &error,
        10,
        "workloads[2].name",
        &[
            "duplicate workload name \"counter\"",
            "workloads[0] on line 2",
        ],
    );
}

#[test]
fn bad_restart_value_is_rejected() {
    let error = err("deploy.toml", &workload("restart = \"sometimes\"\n"));
    assert_error(
        &error,
        4,
        "workloads[0].restart",
        &["restart policy \"sometimes\"", "\"on-failure\""],
    );
}

#[test]
fn bad_intervals_are_rejected() {
    for (value, words) in [
        ("\"0ms\"", &["interval \"0ms\"", "at least 1ms"][..]),
        ("\"500us\"", &["interval \"500us\"", "at least 1ms"]),
        ("\"soon\"", &["invalid interval \"soon\"", "\"500ms\""]),
        (
            "500",
            &["`interval` must be a duration string", "found an integer"],
        ),
    ] {
        let error = err(
            "deploy.toml",
            &workload(&format!("triggers = [\n  {{ interval = {value} }},\n]\n")),
        );
        assert_error(&error, 5, "workloads[0].triggers[0].interval", words);
    }
    let spec = ok(
        "deploy.toml",
        &workload("triggers = [{ interval = \"1m 30s\" }]\n"),
    )
    .spec;
    assert_eq!(
        spec.workloads[0].triggers,
        vec![Trigger::Interval(Duration::from_secs(90))]
    );
}

#[test]
fn zero_time_slice_is_rejected() {
    let error = err(
        "deploy.toml",
        &workload("[workloads.limits]\ntime-slice = \"0s\"\n"),
    );
    assert_error(
        &error,
        5,
        "workloads[0].limits.time-slice",
        &["time-slice \"0s\"", "at least 1ms"],
    );
}

#[test]
fn only_one_interval_trigger_per_workload() {
    let error = err(
        "deploy.toml",
        &workload("triggers = [\n  { interval = \"1s\" },\n  { interval = \"2s\" },\n]\n"),
    );
    assert_error(
        &error,
        6,
        "workloads[0].triggers[1].interval",
        &["only one interval trigger", "line 5"],
    );
}

#[test]
fn memory_below_one_page_is_rejected() {
    let error = err(
        "deploy.toml",
        &workload("[workloads.limits]\nmemory = \"32KiB\"\n"),
    );
    assert_error(
        &error,
        5,
        "workloads[0].limits.memory",
        &["memory limit \"32KiB\"", "64KiB"],
    );

    let error = err(
        "deploy.toml",
        &workload("[workloads.limits]\nmemory = 1024\n"),
    );
    assert_error(
        &error,
        5,
        "workloads[0].limits.memory",
        &["1024 bytes", "64KiB"],
    );

    let spec = ok(
        "deploy.toml",
        &workload("[workloads.limits]\nmemory = \"64KiB\"\n"),
    )
    .spec;
    assert_eq!(spec.workloads[0].limits.memory_bytes, Some(65536));
}

#[test]
fn bad_sizes_and_queues_are_rejected() {
    let error = err(
        "deploy.toml",
        &workload("[workloads.limits]\nmemory = \"16MB\"\n"),
    );
    assert_error(
        &error,
        5,
        "workloads[0].limits.memory",
        &["\"16MB\"", "MiB"],
    );

    let error = err(
        "deploy.toml",
        &workload("[workloads.limits]\nmemory = \"lots\"\n"),
    );
    assert_error(
        &error,
        5,
        "workloads[0].limits.memory",
        &["\"lots\"", "16MiB"],
    );

    let error = err("deploy.toml", &workload("[workloads.limits]\nqueue = 0\n"));
    assert_error(
        &error,
        5,
        "workloads[0].limits.queue",
        &["queue", "at least 1"],
    );
}

#[test]
fn invalid_name_is_rejected() {
    let error = err(
        "deploy.toml",
        "[[workloads]]\nname = \"My_Counter\"\nmodule = \"a.wasm\"\n",
    );
    assert_error(
        &error,
        2,
        "workloads[0].name",
        &["invalid workload name \"My_Counter\"", "a-z"],
    );
    assert_eq!(error.column, Some(8));
}

#[test]
fn wrong_types_name_the_field_and_both_types() {
    let error = err(
        "deploy.toml",
        "[[workloads]]\nname = 7\nmodule = \"a.wasm\"\n",
    );
    assert_error(
        &error,
        2,
        "workloads[0].name",
        &["`name` must be a string", "an integer"],
    );

    let error = err("deploy.json", "{\"workloads\": {}}");
    assert_error(
        &error,
        1,
        "workloads",
        &["`workloads` must be", "an object"],
    );
}

#[test]
fn config_numbers_and_bools_become_strings() {
    let spec = ok(
        "deploy.toml",
        &workload("[workloads.config]\nstep = 1\nbig = 1_000\nhex = 0x10\nratio = 0.5\non = true\nlabel = \"x\"\n"),
    )
    .spec;
    let config = &spec.workloads[0].config;
    let expected = [
        ("step", "1"),
        ("big", "1000"),
        ("hex", "16"),
        ("ratio", "0.5"),
        ("on", "true"),
        ("label", "x"),
    ];
    for (key, value) in expected {
        assert_eq!(
            config.get(key).map(String::as_str),
            Some(value),
            "config.{key}"
        );
    }

    let error = err(
        "deploy.toml",
        &workload("[workloads.config]\nlist = [1, 2]\n"),
    );
    assert_error(
        &error,
        5,
        "workloads[0].config.list",
        &["config value `list`", "an array"],
    );
}

#[test]
fn json_unknown_field_is_located_in_the_right_workload() {
    // Both workloads have "modul"-like keys on different lines; the error is about the second.
    let text = r#"{
  "workloads": [
    { "name": "a", "module": "a.wasm",
      "limits": { "queue": 4 } },
    { "name": "b", "module": "b.wasm",
      "limits": { "queue": 4, "qeue": 5 } }
  ]
}"#;
    let error = err("deploy.json", text);
    assert_error(
        &error,
        6,
        "workloads[1].limits.qeue",
        &["unknown limit `qeue`", "`queue`"],
    );
}

#[test]
fn json_duplicate_name_is_located_on_the_right_line() {
    let text = r#"{
  "workloads": [
    {
      "name": "counter",
      "module": "a.wasm"
    },
    {
      "module": "b.wasm",
      "name": "counter"
    }
  ]
}"#;
    let error = err("deploy.json", text);
    assert_error(
        &error,
        9,
        "workloads[1].name",
        &["duplicate workload name", "on line 4"],
    );
}

#[test]
fn json_duplicate_key_is_rejected() {
    let text = "{\"workloads\": [\n{\"name\": \"a\",\n\"module\": \"a.wasm\",\n\"name\": \"b\"}]}";
    let error = err("deploy.json", text);
    assert_error(
        &error,
        4,
        "workloads[0].name",
        &["duplicate key `name`", "line 2"],
    );
}

#[test]
fn error_at_locates_fields_of_the_right_workload() {
    let parsed = ok("deploy.toml", EXAMPLE_TOML);
    assert_eq!(parsed.file_name(), "deploy.toml");
    let line_of = |needle: &str, nth: usize| {
        EXAMPLE_TOML
            .lines()
            .enumerate()
            .filter(|(_, line)| line.starts_with(needle))
            .nth(nth)
            .map(|(index, _)| index + 1)
    };

    let error = parsed.error_at(1, "module", "cannot read thermostat.wasm");
    assert_eq!(error.line, line_of("module = ", 1));
    assert_eq!(error.column, Some(1));
    assert_eq!(error.field.as_deref(), Some("workloads[1].module"));
    assert!(
        error
            .to_string()
            .ends_with(": workloads[1].module: cannot read thermostat.wasm")
    );

    let error = parsed.error_at(0, "limits.memory", "too big for this board");
    assert_eq!(error.line, line_of("memory = ", 0));

    // Absent field: the workload's table header.
    let error = parsed.error_at(1, "description", "x");
    assert_eq!(error.line, line_of("[[workloads]]", 1));

    let error = parsed.error_at(7, "module", "x");
    assert_eq!((error.line, error.column), (None, None));
    assert_eq!(error.to_string(), "deploy.toml: workloads[7].module: x");

    let parsed = ok("deploy.json", EXAMPLE_JSON);
    let error = parsed.error_at(1, "triggers[0].interval", "x");
    let json_line = EXAMPLE_JSON
        .lines()
        .position(|line| line.contains("\"2s\""))
        .map(|index| index + 1);
    assert_eq!(error.line, json_line);
}

#[test]
fn spec_round_trips_through_serde_json() {
    let mut spec = ok("deploy.toml", EXAMPLE_TOML).spec;
    spec.workloads[1].artifact =
        Artifact::Wasm(WasmArtifact::module(ModuleRef::Digest("0f".repeat(32))));
    spec.workloads[1].limits.time_slice = Some(Duration::from_micros(1500));
    let text = serde_json::to_string(&spec).expect("a spec serializes");
    let back: DeploymentSpec = serde_json::from_str(&text).expect("a serialized spec reads back");
    assert_eq!(back, spec);
    // Canonical: serializing again gives the same bytes.
    assert_eq!(serde_json::to_string(&back).expect("serializes"), text);

    for workload in &spec.workloads {
        let text = serde_json::to_string(workload).expect("a workload serializes");
        let back: WorkloadSpec = serde_json::from_str(&text).expect("reads back");
        assert_eq!(&back, workload);
    }
}

/// Workload specs as the agent stored them before the artifact became an enum (written by the
/// code of `bee29a6` from the files in [`stored_form_of_older_agents_is_kept_byte_for_byte`]):
/// a wasm module with triggers and limits, one with every grant and a digest, containers from
/// an image and from a rootfs, microVMs on an initramfs and on a disk, and a WASI command
/// with the `args` and `env` only the agent's API sets.
const OLD_STORED_FORMS: &[&str] = &[
    r#"{"name":"counter","module":{"path":"/srv/demo/counter.wasm"},"config":{"step":"1"},"triggers":[{"interval":"500ms"}],"limits":{"memory-bytes":16777216,"time-slice":"100ms","queue":64},"restart":"on-failure"}"#,
    r#"{"name":"thermostat","module":{"path":"/srv/demo/thermostat.wasm"},"config":{"hysteresis":"0.5","target":"21.5"},"triggers":[{"interval":"2s"}],"limits":{"memory-bytes":4194304,"time-slice":"50ms","queue":16},"restart":"always"}"#,
    r#"{"name":"door","isolation":"wasm","module":{"digest":"abababababababababababababababababababababababababababababababab"},"config":{},"triggers":[{"gpio-edge":{"input":"button","edge":"falling","debounce":"5ms"}},{"interval":"1m 30s"}],"limits":{},"restart":"never","gpio":[{"name":"led","pin":"GPIO17","mode":"output","initial":"high"},{"name":"button","pin":"GPIO27","mode":"input","initial":"low","bias":"pull-up","edge":"both","debounce":"2ms"}],"spi":[{"name":"adc","bus":"spi0.0","max-hz":1000000}],"i2c":[{"name":"env","bus":"i2c-1","addresses":[72,73]}]}"#,
    r#"{"name":"box","kind":"container","isolation":"strongest","container":{"image":{"oci":"/srv/demo/images/hello"},"command":["/bin/sh","-c"],"args":["echo hi"],"env":{"B":"2","MODE":"test"}},"config":{},"triggers":[],"limits":{"memory-bytes":33554432,"cpu-millis":500,"pids":64},"restart":"always"}"#,
    r#"{"name":"plain","kind":"container","container":{"image":{"rootfs":"/srv/demo/root"},"command":["/bin/true"]},"config":{},"triggers":[],"limits":{},"restart":"on-failure"}"#,
    r#"{"name":"vm","kind":"microvm","microvm":{"kernel":"/srv/demo/vmlinuz","root":{"initramfs":"/srv/demo/initrd.gz"},"vcpus":2,"cmdline":"quiet","ready-marker":"UP","boot-timeout":"30s"},"config":{},"triggers":[],"limits":{"memory-bytes":100663296},"restart":"on-failure"}"#,
    r#"{"name":"vm2","kind":"microvm","isolation":"microvm","microvm":{"kernel":"/srv/demo/Image","root":{"disk":"/srv/demo/root.img"},"vcpus":1},"config":{},"triggers":[],"limits":{},"restart":"on-failure"}"#,
    r#"{"name":"hello","module":{"path":"/srv/demo/counter.wasm"},"config":{"k":"v"},"triggers":[],"limits":{},"restart":"on-failure","args":["one","two words"],"env":{"A":"b","LICHEN_EXIT":"3"}}"#,
];

#[test]
fn stored_form_of_older_agents_is_kept_byte_for_byte() {
    // Each stored form reads and writes back to the same bytes (the agent compares and hashes
    // them to decide what changed).
    let read: Vec<WorkloadSpec> = OLD_STORED_FORMS
        .iter()
        .map(|json| {
            let spec: WorkloadSpec =
                serde_json::from_str(json).unwrap_or_else(|e| panic!("{json} must read: {e}"));
            assert_eq!(serde_json::to_string(&spec).unwrap(), *json);
            spec
        })
        .collect();
    // And today's parse of the same files writes the same bytes.
    let grants = "[[workloads]]\nname = \"door\"\nmodule = \"sha256:ABABABABABABABABABABABABABABABABABABABABABABABABABABABABABABABAB\"\nisolation = \"wasm\"\nrestart = \"never\"\ntriggers = [{ gpio-edge = \"button\", edge = \"falling\", debounce = \"5ms\" }, { interval = \"1m 30s\" }]\ngpio = [{ name = \"led\", pin = \"GPIO17\", mode = \"output\", initial = \"high\" }, { name = \"button\", pin = \"GPIO27\", mode = \"input\", bias = \"pull-up\", edge = \"both\", debounce = \"2ms\" }]\nspi = [{ name = \"adc\", bus = \"spi0.0\", max-hz = 1000000 }]\ni2c = [{ name = \"env\", bus = \"i2c-1\", addresses = [0x48, 0x49] }]\n";
    let container = "[[workloads]]\nname = \"box\"\nkind = \"container\"\nimage = \"images/hello\"\ncommand = [\"/bin/sh\", \"-c\"]\nargs = [\"echo hi\"]\nenv = { MODE = \"test\", B = \"2\" }\nisolation = \"strongest\"\nrestart = \"always\"\n[workloads.limits]\nmemory = \"32MiB\"\ncpus = 0.5\npids = 64\n";
    let rootfs = "[[workloads]]\nname = \"plain\"\nkind = \"container\"\nrootfs = \"root\"\ncommand = [\"/bin/true\"]\n";
    let vm = "[[workloads]]\nname = \"vm\"\nkind = \"microvm\"\nkernel = \"vmlinuz\"\ninitramfs = \"initrd.gz\"\nvcpus = 2\ncmdline = \"quiet\"\nready-marker = \"UP\"\nboot-timeout = \"30s\"\n[workloads.limits]\nmemory = \"96MiB\"\n";
    let disk = "[[workloads]]\nname = \"vm2\"\nkind = \"microvm\"\nisolation = \"microvm\"\nkernel = \"Image\"\ndisk = \"root.img\"\n";
    let mut parsed: Vec<WorkloadSpec> = [EXAMPLE_TOML, grants, container, rootfs, vm, disk]
        .into_iter()
        .flat_map(|text| ok("deploy.toml", text).spec.workloads)
        .collect();
    let mut command = ok("deploy.toml", &workload("")).spec.workloads.remove(0);
    command.name = "hello".into();
    command.config.insert("k".into(), "v".into());
    command.artifact = Artifact::Wasm(WasmArtifact {
        module: ModuleRef::Path("/srv/demo/counter.wasm".into()),
        args: vec!["one".into(), "two words".into()],
        env: [("LICHEN_EXIT", "3"), ("A", "b")]
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .into(),
    });
    parsed.push(command);
    assert_eq!(parsed, read);
    for (spec, json) in parsed.iter().zip(OLD_STORED_FORMS) {
        assert_eq!(serde_json::to_string(spec).unwrap(), *json);
    }
}

#[test]
fn a_stored_form_whose_parts_do_not_fit_its_kind_is_refused() {
    for (json, words) in [
        (
            r#"{"name":"w","module":{"path":"/w.wasm"},"container":{"image":{"rootfs":"/r"},"command":["/x"]}}"#,
            "`container` applies to container workloads only; this workload is wasm",
        ),
        (
            r#"{"name":"b","kind":"container","module":{"path":"/w.wasm"}}"#,
            "`module` applies to wasm workloads only; this workload is container",
        ),
        (
            r#"{"name":"b","kind":"container","container":{"image":{"rootfs":"/r"}},"args":["a"]}"#,
            "`args` applies to wasm workloads only",
        ),
        (
            r#"{"name":"v","kind":"microvm","microvm":{"kernel":"/k","root":{"disk":"/d"},"vcpus":1},"env":{"A":"1"}}"#,
            "`env` applies to wasm workloads only",
        ),
        (
            r#"{"name":"w"}"#,
            "missing field `module` of a wasm workload",
        ),
        (
            r#"{"name":"b","kind":"container"}"#,
            "missing field `container` of a container workload",
        ),
        (
            r#"{"name":"v","kind":"microvm"}"#,
            "missing field `microvm` of a microvm workload",
        ),
    ] {
        let error = serde_json::from_str::<WorkloadSpec>(json).expect_err(json);
        assert!(error.to_string().contains(words), "{json}: {error}");
    }
}

// ---- container workloads ----

fn container(body: &str) -> String {
    format!("[[workloads]]\nname = \"box\"\nkind = \"container\"\n{body}")
}

#[test]
fn a_container_workload_parses_with_image_command_env_and_limits() {
    let text = container(
        "image = \"images/hello\"\ncommand = [\"/bin/sh\", \"-c\"]\nargs = [\"echo hi\"]\n\
         env = { MODE = \"test\" }\nisolation = \"strongest\"\n\
         [workloads.limits]\nmemory = \"32MiB\"\ncpus = 0.5\npids = 64\n",
    );
    let spec = ok("deploy.toml", &text).spec;
    let w = &spec.workloads[0];
    assert_eq!(w.kind(), Tier::Container);
    assert_eq!(w.module(), None);
    assert_eq!(w.isolation, Some(IsolationChoice::Strongest));
    let Artifact::Container(c) = &w.artifact else {
        panic!("a container artifact: {w:?}")
    };
    assert_eq!(
        c.image,
        ImageRef::Oci(PathBuf::from("/srv/demo/images/hello"))
    );
    assert_eq!(
        c.command.as_deref(),
        Some(&["/bin/sh".to_string(), "-c".to_string()][..])
    );
    assert_eq!(c.args.as_deref(), Some(&["echo hi".to_string()][..]));
    assert_eq!(c.env["MODE"], "test");
    assert_eq!(w.limits.memory_bytes, Some(32 << 20));
    assert_eq!(w.limits.cpu_millis, Some(500));
    assert_eq!(w.limits.pids, Some(64));
    // The stored form reads back equal, and a wasm spec's stored form has no new keys.
    let json = serde_json::to_string(w).expect("serializes");
    assert_eq!(
        &serde_json::from_str::<WorkloadSpec>(&json).expect("reads back"),
        w
    );
    let wasm = serde_json::to_string(&ok("deploy.toml", &workload("")).spec.workloads[0])
        .expect("serializes");
    assert!(
        !wasm.contains("kind") && !wasm.contains("container"),
        "{wasm}"
    );
}

#[test]
fn container_mistakes_are_located() {
    // A rootfs has no entrypoint: a command is required.
    let e = err("deploy.toml", &container("rootfs = \"rootfs\"\n"));
    assert_error(
        &e,
        1,
        "workloads[0].command",
        &["plain rootfs has no entrypoint"],
    );
    // Neither image nor rootfs.
    let e = err("deploy.toml", &container("command = [\"/bin/true\"]\n"));
    assert_error(&e, 1, "workloads[0].image", &["`image`", "`rootfs`"]);
    // Both.
    let e = err(
        "deploy.toml",
        &container("image = \"a\"\nrootfs = \"b\"\ncommand = [\"/bin/true\"]\n"),
    );
    assert_error(&e, 5, "workloads[0].rootfs", &["not both", "line 4"]);
    // Wasm-only fields on a container, container-only fields on wasm.
    let e = err(
        "deploy.toml",
        &container(
            "rootfs = \"r\"\ncommand = [\"/bin/true\"]\ntriggers = [{ interval = \"1s\" }]\n",
        ),
    );
    assert_error(
        &e,
        6,
        "workloads[0].triggers",
        &["applies to wasm workloads only"],
    );
    let e = err("deploy.toml", &workload("command = [\"/bin/true\"]\n"));
    assert_error(
        &e,
        4,
        "workloads[0].command",
        &["applies to container workloads only"],
    );
    let e = err("deploy.toml", &workload("[workloads.limits]\npids = 3\n"));
    assert_error(
        &e,
        5,
        "workloads[0].limits.pids",
        &["container workloads only"],
    );
    let e = err(
        "deploy.toml",
        &container("rootfs = \"r\"\ncommand = [\"/bin/true\"]\n[workloads.limits]\nqueue = 3\n"),
    );
    assert_error(&e, 7, "workloads[0].limits.queue", &["wasm workloads only"]);
    // Empty command, bad quota, bad kind, isolation the artifact cannot run in.
    let e = err("deploy.toml", &container("rootfs = \"r\"\ncommand = []\n"));
    assert_error(&e, 5, "workloads[0].command", &["the command is empty"]);
    let e = err(
        "deploy.toml",
        &container("rootfs = \"r\"\ncommand = [\"/bin/true\"]\n[workloads.limits]\ncpus = 0.001\n"),
    );
    assert_error(&e, 7, "workloads[0].limits.cpus", &["at least 0.01 cores"]);
    let e = err(
        "deploy.toml",
        "[[workloads]]\nname = \"a\"\nkind = \"vm\"\n",
    );
    assert_error(
        &e,
        3,
        "workloads[0].kind",
        &["unknown kind \"vm\"", "\"container\""],
    );
    let e = err("deploy.toml", &workload("isolation = \"container\"\n"));
    assert_error(
        &e,
        4,
        "workloads[0].isolation",
        &["a wasm module cannot run in \"container\" isolation"],
    );
    let e = err("deploy.toml", &workload("isolation = \"vm\"\n"));
    assert_error(
        &e,
        4,
        "workloads[0].isolation",
        &["unknown isolation \"vm\""],
    );
}

#[test]
fn a_microvm_workload_parses_and_its_mistakes_are_located() {
    let text = "[[workloads]]\nname = \"vm\"\nkind = \"microvm\"\nkernel = \"vmlinuz\"\n\
                initramfs = \"initrd.gz\"\nvcpus = 2\ncmdline = \"quiet\"\n\
                boot-timeout = \"30s\"\n[workloads.limits]\nmemory = \"96MiB\"\n";
    let spec = ok("deploy.toml", text).spec;
    let w = &spec.workloads[0];
    assert_eq!(w.kind(), Tier::Microvm);
    let Artifact::Microvm(vm) = &w.artifact else {
        panic!("a microvm artifact: {w:?}")
    };
    assert_eq!(vm.kernel, PathBuf::from("/srv/demo/vmlinuz"));
    assert_eq!(
        vm.root,
        GuestRootRef::Initramfs(PathBuf::from("/srv/demo/initrd.gz"))
    );
    assert_eq!((vm.vcpus, vm.cmdline.as_str()), (2, "quiet"));
    assert_eq!(vm.boot_timeout, Some(Duration::from_secs(30)));
    let json = serde_json::to_string(w).expect("serializes");
    assert_eq!(
        &serde_json::from_str::<WorkloadSpec>(&json).expect("reads back"),
        w
    );

    let vm = |body: &str| format!("[[workloads]]\nname = \"vm\"\nkind = \"microvm\"\n{body}");
    let e = err("deploy.toml", &vm("initramfs = \"i\"\n"));
    assert_error(&e, 1, "workloads[0].kernel", &["needs a kernel"]);
    let e = err("deploy.toml", &vm("kernel = \"k\"\n"));
    assert_error(&e, 1, "workloads[0].initramfs", &["`initramfs`", "`disk`"]);
    let e = err(
        "deploy.toml",
        &vm("kernel = \"k\"\ninitramfs = \"i\"\ndisk = \"d\"\n"),
    );
    assert_error(&e, 6, "workloads[0].disk", &["not both"]);
    let e = err(
        "deploy.toml",
        &vm("kernel = \"k\"\ninitramfs = \"i\"\nvcpus = 0\n"),
    );
    assert_error(&e, 6, "workloads[0].vcpus", &["expected 1 to 64"]);
    let e = err(
        "deploy.toml",
        &vm("kernel = \"k\"\ninitramfs = \"i\"\ncommand = [\"/bin/true\"]\n"),
    );
    assert_error(
        &e,
        6,
        "workloads[0].command",
        &["applies to container workloads only", "a microVM"],
    );
    let e = err(
        "deploy.toml",
        &vm("kernel = \"k\"\ninitramfs = \"i\"\n[workloads.limits]\nmemory = \"16MiB\"\n"),
    );
    assert_error(&e, 7, "workloads[0].limits.memory", &["at least 32MiB"]);
    let e = err("deploy.toml", &workload("kernel = \"k\"\n"));
    assert_error(
        &e,
        4,
        "workloads[0].kernel",
        &["applies to microvm workloads only"],
    );
    let e = err(
        "deploy.toml",
        &vm("kernel = \"k\"\ninitramfs = \"i\"\nisolation = \"container\"\n"),
    );
    assert_error(
        &e,
        6,
        "workloads[0].isolation",
        &["a microVM kernel cannot run in \"container\""],
    );
}

#[test]
fn names_and_keys_with_newlines_or_bidi_overrides_are_escaped_in_errors() {
    for (text, shown) in [
        (
            "[[workloads]]\nname = \"evil\\u202Egnp.exe\"\nmodule = \"m.wasm\"\n",
            "\"evil\\u{202e}gnp.exe\"",
        ),
        (
            "[[workloads]]\nname = \"line\\nbreak\"\nmodule = \"m.wasm\"\n",
            "\"line\\nbreak\"",
        ),
        (
            "[[workloads]]\nname = \"w\"\nmodule = \"m.wasm\"\n\"mod\\u2066ule\\n\" = 1\n",
            "mod\\u{2066}ule\\n",
        ),
    ] {
        let shown_error = err("deploy.toml", text).to_string();
        assert!(shown_error.contains(shown), "{shown_error}");
        assert!(
            !shown_error.contains(['\n', '\u{202e}', '\u{2066}']),
            "{shown_error:?}"
        );
    }
}

#[test]
fn isolation_choice_is_written_as_the_tier_name_or_strongest() {
    for (choice, text) in [
        (IsolationChoice::Tier(Tier::Wasm), "\"wasm\""),
        (IsolationChoice::Tier(Tier::Container), "\"container\""),
        (IsolationChoice::Tier(Tier::Microvm), "\"microvm\""),
        (IsolationChoice::Strongest, "\"strongest\""),
    ] {
        assert_eq!(serde_json::to_string(&choice).unwrap(), text);
        assert_eq!(
            serde_json::from_str::<IsolationChoice>(text).unwrap(),
            choice
        );
    }
    let error = serde_json::from_str::<IsolationChoice>("\"strong\"").unwrap_err();
    assert!(
        error.to_string().contains("unknown variant `strong`"),
        "{error}"
    );
    // Tiers order weakest first, which `strongest` relies on.
    assert!(Tier::Wasm < Tier::Container && Tier::Container < Tier::Microvm);
}
