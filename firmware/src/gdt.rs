//! The boot GDT and IDT for entering the kernel directly in 64-bit mode.
//!
//! The 64-bit boot protocol wants flat segments behind the selectors `__BOOT_CS` (0x10) and
//! `__BOOT_DS` (0x18). KVM takes the segment registers' hidden parts from `KVM_SET_SREGS`, not
//! from memory, but the tables are still written so that what the guest finds when it reads
//! its GDTR agrees with the registers it runs on. The kernel installs its own GDT, IDT and TSS
//! almost immediately.

use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryError, GuestMemoryMmap};

use crate::layout::{BOOT_GDT_ADDR, BOOT_IDT_ADDR};

/// Selector of the 64-bit code segment (`__BOOT_CS`).
pub const BOOT_CS_SELECTOR: u16 = 0x10;
/// Selector of the data segment (`__BOOT_DS`), used for DS, ES, FS, GS and SS.
pub const BOOT_DS_SELECTOR: u16 = 0x18;
/// Selector of the TSS, which VMX requires TR to hold even though nothing uses it.
pub const BOOT_TSS_SELECTOR: u16 = 0x20;
/// GDT slots: null, unused (Linux keeps 0x08 free), code, data, and the 16-byte TSS
/// descriptor that long mode requires for system segments.
pub const GDT_ENTRIES: usize = 6;
/// GDT size in bytes.
pub const GDT_SIZE: usize = GDT_ENTRIES * 8;
/// IDT size in bytes: one long-mode gate, left not-present.
pub const IDT_SIZE: usize = 16;

const _: () = assert!(BOOT_GDT_ADDR + GDT_SIZE as u64 <= BOOT_IDT_ADDR);

/// Size of a 64-bit TSS minus one: the limit of the boot TSS.
const TSS_LIMIT: u32 = 0x67;
/// Code segment type: execute/read, accessed (VMX insists on the accessed bit).
const TYPE_CODE_XRA: u8 = 0xb;
/// Data segment type: read/write, accessed.
const TYPE_DATA_RWA: u8 = 0x3;
/// System segment type: busy 64-bit TSS (the only type VMX accepts in TR in long mode).
const TYPE_TSS_BUSY: u8 = 0xb;

/// Plain mirror of a KVM segment register (the VMM converts it to `kvm_segment`).
///
/// `limit` is the byte-granular limit, as in `kvm_segment`: with `g` set, the descriptor's
/// 20-bit field counts 4 KiB pages and `limit` is that field scaled up.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Segment {
    /// Linear base address.
    pub base: u64,
    /// Byte-granular limit.
    pub limit: u32,
    /// Selector (GDT byte offset; TI and RPL zero here).
    pub selector: u16,
    /// 4-bit type field.
    pub type_: u8,
    /// P: present.
    pub present: u8,
    /// Descriptor privilege level.
    pub dpl: u8,
    /// D/B: default operand size 32-bit (must be 0 for 64-bit code).
    pub db: u8,
    /// S: code/data (1) or system (0) segment.
    pub s: u8,
    /// L: 64-bit code segment.
    pub l: u8,
    /// G: limit counts 4 KiB pages.
    pub g: u8,
    /// AVL: available to software.
    pub avl: u8,
    /// KVM's "unusable" flag (a null or not-present segment).
    pub unusable: u8,
}

impl Segment {
    /// The 8-byte descriptor for this segment (for a system segment in long mode, the low
    /// half of its 16-byte descriptor; the high half is `base >> 32`).
    ///
    /// With `g` set, the low 12 bits of `limit` cannot be represented and are dropped.
    pub fn descriptor(&self) -> u64 {
        let limit = if self.g != 0 {
            self.limit >> 12
        } else {
            self.limit
        };
        let limit = u64::from(limit & 0xf_ffff);
        let base = self.base & 0xffff_ffff;
        let access = u64::from(
            (self.type_ & 0xf) | (self.s & 1) << 4 | (self.dpl & 3) << 5 | (self.present & 1) << 7,
        );
        let flags =
            u64::from((self.avl & 1) | (self.l & 1) << 1 | (self.db & 1) << 2 | (self.g & 1) << 3);
        (limit & 0xffff)
            | (base & 0xff_ffff) << 16
            | access << 40
            | (limit >> 16) << 48
            | flags << 52
            | (base >> 24) << 56
    }

    /// Decodes an 8-byte descriptor found at `selector`; the inverse of [`Self::descriptor`].
    pub fn from_descriptor(selector: u16, raw: u64) -> Self {
        let bits = |shift: u32, width: u32| ((raw >> shift) & ((1 << width) - 1)) as u8;
        let g = bits(55, 1);
        let field = ((raw & 0xffff) | ((raw >> 48) & 0xf) << 16) as u32;
        let limit = if g != 0 { field << 12 | 0xfff } else { field };
        let present = bits(47, 1);
        Self {
            base: ((raw >> 16) & 0xff_ffff) | ((raw >> 56) & 0xff) << 24,
            limit,
            selector,
            type_: bits(40, 4),
            present,
            dpl: bits(45, 2),
            db: bits(54, 1),
            s: bits(44, 1),
            l: bits(53, 1),
            g,
            avl: bits(52, 1),
            unusable: u8::from(present == 0),
        }
    }
}

/// What to load into the segment registers, GDTR and IDTR.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BootSegments {
    /// CS.
    pub code: Segment,
    /// DS, ES, FS, GS and SS.
    pub data: Segment,
    /// TR.
    pub tss: Segment,
    /// GDTR base.
    pub gdt_base: u64,
    /// GDTR limit.
    pub gdt_limit: u16,
    /// IDTR base.
    pub idt_base: u64,
    /// IDTR limit.
    pub idt_limit: u16,
}

/// Errors from writing the boot GDT/IDT.
#[derive(Debug, Error)]
pub enum GdtError {
    /// Usually: guest memory does not cover the tables.
    #[error("failed to write the boot GDT/IDT to guest memory")]
    Write(#[source] GuestMemoryError),
}

/// The flat segments the 64-bit boot protocol expects.
pub fn boot_segments() -> BootSegments {
    let flat = Segment {
        base: 0,
        limit: 0xffff_ffff,
        present: 1,
        s: 1,
        g: 1,
        ..Default::default()
    };
    BootSegments {
        code: Segment {
            selector: BOOT_CS_SELECTOR,
            type_: TYPE_CODE_XRA,
            l: 1,
            ..flat
        },
        data: Segment {
            selector: BOOT_DS_SELECTOR,
            type_: TYPE_DATA_RWA,
            db: 1,
            ..flat
        },
        tss: Segment {
            base: 0,
            limit: TSS_LIMIT,
            selector: BOOT_TSS_SELECTOR,
            type_: TYPE_TSS_BUSY,
            present: 1,
            ..Default::default()
        },
        gdt_base: BOOT_GDT_ADDR,
        gdt_limit: (GDT_SIZE - 1) as u16,
        idt_base: BOOT_IDT_ADDR,
        idt_limit: (IDT_SIZE - 1) as u16,
    }
}

/// Writes the boot GDT at [`BOOT_GDT_ADDR`] and an empty IDT at [`BOOT_IDT_ADDR`]; returns
/// the segments to load.
///
/// The IDT's only gate is not present: interrupts are disabled at entry, and any exception
/// before the kernel sets up its own IDT should stop the guest (triple fault) rather than
/// jump somewhere arbitrary.
pub fn write_boot_gdt(mem: &GuestMemoryMmap) -> Result<BootSegments, GdtError> {
    let segs = boot_segments();
    let mut gdt = [0u64; GDT_ENTRIES];
    for seg in [segs.code, segs.data] {
        gdt[usize::from(seg.selector) / 8] = seg.descriptor();
    }
    let tss_slot = usize::from(segs.tss.selector) / 8;
    gdt[tss_slot] = segs.tss.descriptor();
    gdt[tss_slot + 1] = segs.tss.base >> 32;

    let bytes: Vec<u8> = gdt.iter().flat_map(|d| d.to_le_bytes()).collect();
    mem.write_slice(&bytes, GuestAddress(BOOT_GDT_ADDR))
        .map_err(GdtError::Write)?;
    mem.write_slice(&[0u8; IDT_SIZE], GuestAddress(BOOT_IDT_ADDR))
        .map_err(GdtError::Write)?;
    Ok(segs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap()
    }

    fn read_gdt(m: &GuestMemoryMmap) -> [u64; GDT_ENTRIES] {
        let mut gdt = [0u64; GDT_ENTRIES];
        for (i, d) in gdt.iter_mut().enumerate() {
            *d = m
                .read_obj(GuestAddress(BOOT_GDT_ADDR + 8 * i as u64))
                .unwrap();
        }
        gdt
    }

    #[test]
    fn descriptors_decode_back_to_the_returned_segments() {
        let m = mem();
        let segs = write_boot_gdt(&m).unwrap();
        let gdt = read_gdt(&m);
        for seg in [segs.code, segs.data, segs.tss] {
            let raw = gdt[usize::from(seg.selector) / 8];
            assert_eq!(Segment::from_descriptor(seg.selector, raw), seg);
        }
    }

    #[test]
    fn descriptor_values_are_the_architectural_ones() {
        let m = mem();
        write_boot_gdt(&m).unwrap();
        let gdt = read_gdt(&m);
        assert_eq!(gdt[0], 0);
        assert_eq!(gdt[1], 0);
        // 64-bit code: P, DPL 0, S, type 0xb; G and L; 4 GiB limit.
        assert_eq!(gdt[2], 0x00af_9b00_0000_ffff);
        // Data: P, DPL 0, S, type 3; G and D/B.
        assert_eq!(gdt[3], 0x00cf_9300_0000_ffff);
        // Busy 64-bit TSS, byte granular, 0x68 bytes; upper half (base 63:32) zero.
        assert_eq!(gdt[4], 0x0000_8b00_0000_0067);
        assert_eq!(gdt[5], 0);
    }

    #[test]
    fn segments_follow_the_boot_protocol() {
        let segs = write_boot_gdt(&mem()).unwrap();
        assert_eq!(segs.code.selector, 0x10);
        assert_eq!(segs.data.selector, 0x18);
        assert_eq!((segs.code.l, segs.code.db), (1, 0));
        assert_eq!((segs.data.l, segs.data.db), (0, 1));
        for seg in [segs.code, segs.data] {
            assert_eq!((seg.base, seg.limit, seg.g), (0, 0xffff_ffff, 1));
            assert_eq!((seg.present, seg.s, seg.dpl, seg.unusable), (1, 1, 0, 0));
            assert_eq!(seg.type_ & 1, 1, "accessed bit");
        }
        assert_eq!((segs.tss.s, segs.tss.present, segs.tss.type_), (0, 1, 0xb));
        assert_eq!(segs.gdt_base, BOOT_GDT_ADDR);
        assert_eq!(usize::from(segs.gdt_limit), GDT_SIZE - 1);
        assert_eq!(segs.idt_base, BOOT_IDT_ADDR);
        assert_eq!(usize::from(segs.idt_limit), IDT_SIZE - 1);
        // Every selector lies inside the GDT limit, the TSS's upper half included.
        assert!(usize::from(segs.tss.selector) + 15 <= usize::from(segs.gdt_limit));
    }

    #[test]
    fn idt_is_cleared() {
        let m = mem();
        m.write_slice(&[0xff; 64], GuestAddress(BOOT_IDT_ADDR))
            .unwrap();
        write_boot_gdt(&m).unwrap();
        let mut idt = [0xffu8; IDT_SIZE];
        m.read_slice(&mut idt, GuestAddress(BOOT_IDT_ADDR)).unwrap();
        assert_eq!(idt, [0u8; IDT_SIZE]);
    }

    #[test]
    fn descriptor_round_trip_for_odd_segments() {
        let seg = Segment {
            base: 0x1234_5678,
            limit: 0xabcde,
            selector: 0x2b,
            type_: 0x7,
            present: 1,
            dpl: 3,
            db: 1,
            s: 1,
            l: 0,
            g: 0,
            avl: 1,
            unusable: 0,
        };
        assert_eq!(Segment::from_descriptor(0x2b, seg.descriptor()), seg);
        let absent = Segment {
            unusable: 1,
            ..Default::default()
        };
        assert_eq!(Segment::from_descriptor(0, absent.descriptor()), absent);
    }

    #[test]
    fn memory_too_small_is_an_error() {
        let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x510)]).unwrap();
        assert!(matches!(write_boot_gdt(&m), Err(GdtError::Write(_))));
        let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x538)]).unwrap();
        assert!(matches!(write_boot_gdt(&m), Err(GdtError::Write(_))));
    }
}
