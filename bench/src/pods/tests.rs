use lichen_shim::layout::digest;

use super::image::image_tar;
use super::*;

#[test]
fn the_hand_encoded_modules_are_the_wat_they_document() {
    let hello = wat::parse_str(
            r#"(module
                (import "wasi_snapshot_preview1" "fd_write" (func (param i32 i32 i32 i32) (result i32)))
                (memory (export "memory") 1)
                (data (i32.const 16) "lichen pod ready\n")
                (func (export "_start")
                  (i32.store (i32.const 0) (i32.const 16))
                  (i32.store (i32.const 4) (i32.const 17))
                  (drop (call 0 (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))"#,
        )
        .unwrap();
    let sleeper = wat::parse_str(
            r#"(module
                (import "wasi_snapshot_preview1" "fd_write" (func (param i32 i32 i32 i32) (result i32)))
                (import "wasi_snapshot_preview1" "poll_oneoff" (func (param i32 i32 i32 i32) (result i32)))
                (memory (export "memory") 1)
                (data (i32.const 200) "lichen pod sleeping\n")
                (func (export "_start")
                  (i32.store (i32.const 100) (i32.const 200))
                  (i32.store (i32.const 104) (i32.const 20))
                  (drop (call 0 (i32.const 1) (i32.const 100) (i32.const 1) (i32.const 108)))
                  (i32.store8 (i32.const 8) (i32.const 0))
                  (i32.store (i32.const 16) (i32.const 1))
                  (i64.store (i32.const 24) (i64.const 1000000000))
                  (loop
                    (drop (call 1 (i32.const 0) (i32.const 304) (i32.const 1) (i32.const 400)))
                    (br 0))))"#,
        )
        .unwrap();
    assert_eq!(HELLO_WASM, hello.as_slice());
    assert_eq!(SLEEPER_WASM, sleeper.as_slice());
}

#[test]
fn a_parent_pid_is_read_after_the_command_name() {
    assert_eq!(
        parent_of(std::process::id()),
        Some(std::os::unix::process::parent_id())
    );
}

#[test]
fn task_path_parts_are_read_back_for_the_rounds_only() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("agent.log");
    std::fs::write(
            &log,
            "2026 INFO lichen_agent::pods: pod program ready task=lichen-0 artifact_us=900 cached=true\n\
             2026 INFO lichen_shim::service::rpc: pod task path timed task=lichen-0 bundle_us=100 mount_us=200 entrypoint_us=300 fifo_us=40 create_us=1000 start_us=500\n\
             2026 INFO lichen_shim::service::rpc: pod task path timed task=warm-lichen bundle_us=9999 mount_us=1 entrypoint_us=1 fifo_us=1 create_us=1 start_us=1\n",
        )
        .unwrap();
    let parts = task_path_parts(&log, "lichen-").unwrap();
    let got: Vec<(&str, Duration)> = parts
        .iter()
        .map(|(name, s)| (*name, s.percentile(50.0)))
        .collect();
    assert_eq!(got.len(), 7, "{got:?}");
    assert_eq!(got[0], ("bundle read", Duration::from_micros(100)));
    assert_eq!(
        got[5],
        (
            "of which program from the compile cache",
            Duration::from_micros(900)
        )
    );
    assert_eq!(got[6], ("Start", Duration::from_micros(500)));
}

#[test]
fn image_tars_name_every_blob_by_its_digest() {
    let tar = image_tar("x/y:1", "bin/a", b"abc", &["/bin/a"]).unwrap();
    let mut archive = tar::Archive::new(tar.as_slice());
    let mut seen = 0;
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        let path = entry.path().unwrap().display().to_string();
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut entry, &mut bytes).unwrap();
        if let Some(hex) = path.strip_prefix("blobs/sha256/") {
            assert_eq!(digest(&bytes), format!("sha256:{hex}"));
            seen += 1;
        }
    }
    assert_eq!(seen, 3);
}
