//! Kernel loader: validates an x86-64 ELF64 kernel against the kscope boot contract, then
//! loads its `PT_LOAD` segments at `p_paddr` with linux-loader's ELF loader.
//!
//! linux-loader does the copying but checks little (it skips `PT_LOAD` segments without file
//! bytes when computing the image end, and does not check the entry point), so this module
//! parses the program headers first and rejects images that would not boot.

use std::io::Cursor;

use linux_loader::loader::{elf::Elf, KernelLoader};

use crate::error::VmError;
use crate::memory::GuestRam;
use kscope_guest::abi::layout::{KERNEL_PHYS_BASE, KERNEL_VIRT_BASE, PAGE_SIZE};

/// The kernel-image mapping covers the first 1 GiB of physical memory.
const KERNEL_MAP_LIMIT: u64 = 1 << 30;
const PT_LOAD: u32 = 1;
const EM_X86_64: u16 = 62;

/// Where the kernel landed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadedKernel {
    /// Virtual entry point (`e_entry`).
    pub entry: u64,
    /// Lowest `p_paddr` of a loaded segment.
    pub phys_start: u64,
    /// First page-aligned physical address after the image (including `.bss`).
    pub phys_end: u64,
}

/// One `PT_LOAD` program header.
#[derive(Clone, Copy, Debug)]
struct Segment {
    offset: u64,
    vaddr: u64,
    paddr: u64,
    filesz: u64,
    memsz: u64,
}

fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().unwrap_or_default())
}
fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap_or_default())
}

fn bad(msg: String) -> VmError {
    VmError::Loader(msg)
}

/// Parse and validate the ELF header and `PT_LOAD` segments of `image` for a guest of
/// `mem_bytes` bytes. Returns the entry point and the segments.
fn parse(image: &[u8], mem_bytes: u64) -> Result<(u64, Vec<Segment>), VmError> {
    if image.len() < 64 || &image[..4] != b"\x7fELF" {
        return Err(bad("not an ELF file".into()));
    }
    if image[4] != 2 || image[5] != 1 {
        return Err(bad("not a little-endian ELF64 file".into()));
    }
    if u16_at(image, 18) != EM_X86_64 {
        return Err(bad(format!(
            "e_machine {} is not x86-64",
            u16_at(image, 18)
        )));
    }
    let entry = u64_at(image, 24);
    let phoff = u64_at(image, 32);
    let phentsize = u16_at(image, 54) as u64;
    let phnum = u16_at(image, 56) as u64;
    if phentsize != 56 {
        return Err(bad(format!("e_phentsize {phentsize} is not 56")));
    }
    let ph_end = phoff
        .checked_add(phnum * 56)
        .filter(|&e| e <= image.len() as u64)
        .ok_or_else(|| bad("program headers lie outside the file".into()))?;
    let _ = ph_end;
    let mut segs = Vec::new();
    for i in 0..phnum {
        let o = (phoff + i * 56) as usize;
        if u32_at(image, o) != PT_LOAD {
            continue;
        }
        let s = Segment {
            offset: u64_at(image, o + 8),
            vaddr: u64_at(image, o + 16),
            paddr: u64_at(image, o + 24),
            filesz: u64_at(image, o + 32),
            memsz: u64_at(image, o + 40),
        };
        if s.memsz == 0 {
            continue;
        }
        if s.filesz > s.memsz {
            return Err(bad(format!("segment {i}: p_filesz > p_memsz")));
        }
        if s.offset
            .checked_add(s.filesz)
            .is_none_or(|e| e > image.len() as u64)
        {
            return Err(bad(format!("segment {i}: file bytes lie outside the file")));
        }
        let end = s
            .paddr
            .checked_add(s.memsz)
            .ok_or_else(|| bad(format!("segment {i}: address overflow")))?;
        if s.paddr < KERNEL_PHYS_BASE {
            return Err(bad(format!(
                "segment {i}: p_paddr {:#x} is below KERNEL_PHYS_BASE {KERNEL_PHYS_BASE:#x}",
                s.paddr
            )));
        }
        if end > mem_bytes || end > KERNEL_MAP_LIMIT {
            return Err(bad(format!(
                "segment {i} ends at {end:#x}, beyond guest RAM ({mem_bytes:#x}) or the 1 GiB kernel mapping; give the VM more memory"
            )));
        }
        if s.vaddr != KERNEL_VIRT_BASE.wrapping_add(s.paddr) {
            return Err(bad(format!(
                "segment {i}: p_vaddr {:#x} != KERNEL_VIRT_BASE + p_paddr {:#x}",
                s.vaddr, s.paddr
            )));
        }
        segs.push(s);
    }
    if segs.is_empty() {
        return Err(bad("no PT_LOAD segment".into()));
    }
    if !segs
        .iter()
        .any(|s| entry >= s.vaddr && entry < s.vaddr + s.memsz)
    {
        return Err(bad(format!(
            "entry point {entry:#x} is not inside a loaded segment"
        )));
    }
    Ok((entry, segs))
}

/// Validate `image` and load it into `ram`.
pub fn load_kernel(ram: &GuestRam, image: &[u8]) -> Result<LoadedKernel, VmError> {
    let (entry, segs) = parse(image, ram.size())?;
    let mut cursor = Cursor::new(image);
    Elf::load(ram.mem(), None, &mut cursor, None).map_err(|e| bad(format!("linux-loader: {e}")))?;
    // Zero .bss explicitly: RAM may be reused.
    for s in &segs {
        if s.memsz > s.filesz {
            let zeros = vec![0u8; (s.memsz - s.filesz) as usize];
            ram.write(s.paddr + s.filesz, &zeros)?;
        }
    }
    let phys_start = segs
        .iter()
        .map(|s| s.paddr)
        .min()
        .unwrap_or(KERNEL_PHYS_BASE);
    let end = segs
        .iter()
        .map(|s| s.paddr + s.memsz)
        .max()
        .unwrap_or(KERNEL_PHYS_BASE);
    Ok(LoadedKernel {
        entry,
        phys_start,
        phys_end: end.div_ceil(PAGE_SIZE) * PAGE_SIZE,
    })
}

/// Build a minimal ELF64 x86-64 executable with one RWX `PT_LOAD` segment holding `code` at
/// physical `paddr` (linked at `KERNEL_VIRT_BASE + paddr`), entered at its first byte.
/// For tests and benchmarks with hand-assembled guests.
pub fn build_test_elf(code: &[u8], paddr: u64) -> Vec<u8> {
    let mut f = vec![0u8; 0x1000];
    let vaddr = KERNEL_VIRT_BASE + paddr;
    f[..4].copy_from_slice(b"\x7fELF");
    f[4] = 2; // ELFCLASS64
    f[5] = 1; // little endian
    f[6] = 1; // EV_CURRENT
    f[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    f[18..20].copy_from_slice(&EM_X86_64.to_le_bytes());
    f[20..24].copy_from_slice(&1u32.to_le_bytes());
    f[24..32].copy_from_slice(&vaddr.to_le_bytes()); // e_entry
    f[32..40].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
    f[52..54].copy_from_slice(&64u16.to_le_bytes()); // e_ehsize
    f[54..56].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
    f[56..58].copy_from_slice(&1u16.to_le_bytes()); // e_phnum
    let ph = 64;
    f[ph..ph + 4].copy_from_slice(&PT_LOAD.to_le_bytes());
    f[ph + 4..ph + 8].copy_from_slice(&7u32.to_le_bytes()); // RWX
    f[ph + 8..ph + 16].copy_from_slice(&0x1000u64.to_le_bytes()); // p_offset
    f[ph + 16..ph + 24].copy_from_slice(&vaddr.to_le_bytes());
    f[ph + 24..ph + 32].copy_from_slice(&paddr.to_le_bytes());
    f[ph + 32..ph + 40].copy_from_slice(&(code.len() as u64).to_le_bytes());
    f[ph + 40..ph + 48].copy_from_slice(&(code.len() as u64 + 0x1000).to_le_bytes());
    f[ph + 48..ph + 56].copy_from_slice(&0x1000u64.to_le_bytes()); // p_align
    f.extend_from_slice(code);
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loads_segments_at_paddr_and_zeroes_bss() {
        let ram = GuestRam::new("loader", 8 << 20).unwrap();
        ram.write(0x100000 + 4, &[0xaa; 16]).unwrap(); // stale data in .bss
        let elf = build_test_elf(&[0xf4, 0xeb, 0xfd, 0x90], 0x100000);
        let k = load_kernel(&ram, &elf).unwrap();
        assert_eq!(k.entry, KERNEL_VIRT_BASE + 0x100000);
        assert_eq!(k.phys_start, 0x100000);
        assert_eq!(k.phys_end, 0x102000);
        let mut b = [0u8; 8];
        ram.read(0x100000, &mut b).unwrap();
        assert_eq!(b, [0xf4, 0xeb, 0xfd, 0x90, 0, 0, 0, 0]);
    }

    #[test]
    fn rejects_bad_images() {
        let ram = GuestRam::new("loader", 4 << 20).unwrap();
        assert!(load_kernel(&ram, b"not an elf").is_err());
        // Below 1 MiB.
        let elf = build_test_elf(&[0xf4], 0x8000);
        assert!(matches!(load_kernel(&ram, &elf), Err(VmError::Loader(_))));
        // Beyond RAM.
        let elf = build_test_elf(&[0xf4], 0x3ff000);
        assert!(load_kernel(&ram, &elf).is_err());
        // Entry outside the segment.
        let mut elf = build_test_elf(&[0xf4], 0x100000);
        elf[24..32].copy_from_slice(&(KERNEL_VIRT_BASE + 0x900000).to_le_bytes());
        assert!(load_kernel(&ram, &elf)
            .unwrap_err()
            .to_string()
            .contains("entry point"));
        // Wrong machine.
        let mut elf = build_test_elf(&[0xf4], 0x100000);
        elf[18] = 3;
        assert!(load_kernel(&ram, &elf).is_err());
    }
}
