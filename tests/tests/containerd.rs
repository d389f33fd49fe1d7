//! Lichen's shim under a real containerd (Debian's 1.6, started by the test with its own root,
//! state and socket): images built offline and imported with `ctr`, pods run with
//! `ctr run --runtime io.containerd.lichen.v1` and by the shim's absolute path.
//!
//! The first tests serve the task API from the test process with the stand-in agent
//! (`lichen_shim::testing::FakeAgent`, which runs no Wasm but writes one line naming the
//! entrypoint and ends with an `--exit=N` argument's code): they prove the containerd side
//! (shim start/delete, ttrpc, rootfs mounts, FIFOs, events, exit codes, the agent going away).
//! The tests at the end run pods on the real agent (`lichen run`).

use lichen_agent::api::types::WorkloadState;
use lichen_tests::containerd::{
    Containerd, FAKE_SLOT_BYTES, FakeAgentServer, ImageFile, ImageSpec, RUNTIME, exit_wasm,
    hello_wasm, shim_bin, sleeper_wasm, tools_present,
};

const HELLO: &str = "lichen.test/hello:1";

fn hello_image() -> ImageSpec {
    ImageSpec {
        name: HELLO.into(),
        files: vec![ImageFile::new("app/hello.wasm", hello_wasm())],
        entrypoint: vec!["/app/hello.wasm".into()],
        cmd: vec![],
    }
}

/// containerd + the stand-in agent's task server on a socket in `scratch`.
fn setup(scratch: &tempfile::TempDir) -> (FakeAgentServer, Containerd) {
    let socket = scratch.path().join("task.sock");
    let server = FakeAgentServer::start(&socket).unwrap();
    let containerd = Containerd::start(&socket, false).unwrap();
    containerd.import(&hello_image()).unwrap();
    (server, containerd)
}

fn scratch() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("lts")
        .tempdir_in("/tmp")
        .unwrap()
}

#[test]
fn ctr_run_prints_the_pods_output_and_returns_its_exit_code() {
    if !tools_present() {
        return;
    }
    let dir = scratch();
    let (server, ctrd) = setup(&dir);
    let out = ctrd
        .ctr(&[
            "run",
            "--rm",
            "--runtime",
            RUNTIME,
            HELLO,
            "hello1",
            "/app/hello.wasm",
            "--exit=3",
        ])
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(3),
        "stdout {stdout}\nstderr {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        ctrd.log_tail()
    );
    assert!(
        stdout.contains("fake agent ran /app/hello.wasm with args [\"--exit=3\"]"),
        "{stdout}"
    );
    assert_eq!(
        ctrd.task_status("hello1").unwrap(),
        None,
        "--rm deleted the task"
    );
    assert!(
        server.agent.ids().is_empty(),
        "the agent forgot the workload"
    );
    assert!(
        ctrd.mounts_left().is_empty(),
        "rootfs unmounted: {:?}",
        ctrd.mounts_left()
    );

    // The runtime named by the shim binary's absolute path works the same.
    let shim = shim_bin();
    let out = ctrd
        .ctr(&[
            "run",
            "--rm",
            "--runtime",
            shim.to_str().unwrap(),
            HELLO,
            "hello2",
            "/app/hello.wasm",
            "--exit=0",
        ])
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        ctrd.log_tail()
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("ran /app/hello.wasm"));
}

#[test]
fn a_long_running_pod_is_listed_killed_and_deleted() {
    if !tools_present() {
        return;
    }
    let dir = scratch();
    let (server, ctrd) = setup(&dir);
    ctrd.ctr_ok(&["run", "-d", "--runtime", RUNTIME, HELLO, "long"])
        .unwrap();
    ctrd.wait_task("long", "RUNNING", |s| s == Some("RUNNING"))
        .unwrap();
    assert_eq!(server.agent.ids(), ["long"]);
    assert_eq!(
        ctrd.mounts_left().len(),
        1,
        "the rootfs is mounted while the task lives"
    );

    ctrd.ctr_ok(&["task", "kill", "-s", "SIGTERM", "long"])
        .unwrap();
    ctrd.wait_task("long", "STOPPED", |s| s == Some("STOPPED"))
        .unwrap();
    ctrd.ctr_ok(&["task", "delete", "long"]).unwrap();
    assert_eq!(ctrd.task_status("long").unwrap(), None);
    ctrd.ctr_ok(&["containers", "delete", "long"]).unwrap();
    assert!(server.agent.ids().is_empty());
    assert!(ctrd.mounts_left().is_empty(), "{:?}", ctrd.mounts_left());
}

#[test]
fn bad_images_are_refused_through_containerd_naming_the_cause() {
    if !tools_present() {
        return;
    }
    let dir = scratch();
    let (server, ctrd) = setup(&dir);
    ctrd.import(&ImageSpec {
        name: "lichen.test/noentry:1".into(),
        files: vec![ImageFile::new("app/hello.wasm", hello_wasm())],
        entrypoint: vec![],
        cmd: vec![],
    })
    .unwrap();
    ctrd.import(&ImageSpec {
        name: "lichen.test/shell:1".into(),
        files: vec![ImageFile::new("bin/sh", b"\x7fELF not really".to_vec())],
        entrypoint: vec!["/bin/sh".into()],
        cmd: vec![],
    })
    .unwrap();
    let over_slot = (FAKE_SLOT_BYTES * 2).to_string();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["lichen.test/noentry:1", "bad1"], "process.args"),
        (
            vec!["lichen.test/shell:1", "bad2"],
            "\"/bin/sh\" is not a WebAssembly binary",
        ),
        (
            vec![HELLO, "bad3", "/app/missing.wasm"],
            "\"/app/missing.wasm\" not found",
        ),
        (
            vec!["--memory-limit", &over_slot, HELLO, "bad4"],
            "linux.resources.memory.limit",
        ),
    ];
    for (args, expected) in cases {
        let mut full = vec!["run", "--rm", "--runtime", RUNTIME];
        full.extend(args.iter().copied());
        let out = ctrd.ctr(&full).unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} was accepted");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
        assert!(
            server.agent.ids().is_empty(),
            "{args:?}: the agent holds nothing"
        );
    }
    assert!(
        ctrd.mounts_left().is_empty(),
        "a refused create unmounts: {:?}",
        ctrd.mounts_left()
    );
    // containerd, the agent and other pods are unharmed.
    let out = ctrd
        .ctr(&[
            "run",
            "--rm",
            "--runtime",
            RUNTIME,
            HELLO,
            "good",
            "/app/hello.wasm",
            "--exit=0",
        ])
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn containerd_sees_running_pods_exit_when_the_agent_goes_away() {
    if !tools_present() {
        return;
    }
    let dir = scratch();
    let (server, ctrd) = setup(&dir);
    let socket = server.socket().to_path_buf();
    ctrd.ctr_ok(&["run", "-d", "--runtime", RUNTIME, HELLO, "p1"])
        .unwrap();
    ctrd.ctr_ok(&["run", "-d", "--runtime", RUNTIME, HELLO, "p2"])
        .unwrap();
    ctrd.wait_task("p1", "RUNNING", |s| s == Some("RUNNING"))
        .unwrap();
    ctrd.wait_task("p2", "RUNNING", |s| s == Some("RUNNING"))
        .unwrap();

    // The agent exits: its Wasm ran in its own process, so nothing of the pods is left; the
    // closed connection makes containerd run the shim's `delete` and report the exits.
    server.stop();
    for id in ["p1", "p2"] {
        ctrd.wait_task(id, "stopped or gone", |s| s != Some("RUNNING"))
            .unwrap();
    }
    assert!(
        ctrd.mounts_left().is_empty(),
        "shim delete unmounted: {:?}",
        ctrd.mounts_left()
    );

    // The agent is back: new pods run.
    let server = FakeAgentServer::start(&socket).unwrap();
    let out = ctrd
        .ctr(&[
            "run",
            "--rm",
            "--runtime",
            RUNTIME,
            HELLO,
            "p3",
            "/app/hello.wasm",
            "--exit=0",
        ])
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        ctrd.log_tail()
    );
    drop(server);
}

#[test]
fn shim_start_without_an_agent_fails_with_a_clear_error() {
    if !tools_present() {
        return;
    }
    let dir = scratch();
    let socket = dir.path().join("nobody.sock");
    let ctrd = Containerd::start(&socket, false).unwrap();
    ctrd.import(&hello_image()).unwrap();
    let out = ctrd
        .ctr(&["run", "--rm", "--runtime", RUNTIME, HELLO, "orphan"])
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("task server does not answer"), "{stderr}");
}

// ---------------------------------------------------------------------------------------
// With the real agent: `lichen run` serves containerd's Task API on the socket named by
// LICHEN_TASK_SOCKET (lichen_shim::SOCKET_ENV), pods run as its workloads.
// ---------------------------------------------------------------------------------------

const SLEEPER: &str = "lichen.test/sleeper:1";

fn sleeper_image() -> ImageSpec {
    ImageSpec {
        name: SLEEPER.into(),
        files: vec![ImageFile::new("sleeper.wasm", sleeper_wasm())],
        entrypoint: vec!["/sleeper.wasm".into()],
        cmd: vec![],
    }
}

/// The real agent serving the task API on `socket`.
fn agent_serving(socket: &std::path::Path) -> lichen_tests::Daemon {
    let export = format!("export {}='{}'", lichen_shim::SOCKET_ENV, socket.display());
    let daemon = lichen_tests::Daemon::start_with(&[], Some(&export)).unwrap();
    wait_serving(&daemon, socket);
    daemon
}

fn wait_serving(daemon: &lichen_tests::Daemon, socket: &std::path::Path) {
    let start = std::time::Instant::now();
    while std::os::unix::net::UnixStream::connect(socket).is_err() {
        assert!(
            start.elapsed() < lichen_tests::containerd::DEADLINE,
            "the agent serves no task API on {}\n{}",
            socket.display(),
            daemon.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Waits until `lichen ps` shows `name` in a state `check` accepts; returns the row.
fn wait_ps(
    daemon: &lichen_tests::Daemon,
    name: &str,
    what: &str,
    check: impl Fn(&lichen_agent::api::types::WorkloadStatus) -> bool,
) -> lichen_agent::api::types::WorkloadStatus {
    daemon.wait_for(name, what, check)
}

#[test]
fn real_agent_runs_a_wasm_pod_shows_it_in_ps_and_returns_its_exit_code() {
    if !tools_present() {
        return;
    }
    let dir = scratch();
    let socket = dir.path().join("task.sock");
    let daemon = agent_serving(&socket);
    let ctrd = Containerd::start(&socket, false).unwrap();
    ctrd.import(&hello_image()).unwrap();
    ctrd.import(&sleeper_image()).unwrap();
    ctrd.import(&ImageSpec {
        name: "lichen.test/exit3:1".into(),
        files: vec![ImageFile::new("exit3.wasm", exit_wasm(3))],
        entrypoint: vec!["/exit3.wasm".into()],
        cmd: vec![],
    })
    .unwrap();
    ctrd.import(&ImageSpec {
        name: "lichen.test/hello-cli:1".into(),
        files: vec![ImageFile::new(
            "hello.wasm",
            std::fs::read(lichen_tests::guest("hello-wasi-cli")).unwrap(),
        )],
        entrypoint: vec!["/hello.wasm".into()],
        cmd: vec![],
    })
    .unwrap();

    // Pod start to its first output, through `ctr run` (a figure, not a threshold).
    let started = std::time::Instant::now();
    let out = ctrd
        .ctr(&["run", "--rm", "--runtime", RUNTIME, HELLO, "p1"])
        .unwrap();
    eprintln!(
        "figure: `ctr run --rm` of a Wasm pod on the lichen runtime, start to exit: {:?}",
        started.elapsed()
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        daemon.log()
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("hello from a wasm pod"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // Again, the module's compilation now cached (a figure).
    let started = std::time::Instant::now();
    let out = ctrd
        .ctr(&["run", "--rm", "--runtime", RUNTIME, HELLO, "p1w"])
        .unwrap();
    eprintln!(
        "figure: the same Wasm pod again (compiled module cached), start to exit: {:?}",
        started.elapsed()
    );
    assert_eq!(out.status.code(), Some(0));
    // The same through runc's shim with a static busybox, side by side (a figure).
    if let Ok(busybox) = std::fs::read("/bin/busybox") {
        ctrd.import(&ImageSpec {
            name: "lichen.test/busybox:1".into(),
            files: vec![ImageFile::new("bin/busybox", busybox)],
            entrypoint: vec!["/bin/busybox".into()],
            cmd: vec!["echo".into(), "hello from runc".into()],
        })
        .unwrap();
        let started = std::time::Instant::now();
        let out = ctrd
            .ctr(&[
                "run",
                "--rm",
                "--runtime",
                "io.containerd.runc.v2",
                "lichen.test/busybox:1",
                "runc1",
            ])
            .unwrap();
        eprintln!(
            "figure: `ctr run --rm` of busybox echo on containerd-shim-runc-v2, start to exit: {:?} (exit {:?})",
            started.elapsed(),
            out.status.code()
        );
    }
    let out = ctrd
        .ctr(&[
            "run",
            "--rm",
            "--runtime",
            RUNTIME,
            "lichen.test/exit3:1",
            "p1b",
        ])
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "the program's exit code");
    assert!(String::from_utf8_lossy(&out.stdout).contains("hello from a wasm pod"));
    let out = ctrd
        .ctr(&[
            "run",
            "--rm",
            "--runtime",
            RUNTIME,
            "--env",
            "LICHEN_EXIT=3",
            "lichen.test/hello-cli:1",
            "p2",
        ])
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("hello from wasi"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(out.status.code(), Some(1), "WASI 0.2 exit carries ok/err");
    assert!(
        daemon.status("p1").is_none(),
        "--rm removed the pod from the agent"
    );

    // A long-running pod: running in ps, its output in `lichen logs` while it runs, killed by
    // containerd with the exit status of a process killed by the signal.
    ctrd.ctr_ok(&["run", "-d", "--runtime", RUNTIME, SLEEPER, "p3"])
        .unwrap();
    let row = wait_ps(&daemon, "p3", "running", |w| {
        w.state == WorkloadState::Running
    });
    assert_eq!(row.kind, "wasi-command");
    assert_eq!(row.source, "pods", "{row:?}");
    assert_eq!(row.labels["containerd-namespace"], "lichen-test", "{row:?}");
    assert_eq!(row.labels["container"], "p3", "{row:?}");
    let deadline = std::time::Instant::now() + lichen_tests::containerd::DEADLINE;
    loop {
        let logs = String::from_utf8_lossy(&daemon.cli(&["logs", "p3"]).stdout).into_owned();
        if logs.contains("sleeping") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no streamed output: {logs}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    ctrd.wait_task("p3", "RUNNING", |s| s == Some("RUNNING"))
        .unwrap();
    ctrd.ctr_ok(&["task", "kill", "-s", "SIGTERM", "p3"])
        .unwrap();
    ctrd.wait_task("p3", "STOPPED", |s| s == Some("STOPPED"))
        .unwrap();
    let tasks = ctrd.ctr_ok(&["task", "ls"]).unwrap();
    assert!(
        tasks
            .lines()
            .any(|l| l.starts_with("p3") && l.contains("STOPPED")),
        "{tasks}"
    );
    wait_ps(&daemon, "p3", "stopped", |w| {
        w.state == WorkloadState::Stopped
    });
    let out = ctrd.ctr(&["task", "delete", "p3"]).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(daemon.status("p3").is_none(), "task delete removed the pod");
    ctrd.ctr_ok(&["containers", "delete", "p3"]).unwrap();
    assert!(ctrd.mounts_left().is_empty(), "{:?}", ctrd.mounts_left());
}

#[test]
fn real_agent_refuses_bad_pods_naming_the_cause_and_stays_unharmed() {
    if !tools_present() {
        return;
    }
    let dir = scratch();
    let socket = dir.path().join("task.sock");
    let daemon = agent_serving(&socket);
    let ctrd = Containerd::start(&socket, false).unwrap();
    ctrd.import(&hello_image()).unwrap();
    ctrd.import(&sleeper_image()).unwrap();
    // Another pod runs through all of it.
    ctrd.ctr_ok(&["run", "-d", "--runtime", RUNTIME, SLEEPER, "bystander"])
        .unwrap();
    wait_ps(&daemon, "bystander", "running", |w| {
        w.state == WorkloadState::Running
    });

    let unknown_import =
        wat::parse_str(r#"(module (import "nowhere" "thing" (func)) (func (export "_start")))"#)
            .unwrap();
    let images = [
        (
            "lichen.test/corrupt:1",
            b"\0asm\x01\0\0\0\x01\xff\xff".to_vec(),
            vec!["entrypoint \"/app.wasm\"", "does not compile"],
        ),
        (
            "lichen.test/import:1",
            unknown_import,
            vec!["entrypoint \"/app.wasm\"", "nowhere"],
        ),
    ];
    for (name, wasm, expected) in images {
        ctrd.import(&ImageSpec {
            name: name.into(),
            files: vec![ImageFile::new("app.wasm", wasm)],
            entrypoint: vec!["/app.wasm".into()],
            cmd: vec![],
        })
        .unwrap();
        let out = ctrd
            .ctr(&["run", "--rm", "--runtime", RUNTIME, name, "bad"])
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{name} was accepted");
        for e in expected {
            assert!(stderr.contains(e), "{name}: {stderr}");
        }
        let _ = ctrd.ctr(&["containers", "delete", "bad"]);
    }
    ctrd.import(&ImageSpec {
        name: "lichen.test/noentry:1".into(),
        files: vec![ImageFile::new("app/hello.wasm", hello_wasm())],
        entrypoint: vec![],
        cmd: vec![],
    })
    .unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["lichen.test/noentry:1", "bad1"], "process.args"),
        (
            vec![HELLO, "bad2", "/app/missing.wasm"],
            "\"/app/missing.wasm\" not found",
        ),
        (
            vec!["--memory-limit", "17179869184", HELLO, "bad3"],
            "linux.resources.memory.limit",
        ),
    ];
    for (args, expected) in cases {
        let mut full = vec!["run", "--rm", "--runtime", RUNTIME];
        full.extend(args.iter().copied());
        let out = ctrd.ctr(&full).unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} was accepted");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
    // Nothing of the refused pods is held; the agent, containerd and the other pod are unharmed.
    let names: Vec<String> = daemon.ps().into_iter().map(|w| w.name).collect();
    assert_eq!(names, ["bystander"], "only the running pod is held");
    assert_eq!(
        ctrd.task_status("bystander").unwrap().as_deref(),
        Some("RUNNING"),
        "{:?}",
        daemon.status("bystander"),
    );
    let out = ctrd
        .ctr(&["run", "--rm", "--runtime", RUNTIME, HELLO, "good"])
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    ctrd.ctr_ok(&["task", "kill", "-s", "SIGKILL", "bystander"])
        .unwrap();
    ctrd.wait_task("bystander", "STOPPED", |s| s == Some("STOPPED"))
        .unwrap();
}

const COUNTER: &str = "lichen.test/counter:1";

fn component_image(name: &str, guest: &str) -> ImageSpec {
    ImageSpec {
        name: name.into(),
        files: vec![ImageFile::new(
            "fn.wasm",
            std::fs::read(lichen_tests::guest(guest)).unwrap(),
        )],
        entrypoint: vec!["/fn.wasm".into()],
        cmd: vec![],
    }
}

#[test]
fn real_agent_runs_a_lichen_component_pod_with_no_grants_and_refuses_device_imports() {
    if !tools_present() {
        return;
    }
    let dir = scratch();
    let socket = dir.path().join("task.sock");
    let daemon = agent_serving(&socket);
    let ctrd = Containerd::start(&socket, false).unwrap();
    ctrd.import(&component_image(COUNTER, "counter")).unwrap();
    ctrd.import(&component_image("lichen.test/blinky:1", "blinky"))
        .unwrap();

    // The counter device function as a pod: ticked by LICHEN_INTERVAL, configured by its
    // environment, run by the supervisor as a `pods` workload.
    ctrd.ctr_ok(&[
        "run",
        "-d",
        "--runtime",
        RUNTIME,
        "--env",
        "LICHEN_INTERVAL=20ms",
        "--env",
        "step=2",
        COUNTER,
        "c1",
    ])
    .unwrap();
    let row = wait_ps(&daemon, "c1", "3 ticks handled", |w| {
        w.state == WorkloadState::Running && w.events_handled >= 3
    });
    assert_eq!(row.kind, "wasm", "{row:?}");
    assert_eq!(row.source, "pods", "{row:?}");
    assert_eq!(row.labels["container"], "c1", "{row:?}");
    assert_eq!(row.labels["containerd-namespace"], "lichen-test", "{row:?}");
    assert_eq!(
        daemon.ps().iter().filter(|w| w.name == "c1").count(),
        1,
        "one ps row for the pod"
    );
    let logs = String::from_utf8_lossy(&daemon.cli(&["logs", "c1"]).stdout).into_owned();
    assert!(
        logs.contains("counting by 2"),
        "config from the pod's env: {logs}"
    );
    let count: u64 = daemon
        .kv("c1", "count")
        .expect("the pod's key-value state")
        .parse()
        .unwrap();
    assert!(count >= 6 && count.is_multiple_of(2), "{count}");
    // Its telemetry is in the outbox under the pod's workload name.
    let db = rusqlite::Connection::open_with_flags(
        daemon.state_dir().join("lichen.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    let records: i64 = db
        .query_row(
            "SELECT COUNT(*) FROM outbox WHERE workload = 'c1' AND stream = 'count'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(records >= 3, "{records} telemetry records");
    drop(db);

    // containerd's kill stops it; delete removes it from the agent.
    ctrd.wait_task("c1", "RUNNING", |s| s == Some("RUNNING"))
        .unwrap();
    ctrd.ctr_ok(&["task", "kill", "-s", "SIGTERM", "c1"])
        .unwrap();
    ctrd.wait_task("c1", "STOPPED", |s| s == Some("STOPPED"))
        .unwrap();
    wait_ps(&daemon, "c1", "stopped", |w| {
        w.state == WorkloadState::Stopped
    });
    ctrd.ctr_ok(&["task", "delete", "c1"]).unwrap();
    assert!(daemon.status("c1").is_none(), "task delete removed the pod");
    ctrd.ctr_ok(&["containers", "delete", "c1"]).unwrap();

    // A failing init ends the task, with the reason on the pod's stderr and a trap's status.
    let out = ctrd
        .ctr(&[
            "run",
            "--rm",
            "--runtime",
            RUNTIME,
            "--env",
            "step=0",
            COUNTER,
            "c2",
        ])
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(134), "{stderr}\n{}", daemon.log());
    assert!(stderr.contains("positive integer"), "{stderr}");

    // A component importing a device interface is refused at create, naming the import and
    // the missing grant; nothing is held.
    let out = ctrd
        .ctr(&[
            "run",
            "--rm",
            "--runtime",
            RUNTIME,
            "lichen.test/blinky:1",
            "b1",
        ])
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a pod took device access: {stderr}");
    assert!(stderr.contains("lichen:device/gpio"), "{stderr}");
    assert!(stderr.contains("no device grants"), "{stderr}");
    let _ = ctrd.ctr(&["containers", "delete", "b1"]);
    let bad = ctrd
        .ctr(&[
            "run",
            "--rm",
            "--runtime",
            RUNTIME,
            "--env",
            "LICHEN_INTERVAL=soon",
            COUNTER,
            "c3",
        ])
        .unwrap();
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("process.env LICHEN_INTERVAL"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
    let _ = ctrd.ctr(&["containers", "delete", "c3"]);
    assert!(daemon.ps().is_empty(), "{:?}", daemon.ps());
}

#[test]
fn real_agent_restart_while_pods_run_reports_their_exits_and_leaves_nothing_running() {
    if !tools_present() {
        return;
    }
    let dir = scratch();
    let socket = dir.path().join("task.sock");
    let mut daemon = agent_serving(&socket);
    let ctrd = Containerd::start(&socket, false).unwrap();
    ctrd.import(&hello_image()).unwrap();
    ctrd.import(&sleeper_image()).unwrap();
    ctrd.import(&component_image(COUNTER, "counter")).unwrap();
    // A figure, not a threshold: the agent's resident memory per extra running pod.
    let rss_kib = |pid: u32| -> u64 {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    };
    let pid = daemon.pid();
    // One pod first, so the engine's first-use costs are not counted per pod.
    ctrd.ctr_ok(&["run", "-d", "--runtime", RUNTIME, SLEEPER, "r0"])
        .unwrap();
    wait_ps(&daemon, "r0", "running", |w| {
        w.state == WorkloadState::Running
    });
    let before = rss_kib(pid);
    let ids = ["r1", "r2", "r3", "r4", "r5", "r6", "r7", "r8"];
    for id in ids {
        ctrd.ctr_ok(&["run", "-d", "--runtime", RUNTIME, SLEEPER, id])
            .unwrap();
        wait_ps(&daemon, id, "running", |w| {
            w.state == WorkloadState::Running
        });
        ctrd.wait_task(id, "RUNNING", |s| s == Some("RUNNING"))
            .unwrap();
    }
    let after = rss_kib(pid);
    // A pod of Lichen's world too: run by the supervisor, it must not come back either.
    ctrd.ctr_ok(&["run", "-d", "--runtime", RUNTIME, COUNTER, "rc"])
        .unwrap();
    wait_ps(&daemon, "rc", "running", |w| {
        w.state == WorkloadState::Running
    });
    eprintln!(
        "figure: agent RSS {before} KiB with 1 pod, {after} KiB with {}: {} KiB per extra pod",
        ids.len() + 1,
        after.saturating_sub(before) / ids.len() as u64
    );

    // The agent dies (SIGKILL: no chance to say goodbye). Its pods ran in its process: the
    // process is gone, containerd sees the task connection close and reports the exits.
    daemon.kill9().unwrap();
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "the agent process is gone, and with it every pod's Wasm"
    );
    for id in ["r0", "rc"].iter().chain(&ids) {
        ctrd.wait_task(id, "stopped or gone", |s| s != Some("RUNNING"))
            .unwrap();
    }
    assert!(ctrd.mounts_left().is_empty(), "{:?}", ctrd.mounts_left());

    // Back: it holds no half-run pod and new pods run.
    daemon.restart().unwrap();
    wait_serving(&daemon, &socket);
    assert!(
        daemon.ps().is_empty(),
        "a restarted agent holds no pod: {:?}",
        daemon.ps()
    );
    let out = ctrd
        .ctr(&["run", "--rm", "--runtime", RUNTIME, HELLO, "again"])
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        ctrd.log_tail()
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("hello from a wasm pod"));
    for id in ["r0", "rc"].iter().chain(&ids) {
        let _ = ctrd.ctr(&["task", "delete", id]);
        ctrd.ctr_ok(&["containers", "delete", id]).unwrap();
    }
}
