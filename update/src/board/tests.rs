//! A board made of files: two slot files, GRUB environment blocks, a command line and a
//! system.json, with the boot loader's decision (the same as images/system/grub.cfg) played
//! by [`Fixture::boot`]. Drives whole updates, rollbacks and power cuts without a board.

use super::*;
use crate::bootstate::MAX_TRIES;
use crate::bootstate::grubenv::GrubEnvStore;
use crate::bundle::tests::{TestKey, image};
use crate::bundle::write_bundle;

struct Fixture {
    dir: tempfile::TempDir,
    config: UpdateConfig,
    key: TestKey,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let p = |name: &str| dir.path().join(name);
        for slot in ["slot-a", "slot-b"] {
            std::fs::write(p(slot), vec![0u8; 2 << 20]).unwrap();
        }
        std::fs::write(p("mounts"), "/dev/root / squashfs ro 0 0\n").unwrap();
        let text = format!(
            r#"target = "x86_64"
boot = "grub"
boot-state = ["{env1}", "{env2}"]
slots = {{ A = "{a}", B = "{b}" }}
cmdline = "{cmdline}"
system-file = "{system}"
mounts = "{mounts}"
confirm-file = "{confirm}"
"#,
            env1 = p("grubenv").display(),
            env2 = p("grubenv.bak").display(),
            a = p("slot-a").display(),
            b = p("slot-b").display(),
            cmdline = p("cmdline").display(),
            system = p("system.json").display(),
            mounts = p("mounts").display(),
            confirm = p("confirmed").display(),
        );
        let config: UpdateConfig = toml::from_str(&text).unwrap();
        let fixture = Fixture {
            dir,
            config,
            key: TestKey::new(),
        };
        fixture.store().store(&BootState::default()).unwrap();
        fixture.set_running(Slot::A, "1");
        fixture
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn store(&self) -> GrubEnvStore {
        GrubEnvStore::new(vec![self.path("grubenv"), self.path("grubenv.bak")]).unwrap()
    }

    fn set_running(&self, slot: Slot, version: &str) {
        std::fs::write(
            self.path("cmdline"),
            format!("console=ttyS0 lichen.slot={slot}\n"),
        )
        .unwrap();
        std::fs::write(
            self.path("system.json"),
            format!("{{\"version\":\"{version}\",\"target\":\"x86_64\"}}"),
        )
        .unwrap();
    }

    fn board(&self) -> Board {
        Board::open(&self.config, &self.path("state")).unwrap()
    }

    fn bundle(&self, version: &str, size: usize) -> PathBuf {
        let img_dir = self.path(&format!("img-{version}"));
        std::fs::create_dir_all(&img_dir).unwrap();
        let img = image(&img_dir, size);
        let out = self.path(&format!("{version}.lub"));
        write_bundle(&out, version, "x86_64", &img, &self.key).unwrap();
        out
    }

    /// The boot loader (grub.cfg): takes a try of the first slot with tries left (all reset
    /// to 3 when none has any), saves, and "runs" that slot: its trailer's version.
    fn boot(&self) -> Slot {
        let store = self.store();
        let mut state = store.load().unwrap();
        let take = |state: &mut BootState| {
            let slot = state.order.into_iter().find(|s| state.left(*s) > 0)?;
            match slot {
                Slot::A => state.a_left -= 1,
                Slot::B => state.b_left -= 1,
            }
            Some(slot)
        };
        let slot = take(&mut state).unwrap_or_else(|| {
            state.a_left = MAX_TRIES;
            state.b_left = MAX_TRIES;
            take(&mut state).unwrap()
        });
        store.store(&state).unwrap();
        let device = self.path(if slot == Slot::A { "slot-a" } else { "slot-b" });
        let version = SlotTrailer::read(&device)
            .unwrap()
            .map_or("1".to_string(), |t| t.version);
        self.set_running(slot, &version);
        let _ = std::fs::remove_file(self.path("confirmed"));
        slot
    }

    fn journal(&self) -> Journal {
        JournalFile::in_state_dir(&self.path("state"))
            .load()
            .unwrap()
    }
}

#[test]
fn an_update_boots_the_new_slot_once_and_commits_it() {
    let f = Fixture::new();
    let board = f.board();
    let path = f.bundle("2", 300_000);
    let bundle = board.verify(&path, &f.key).unwrap();
    let report = board.apply(&bundle, 10, &mut |_| {}).unwrap();
    assert_eq!(report.slot, Slot::B);
    assert_eq!(
        report.state.to_string(),
        "BOOT_ORDER=\"B A\" BOOT_A_LEFT=3 BOOT_B_LEFT=1"
    );
    assert_eq!(f.journal().pending.unwrap().phase, Phase::Armed);
    // The running agent restarting before the reboot changes nothing.
    assert!(matches!(board.start(11).unwrap(), Start::AwaitingReboot(_)));
    assert!(
        board
            .apply(&bundle, 12, &mut |_| {})
            .unwrap_err()
            .to_string()
            .contains("reboot to try it")
    );

    assert_eq!(f.boot(), Slot::B);
    let board = f.board();
    let Start::Trial(pending) = board.start(20).unwrap() else {
        panic!("a trial")
    };
    assert!(
        board
            .apply(&bundle, 21, &mut |_| {})
            .unwrap_err()
            .to_string()
            .contains("first boot")
    );
    let outcome = board.commit(&pending, "2 workloads answered", 30).unwrap();
    assert_eq!(outcome.result, OutcomeKind::Committed);
    assert_eq!(
        f.store().load().unwrap().to_string(),
        "BOOT_ORDER=\"B A\" BOOT_A_LEFT=3 BOOT_B_LEFT=3"
    );
    board.confirm().unwrap();
    assert!(f.path("confirmed").exists());

    // Later boots stay on B and are normal.
    assert_eq!(f.boot(), Slot::B);
    assert_eq!(
        f.board().start(40).unwrap(),
        Start::Confirmed { outcome: None }
    );
    assert_eq!(
        f.store().load().unwrap().b_left,
        MAX_TRIES,
        "marked good again"
    );
    let status = f.board().status();
    assert_eq!(
        status.other.unwrap(),
        None,
        "slot A was never written by an update"
    );
    assert_eq!(status.journal.unwrap().last.unwrap().version, "2");
}

#[test]
fn a_failed_health_check_comes_back_to_the_old_slot_with_the_reason() {
    let f = Fixture::new();
    let board = f.board();
    let bundle = board.verify(&f.bundle("2", 100_000), &f.key).unwrap();
    board.apply(&bundle, 10, &mut |_| {}).unwrap();
    assert_eq!(f.boot(), Slot::B);
    let board = f.board();
    let Start::Trial(pending) = board.start(20).unwrap() else {
        panic!("a trial")
    };
    board
        .reject(&pending, "workload \"counter\" failed: out of memory")
        .unwrap();
    assert_eq!(board.reboot_command(false), vec!["reboot".to_string()]);

    assert_eq!(f.boot(), Slot::A, "back on the old slot");
    let Start::Confirmed {
        outcome: Some(outcome),
    } = f.board().start(30).unwrap()
    else {
        panic!("an outcome")
    };
    assert_eq!(outcome.result, OutcomeKind::RolledBack);
    let reason = outcome.reason.unwrap();
    assert!(
        reason.contains("health check failed") && reason.contains("out of memory"),
        "{reason}"
    );
    assert_eq!(
        f.store().load().unwrap().to_string(),
        "BOOT_ORDER=\"A B\" BOOT_A_LEFT=3 BOOT_B_LEFT=0"
    );
    assert_eq!(f.journal().pending, None);
    assert_eq!(
        f.board().start(31).unwrap(),
        Start::Confirmed { outcome: None },
        "reported once"
    );
}

#[test]
fn a_first_boot_that_never_confirms_rolls_back() {
    // A crash, a hang or a power cut during the new slot's first boot: no verdict at all.
    let f = Fixture::new();
    let board = f.board();
    let bundle = board.verify(&f.bundle("2", 100_000), &f.key).unwrap();
    board.apply(&bundle, 10, &mut |_| {}).unwrap();
    assert_eq!(f.boot(), Slot::B);
    assert_eq!(f.boot(), Slot::A, "the one try is gone: the old slot");
    let Start::Confirmed {
        outcome: Some(outcome),
    } = f.board().start(30).unwrap()
    else {
        panic!("an outcome")
    };
    assert_eq!(outcome.result, OutcomeKind::RolledBack);
    assert!(
        outcome
            .reason
            .unwrap()
            .contains("did not confirm its first boot")
    );
    for _ in 0..5 {
        assert_eq!(f.boot(), Slot::A);
        f.board().start(40).unwrap();
    }
}

#[test]
fn a_power_cut_while_writing_boots_the_old_slot_and_reports_it() {
    let f = Fixture::new();
    let board = f.board();
    let bundle = board.verify(&f.bundle("2", 1_500_000), &f.key).unwrap();
    // Stop the write half-way, as a power cut would (the progress callback never returns).
    let cut = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        board.apply(&bundle, 10, &mut |n| {
            if n >= 1 << 20 {
                panic!("power cut");
            }
        })
    }));
    assert!(cut.is_err());
    assert_eq!(f.journal().pending.unwrap().phase, Phase::Writing);
    assert_eq!(SlotTrailer::read(&f.path("slot-b")).unwrap(), None);
    assert_eq!(f.boot(), Slot::A);
    let Start::Confirmed {
        outcome: Some(outcome),
    } = f.board().start(30).unwrap()
    else {
        panic!("an outcome")
    };
    assert_eq!(outcome.result, OutcomeKind::Interrupted);
    assert_eq!(
        f.store().load().unwrap().b_left,
        0,
        "slot B stays unbootable"
    );
    // A new update runs over the interrupted one.
    let report = f.board().apply(&bundle, 40, &mut |_| {}).unwrap();
    assert_eq!(report.slot, Slot::B);
}

#[test]
fn a_slot_holding_another_version_than_signed_is_rejected_at_once() {
    let f = Fixture::new();
    let board = f.board();
    let bundle = board.verify(&f.bundle("2", 100_000), &f.key).unwrap();
    board.apply(&bundle, 10, &mut |_| {}).unwrap();
    assert_eq!(f.boot(), Slot::B);
    f.set_running(Slot::B, "3");
    let Start::Rejected(_, reason) = f.board().start(20).unwrap() else {
        panic!("rejected")
    };
    assert!(
        reason.contains("\"3\"") && reason.contains("\"2\""),
        "{reason}"
    );
    assert_eq!(f.boot(), Slot::A);
}

#[test]
fn bad_bundles_and_a_mounted_slot_change_nothing() {
    let f = Fixture::new();
    let board = f.board();
    let snapshot = || {
        (
            std::fs::read(f.path("slot-b")).unwrap(),
            std::fs::read(f.path("grubenv")).unwrap(),
            std::fs::read(f.path("grubenv.bak")).unwrap(),
        )
    };
    let before = snapshot();
    let other = TestKey::new();
    let img = image(&f.path(""), 50_000);
    let wrong = f.path("wrong.lub");
    write_bundle(&wrong, "2", "x86_64", &img, &other).unwrap();
    assert!(board.verify(&wrong, &f.key).is_err());
    let arm = f.path("arm.lub");
    write_bundle(&arm, "2", "arm64", &img, &f.key).unwrap();
    assert!(
        board
            .verify(&arm, &f.key)
            .unwrap_err()
            .to_string()
            .contains("\"arm64\"")
    );
    assert_eq!(snapshot(), before);
    assert_eq!(f.journal().pending, None);

    std::fs::write(
        f.path("mounts"),
        format!("{} /mnt squashfs ro 0 0\n", f.path("slot-b").display()),
    )
    .unwrap();
    let bundle = board.verify(&f.bundle("2", 10_000), &f.key).unwrap();
    let err = board
        .apply(&bundle, 1, &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(err.contains("is mounted"), "{err}");
    assert_eq!(snapshot(), before);
}

#[test]
fn an_unverifiable_boot_state_refuses_to_arm() {
    let f = Fixture::new();
    let board = f.board();
    let bundle = board.verify(&f.bundle("2", 10_000), &f.key).unwrap();
    std::fs::write(f.path("grubenv"), b"garbage").unwrap();
    std::fs::write(f.path("grubenv.bak"), b"garbage").unwrap();
    let err = board
        .apply(&bundle, 1, &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(err.contains("cannot read the boot state"), "{err}");
    assert_eq!(f.journal().pending, None);
}

#[test]
fn an_interrupted_write_then_a_good_update_reports_the_good_update() {
    // images/bench's rounds 1 and 2: a power cut in the write of slot B, then an update that
    // arms B and is cut after arming, before the boot loader took B's try.
    let f = Fixture::new();
    let bundle = f.board().verify(&f.bundle("2", 1_500_000), &f.key).unwrap();
    let cut = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        f.board().apply(&bundle, 10, &mut |n| {
            if n >= 1 << 20 {
                panic!("power cut");
            }
        })
    }));
    assert!(cut.is_err());
    assert_eq!(f.boot(), Slot::A);
    let Start::Confirmed {
        outcome: Some(interrupted),
    } = f.board().start(20).unwrap()
    else {
        panic!("an outcome")
    };
    assert_eq!(interrupted.result, OutcomeKind::Interrupted);

    f.board().apply(&bundle, 30, &mut |_| {}).unwrap();
    assert_eq!(f.boot(), Slot::B, "the armed slot's one try");
    let board = f.board();
    let Start::Trial(pending) = board.start(40).unwrap() else {
        panic!("a trial")
    };
    // While the health check runs, `last` is still the interrupted write (the last update
    // that ended) and `pending` is the trial: doctor shows both rows.
    let during = board.status().journal.unwrap();
    assert_eq!(
        during.last.as_ref().unwrap().result,
        OutcomeKind::Interrupted
    );
    assert_eq!(during.pending.as_ref().unwrap().phase, Phase::Armed);
    assert_eq!(during.pending.as_ref().unwrap().to, Slot::B);

    let outcome = board.commit(&pending, "1 workload answered", 50).unwrap();
    let after = board.status().journal.unwrap();
    assert_eq!(after.pending, None);
    assert_eq!(after.last, Some(outcome.clone()));
    assert_eq!(outcome.result, OutcomeKind::Committed);
    assert_eq!(
        outcome.describe(),
        "update 1 -> 2 (slot B) committed: 1 workload answered"
    );
    // The next boot stays on B and keeps reporting the good update.
    assert_eq!(f.boot(), Slot::B);
    assert_eq!(
        f.board().start(60).unwrap(),
        Start::Confirmed { outcome: None }
    );
    assert_eq!(f.journal().last, Some(outcome));
}
