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
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // --help and --version print as usual.
        Err(e) if !e.use_stderr() => e.exit(),
        Err(e) => {
            eprintln!("rvmm: error: {}", one_line(&e.to_string()));
            return ExitCode::FAILURE;
        }
    };
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

/// clap's message up to its first blank line (the usage hint after it is dropped), on one line.
fn one_line(clap_msg: &str) -> String {
    let first: Vec<&str> = clap_msg
        .lines()
        .take_while(|l| !l.trim().is_empty())
        .map(str::trim)
        .collect();
    first.join(" ").trim_start_matches("error: ").to_string()
}

fn error_chain(err: &dyn std::error::Error) -> String {
    let mut msg = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        // Some errors repeat their cause in their own message.
        let cause_msg = cause.to_string();
        if !msg.ends_with(&cause_msg) {
            msg = format!("{msg}: {cause_msg}");
        }
        source = cause.source();
    }
    msg
}
