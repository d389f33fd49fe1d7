//! Board images (`images/build`) under real QEMU with TCG (KVM here is KVM-PVM, where stock
//! kernels hang): an x86_64 board (UEFI, GRUB) that updates, rolls back and survives power
//! cuts; an arm64 board (U-Boot) that boots and falls back; and the build's reproducibility.
//!
//! Each test builds what it needs through the cache of `images/build` (keyed by every input,
//! with the agent-independent base cached apart, so a changed agent only rebuilds the root
//! slot and the disk), with a signing key kept in that cache, so a second run rebuilds nothing.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use lichen_tests::board::{Board, BoardDisk, build_image};
use lichen_tests::{lichen, output_text};

/// The cache images/build uses; the tests keep their signing keys there too.
fn cache_root() -> PathBuf {
    std::env::var_os("LICHEN_IMAGE_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/tmp/lichen-target/image"))
}

/// A publisher key pair made once and kept (so images built with its public key are cached).
/// The image tests run in parallel threads of one process and share the key: one makes it
/// while the others wait (two keygens on one path would fail on the file the other made).
fn keypair(name: &str) -> Result<PathBuf> {
    static MAKING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one_at_a_time = MAKING
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let dir = cache_root().join("test-keys");
    std::fs::create_dir_all(&dir)?;
    let key = dir.join(format!("{name}.pem"));
    if !key.with_extension("pem.pub").exists() {
        let _ = std::fs::remove_file(&key);
        let out = lichen(&["hub", "keygen", key.to_str().expect("utf-8 path")]);
        ensure!(out.status.success(), "keygen: {}", output_text(&out));
    }
    Ok(key)
}

fn public(key: &Path) -> String {
    key.with_extension("pem.pub").display().to_string()
}

/// `lichen hub update-bundle`.
fn bundle(rootfs_dir: &Path, version: &str, target: &str, key: &Path, out: &Path) -> Result<()> {
    let out_text = lichen(&[
        "hub",
        "update-bundle",
        rootfs_dir.join("rootfs.img").to_str().expect("utf-8"),
        "--system-version",
        version,
        "--target",
        target,
        "--key",
        key.to_str().expect("utf-8"),
        "--out",
        out.to_str().expect("utf-8"),
    ]);
    ensure!(
        out_text.status.success(),
        "update-bundle: {}",
        output_text(&out_text)
    );
    Ok(())
}

/// The same bundle without its signature member.
fn unsigned_copy(signed: &Path, out: &Path) -> Result<()> {
    let mut archive = tar::Archive::new(std::fs::File::open(signed)?);
    let mut builder = tar::Builder::new(std::fs::File::create(out)?);
    for entry in archive.entries()? {
        let mut entry = entry?;
        let name = entry.path()?.to_string_lossy().into_owned();
        if name == "manifest.sig" {
            continue;
        }
        let mut header = entry.header().clone();
        builder.append_data(&mut header, &name, &mut entry)?;
    }
    builder.finish()?;
    Ok(())
}

/// What a refused bundle must leave alone: slot B, both boot-state copies, the journal.
const DISK_STATE: &str = "sha256sum /dev/vda3 /bootfs/lichen/grubenv /bootfs/lichen/grubenv.bak; cat /data/lichen/update/journal.json 2>/dev/null | sha256sum";
/// Bytes per second the board's disk takes writes at: an SD card's, not the host's.
const SD_CARD_WRITE_RATE: u64 = 8 << 20;
const DOCTOR: &str = "lichen doctor --config /etc/lichen/lichen.toml";

/// Waits for the agent to run the default deployment; returns the counter's count.
fn agent_counts(board: &mut Board) -> Result<u64> {
    let text = board.wait_until("lichen kv counter count", "the counter to count", |out| {
        out.lines()
            .last()
            .and_then(|l| l.split_whitespace().last())
            .and_then(|v| v.parse::<u64>().ok())
            .is_some_and(|n| n >= 1)
    })?;
    Ok(text
        .lines()
        .last()
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0))
}

/// Boots until the console shell is ready; checks the slot init names.
fn boot_on(disk: &BoardDisk, slot: &str) -> Result<Board> {
    let mut board = disk.boot()?;
    let booted = board.shell()?;
    ensure!(booted == slot, "booted slot {booted}, expected {slot}");
    Ok(board)
}

/// Waits until `lichen doctor` says the last update ended as `word` (`committed`, ...).
fn last_update(board: &mut Board, word: &str) -> Result<String> {
    let out = board.wait_until(DOCTOR, &format!("the last update to be {word}"), |out| {
        out.lines()
            .any(|l| l.starts_with("last update") && l.contains(word))
    })?;
    Ok(out
        .lines()
        .find(|l| l.starts_with("last update"))
        .unwrap_or_default()
        .to_string())
}

#[test]
fn x86_64_board_updates_rolls_back_and_always_boots_a_good_slot() -> Result<()> {
    let key = keypair("publisher")?;
    let stranger = keypair("stranger")?;
    let common = ["--trusted-key", &public(&key), "--health-deadline", "4m"];
    let v1 = build_image(&[&["x86_64", "--version", "1"], &common[..]].concat())?;
    let v2 = build_image(&[&["x86_64", "--rootfs-only", "--version", "2"], &common[..]].concat())?;
    // A bad update: the same system whose agent config leaves no room for a component, so
    // its agent starts but cannot restore the deployment: its health check fails.
    let scratch = tempfile::tempdir()?;
    let bad_config = scratch.path().join("bad.toml");
    let config = std::fs::read_to_string(v1.join("lichen.toml"))?;
    ensure!(
        config.contains("max-memory = \"16MiB\""),
        "unexpected config:\n{config}"
    );
    std::fs::write(
        &bad_config,
        config.replace("max-memory = \"16MiB\"", "max-memory = \"64KiB\""),
    )?;
    let bad = build_image(&[
        "x86_64",
        "--rootfs-only",
        "--version",
        "2-bad",
        "--config",
        bad_config.to_str().expect("utf-8"),
    ])?;

    let b = |name: &str| scratch.path().join(name);
    bundle(&v2, "2", "x86_64", &key, &b("v2.lub"))?;
    bundle(&bad, "2-bad", "x86_64", &key, &b("v2-bad.lub"))?;
    bundle(&v1, "1", "x86_64", &key, &b("v1.lub"))?;
    bundle(&v2, "2", "x86_64", &stranger, &b("stranger.lub"))?;
    bundle(&v2, "2", "arm64", &key, &b("arm64.lub"))?;
    unsigned_copy(&b("v2.lub"), &b("unsigned.lub"))?;
    let full = std::fs::read(b("v2.lub"))?;
    std::fs::write(b("truncated.lub"), &full[..full.len() / 2])?;

    let mut disk = BoardDisk::new(&v1, "x86_64")?;
    disk.write_rate(SD_CARD_WRITE_RATE);
    let names = [
        "v2.lub",
        "v2-bad.lub",
        "v1.lub",
        "stranger.lub",
        "arm64.lub",
        "unsigned.lub",
        "truncated.lub",
    ];
    let files: Vec<(&str, PathBuf)> = names.iter().map(|n| (*n, b(n))).collect();
    let files: Vec<(&str, &Path)> = files.iter().map(|(n, p)| (*n, p.as_path())).collect();
    disk.with_usb(&files)?;

    // 1. First boot: slot A, the agent on its embedded default deployment.
    let mut board = boot_on(&disk, "A")?;
    let count = agent_counts(&mut board)?;
    board.sh("mkdir -p /mnt && mount -o ro /dev/vdb /mnt")?;
    let doctor = board.sh(DOCTOR)?;
    ensure!(doctor.contains("booted slot A: version 1"), "{doctor}");
    ensure!(
        doctor.contains("slot B: version 1"),
        "images/build fills both slots:\n{doctor}"
    );

    // 2. Bad bundles: refused with the reason, nothing on disk changes.
    let before = board.sh(DISK_STATE)?;
    for (file, reason) in [
        ("unsigned.lub", "unsigned"),
        ("stranger.lub", "not one of this node's trusted keys"),
        ("arm64.lub", "is for target \"arm64\""),
        ("truncated.lub", "truncated"),
    ] {
        let (status, out) = board.run(&format!("lichen update /mnt/{file} --no-reboot"))?;
        ensure!(status == 2, "{file}: exit {status}:\n{out}");
        ensure!(out.contains(reason), "{file}: no {reason:?} in:\n{out}");
        ensure!(board.sh(DISK_STATE)? == before, "{file} changed the disk");
    }

    let deployment = deployment_versions(&mut board)?;

    // 3. A bad update: slot B's first boot fails its health check; back on slot A.
    board.send("lichen update /mnt/v2-bad.lub")?;
    board.wait_for("lichen: booting slot B")?;
    board.wait_for("lichen: booting slot A")?;
    ensure!(board.shell()? == "A");
    let line = last_update(&mut board, "rolled back")?;
    ensure!(
        // The bad slot's config gives Wasm guests 64 KiB: the stored counter is restored as a
        // failed workload, and the health check names it.
        line.contains("health check failed") && line.contains("workload \"counter\" failed"),
        "{line}"
    );
    let events = board.sh("lichen events")?;
    ensure!(events.contains("update-rolled-back"), "{events}");
    ensure!(
        board
            .sh("cat /bootfs/lichen/grubenv")?
            .contains("BOOT_B_LEFT=0")
    );

    // 4. A good update: slot B commits; the agent's state carries over.
    let count_a = agent_counts(&mut board)?;
    ensure!(
        count_a > count,
        "the counter went on: {count} then {count_a}"
    );
    board.sh("mkdir -p /mnt && mount -o ro /dev/vdb /mnt")?;
    board.send("lichen update /mnt/v2.lub")?;
    board.wait_for("lichen: booting slot B")?;
    ensure!(board.shell()? == "B");
    let line = last_update(&mut board, "committed")?;
    ensure!(line.contains("1 -> 2"), "{line}");
    let count_b = agent_counts(&mut board)?;
    ensure!(count_b > count_a, "data survives: {count_a} then {count_b}");
    ensure!(
        deployment_versions(&mut board)? == deployment,
        "the deployment survives"
    );
    let env = board.sh("cat /bootfs/lichen/grubenv")?;
    ensure!(
        env.contains("BOOT_ORDER=B A") && env.contains("BOOT_B_LEFT=3"),
        "{env}"
    );
    let doctor = board.sh(DOCTOR)?;
    ensure!(doctor.contains("booted slot B: version 2"), "{doctor}");

    // 5. Power cut while writing slot A (the disk writes at SD-card speed, so the write
    //    takes seconds): the board comes back on B.
    board.sh("mkdir -p /mnt && mount -o ro /dev/vdb /mnt")?;
    board.send("lichen update /mnt/v1.lub")?;
    board.wait_for("writing slot A")?;
    board.wait_for("% ")?;
    board.power_cut();
    let mut board = boot_on(&disk, "B")?;
    let line = last_update(&mut board, "interrupted")?;
    ensure!(line.contains("slot A"), "{line}");

    // 6. Power cut during the new slot's first boot: back on B, reported.
    board.sh("mkdir -p /mnt && mount -o ro /dev/vdb /mnt")?;
    board.send("lichen update /mnt/v1.lub")?;
    board.wait_for("lichen: booting slot A")?;
    board.wait_for("lichen-init: slot A")?;
    board.power_cut();
    let mut board = boot_on(&disk, "B")?;
    let line = last_update(&mut board, "rolled back")?;
    ensure!(line.contains("did not confirm its first boot"), "{line}");
    agent_counts(&mut board)?;
    Ok(())
}

/// The deployment version of every workload (`lichen --json ps`), sorted by name.
fn deployment_versions(board: &mut Board) -> Result<Vec<(String, u64)>> {
    let text = board.sh("lichen --json ps")?;
    let rows: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("ps: {text}"))?;
    let mut out: Vec<(String, u64)> = rows
        .as_array()
        .context("ps --json gives an array")?
        .iter()
        .map(|w| {
            (
                w["name"].as_str().unwrap_or_default().to_string(),
                w["deployment_version"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    out.sort();
    ensure!(!out.is_empty(), "no workloads");
    Ok(out)
}

/// Two builds of the same inputs give the same bytes: one afresh (`--no-cache`: its base too)
/// and one through the cache (whose base other tests may have built from the same inputs),
/// which also proves the cache keys cover what the bytes depend on.
#[test]
fn x86_64_images_are_reproducible() -> Result<()> {
    let key = keypair("publisher")?;
    let args = [
        "x86_64",
        "--version",
        "repro",
        "--trusted-key",
        &public(&key),
    ];
    let fresh = build_image(&[&args[..], &["--no-cache"]].concat())?;
    let cached = build_image(&args)?;
    ensure!(fresh != cached, "--no-cache built in the cache");
    for file in ["disk.img", "rootfs.img"] {
        let same = Command::new("cmp")
            .arg(fresh.join(file))
            .arg(cached.join(file))
            .status()
            .context("cannot run cmp")?
            .success();
        ensure!(same, "two builds of the same inputs differ in {file}");
    }
    std::fs::remove_dir_all(fresh)?;
    Ok(())
}

/// Reads or writes the U-Boot environment copies inside the boot FAT of a disk image, from
/// outside the board (mtools at the partition's offset).
fn uboot_env(
    disk: &Path,
    write: Option<&lichen_update::bootstate::BootState>,
) -> Result<lichen_update::bootstate::BootState> {
    use lichen_update::bootstate::BootStore;
    use lichen_update::bootstate::ubootenv::{DEFAULT_SIZE, UbootEnvStore};
    let dir = tempfile::tempdir()?;
    let image = format!("{}@@1M", disk.display());
    let names = ["uboot.env", "uboot-redund.env"];
    for name in names {
        let ok = Command::new("mcopy")
            .env("MTOOLS_SKIP_CHECK", "1")
            .args(["-n", "-i", &image, &format!("::lichen/{name}")])
            .arg(dir.path().join(name))
            .status()?
            .success();
        ensure!(ok, "cannot copy {name} out of {}", disk.display());
    }
    let store = UbootEnvStore::new(
        names.iter().map(|n| dir.path().join(n)).collect(),
        DEFAULT_SIZE,
    )?;
    if let Some(state) = write {
        store.store(state)?;
        for name in names {
            let ok = Command::new("mcopy")
                .env("MTOOLS_SKIP_CHECK", "1")
                .args(["-o", "-i", &image])
                .arg(dir.path().join(name))
                .arg(format!("::lichen/{name}"))
                .status()?
                .success();
            ensure!(ok, "cannot copy {name} into {}", disk.display());
        }
    }
    Ok(store.load()?)
}

#[test]
fn arm64_board_boots_with_u_boot_and_falls_back() -> Result<()> {
    use lichen_update::bootstate::BootState;
    use lichen_update::slot::Slot;
    let key = keypair("publisher")?;
    let image = build_image(&["arm64", "--version", "1", "--trusted-key", &public(&key)])?;
    let disk = BoardDisk::new(&image, "arm64")?;

    // 1. U-Boot boots slot A; the agent runs its default deployment and marks A good.
    let mut board = disk.boot()?;
    board.wait_for("lichen: booting slot A")?;
    ensure!(board.shell()? == "A");
    agent_counts(&mut board)?;
    board.wait_until(
        "cat /run/lichen/boot-confirmed",
        "the boot to be confirmed",
        |o| o.contains("slot A"),
    )?;
    board.poweroff()?;
    let state = uboot_env(&disk.disk(), None)?;
    ensure!(
        state.to_string() == "BOOT_ORDER=\"A B\" BOOT_A_LEFT=3 BOOT_B_LEFT=3",
        "{state}"
    );

    // 2. From outside: try B once. U-Boot takes B's try; a power cut before B confirms...
    let mut armed = BootState::default();
    armed.try_once(Slot::B);
    uboot_env(&disk.disk(), Some(&armed))?;
    let mut board = disk.boot()?;
    board.wait_for("lichen: booting slot B (BOOT_ORDER=\"B A\" BOOT_A_LEFT=3 BOOT_B_LEFT=0)")?;
    board.wait_for("lichen-init: slot B")?;
    board.power_cut();
    // ... and the next boot falls back to A, which has its tries.
    let mut board = disk.boot()?;
    board.wait_for("lichen: booting slot A (BOOT_ORDER=\"B A\" BOOT_A_LEFT=2 BOOT_B_LEFT=0)")?;
    board.wait_for("lichen-init: slot A")?;
    board.power_cut();

    // 3. Every counter at 0: the script resets them and boots the first slot in order.
    let empty = BootState {
        order: [Slot::B, Slot::A],
        a_left: 0,
        b_left: 0,
    };
    uboot_env(&disk.disk(), Some(&empty))?;
    let mut board = disk.boot()?;
    board.wait_for("lichen: no slot has tries left; resetting every counter to 3")?;
    board.wait_for("lichen: booting slot B (BOOT_ORDER=\"B A\" BOOT_A_LEFT=3 BOOT_B_LEFT=2)")?;
    ensure!(board.shell()? == "B");
    board.poweroff()?;
    Ok(())
}

/// Figures for docs/updates.md (not a pass/fail test; `images/bench` runs it): image size,
/// boot to agent ready (TCG), update apply time and bytes written, and rounds of power cuts at
/// random moments of an update with the board still booting a good slot afterwards.
/// `LICHEN_BENCH_TARGET` picks the board (`x86_64`, the default, or `arm64`);
/// `LICHEN_BENCH_ROUNDS` sets the rounds (default 20).
#[test]
#[ignore = "figures, run by images/bench"]
fn figures() -> Result<()> {
    let rounds: u32 = std::env::var("LICHEN_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let target = std::env::var("LICHEN_BENCH_TARGET").unwrap_or_else(|_| "x86_64".into());
    let machine = match target.as_str() {
        "x86_64" => "QEMU q35 with OVMF and GRUB, TCG, 1 vCPU",
        "arm64" => "QEMU virt (cortex-a57) with U-Boot, TCG, 1 vCPU",
        other => anyhow::bail!("LICHEN_BENCH_TARGET={other}: x86_64 or arm64"),
    };
    let key = keypair("publisher")?;
    let common = ["--trusted-key", &public(&key)];
    let v1 = build_image(&[&[target.as_str(), "--version", "1"], &common[..]].concat())?;
    let v2 = build_image(
        &[
            &[target.as_str(), "--rootfs-only", "--version", "2"],
            &common[..],
        ]
        .concat(),
    )?;
    let scratch = tempfile::tempdir()?;
    let b = |name: &str| scratch.path().join(name);
    bundle(&v1, "1", &target, &key, &b("v1.lub"))?;
    bundle(&v2, "2", &target, &key, &b("v2.lub"))?;
    let usb = [("v1.lub", b("v1.lub")), ("v2.lub", b("v2.lub"))];
    let usb: Vec<(&str, &Path)> = usb.iter().map(|(n, p)| (*n, p.as_path())).collect();

    let disk_meta = std::fs::metadata(v1.join("disk.img"))?;
    let allocated = {
        use std::os::unix::fs::MetadataExt;
        disk_meta.blocks() * 512
    };
    println!(
        "figure: {target} image: disk.img {} MiB ({} MiB allocated), root slot image {} KiB, bundle {} KiB",
        disk_meta.len() >> 20,
        allocated >> 20,
        std::fs::metadata(v1.join("rootfs.img"))?.len() >> 10,
        std::fs::metadata(b("v2.lub"))?.len() >> 10
    );

    // Boot to agent ready, and one update at the disk's own speed.
    let mut disk = BoardDisk::new(&v1, &target)?;
    disk.with_usb(&usb)?;
    let mut board = disk.boot()?;
    board.wait_for("lichen: booting slot")?;
    let loader = board.uptime();
    board.shell()?;
    let init = board.uptime();
    board.wait_until("lichen ps", "the agent to answer", |out| {
        out.contains("running")
    })?;
    let ready = board.uptime();
    println!(
        "figure: {target} boot ({machine}): boot loader at {:.1} s, init ready at {:.1} s, agent answering with running workloads at {:.1} s",
        loader.as_secs_f64(),
        init.as_secs_f64(),
        ready.as_secs_f64()
    );
    board.sh("mkdir -p /mnt && mount -o ro /dev/vdb /mnt")?;
    let out = board.sh("lichen --json update /mnt/v2.lub --no-reboot")?;
    let json_start = out.find('{').context("no JSON from lichen update")?;
    let report: serde_json::Value = serde_json::from_str(&out[json_start..])?;
    println!(
        "figure: {target} update apply (virtio disk under TCG): {} bytes written, write {} ms, read-back verify {} ms, whole verb {} ms (signature, pre-hash, write, verify, arm)",
        report["bytes-written"], report["write-ms"], report["verify-ms"], report["total-ms"]
    );
    drop(board);

    // Power cuts at random moments of an update (SD-card write speed, so the cut lands in
    // the write as often as in the reboot and first boot).
    let fresh_disk = || -> Result<BoardDisk> {
        let mut disk = BoardDisk::new(&v1, &target)?;
        disk.with_usb(&usb)?;
        disk.write_rate(SD_CARD_WRITE_RATE);
        Ok(disk)
    };
    let mut disk = fresh_disk()?;
    let mut seed: u64 = 0x5eed_1c4e_0000_0001;
    let mut bricked = 0;
    for round in 1..=rounds {
        let mut board = disk.boot()?;
        let slot = board.shell()?;
        agent_counts(&mut board)?;
        board.sh("mkdir -p /mnt && mount -o ro /dev/vdb /mnt")?;
        let file = if round % 2 == 0 { "v1.lub" } else { "v2.lub" };
        board.send(&format!("lichen update /mnt/{file}"))?;
        // Fault injection, not synchronisation: the cut lands at a random moment up to 25 s
        // after the update starts (write, arm, reboot, first boot of the new slot).
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let cut = Duration::from_millis(seed % 25_000);
        std::thread::sleep(cut);
        board.power_cut();
        let mut board = disk.boot()?;
        let outcome = board.shell().and_then(|now| {
            agent_counts(&mut board)?;
            // The row is read once the agent has settled this boot: no update in progress
            // (a first boot of the new slot is still in its health check until then, and
            // `last update` is still the previous update's outcome).
            let doctor = board.wait_until(DOCTOR, "the update to end", |out| {
                !out.lines().any(|l| l.starts_with("update in progress"))
            })?;
            Ok((now, doctor))
        });
        match outcome {
            Ok((now, doctor)) => {
                let last = doctor
                    .lines()
                    .find(|l| l.starts_with("last update"))
                    .unwrap_or("")
                    .to_string();
                println!(
                    "round {round}: on slot {slot}, cut {:.1} s into the update of {file}: boots slot {now}, agent answers; {last}",
                    cut.as_secs_f64()
                );
            }
            Err(err) => {
                bricked += 1;
                println!(
                    "round {round}: cut {:.1} s into the update: NOT BOOTING: {err:#}",
                    cut.as_secs_f64()
                );
                disk = fresh_disk()?;
            }
        }
        board.power_cut();
    }
    println!(
        "figure: {target} power cuts during an update: {bricked} of {rounds} rounds left a board that does not boot to a working agent"
    );
    Ok(())
}
