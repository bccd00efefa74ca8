use std::process::ExitCode;

use clap::Parser;
use rvmm::cli::{Cli, Command, RestoreArgs, VmArgs};
use rvmm::shared_cli;
use rvmm_vmm::config::{VmConfig, VmParams};
use rvmm_vmm::error_chain;
use rvmm_vmm::terminal::RawTerminal;
use rvmm_vmm::vmm::{VmExit, Vmm};

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
    let result = match cli.command {
        Some(Command::Run(args)) => rvmm_container::run(&args.into())
            .map(ExitCode::from)
            .map_err(|e| error_chain(&e)),
        Some(Command::Bench(args)) => rvmm_bench::main(args.into()),
        Some(Command::Vm(command)) => shared_cli::vm(command),
        Some(Command::Exec(args)) => shared_cli::exec(args),
        Some(Command::Ps(args)) => shared_cli::ps(args),
        Some(Command::Stop(args)) => shared_cli::stop(args),
        Some(Command::Kill(args)) => shared_cli::kill(args),
        Some(Command::Restore(args)) => restore(args),
        None => boot(cli.vm),
    };
    result.unwrap_or_else(|msg| {
        eprintln!("rvmm: error: {msg}");
        ExitCode::FAILURE
    })
}

fn boot(args: VmArgs) -> Result<ExitCode, String> {
    let cfg = VmConfig::try_from(VmParams::from(args)).map_err(|e| error_chain(&e))?;
    run(Vmm::build(&cfg).map_err(|e| error_chain(&e))?)
}

fn restore(args: RestoreArgs) -> Result<ExitCode, String> {
    let dir = args.dir.clone();
    run(Vmm::restore(&dir, &args.into()).map_err(|e| error_chain(&e))?)
}

/// Runs a built VM to its end; its end becomes the exit status.
fn run(vmm: Vmm) -> Result<ExitCode, String> {
    let _terminal = RawTerminal::enter();
    match vmm.run().map_err(|e| error_chain(&e))? {
        VmExit::Guest => Ok(ExitCode::SUCCESS),
        // The shell convention for "ended by signal N".
        VmExit::Signal(signo) => Ok(ExitCode::from(128 + signo as u8)),
        VmExit::Panic(line) => {
            match line {
                Some(line) => eprintln!("rvmm: error: the guest kernel panicked: {line}"),
                None => eprintln!("rvmm: error: the guest kernel panicked"),
            }
            Ok(ExitCode::from(GUEST_PANIC_STATUS))
        }
    }
}

/// The exit status when the guest kernel panicked (README: exit status).
const GUEST_PANIC_STATUS: u8 = 3;

/// clap's message up to its first blank line (the usage hint after it is dropped), on one line.
fn one_line(clap_msg: &str) -> String {
    let first: Vec<&str> = clap_msg
        .lines()
        .take_while(|l| !l.trim().is_empty())
        .map(str::trim)
        .collect();
    first.join(" ").trim_start_matches("error: ").to_string()
}
