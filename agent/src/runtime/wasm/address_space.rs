//! Sizing the instance pool to the virtual address space the process really has.
//!
//! The pooling allocator reserves every slot's linear memories, stack and tables up front,
//! when the engine is built. A board's kernel may give user space only 39 bits (256 GiB on
//! Sv39 RISC-V, 512 GiB on 39-bit arm64 kernels) and `ulimit -v` (RLIMIT_AS) may allow less:
//! a pool that does not fit would stop the agent from starting. So the agent measures what it
//! may map, lowers the pool's instance count to fit (with a warning), and `lichen doctor` says
//! the figures.

use super::engine::EngineOptions;

/// Address space kept for everything but the pool: thread stacks, malloc arenas, SQLite,
/// the code. Generous, since running out of it later fails far from its cause.
pub const HEADROOM_BYTES: u64 = 2 << 30;

/// What a pool slot reserves besides its linear memories and tables: a fiber stack (Wasmtime's
/// default async stack, 2 MiB, plus its guard). Tables: [`EngineOptions::table_bytes_per_instance`].
const STACK_AND_TABLES_BYTES: u64 = (2 << 20) + (64 << 10);

/// The virtual address space the process may map, as measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AddressSpace {
    /// RLIMIT_AS (`ulimit -v`), if set.
    pub limit: Option<u64>,
    /// Bits of user virtual address space the kernel gives (from the highest mapping).
    pub user_bits: Option<u32>,
    /// Address space the process maps already.
    pub in_use: u64,
}

impl AddressSpace {
    /// Measures this process: `getrlimit(RLIMIT_AS)`, `/proc/self/maps` and `VmSize`.
    pub fn probe() -> Self {
        let limit = rustix::process::getrlimit(rustix::process::Resource::As).current;
        let user_bits = std::fs::read_to_string("/proc/self/maps")
            .ok()
            .and_then(|maps| user_bits(&maps));
        let in_use = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|status| vm_size(&status))
            .unwrap_or(0);
        Self {
            limit,
            user_bits,
            in_use,
        }
    }

    /// Bytes the pool may reserve: the smaller of the limit and user space, less what is
    /// mapped and [`HEADROOM_BYTES`]. `None` when nothing bounds it that the agent can see.
    pub fn for_pool(&self) -> Option<u64> {
        let space = self.user_bits.map(|bits| 1u64 << bits.min(63));
        let bound = match (self.limit, space) {
            (Some(a), Some(b)) => a.min(b),
            (a, b) => a.or(b)?,
        };
        Some(
            bound
                .saturating_sub(self.in_use)
                .saturating_sub(HEADROOM_BYTES),
        )
    }
}

/// The user address-space width: the bit length of the highest user mapping's end (the
/// stack sits near the top of user space). Kernel mappings (x86_64's `[vsyscall]`) are
/// skipped.
fn user_bits(maps: &str) -> Option<u32> {
    maps.lines()
        .filter(|line| !line.ends_with("[vsyscall]"))
        .filter_map(|line| {
            let range = line.split_whitespace().next()?;
            let (_, end) = range.split_once('-')?;
            u64::from_str_radix(end, 16).ok()
        })
        .filter(|end| *end < 1 << 63)
        .max()
        .map(|end| u64::BITS - (end - 1).leading_zeros())
}

/// `VmSize` of `/proc/self/status`, in bytes.
fn vm_size(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmSize:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// How the pool was sized.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolFit {
    /// Instances the configuration asks for.
    pub configured: u32,
    /// Instances that fit (equal to `configured` when all do).
    pub fitted: u32,
    /// Address space one instance slot reserves.
    pub per_instance: u64,
    /// Address space the pool may reserve (`None`: unbounded as far as the agent sees).
    pub available: Option<u64>,
}

impl PoolFit {
    /// Whether the pool was made smaller than configured.
    pub fn lowered(&self) -> bool {
        self.fitted < self.configured
    }

    /// One sentence for the log and `lichen doctor`.
    pub fn describe(&self, space: &AddressSpace) -> String {
        let human = crate::util::human_bytes;
        let bounds = match (space.limit, space.user_bits) {
            (Some(limit), Some(bits)) => {
                format!("ulimit -v {}, {bits}-bit user space", human(limit))
            }
            (Some(limit), None) => format!("ulimit -v {}", human(limit)),
            (None, Some(bits)) => format!("no ulimit -v, {bits}-bit user space"),
            (None, None) => "no bound seen".to_string(),
        };
        let available = self
            .available
            .map_or_else(|| "unbounded".to_string(), human);
        let pool = human(u64::from(self.fitted).saturating_mul(self.per_instance));
        if self.lowered() {
            format!(
                "wasm.max-instances = {} does not fit: the pool holds {} instances ({pool}, {} per slot) in the {available} this process may map ({bounds})",
                self.configured,
                self.fitted,
                human(self.per_instance)
            )
        } else {
            format!(
                "the pool of {} instances reserves {pool} ({} per slot) of the {available} this process may map ({bounds})",
                self.fitted,
                human(self.per_instance)
            )
        }
    }
}

impl EngineOptions {
    /// Address space one instance slot of the pool reserves: its linear memories with their
    /// guards, its stack and its tables.
    pub fn reserved_bytes_per_instance(&self) -> u64 {
        self.reserved_memory_bytes() / u64::from(self.max_instances.max(1))
            + STACK_AND_TABLES_BYTES
            + self.table_bytes_per_instance()
    }

    /// Address space the table slots of one instance slot reserve: 8 bytes per element of
    /// each of its tables.
    pub fn table_bytes_per_instance(&self) -> u64 {
        u64::from(self.tables_per_component.clamp(4, 8))
            .saturating_mul(u64::from(self.table_elements))
            .saturating_mul(8)
    }

    /// These options with `max_instances` lowered to what fits in `space` (at least one).
    pub fn fit_to(&self, space: &AddressSpace) -> (EngineOptions, PoolFit) {
        let per_instance = self.reserved_bytes_per_instance();
        let available = space.for_pool();
        let fitting = available.map_or(u64::MAX, |bytes| bytes / per_instance.max(1));
        let fitted = u32::try_from(fitting)
            .unwrap_or(u32::MAX)
            .clamp(1, self.max_instances.max(1));
        let options = EngineOptions {
            max_instances: fitted,
            ..*self
        };
        let fit = PoolFit {
            configured: self.max_instances,
            fitted,
            per_instance,
            available,
        };
        (options, fit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_bits_come_from_the_highest_user_mapping() {
        let x86 = "55d0c0000000-55d0c0021000 r--p 00000000 08:01 1 /bin/x\n\
                   7ffc1a2b3000-7ffc1a2d4000 rw-p 00000000 00:00 0 [stack]\n\
                   ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0 [vsyscall]";
        assert_eq!(user_bits(x86), Some(47));
        let arm64_39 = "5580000000-5580001000 r-xp 00000000 b3:02 1 /bin/x\n\
                        7fd4e61000-7fd4e82000 rw-p 00000000 00:00 0 [stack]";
        assert_eq!(user_bits(arm64_39), Some(39));
        assert_eq!(
            vm_size("Name:\tx\nVmSize:\t   12345 kB\n"),
            Some(12345 * 1024)
        );
    }

    #[test]
    fn a_pool_too_big_for_the_limit_is_lowered_and_says_so() {
        let options = EngineOptions::default();
        let space = AddressSpace {
            limit: Some(64 << 30),
            user_bits: Some(47),
            in_use: 1 << 30,
        };
        let (fitted, fit) = options.fit_to(&space);
        assert!(fit.lowered(), "{fit:?}");
        assert_eq!(fitted.max_instances, fit.fitted);
        let reserved = u64::from(fit.fitted) * fit.per_instance;
        assert!(reserved <= (64u64 << 30) - (1 << 30) - HEADROOM_BYTES);
        assert!(reserved + fit.per_instance > (64u64 << 30) - (1 << 30) - HEADROOM_BYTES);
        let text = fit.describe(&space);
        assert!(
            text.contains("wasm.max-instances = 1024 does not fit"),
            "{text}"
        );
        assert!(
            text.contains(&format!("holds {} instances", fit.fitted)),
            "{text}"
        );

        // Without a limit, 47 bits hold the whole configured pool.
        let (same, fit) = options.fit_to(&AddressSpace {
            limit: None,
            ..space
        });
        assert!(!fit.lowered());
        assert_eq!(same, options);
    }
}
