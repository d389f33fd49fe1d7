use clap::CommandFactory;

use super::*;
use lichen_agent::api::types::{
    DeployReport, LogLine, WorkloadFailure, WorkloadState, WorkloadStatus,
};

fn text(write: impl FnOnce(&mut Vec<u8>)) -> String {
    let mut out = Vec::new();
    write(&mut out);
    String::from_utf8(out).expect("output is UTF-8")
}

#[test]
fn the_command_line_is_well_formed() {
    Cli::command().debug_assert();
}

#[test]
fn verbs_parse_with_their_defaults() {
    let cli = Cli::try_parse_from(["lichen", "--json", "logs", "door", "-f"]).expect("parses");
    assert!(cli.json);
    assert!(matches!(
        cli.command,
        Command::Logs {
            follow: true,
            tail: 100,
            ..
        }
    ));
    let cli = Cli::try_parse_from(["lichen", "send", "door", "open", "--socket", "/x.sock"])
        .expect("parses");
    assert_eq!(cli.socket, PathBuf::from("/x.sock"));
    assert!(matches!(cli.command, Command::Send { ref payload, .. } if payload.is_empty()));
    let cli = Cli::try_parse_from(["lichen", "run", "--empty", "--metrics", "127.0.0.1:9464"])
        .expect("parses");
    assert!(matches!(
        cli.command,
        Command::Run(RunArgs {
            no_default: true,
            ..
        })
    ));
    assert!(Cli::try_parse_from(["lichen", "run", "--empty", "--deploy", "d.toml"]).is_err());
}

#[test]
fn default_socket_is_absolute_and_ends_in_sock() {
    let path = default_socket_path();
    assert!(path.is_absolute());
    assert_eq!(path.extension().and_then(|e| e.to_str()), Some("sock"));
}

#[test]
fn ps_prints_humanised_columns() {
    let status = WorkloadStatus {
        name: "door".into(),
        kind: "wasm".into(),
        state: WorkloadState::Running,
        module_digest: "sha256:00".into(),
        deployment_version: 3,
        restarts: 1,
        traps: 2,
        events_handled: 40,
        queue_depth: 0,
        memory_bytes: 131_072,
        uptime_ms: Some(312_000),
        last_error: Some("wasm trap:\nunreachable".into()),
        ..Default::default()
    };
    let out = text(|out| write_ps(out, &[status]));
    let mut lines = out.lines();
    let header = lines.next().expect("header");
    assert!(
        header.starts_with("NAME  KIND  STATE    RESTARTS  TRAPS  EVENTS"),
        "{header}"
    );
    assert!(
        header.ends_with("MEMORY   UPTIME  SOURCE    LAST-ERROR"),
        "{header}"
    );
    let row = lines.next().expect("row");
    assert!(row.contains("128 KiB"), "{row}");
    assert!(row.contains("5m12s"), "{row}");
    assert!(row.ends_with("wasm trap:\\nunreachable"), "{row}");
}

#[test]
fn deploy_report_names_each_outcome() {
    let report = DeployReport {
        version: 4,
        started: vec!["a".into(), "b".into()],
        failures: vec![WorkloadFailure {
            workload: "c".into(),
            message: "init trapped".into(),
        }],
        ..Default::default()
    };
    assert_eq!(
        text(|out| write_deploy(out, &report)),
        "deployment version 4 applied\n  started    a, b\n  failed     c: init trapped\n"
    );
}

#[test]
fn log_lines_read_time_level_context_message() {
    let line = LogLine {
        at_ms: 1_500,
        workload: "door".into(),
        level: "info".into(),
        context: "gpio".into(),
        message: "opened".into(),
    };
    assert_eq!(
        text(|out| write_log_line(out, &line)),
        "1970-01-01T00:00:01.500Z INFO  [gpio] opened\n"
    );
}
