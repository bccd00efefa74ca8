//! Command-line configuration: the input is NUL-separated arguments, each turned into one of
//! rvmm's options by its first byte (`--disk`, `--net`, `--vsock`, `--cmdline`, …) with the
//! rest as its value. Each value is also parsed alone by the spec parsers, and an accepted
//! configuration's command line is written into guest memory the way a boot does it.
// `cargo test` builds every binary as a test harness, which brings its own `main`.
#![cfg_attr(not(test), no_main)]

use std::ffi::OsString;
use std::os::unix::ffi::OsStrExt;
use std::sync::OnceLock;

use clap::Parser;
use libfuzzer_sys::fuzz_target;
use rvmm::cli::Cli;
use rvmm_firmware::acpi::AcpiConfig;
use rvmm_fuzz::scratch_file;
use rvmm_vmm::boot::{load, BootConfig};
use rvmm_vmm::config::{DiskConfig, NetConfig, VmConfig, VmParams, VsockConfig};
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::tempfile::TempFile;

const MEM_SIZE: u64 = 64 << 20;
/// The smallest loadable kernel: the loader target's seed after its control byte.
const KERNEL_SEED: &[u8] = include_bytes!("../../seeds/boot_loader/elf-minimal");
const OPTIONS: [&str; 10] = [
    "--disk",
    "--net",
    "--vsock",
    "--cmdline",
    "--rootfs",
    "--memory",
    "--cpus",
    "--console",
    "--cpu-template",
    "--initrd",
];

struct Rig {
    mem: GuestMemoryMmap,
    kernel: TempFile,
}

fn rig() -> &'static Rig {
    static RIG: OnceLock<Rig> = OnceLock::new();
    RIG.get_or_init(|| {
        let kernel = scratch_file("kernel");
        std::fs::write(kernel.as_path(), &KERNEL_SEED[1..]).expect("writing the kernel");
        Rig {
            mem: GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)])
                .expect("guest memory"),
            kernel,
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let rig = rig();
    let mut args: Vec<OsString> = vec!["rvmm".into(), "--kernel".into()];
    args.push(rig.kernel.as_path().into());
    for arg in data.split(|&b| b == 0) {
        let Some((&which, value)) = arg.split_first() else {
            continue;
        };
        if let Ok(spec) = std::str::from_utf8(value) {
            let _ = spec.parse::<DiskConfig>();
            let _ = spec.parse::<NetConfig>();
            let _ = spec.parse::<VsockConfig>();
        }
        match OPTIONS.get(usize::from(which)) {
            Some(option) => args.push(option.into()),
            // Anything else passes the value as a bare argument.
            None if which == 0xff => {}
            None => continue,
        }
        args.push(std::ffi::OsStr::from_bytes(value).into());
    }
    let Ok(cli) = Cli::try_parse_from(args) else {
        return;
    };
    // `rvmm run` and `rvmm bench` have their own parsers.
    if cli.command.is_some() {
        return;
    }
    let Ok(cfg) = VmConfig::try_from(VmParams::from(cli.vm)) else {
        return;
    };
    let boot = BootConfig {
        kernel: rig.kernel.as_path(),
        initrd: None,
        cmdline: cfg.cmdline.as_str(),
        vcpus: cfg.vcpus,
        mem_size: MEM_SIZE,
        acpi: cfg.acpi.then_some(AcpiConfig {
            num_cpus: cfg.vcpus,
            virtio: &[],
            serial: true,
        }),
    };
    let _ = load(&rig.mem, &boot);
});
