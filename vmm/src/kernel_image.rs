//! Checks a kernel file before it is loaded: the loader would copy an ELF for another machine
//! into guest memory and jump into it, and load a truncated image as far as it goes. Both are
//! refused here with a line that says what is wrong.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};

const ELF_MAGIC: [u8; 4] = *b"\x7fELF";
/// "HdrS" at offset 0x202 marks a bzImage (Linux boot protocol ≥ 2.00).
const BZIMAGE_MAGIC_OFFSET: u64 = 0x202;
const BZIMAGE_MAGIC: [u8; 4] = *b"HdrS";
const ELFCLASS64: u8 = 2;
const ELFDATA2LSB: u8 = 1;
const EM_X86_64: u16 = 62;
const PT_LOAD: u32 = 1;
const ELF_HEADER_LEN: usize = 64;
const PHDR_LEN: usize = 56;
/// The bzImage setup header fields rvmm needs (Linux boot protocol, offsets in the file).
const BZ_SETUP_SECTS: usize = 0x1f1;
const BZ_SYSSIZE: usize = 0x1f4;
const BZ_HEADER_END: usize = 0x1f8;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KernelImageError {
    #[error("neither an ELF vmlinux nor a bzImage")]
    UnknownFormat,
    #[error("cannot read it: {0}")]
    Read(String),
    #[error("a 32-bit ELF; rvmm boots 64-bit x86-64 kernels")]
    Elf32,
    #[error("a big-endian ELF; rvmm boots x86-64 kernels")]
    BigEndian,
    #[error("an ELF for {0}, not x86-64")]
    Machine(String),
    #[error("truncated: {0}")]
    Truncated(String),
}

/// The kernel formats rvmm boots.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelFormat {
    Elf,
    BzImage,
}

/// Tells the two formats apart by their magic numbers and checks the image is one rvmm can
/// boot.
pub fn inspect(file: &mut File) -> Result<KernelFormat, KernelImageError> {
    if read_array(file, 0) == Ok(ELF_MAGIC) {
        check_elf(file)?;
        return Ok(KernelFormat::Elf);
    }
    if read_array(file, BZIMAGE_MAGIC_OFFSET) == Ok(BZIMAGE_MAGIC) {
        check_bzimage(file)?;
        return Ok(KernelFormat::BzImage);
    }
    Err(KernelImageError::UnknownFormat)
}

/// Checks an ELF vmlinux: 64-bit little-endian x86-64, every loadable segment in the file.
fn check_elf(file: &mut File) -> Result<(), KernelImageError> {
    let len = file_len(file)?;
    let header: [u8; ELF_HEADER_LEN] = read_array(file, 0)
        .map_err(|_| truncated(format!("{len} bytes, shorter than an ELF header")))?;
    if header[4] != ELFCLASS64 {
        return Err(KernelImageError::Elf32);
    }
    if header[5] != ELFDATA2LSB {
        return Err(KernelImageError::BigEndian);
    }
    let machine = u16_at(&header, 18);
    if machine != EM_X86_64 {
        return Err(KernelImageError::Machine(machine_name(machine)));
    }
    let phoff = u64_at(&header, 32);
    let phentsize = usize::from(u16_at(&header, 54));
    let phnum = u64::from(u16_at(&header, 56));
    if phentsize != PHDR_LEN {
        return Err(truncated(format!("bad program header size {phentsize}")));
    }
    let table_end = phoff.saturating_add(phnum * PHDR_LEN as u64);
    if table_end > len {
        return Err(truncated(format!(
            "program headers end at byte {table_end}, the file has {len}"
        )));
    }
    for i in 0..phnum {
        let phdr: [u8; PHDR_LEN] = read_array(file, phoff + i * PHDR_LEN as u64)?;
        if u32_at(&phdr, 0) != PT_LOAD {
            continue;
        }
        let end = u64_at(&phdr, 8).saturating_add(u64_at(&phdr, 32));
        if end > len {
            return Err(truncated(format!(
                "segment {i} ends at byte {end}, the file has {len}"
            )));
        }
    }
    Ok(())
}

/// Checks a bzImage: the setup sectors and the protected-mode kernel they announce are all
/// in the file.
fn check_bzimage(file: &mut File) -> Result<(), KernelImageError> {
    let len = file_len(file)?;
    let header: [u8; BZ_HEADER_END] = read_array(file, 0)
        .map_err(|_| truncated(format!("{len} bytes, shorter than a bzImage header")))?;
    // Boot protocol: a setup_sects of 0 means 4.
    let setup_sects = match header[BZ_SETUP_SECTS] {
        0 => 4,
        n => u64::from(n),
    };
    let syssize = u64::from(u32_at(&header, BZ_SYSSIZE));
    let needed = (setup_sects + 1) * 512 + syssize * 16;
    if needed > len {
        return Err(truncated(format!(
            "the header announces {needed} bytes, the file has {len}"
        )));
    }
    Ok(())
}

fn truncated(what: String) -> KernelImageError {
    KernelImageError::Truncated(what)
}

fn file_len(file: &File) -> Result<u64, KernelImageError> {
    file.metadata()
        .map(|m| m.len())
        .map_err(|e| KernelImageError::Read(e.to_string()))
}

fn read_array<const N: usize>(file: &mut File, offset: u64) -> Result<[u8; N], KernelImageError> {
    let mut buf = [0u8; N];
    file.seek(SeekFrom::Start(offset))
        .and_then(|_| file.read_exact(&mut buf))
        .map_err(|e| KernelImageError::Read(e.to_string()))?;
    Ok(buf)
}

fn machine_name(machine: u16) -> String {
    match machine {
        3 => "i386".into(),
        40 => "arm".into(),
        183 => "aarch64".into(),
        243 => "riscv".into(),
        n => format!("machine {n}"),
    }
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(v)
}

/// A minimal x86-64 ELF whose one PT_LOAD segment has `filesz` bytes at offset 0x1000 (the
/// file itself stops after the program header).
#[cfg(test)]
pub(crate) fn test_elf(filesz: u64) -> Vec<u8> {
    let mut b = vec![0u8; ELF_HEADER_LEN + PHDR_LEN];
    b[..4].copy_from_slice(b"\x7fELF");
    b[4] = ELFCLASS64;
    b[5] = ELFDATA2LSB;
    b[18..20].copy_from_slice(&EM_X86_64.to_le_bytes());
    b[32..40].copy_from_slice(&(ELF_HEADER_LEN as u64).to_le_bytes());
    b[54..56].copy_from_slice(&(PHDR_LEN as u16).to_le_bytes());
    b[56..58].copy_from_slice(&1u16.to_le_bytes());
    let ph = ELF_HEADER_LEN;
    b[ph..ph + 4].copy_from_slice(&PT_LOAD.to_le_bytes());
    b[ph + 8..ph + 16].copy_from_slice(&0x1000u64.to_le_bytes());
    b[ph + 32..ph + 40].copy_from_slice(&filesz.to_le_bytes());
    b
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::tempfile::TempFile;

    fn elf(filesz: u64) -> Vec<u8> {
        test_elf(filesz)
    }

    fn check(
        bytes: &[u8],
        f: fn(&mut File) -> Result<(), KernelImageError>,
    ) -> Result<(), KernelImageError> {
        let t = TempFile::new().unwrap();
        std::fs::write(t.as_path(), bytes).unwrap();
        f(&mut File::open(t.as_path()).unwrap())
    }

    #[test]
    fn accepts_a_complete_x86_64_elf() {
        let mut b = elf(16);
        b.resize(0x1010, 0);
        assert_eq!(check(&b, check_elf), Ok(()));
        let t = TempFile::new().unwrap();
        std::fs::write(t.as_path(), &b).unwrap();
        let format = inspect(&mut File::open(t.as_path()).unwrap());
        assert_eq!(format, Ok(KernelFormat::Elf));
    }

    #[test]
    fn detects_formats() {
        let t = TempFile::new().unwrap();
        let mut bz = vec![0u8; 0x1000];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        std::fs::write(t.as_path(), &bz).unwrap();
        let format = inspect(&mut File::open(t.as_path()).unwrap());
        assert_eq!(format, Ok(KernelFormat::BzImage));
        std::fs::write(t.as_path(), b"garbage").unwrap();
        let format = inspect(&mut File::open(t.as_path()).unwrap());
        assert_eq!(format, Err(KernelImageError::UnknownFormat));
    }

    #[test]
    fn refuses_other_elves() {
        let mut b = elf(16);
        b.resize(0x1010, 0);
        let mut b32 = b.clone();
        b32[4] = 1;
        assert_eq!(check(&b32, check_elf), Err(KernelImageError::Elf32));
        let mut arm = b.clone();
        arm[18..20].copy_from_slice(&183u16.to_le_bytes());
        assert_eq!(
            check(&arm, check_elf),
            Err(KernelImageError::Machine("aarch64".into()))
        );
        let mut be = b;
        be[5] = 2;
        assert_eq!(check(&be, check_elf), Err(KernelImageError::BigEndian));
    }

    #[test]
    fn refuses_truncated_images() {
        let mut b = elf(16);
        b.resize(0x1008, 0);
        let err = check(&b, check_elf).unwrap_err();
        assert_eq!(
            err.to_string(),
            "truncated: segment 0 ends at byte 4112, the file has 4104"
        );
        assert!(matches!(
            check(&b[..40], check_elf),
            Err(KernelImageError::Truncated(_))
        ));
        let mut bz = vec![0u8; 0x1000];
        bz[BZ_SETUP_SECTS] = 1;
        bz[BZ_SYSSIZE..BZ_SYSSIZE + 4].copy_from_slice(&0x80u32.to_le_bytes());
        assert_eq!(check(&bz, check_bzimage), Ok(()));
        bz[BZ_SYSSIZE..BZ_SYSSIZE + 4].copy_from_slice(&0x1000u32.to_le_bytes());
        assert!(matches!(
            check(&bz, check_bzimage),
            Err(KernelImageError::Truncated(_))
        ));
    }
}
