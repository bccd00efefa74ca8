//! `rvmm bench`: what a microVM costs next to a container and a plain process.

use std::process::ExitCode;

/// Options of `rvmm bench`.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {}

pub fn main(_args: BenchArgs) -> Result<ExitCode, String> {
    Err("rvmm bench is not implemented yet".into())
}
