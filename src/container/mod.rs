//! `rvmm run`: a container image run inside a fresh microVM.

use std::process::ExitCode;

/// Options of `rvmm run`.
#[derive(Debug, clap::Args)]
pub struct RunArgs {}

pub fn main(_args: RunArgs) -> Result<ExitCode, String> {
    Err("rvmm run is not implemented yet".into())
}
