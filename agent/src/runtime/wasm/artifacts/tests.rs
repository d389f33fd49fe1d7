use super::*;
use crate::runtime::wasm::{EngineOptions, host_target};

fn store(dir: &Path) -> Arc<ArtifactStore> {
    let engine = Arc::new(
        WasmEngine::new(EngineOptions {
            max_instances: 4,
            ..EngineOptions::default()
        })
        .expect("engine builds"),
    );
    Arc::new(ArtifactStore::open(dir, engine).expect("store opens"))
}

#[tokio::test]
async fn a_component_is_compiled_once_and_reloaded_from_its_cached_compilation() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = crate::embedded::COUNTER.to_vec();
    let digest = sha256_hex(&bytes);
    let first = store(dir.path());
    let artifact = first
        .add(bytes.clone())
        .await
        .expect("counter is a device function");
    assert_eq!(artifact.kind(), ArtifactKind::Component);
    let compiled = first.compiled_path(&digest);
    assert!(compiled.is_file(), "the compilation is cached on disk");
    assert!(first.contains(&digest), "the source is kept by digest");
    let stamp = fs::metadata(&compiled).unwrap().modified().unwrap();

    // A new agent on the same directory loads the cached compilation by digest.
    let second = store(dir.path());
    let loaded = second.load(&digest).await.expect("loads by digest");
    assert_eq!(loaded.digest(), digest);
    assert_eq!(
        fs::metadata(&compiled).unwrap().modified().unwrap(),
        stamp,
        "not recompiled"
    );
}

#[tokio::test]
async fn a_cached_compilation_changed_after_it_was_recorded_is_never_loaded() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = crate::embedded::COUNTER.to_vec();
    let digest = sha256_hex(&bytes);
    let first = store(dir.path());
    first.add(bytes.clone()).await.unwrap();
    let compiled = first.compiled_path(&digest);
    let mut damaged = fs::read(&compiled).unwrap();
    let middle = damaged.len() / 2;
    damaged[middle] ^= 0xff;
    fs::write(&compiled, &damaged).unwrap();
    // Written in place, same size and inode: the times differ from the record (set here so
    // the check does not depend on the file system clock's tick).
    fs::File::options()
        .write(true)
        .open(&compiled)
        .unwrap()
        .set_modified(std::time::UNIX_EPOCH + std::time::Duration::from_secs(1))
        .unwrap();

    let second = store(dir.path());
    let artifact = second
        .load(&digest)
        .await
        .expect("recompiled from the source");
    assert_eq!(artifact.kind(), ArtifactKind::Component);
    assert_eq!(
        second.counts().compiled,
        1,
        "hashed, found damaged, compiled"
    );
    assert_eq!(second.counts().precompiled_loads, 0);
    assert_ne!(
        fs::read(&compiled).unwrap(),
        damaged,
        "the damaged file was replaced"
    );
}

/// The counter compiled off the node for `target` with the default engine settings.
fn precompiled_counter(target: &str) -> (Vec<u8>, Vec<u8>) {
    let bytes = crate::embedded::COUNTER.to_vec();
    let source = crate::hub::artifacts::LocalArtifact {
        digest: sha256_hex(&bytes),
        path: "counter.wasm".into(),
        bytes: bytes.clone(),
    };
    let engines =
        crate::hub::precompile::parse_targets(&[target.to_owned()], EngineOptions::default())
            .unwrap();
    let (mut compiled, _) = crate::hub::precompile::precompile(&[source], &engines).unwrap();
    (bytes, compiled.remove(0).bytes)
}

#[tokio::test]
async fn a_component_precompiled_off_the_node_is_mapped_without_compiling() {
    let dir = tempfile::tempdir().unwrap();
    let (source, compiled) = precompiled_counter("host");
    let store = store(dir.path());
    // The hub compiled for this engine: its fingerprint is the node's.
    assert_eq!(
        crate::runtime::wasm::CodeSettings::new(&host_target(), &EngineOptions::default())
            .fingerprint(),
        store.engine().fingerprint()
    );
    let digest = store.add_source(source).await.unwrap();
    store.add_precompiled(&digest, compiled).await.unwrap();
    assert_eq!(
        store.counts(),
        CompileCounts::default(),
        "stored, nothing compiled"
    );
    let artifact = store.load(&digest).await.expect("loads");
    assert_eq!(artifact.kind(), ArtifactKind::Component);
    assert_eq!(
        store.counts(),
        CompileCounts {
            compiled: 0,
            precompiled_loads: 1
        }
    );
    // After a restart: loaded from the compiled file alone, still never compiled.
    let again = super::super::ArtifactStore::open(dir.path(), store.engine().clone()).unwrap();
    let again = Arc::new(again);
    again.load(&digest).await.expect("loads again");
    assert_eq!(again.counts().compiled, 0);
    assert_eq!(again.counts().precompiled_loads, 1);
}

#[tokio::test]
async fn a_component_precompiled_for_another_target_is_refused_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let foreign = if host_target().starts_with("aarch64") {
        "x86_64-unknown-linux-musl"
    } else {
        "aarch64-unknown-linux-musl"
    };
    let (source, compiled) = precompiled_counter(foreign);
    let store = store(dir.path());
    let digest = sha256_hex(&source);
    let err = store
        .add_precompiled(&digest, compiled)
        .await
        .expect_err("refused");
    let text = format!("{err:#}");
    assert!(
        text.contains(&format!("compiled artifact for module sha256:{digest}"))
            && text.contains("does not load into this engine"),
        "{text}"
    );
    assert!(!store.has_compiled(&digest));
    assert!(
        !store.compiled_path(&digest).exists(),
        "the refused file is removed"
    );
}

#[tokio::test]
async fn a_damaged_source_is_refused_by_digest() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = crate::embedded::COUNTER.to_vec();
    let digest = sha256_hex(&bytes);
    let first = store(dir.path());
    first.add(bytes).await.unwrap();
    // Without its compiled form the source is read (with one, it is not needed).
    fs::remove_file(first.compiled_path(&digest)).unwrap();
    fs::write(
        dir.path().join(format!("{digest}.wasm")),
        b"\0asm\x0d\0\x01\0junk",
    )
    .unwrap();
    let err = store(dir.path())
        .load(&digest)
        .await
        .err()
        .expect("refused");
    assert!(format!("{err:#}").contains("corrupt"), "{err:#}");
}

#[tokio::test]
async fn a_wasi_cli_component_is_a_command_that_prints_and_exits_with_its_code() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = fs::read(lichen_test_programs::HELLO_WASI_CLI).unwrap();
    let store = store(dir.path());
    let artifact = store
        .add(bytes)
        .await
        .expect("a wasi:cli/run component loads");
    assert_eq!(artifact.kind(), ArtifactKind::Command);
    let program = artifact.command().expect("a command program").clone();
    assert_eq!(program.kind_name(), "wasi-cli");

    let log = crate::logs::LogHub::new(crate::logs::LogOptions::default());
    let mut config = std::collections::BTreeMap::new();
    config.insert("greeting".to_string(), "hi".to_string());
    let run = |config: std::collections::BTreeMap<String, String>| {
        let program = program.clone();
        let engine = store.engine().engine().clone();
        let log = &log;
        async move {
            super::super::command::run_command(
                &engine,
                program,
                "hello",
                super::super::command::CommandInput {
                    config: &config,
                    args: &[],
                    env: &std::collections::BTreeMap::new(),
                },
                log,
                16 << 20,
                std::time::Duration::from_secs(10),
            )
            .await
        }
    };
    assert_eq!(run(config.clone()).await, Ok(0));
    let lines: Vec<String> = log
        .recent("hello", 64)
        .into_iter()
        .map(|l| l.message)
        .collect();
    assert!(lines.iter().any(|l| l == "hello from wasi"), "{lines:?}");
    assert!(lines.iter().any(|l| l == "LICHEN_GREETING=hi"), "{lines:?}");
    // WASI 0.2's `wasi:cli/exit` carries ok or err only: `exit(3)` reaches the host as 1.
    config.insert("exit".to_string(), "3".to_string());
    assert_eq!(
        run(config).await,
        Ok(1),
        "a failing exit comes through wasi:cli/exit"
    );
}

#[tokio::test]
async fn a_component_that_is_neither_kind_is_refused_naming_both() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = wat::parse_str("(component)").unwrap();
    let err = store(dir.path()).add(bytes).await.err().expect("refused");
    let text = format!("{err:#}");
    assert!(
        text.contains("neither a device function") && text.contains("wasi:cli/run"),
        "{text}"
    );
    assert!(
        fs::read_dir(dir.path()).unwrap().next().is_none(),
        "nothing stored"
    );
}
