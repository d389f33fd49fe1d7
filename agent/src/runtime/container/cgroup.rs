//! The host's cgroup layout (v2, v1 or hybrid) and a container's counters read from it.

use std::fmt;
use std::path::Path;
#[cfg(feature = "containers")]
use std::path::PathBuf;

/// How the host mounts cgroups.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupLayout {
    /// Only the unified hierarchy (Raspberry Pi OS, recent distributions).
    V2,
    /// Only per-controller v1 hierarchies.
    V1,
    /// v1 controllers plus a unified hierarchy at `/sys/fs/cgroup/unified`.
    Hybrid,
    /// No cgroup filesystem: containers cannot be limited.
    Missing,
}

impl fmt::Display for CgroupLayout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CgroupLayout::V2 => "cgroup v2",
            CgroupLayout::V1 => "cgroup v1",
            CgroupLayout::Hybrid => "hybrid cgroup v1 + v2",
            CgroupLayout::Missing => "no cgroups",
        })
    }
}

/// What the cgroup probe found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupProbe {
    /// The layout.
    pub layout: CgroupLayout,
    /// Controllers usable for containers: the unified ones on v2, the mounted v1 ones otherwise.
    pub controllers: Vec<String>,
    /// Controllers attached to the unified hierarchy on a hybrid host (crun refuses any).
    pub unified_controllers: Vec<String>,
    /// Whether memory+swap can be limited (v2, or v1 with `memory.memsw.*`).
    pub swap_limit: bool,
}

impl CgroupProbe {
    /// Reads the layout of `/sys/fs/cgroup`.
    pub fn detect() -> Self {
        Self::detect_at(Path::new("/sys/fs/cgroup"))
    }

    /// Reads the layout of a cgroup mount point (a parameter so tests can fake one).
    pub fn detect_at(root: &Path) -> Self {
        if let Some(list) = read(&root.join("cgroup.controllers")) {
            return CgroupProbe {
                layout: CgroupLayout::V2,
                controllers: words(&list),
                unified_controllers: Vec::new(),
                swap_limit: true,
            };
        }
        let v1: Vec<String> = [
            "cpu", "cpuacct", "cpuset", "memory", "pids", "devices", "freezer", "blkio",
        ]
        .into_iter()
        .filter(|c| root.join(c).join("cgroup.procs").is_file())
        .map(String::from)
        .collect();
        if v1.is_empty() {
            return CgroupProbe {
                layout: CgroupLayout::Missing,
                controllers: Vec::new(),
                unified_controllers: Vec::new(),
                swap_limit: false,
            };
        }
        let unified = root.join("unified");
        let layout = if unified.join("cgroup.controllers").is_file() {
            CgroupLayout::Hybrid
        } else {
            CgroupLayout::V1
        };
        CgroupProbe {
            layout,
            unified_controllers: read(&unified.join("cgroup.controllers"))
                .map(|l| words(&l))
                .unwrap_or_default(),
            swap_limit: root.join("memory/memory.memsw.limit_in_bytes").is_file(),
            controllers: v1,
        }
    }

    /// Whether a controller (`memory`, `pids`, `cpu`) is available.
    pub fn has(&self, controller: &str) -> bool {
        self.controllers.iter().any(|c| c == controller)
    }
}

fn words(text: &str) -> Vec<String> {
    text.split_whitespace().map(String::from).collect()
}

fn read(path: &Path) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

/// Where one container's cgroup lives, for reading its counters. `path` is the absolute
/// `cgroupsPath` of the bundle (for example `/lichen/lichen-hello`).
#[cfg(feature = "containers")]
#[derive(Debug, Clone)]
pub(crate) struct CgroupPaths {
    root: PathBuf,
    layout: CgroupLayout,
    path: String,
}

#[cfg(feature = "containers")]
impl CgroupPaths {
    pub(crate) fn new(layout: CgroupLayout, path: &str) -> Self {
        CgroupPaths {
            root: PathBuf::from("/sys/fs/cgroup"),
            layout,
            path: path.trim_start_matches('/').to_string(),
        }
    }

    fn file(&self, controller: &str, v2_name: &str, v1_name: &str) -> Option<PathBuf> {
        match self.layout {
            CgroupLayout::V2 => Some(self.root.join(&self.path).join(v2_name)),
            CgroupLayout::V1 | CgroupLayout::Hybrid => {
                Some(self.root.join(controller).join(&self.path).join(v1_name))
            }
            CgroupLayout::Missing => None,
        }
    }

    /// Bytes of memory charged to the cgroup now.
    pub(crate) fn memory_current(&self) -> Option<u64> {
        let file = self.file("memory", "memory.current", "memory.usage_in_bytes")?;
        read(&file)?.trim().parse().ok()
    }

    /// Processes (tasks) in the cgroup now.
    pub(crate) fn pids_current(&self) -> Option<u64> {
        let file = self.file("pids", "pids.current", "pids.current")?;
        read(&file)?.trim().parse().ok()
    }

    /// How many times the kernel's OOM killer killed a process of this cgroup
    /// (`oom_kill` of `memory.events` on v2, of `memory.oom_control` on v1).
    pub(crate) fn oom_kills(&self) -> Option<u64> {
        let file = self.file("memory", "memory.events", "memory.oom_control")?;
        keyed_value(&read(&file)?, "oom_kill")
    }
}

/// The value of `key` in a flat-keyed cgroup file (`key value` per line).
#[cfg(feature = "containers")]
pub(crate) fn keyed_value(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let mut parts = line.split_whitespace();
        (parts.next() == Some(key))
            .then(|| parts.next()?.parse().ok())
            .flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(feature = "containers")]
    #[test]
    fn reads_oom_kill_from_v1_and_v2_files() {
        let v2 = "low 0\nhigh 0\nmax 12\noom 1\noom_kill 1\noom_group_kill 0\n";
        let v1 = "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n";
        assert_eq!(keyed_value(v2, "oom_kill"), Some(1));
        assert_eq!(keyed_value(v1, "oom_kill"), Some(3));
        assert_eq!(keyed_value(v1, "oom"), None);
    }

    #[test]
    fn tells_v2_v1_hybrid_and_missing_apart() {
        let dir = tempfile::tempdir().expect("temp dir");
        let root = dir.path();
        assert_eq!(CgroupProbe::detect_at(root).layout, CgroupLayout::Missing);

        for c in ["memory", "pids"] {
            std::fs::create_dir_all(root.join(c)).expect("mkdir");
            std::fs::write(root.join(c).join("cgroup.procs"), "").expect("write");
        }
        let v1 = CgroupProbe::detect_at(root);
        assert_eq!(v1.layout, CgroupLayout::V1);
        assert!(v1.has("memory") && v1.has("pids") && !v1.has("cpu"));

        std::fs::create_dir_all(root.join("unified")).expect("mkdir");
        std::fs::write(root.join("unified/cgroup.controllers"), "hugetlb\n").expect("write");
        let hybrid = CgroupProbe::detect_at(root);
        assert_eq!(hybrid.layout, CgroupLayout::Hybrid);
        assert_eq!(hybrid.unified_controllers, vec!["hugetlb".to_string()]);

        std::fs::write(root.join("cgroup.controllers"), "cpu memory pids\n").expect("write");
        let v2 = CgroupProbe::detect_at(root);
        assert_eq!(v2.layout, CgroupLayout::V2);
        assert!(v2.has("cpu") && v2.has("memory") && v2.has("pids"));
    }
}
