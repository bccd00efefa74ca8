//! rvmm-oci: the runc-compatible runtime binary; see `rvmm_oci`.

use std::process::ExitCode;

use clap::Parser;
use rvmm::oci_cli::OciCli;

fn main() -> ExitCode {
    let cli = match OciCli::try_parse() {
        Ok(cli) => cli,
        // --help and --version print as usual.
        Err(e) if !e.use_stderr() => e.exit(),
        Err(e) => {
            let first = e.to_string();
            let first = first.lines().next().unwrap_or_default();
            let first = first.strip_prefix("error: ").unwrap_or(first);
            rvmm_oci::log_error(first);
            return ExitCode::FAILURE;
        }
    };
    let (global, command) = cli.into_parts();
    ExitCode::from(rvmm_oci::main(global, command))
}
