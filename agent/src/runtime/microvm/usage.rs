//! A microVM's resource usage: its QEMU process's memory from `/proc/PID/smaps_rollup` (the
//! guest's RAM is QEMU's memory, so this counts what the guest touched plus QEMU itself).

/// What a microVM uses now; `None` when the counter cannot be read (QEMU is gone).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ResourceUsage {
    /// Resident set size of the QEMU process, in bytes.
    pub rss_bytes: Option<u64>,
    /// Proportional set size (shared pages divided among their users), in bytes: the fair
    /// per-instance figure when several QEMUs share their binary and libraries.
    pub pss_bytes: Option<u64>,
}

impl ResourceUsage {
    /// Reads the usage of process `pid`.
    pub fn of_process(pid: u32) -> ResourceUsage {
        match std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")) {
            Ok(text) => parse_rollup(&text),
            Err(_) => ResourceUsage::default(),
        }
    }
}

fn parse_rollup(text: &str) -> ResourceUsage {
    let field = |name: &str| {
        text.lines().find_map(|line| {
            let rest = line.strip_prefix(name)?.strip_prefix(':')?;
            let kib: u64 = rest.trim().strip_suffix("kB")?.trim().parse().ok()?;
            Some(kib * 1024)
        })
    };
    ResourceUsage {
        rss_bytes: field("Rss"),
        pss_bytes: field("Pss"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rollup_fields_are_read_in_bytes() {
        let text = "55d0-7ffd ---p 00000000 00:00 0  [rollup]\n\
                    Rss:              188416 kB\n\
                    Pss:              180224 kB\n\
                    Pss_Anon:         170000 kB\n";
        let usage = parse_rollup(text);
        assert_eq!(usage.rss_bytes, Some(188416 * 1024));
        assert_eq!(usage.pss_bytes, Some(180224 * 1024));
        assert_eq!(parse_rollup("nothing"), ResourceUsage::default());
    }

    #[test]
    fn this_process_has_a_resident_set() {
        let usage = ResourceUsage::of_process(std::process::id());
        assert!(usage.rss_bytes.is_some_and(|b| b > 0), "{usage:?}");
        assert!(usage.pss_bytes.is_some_and(|b| b > 0), "{usage:?}");
    }
}
