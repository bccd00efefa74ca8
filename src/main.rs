use std::process::ExitCode;

use clap::Parser;
use rvmm::config::{Cli, VmConfig};
use rvmm::terminal::RawTerminal;
use rvmm::vmm::{VmExit, Vmm};

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
        .format(|buf, record| {
            use std::io::Write;
            let level = record.level().as_str().to_lowercase();
            writeln!(buf, "rvmm: {level}: {}", record.args())
        })
        .init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(VmExit::Guest) => ExitCode::SUCCESS,
        // The shell convention for "ended by signal N".
        Ok(VmExit::Signal(signo)) => ExitCode::from(128 + signo as u8),
        Err(msg) => {
            eprintln!("rvmm: error: {msg}");
            ExitCode::FAILURE
        }
    }
}

/// Every failure becomes one line: the error and its causes joined by ": ".
fn run(cli: Cli) -> Result<VmExit, String> {
    let cfg = VmConfig::try_from(cli).map_err(|e| error_chain(&e))?;
    let vmm = Vmm::build(&cfg).map_err(|e| error_chain(&e))?;
    let _terminal = RawTerminal::enter();
    vmm.run().map_err(|e| error_chain(&e))
}

fn error_chain(err: &dyn std::error::Error) -> String {
    let mut msg = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        msg = format!("{msg}: {cause}");
        source = cause.source();
    }
    msg
}
