//! A/B system updates for Lichen boards, owned by the agent: a board has two read-only root
//! slots, and an update writes the one not running, boots it once, and keeps it only if it
//! proves healthy; anything else (a failed check, a crash, a hang, a power cut) falls back to
//! the slot that ran before.
//!
//! - [`bootstate`]: the boot loader's state in RAUC's variables (`BOOT_ORDER`,
//!   `BOOT_A_LEFT`, `BOOT_B_LEFT`), through adapters for GRUB, U-Boot and Raspberry Pi
//!   `tryboot`; every write read back.
//! - [`bundle`]: update bundles (a root image and a manifest signed with ed25519), checked
//!   before anything is written; the signature code is passed in ([`bundle::Verifier`],
//!   [`bundle::Signer`]).
//! - [`writer`]: the slot writer (stream, hash, flush, read back, trailer).
//! - [`journal`]: what an update is doing, kept on the data partition.
//! - [`board`]: the order of all the writes, and what each start of the agent means.
//! - [`health`]: the first-boot health check as plain decisions.
//! - [`config`]: the `[update]` section of the agent configuration.
//!
//! ```no_run
//! # fn demo(config: &lichen_update::config::UpdateConfig, keys: &dyn lichen_update::bundle::Verifier)
//! # -> Result<(), lichen_update::board::UpdateError> {
//! use std::path::Path;
//! let board = lichen_update::board::Board::open(config, Path::new("/data/lichen"))?;
//! let bundle = board.verify(Path::new("/mnt/usb/v2.lub"), keys)?;
//! let report = board.apply(&bundle, 0, &mut |_bytes| {})?;
//! println!("slot {} holds {}: reboot to try it", report.slot, report.version);
//! # Ok(()) }
//! ```

pub mod board;
pub mod bootstate;
pub mod bundle;
pub mod config;
pub mod health;
pub mod journal;
pub mod slot;
pub mod writer;
