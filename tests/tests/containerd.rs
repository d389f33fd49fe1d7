//! Lichen's shim under a real containerd (Debian's 1.6, started by the test with its own root,
//! state and socket): images built offline and imported with `ctr`, pods run with
//! `ctr run --runtime io.containerd.lichen.v1` and by the shim's absolute path.
//!
//! The task server here is served by the test process with the stand-in agent
//! (`lichen_shim::testing::FakeAgent`, which runs no Wasm but writes one line naming the
//! entrypoint and ends with an `--exit=N` argument's code): these tests prove the containerd
//! side (shim start/delete, ttrpc, rootfs mounts, FIFOs, events, exit codes, the agent going
//! away). The tests at the end need the agent itself to serve the task API and are ignored
//! until it does.

use lichen_tests::containerd::{
    Containerd, FAKE_SLOT_BYTES, FakeAgentServer, ImageFile, ImageSpec, RUNTIME, hello_wasm,
    shim_bin, tools_present,
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
// With the real agent. These need `lichen run` to serve containerd's Task API on the socket
// named by LICHEN_TASK_SOCKET (lichen_shim::SOCKET_ENV), with pods as agent workloads: the
// wiring of lichen_shim::TaskService to the agent's supervisor. Ignored until it lands; run
// them with `cargo test -p lichen-tests --test containerd -- --ignored`.
// ---------------------------------------------------------------------------------------

/// The real agent serving the task API on `socket`.
fn agent_serving(socket: &std::path::Path) -> lichen_tests::Daemon {
    let export = format!("export {}='{}'", lichen_shim::SOCKET_ENV, socket.display());
    let daemon = lichen_tests::Daemon::start_with(&[], Some(&export)).unwrap();
    let start = std::time::Instant::now();
    while std::os::unix::net::UnixStream::connect(socket).is_err() {
        assert!(
            start.elapsed() < lichen_tests::containerd::DEADLINE,
            "the agent serves no task API on {}",
            socket.display()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    daemon
}

#[test]
#[ignore = "needs the agent to serve the containerd Task API (lichen_shim wiring)"]
fn real_agent_runs_a_wasm_pod_shows_it_in_ps_and_returns_its_exit_code() {
    if !tools_present() {
        return;
    }
    let dir = scratch();
    let socket = dir.path().join("task.sock");
    let daemon = agent_serving(&socket);
    let ctrd = Containerd::start(&socket, false).unwrap();
    ctrd.import(&hello_image()).unwrap();
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

    let out = ctrd
        .ctr(&["run", "--rm", "--runtime", RUNTIME, HELLO, "p1"])
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
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
    assert!(String::from_utf8_lossy(&out.stdout).contains("hello from wasi"));
    assert_eq!(out.status.code(), Some(1), "WASI 0.2 exit carries ok/err");

    ctrd.ctr_ok(&[
        "run",
        "-d",
        "--runtime",
        RUNTIME,
        HELLO,
        "p3",
        "/app/hello.wasm",
    ])
    .unwrap();
    let ps = String::from_utf8_lossy(&daemon.cli(&["ps"]).stdout).into_owned();
    assert!(
        ps.contains("p3"),
        "lichen ps shows the pod's workload: {ps}"
    );
}

#[test]
#[ignore = "needs the agent to serve the containerd Task API (lichen_shim wiring)"]
fn real_agent_refuses_corrupt_wasm_unknown_imports_and_memory_over_its_slot() {
    if !tools_present() {
        return;
    }
    let dir = scratch();
    let socket = dir.path().join("task.sock");
    let daemon = agent_serving(&socket);
    let ctrd = Containerd::start(&socket, false).unwrap();
    let unknown_import =
        wat::parse_str(r#"(module (import "nowhere" "thing" (func)) (func (export "_start")))"#)
            .unwrap();
    let images = [
        (
            "lichen.test/corrupt:1",
            b"\0asm\x01\0\0\0\x01\xff\xff".to_vec(),
            "does not compile",
        ),
        ("lichen.test/import:1", unknown_import, "nowhere"),
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
        assert!(
            !out.status.success() && stderr.contains(expected),
            "{name}: {stderr}"
        );
    }
    ctrd.import(&hello_image()).unwrap();
    let out = ctrd
        .ctr(&[
            "run",
            "--rm",
            "--runtime",
            RUNTIME,
            "--memory-limit",
            "17179869184",
            HELLO,
            "big",
        ])
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("linux.resources.memory.limit"));
    // The agent and other pods are unharmed.
    let out = ctrd
        .ctr(&["run", "--rm", "--runtime", RUNTIME, HELLO, "good"])
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert!(daemon.cli(&["ps"]).status.success());
}

#[test]
#[ignore = "needs the agent to serve the containerd Task API (lichen_shim wiring)"]
fn real_agent_restart_while_pods_run_reports_their_exits_and_leaves_nothing_running() {
    if !tools_present() {
        return;
    }
    let dir = scratch();
    let socket = dir.path().join("task.sock");
    let mut daemon = agent_serving(&socket);
    let ctrd = Containerd::start(&socket, false).unwrap();
    ctrd.import(&hello_image()).unwrap();
    ctrd.ctr_ok(&[
        "run",
        "-d",
        "--runtime",
        RUNTIME,
        HELLO,
        "r1",
        "/app/hello.wasm",
    ])
    .unwrap();
    daemon.kill9().unwrap();
    ctrd.wait_task("r1", "stopped or gone", |s| s != Some("RUNNING"))
        .unwrap();
    assert!(ctrd.mounts_left().is_empty(), "{:?}", ctrd.mounts_left());
    daemon.restart().unwrap();
    let out = ctrd
        .ctr(&["run", "--rm", "--runtime", RUNTIME, HELLO, "r2"])
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
}
