//! `lichen bench`: figures for the claims in the README (see there for the command lines).

use anyhow::Result;

use crate::cli::BenchArgs;

/// Runs the benchmarks named in `args`.
pub async fn run(_args: BenchArgs) -> Result<()> {
    anyhow::bail!("benchmarks are being written")
}
