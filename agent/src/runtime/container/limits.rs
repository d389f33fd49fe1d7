//! Bounds on what one OCI image may unpack, and what to do with set-uid files: the
//! `[images]` section of the agent config. Every bound is checked before the data it limits
//! is written, and each error names its config key.

/// What to do with set-uid and set-gid regular files in an image (`images.setuid`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SetuidPolicy {
    /// Refuse the image, naming the file (the default).
    #[default]
    Refuse,
    /// Import the file with the set-uid and set-gid bits cleared.
    Strip,
    /// Keep the bits (containers still run with `no_new_privileges`).
    Keep,
}

/// Bounds on what one image may unpack, and the set-uid policy (`[images]` in the agent
/// config). Every bound is checked before the data it limits is written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageLimits {
    /// Bytes written by all layers of one image together (`images.max-unpacked`).
    pub max_unpacked_bytes: u64,
    /// Size of one file (`images.max-file`).
    pub max_file_bytes: u64,
    /// Tar entries of all layers together, whiteouts and directories included
    /// (`images.max-entries`).
    pub max_entries: u64,
    /// Bytes of one entry's path or link target (`images.max-path`).
    pub max_path_bytes: usize,
    /// Components of one entry's path (`images.max-depth`).
    pub max_depth: usize,
    /// Set-uid and set-gid files (`images.setuid`).
    pub setuid: SetuidPolicy,
}

impl Default for ImageLimits {
    fn default() -> Self {
        ImageLimits {
            max_unpacked_bytes: 2 << 30,
            max_file_bytes: 1 << 30,
            max_entries: 200_000,
            max_path_bytes: 4096,
            max_depth: 128,
            setuid: SetuidPolicy::Refuse,
        }
    }
}
