//! Kernel and initrd loaders: the input is a kernel image (ELF vmlinux, bzImage or garbage)
//! loaded with the boot tables into 64 MiB of guest memory. With control bit 0, the input's
//! last N bytes are an initrd, N being the 16-bit number in bytes 1-2; bits 1-3 pick 1 to 8
//! vCPUs for the MP table, bits 4-6 the number of virtio devices in the DSDT, and bit 7
//! turns the ACPI tables off.
// `cargo test` builds every binary as a test harness, which brings its own `main`.
#![cfg_attr(not(test), no_main)]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use rvmm_firmware::acpi::AcpiConfig;
use rvmm_firmware::layout::VirtioSlot;
use rvmm_fuzz::scratch_file;
use rvmm_vmm::boot::{load, BootConfig};
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::tempfile::TempFile;

const MEM_SIZE: u64 = 64 << 20;

/// Memory and files reused across inputs: remapping 64 MiB for each costs more than the load.
struct Rig {
    mem: GuestMemoryMmap,
    kernel: TempFile,
    initrd: TempFile,
}

fn rig() -> &'static Rig {
    static RIG: OnceLock<Rig> = OnceLock::new();
    RIG.get_or_init(|| Rig {
        mem: GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)])
            .expect("guest memory"),
        kernel: scratch_file("kernel"),
        initrd: scratch_file("initrd"),
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&control, rest)) = data.split_first() else {
        return;
    };
    let rig = rig();
    let (kernel, initrd) = match rest {
        [a, b, image @ ..] if control & 1 != 0 => {
            let len = usize::from(u16::from_le_bytes([*a, *b])).min(image.len());
            let (kernel, initrd) = image.split_at(image.len() - len);
            (kernel, Some(initrd))
        }
        _ => (rest, None),
    };
    std::fs::write(rig.kernel.as_path(), kernel).expect("writing the kernel");
    if let Some(initrd) = initrd {
        std::fs::write(rig.initrd.as_path(), initrd).expect("writing the initrd");
    }
    let vcpus = 1 + (control >> 1 & 0x7);
    let devices: Vec<VirtioSlot> = (0..u32::from(control >> 4 & 0x7))
        .filter_map(VirtioSlot::nth)
        .collect();
    let cfg = BootConfig {
        kernel: rig.kernel.as_path(),
        initrd: initrd.map(|_| rig.initrd.as_path()),
        cmdline: "console=ttyS0 panic=1",
        vcpus,
        mem_size: MEM_SIZE,
        acpi: (control & 0x80 == 0).then_some(AcpiConfig {
            num_cpus: vcpus,
            virtio: &devices,
            serial: true,
        }),
    };
    let _ = load(&rig.mem, &cfg);
});
