//! QEMU's command line for a microVM: the machine by host architecture (`-M microvm` on
//! x86_64, `-M virt` on arm64), the accelerator, the serial console on stdio, QMP on a socket.

use std::ffi::OsString;
use std::fmt;
use std::path::Path;

use super::spec::{GuestRoot, MicrovmSpec};

/// The TSC frequency given to TCG x86 guests (`tsc_early_khz`): without it a stock kernel's
/// TSC calibration under TCG can take long or fail.
pub const TCG_TSC_KHZ: u32 = 2_600_000;

/// How QEMU runs guest code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Accelerator {
    /// Hardware virtualization through `/dev/kvm`.
    Kvm,
    /// QEMU's own translator (no hardware help: slow, but works everywhere).
    Tcg,
}

impl Accelerator {
    /// QEMU's name for it (`-accel kvm`, `-accel tcg`).
    pub fn name(self) -> &'static str {
        match self {
            Accelerator::Kvm => "kvm",
            Accelerator::Tcg => "tcg",
        }
    }
}

impl fmt::Display for Accelerator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The QEMU machine used on this host's architecture.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Machine {
    /// The host (and guest) architecture, as Rust names it (`x86_64`, `aarch64`).
    pub arch: &'static str,
    /// The QEMU system emulator's binary name.
    pub binary: &'static str,
    /// The `-M` value.
    pub machine: &'static str,
    /// The guest's serial console device name (`ttyS0`, `ttyAMA0`).
    pub console: &'static str,
    /// The kernel's early console argument, which prints before the console driver loads.
    pub early_console: &'static str,
}

impl Machine {
    /// The machine for the architecture this agent was built for, or `None` where Lichen has no
    /// microVM support (riscv64 and others).
    pub fn host() -> Option<Machine> {
        Machine::for_arch(std::env::consts::ARCH)
    }

    /// The machine for an architecture name (`x86_64`, `aarch64`).
    pub fn for_arch(arch: &str) -> Option<Machine> {
        match arch {
            "x86_64" => Some(Machine {
                arch: "x86_64",
                binary: "qemu-system-x86_64",
                machine: "microvm",
                console: "ttyS0",
                early_console: "earlyprintk=ttyS0",
            }),
            "aarch64" => Some(Machine {
                arch: "aarch64",
                binary: "qemu-system-aarch64",
                machine: "virt",
                console: "ttyAMA0",
                early_console: "earlycon=pl011,mmio32,0x9000000",
            }),
            _ => None,
        }
    }

    /// Arguments common to every run: machine, accelerator, CPU model, no default devices, no
    /// display, the serial console on stdio, no reboot (a guest reboot ends QEMU).
    pub(crate) fn base_args(&self, accel: Accelerator) -> Vec<OsString> {
        let cpu = match (self.arch, accel) {
            ("aarch64", Accelerator::Kvm) => Some("host"),
            ("aarch64", Accelerator::Tcg) => Some("max"),
            // x86: QEMU's default model; `-cpu host` trips KVM-PVM's MSR checks.
            _ => None,
        };
        let mut args: Vec<OsString> = vec![
            "-M".into(),
            self.machine.into(),
            "-accel".into(),
            accel.name().into(),
        ];
        if let Some(cpu) = cpu {
            args.extend(["-cpu".into(), cpu.into()]);
        }
        args.extend(
            [
                "-nodefaults",
                "-no-user-config",
                "-display",
                "none",
                "-serial",
                "stdio",
                "-no-reboot",
            ]
            .map(OsString::from),
        );
        args
    }

    /// The kernel command line Lichen puts before the workload's: console on the serial port,
    /// reboot at once on panic (which ends QEMU), and on x86 TCG a fixed TSC frequency.
    pub(crate) fn cmdline(&self, accel: Accelerator, extra: &str) -> String {
        let mut line = format!("console={} panic=-1", self.console);
        if self.arch == "x86_64" && accel == Accelerator::Tcg {
            line.push_str(&format!(" tsc_early_khz={TCG_TSC_KHZ}"));
        }
        let extra = extra.trim();
        if !extra.is_empty() {
            line.push(' ');
            line.push_str(extra);
        }
        line
    }
}

/// The full argument list that boots `spec` with `accel`, QMP listening on `qmp_socket`.
pub(crate) fn vm_args(
    machine: &Machine,
    accel: Accelerator,
    spec: &MicrovmSpec,
    qmp_socket: &Path,
) -> Vec<OsString> {
    let mut args = machine.base_args(accel);
    args.extend([
        "-name".into(),
        format!("lichen-{}", spec.name).into(),
        "-m".into(),
        spec.memory_mib.to_string().into(),
        "-smp".into(),
        spec.vcpus.to_string().into(),
        "-kernel".into(),
        spec.kernel.clone().into_os_string(),
    ]);
    let mut cmdline = machine.cmdline(accel, "");
    match &spec.root {
        GuestRoot::Initramfs(path) => {
            args.extend(["-initrd".into(), path.clone().into_os_string()]);
        }
        GuestRoot::Disk(path) => {
            let mut drive = OsString::from("id=root,if=none,format=raw,read-only=on,file=");
            drive.push(path);
            args.extend([
                "-drive".into(),
                drive,
                "-device".into(),
                "virtio-blk-device,drive=root".into(),
            ]);
            cmdline.push_str(" root=/dev/vda ro");
        }
    }
    let extra = spec.cmdline.trim();
    if !extra.is_empty() {
        cmdline.push(' ');
        cmdline.push_str(extra);
    }
    let mut qmp = OsString::from("unix:");
    qmp.push(qmp_socket);
    qmp.push(",server=on,wait=off");
    args.extend(["-append".into(), cmdline.into(), "-qmp".into(), qmp]);
    args
}

#[cfg(test)]
mod tests {
    use super::*;

    fn joined(args: &[OsString]) -> String {
        args.iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    }

    #[test]
    fn x86_tcg_uses_microvm_serial_stdio_and_a_fixed_tsc() {
        let machine = Machine::for_arch("x86_64").expect("x86_64 is supported");
        let mut spec = MicrovmSpec::new(
            "web",
            "/k/vmlinuz",
            GuestRoot::Initramfs("/k/initrd.gz".into()),
        );
        spec.vcpus = 2;
        spec.cmdline = "LICHEN_TICK=5".into();
        let line = joined(&vm_args(
            &machine,
            Accelerator::Tcg,
            &spec,
            Path::new("/run/q.sock"),
        ));
        assert_eq!(
            line,
            "-M microvm -accel tcg -nodefaults -no-user-config -display none -serial stdio \
             -no-reboot -name lichen-web -m 128 -smp 2 -kernel /k/vmlinuz -initrd /k/initrd.gz \
             -append console=ttyS0 panic=-1 tsc_early_khz=2600000 LICHEN_TICK=5 \
             -qmp unix:/run/q.sock,server=on,wait=off"
        );
    }

    #[test]
    fn arm64_kvm_uses_virt_with_a_disk_and_no_tsc_setting() {
        let machine = Machine::for_arch("aarch64").expect("aarch64 is supported");
        let spec = MicrovmSpec::new("db", "/k/Image", GuestRoot::Disk("/k/root.img".into()));
        let line = joined(&vm_args(&machine, Accelerator::Kvm, &spec, Path::new("/q")));
        assert!(line.starts_with("-M virt -accel kvm -cpu host "), "{line}");
        assert!(
            line.contains(
                "-drive id=root,if=none,format=raw,read-only=on,file=/k/root.img \
                 -device virtio-blk-device,drive=root"
            ),
            "{line}"
        );
        assert!(
            line.contains("-append console=ttyAMA0 panic=-1 root=/dev/vda ro -qmp"),
            "{line}"
        );
        assert!(Machine::for_arch("riscv64").is_none());
    }
}
