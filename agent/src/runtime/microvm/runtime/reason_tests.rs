use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;

use super::*;

fn reason(stop: u8, raw: i32, shutdown: Option<&str>, console: &[&str]) -> ExitReason {
    let seen = ConsoleSeen::default();
    for line in console {
        seen.note(line);
    }
    exit_reason(
        stop,
        Ok(ExitStatus::from_raw(raw)),
        shutdown,
        &seen,
        true,
        "",
        (Duration::from_secs(9), "READY".into()),
    )
}

#[test]
fn lichens_action_then_the_guests_then_qemus_status_decide_the_reason() {
    // A requested power-off, told by QMP or (without QMP) by the kernel's last line.
    let off = ExitReason::PoweredOff { requested: true };
    assert_eq!(reason(STOP_POWERDOWN, 0, Some("guest-shutdown"), &[]), off);
    assert_eq!(
        reason(STOP_POWERDOWN, 0, None, &["[ 6.0] reboot: Power down"]),
        off
    );
    // The guest's own decisions.
    assert_eq!(
        reason(STOP_NONE, 0, Some("guest-shutdown"), &[]),
        ExitReason::PoweredOff { requested: false }
    );
    assert_eq!(
        reason(STOP_NONE, 0, Some("guest-reset"), &[]),
        ExitReason::GuestReset
    );
    assert_eq!(
        reason(
            STOP_NONE,
            0,
            Some("guest-reset"),
            &["Kernel panic - not syncing: VFS"]
        ),
        ExitReason::GuestPanicked
    );
    // Lichen ended QEMU after the grace period.
    assert_eq!(
        reason(STOP_QUIT, 0, Some("host-qmp-quit"), &[]),
        ExitReason::Stopped { forced: false }
    );
    assert_eq!(
        reason(STOP_KILL, 9, None, &[]),
        ExitReason::Stopped { forced: true }
    );
    // A boot timeout wins over whatever QEMU said while being killed.
    assert_eq!(
        reason(STOP_BOOT_TIMEOUT, 9, None, &[]),
        ExitReason::BootTimeout {
            timeout: Duration::from_secs(9),
            marker: "READY".into()
        }
    );
    // Nobody said anything: QEMU's status.
    assert_eq!(
        reason(STOP_NONE, 3 << 8, None, &[]),
        ExitReason::Exited { code: 3 }
    );
    assert_eq!(
        reason(STOP_NONE, 15, None, &[]),
        ExitReason::Signaled { signal: 15 }
    );
}
