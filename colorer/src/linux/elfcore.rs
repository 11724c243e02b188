//! An ELF core file (qemu's `dump-guest-memory`, kdump's `/proc/vmcore`) as guest-physical
//! memory: a [`PhysMem`] over its `PT_LOAD` segments, plus its notes (`VMCOREINFO`, qemu's
//! per-CPU state with CR3).
//!
//! The file is read once into memory; every segment is checked to lie inside the file, so a
//! truncated image is refused at open, not at the first read. Frames that no segment covers
//! (e.g. the legacy VGA hole) are not readable: reads there fail with
//! [`MemError::OutOfRange`], and the colorer leaves such frames `Unknown`.

use crate::mem::{Gfn, MemError, PhysMem};
use std::path::Path;

/// Errors of ELF core files.
#[derive(Debug, thiserror::Error)]
pub enum ElfCoreError {
    /// The file could not be read.
    #[error("cannot read the memory image {path}: {source}")]
    Io {
        /// The path.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Not an ELF file at all.
    #[error("not an ELF file (magic {0:02x?}): give a memory image made by qemu's dump-guest-memory or kdump (/proc/vmcore)")]
    NotElf([u8; 4]),
    /// An ELF file, but not one this reader can take.
    #[error("foreign ELF file: {0}; a 64-bit little-endian x86-64 core file (e_type CORE) is needed, as qemu's dump-guest-memory writes")]
    Foreign(String),
    /// A header, segment or note extends past the end of the file.
    #[error("truncated memory image: {what} ends at byte {end} but the file has {len} bytes; the dump was interrupted or the file was cut")]
    Truncated {
        /// What is cut.
        what: String,
        /// Where it should end.
        end: u64,
        /// File length.
        len: u64,
    },
    /// The image has no memory.
    #[error("the core file has no PT_LOAD segment: it holds no guest memory")]
    NoMemory,
}

const PT_LOAD: u32 = 1;
const PT_NOTE: u32 = 4;

/// One `PT_LOAD` segment: guest-physical `[paddr, paddr + len)` at `offset` in the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Guest-physical start.
    pub paddr: u64,
    /// Bytes present in the file.
    pub len: u64,
    /// Offset in the file.
    pub offset: u64,
}

/// One ELF note.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Note {
    /// Owner name (without the trailing NUL).
    pub name: String,
    /// Note type.
    pub kind: u32,
    /// Descriptor bytes.
    pub desc: Vec<u8>,
}

/// An ELF core file held in memory.
pub struct ElfCore {
    data: Vec<u8>,
    segments: Vec<Segment>,
    notes: Vec<Note>,
    limit: u64,
}

fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}
fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap_or_default())
}
fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().unwrap_or_default())
}

impl ElfCore {
    /// Read and check the core file at `path`.
    pub fn open(path: &Path) -> Result<Self, ElfCoreError> {
        let data = std::fs::read(path).map_err(|source| ElfCoreError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(data)
    }

    /// Check and index a core file's bytes.
    pub fn parse(data: Vec<u8>) -> Result<Self, ElfCoreError> {
        let len = data.len() as u64;
        let trunc = |what: &str, end: u64| ElfCoreError::Truncated {
            what: what.to_string(),
            end,
            len,
        };
        if data.len() < 4 {
            return Err(trunc("the ELF identification", 4));
        }
        let magic: [u8; 4] = data[..4].try_into().unwrap_or_default();
        if magic != *b"\x7fELF" {
            return Err(ElfCoreError::NotElf(magic));
        }
        if data.len() < 64 {
            return Err(trunc("the ELF header", 64));
        }
        if data[4] != 2 {
            return Err(ElfCoreError::Foreign(format!(
                "class {} (not 64-bit)",
                data[4]
            )));
        }
        if data[5] != 1 {
            return Err(ElfCoreError::Foreign("big-endian".into()));
        }
        let e_type = u16_at(&data, 16);
        if e_type != 4 {
            return Err(ElfCoreError::Foreign(format!(
                "e_type {e_type} (not a core file)"
            )));
        }
        let machine = u16_at(&data, 18);
        if machine != 62 {
            return Err(ElfCoreError::Foreign(format!(
                "machine {machine} (not x86-64)"
            )));
        }
        let phoff = u64_at(&data, 32);
        let phentsize = u64::from(u16_at(&data, 54));
        let phnum = u64::from(u16_at(&data, 56));
        if phentsize < 56 {
            return Err(ElfCoreError::Foreign(format!(
                "program header size {phentsize}"
            )));
        }
        let ph_end = phoff
            .checked_add(phentsize * phnum)
            .ok_or_else(|| trunc("the program headers", u64::MAX))?;
        if ph_end > len {
            return Err(trunc("the program headers", ph_end));
        }
        let mut segments = Vec::new();
        let mut notes = Vec::new();
        for i in 0..phnum {
            let h = (phoff + i * phentsize) as usize;
            let p_type = u32_at(&data, h);
            let offset = u64_at(&data, h + 8);
            let paddr = u64_at(&data, h + 24);
            let filesz = u64_at(&data, h + 32);
            let end = offset
                .checked_add(filesz)
                .ok_or_else(|| trunc("a segment", u64::MAX))?;
            match p_type {
                PT_LOAD => {
                    if end > len {
                        return Err(trunc(&format!("PT_LOAD segment at {paddr:#x}"), end));
                    }
                    if filesz > 0 {
                        segments.push(Segment {
                            paddr,
                            len: filesz,
                            offset,
                        });
                    }
                }
                PT_NOTE => {
                    if end > len {
                        return Err(trunc("the PT_NOTE segment", end));
                    }
                    parse_notes(&data[offset as usize..end as usize], &mut notes)
                        .map_err(|at| trunc("a note", offset + at as u64))?;
                }
                _ => {}
            }
        }
        if segments.is_empty() {
            return Err(ElfCoreError::NoMemory);
        }
        segments.sort_by_key(|s| s.paddr);
        let limit = segments.iter().map(|s| s.paddr + s.len).max().unwrap_or(0);
        Ok(ElfCore {
            data,
            segments,
            notes,
            limit,
        })
    }

    /// The `PT_LOAD` segments, by address.
    pub fn segments(&self) -> &[Segment] {
        &self.segments
    }

    /// The notes.
    pub fn notes(&self) -> &[Note] {
        &self.notes
    }

    /// The `VMCOREINFO` note's text, if the image has one.
    pub fn vmcoreinfo(&self) -> Option<&str> {
        self.notes
            .iter()
            .find(|n| n.name == "VMCOREINFO")
            .and_then(|n| std::str::from_utf8(&n.desc).ok())
            .map(|s| s.trim_end_matches('\0'))
    }

    /// CR3 of every vCPU, from qemu's `QEMU` notes (QEMUCPUState: version, size, 16 GPRs, rip,
    /// rflags, 8 segment descriptors of 24 bytes, gdt and idt of 24 bytes, cr0..cr4).
    pub fn vcpu_cr3s(&self) -> Vec<u64> {
        // Layout of QEMUCPUState (target/i386/arch_dump.c, version 1): u32 version, u32 size,
        // 18 x u64 registers, 10 x QEMUCPUSegment (u32 selector, limit, flags, pad; u64 base),
        // cr[5].
        const CR_OFF: usize = 8 + 18 * 8 + 10 * 24;
        self.notes
            .iter()
            .filter(|n| n.name == "QEMU" && n.desc.len() >= CR_OFF + 5 * 8)
            .filter(|n| u32_at(&n.desc, 0) == 1)
            .map(|n| u64_at(&n.desc, CR_OFF + 3 * 8))
            .collect()
    }

    /// Restrict guest RAM to `[0, end)` (e.g. to the guest's own end of RAM, leaving out
    /// device memory such as a VGA frame buffer that the dump also holds).
    pub fn set_limit(&mut self, end: u64) {
        self.limit = end.min(
            self.segments
                .iter()
                .map(|s| s.paddr + s.len)
                .max()
                .unwrap_or(0),
        );
    }

    fn locate(&self, gpa: u64, len: u64) -> Option<usize> {
        if gpa.checked_add(len)? > self.limit {
            return None;
        }
        let i = self.segments.partition_point(|s| s.paddr <= gpa);
        let s = self.segments.get(i.checked_sub(1)?)?;
        let off = gpa - s.paddr;
        if off.checked_add(len)? > s.len {
            return None;
        }
        usize::try_from(s.offset + off).ok()
    }
}

/// Parse notes; on a cut note, the offset where it is cut.
fn parse_notes(b: &[u8], out: &mut Vec<Note>) -> Result<(), usize> {
    let mut at = 0usize;
    while at + 12 <= b.len() {
        let namesz = u32_at(b, at) as usize;
        let descsz = u32_at(b, at + 4) as usize;
        let kind = u32_at(b, at + 8);
        let name_at = at + 12;
        let desc_at = name_at.checked_add(namesz.div_ceil(4) * 4).ok_or(at)?;
        let next = desc_at.checked_add(descsz.div_ceil(4) * 4).ok_or(at)?;
        if desc_at + descsz > b.len() {
            return Err(at);
        }
        let name = String::from_utf8_lossy(&b[name_at..name_at + namesz])
            .trim_end_matches('\0')
            .to_string();
        out.push(Note {
            name,
            kind,
            desc: b[desc_at..desc_at + descsz].to_vec(),
        });
        at = next;
    }
    Ok(())
}

impl PhysMem for ElfCore {
    fn size(&self) -> u64 {
        self.limit
    }

    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemError> {
        let oor = || MemError::OutOfRange {
            gpa,
            len: buf.len(),
            size: self.limit,
        };
        let off = self.locate(gpa, buf.len() as u64).ok_or_else(oor)?;
        buf.copy_from_slice(&self.data[off..off + buf.len()]);
        Ok(())
    }

    fn page(&self, gfn: Gfn) -> Option<&[u8]> {
        let off = self.locate(gfn.checked_mul(4096)?, 4096)?;
        self.data.get(off..off + 4096)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A minimal core file: one note, one LOAD segment of `pages` pages at `paddr`.
    pub(crate) fn core_file(vmcoreinfo: Option<&str>, paddr: u64, mem: &[u8]) -> Vec<u8> {
        let mut note = Vec::new();
        if let Some(v) = vmcoreinfo {
            let name = b"VMCOREINFO\0";
            note.extend_from_slice(&(name.len() as u32).to_le_bytes());
            note.extend_from_slice(&(v.len() as u32).to_le_bytes());
            note.extend_from_slice(&0u32.to_le_bytes());
            note.extend_from_slice(name);
            note.resize(note.len().div_ceil(4) * 4, 0);
            note.extend_from_slice(v.as_bytes());
            note.resize(note.len().div_ceil(4) * 4, 0);
        }
        let phoff = 64u64;
        let note_off = phoff + 2 * 56;
        let load_off = (note_off + note.len() as u64).div_ceil(4096) * 4096;
        let mut f = vec![0u8; load_off as usize];
        f[..4].copy_from_slice(b"\x7fELF");
        f[4] = 2;
        f[5] = 1;
        f[6] = 1;
        f[16..18].copy_from_slice(&4u16.to_le_bytes());
        f[18..20].copy_from_slice(&62u16.to_le_bytes());
        f[32..40].copy_from_slice(&phoff.to_le_bytes());
        f[52..54].copy_from_slice(&64u16.to_le_bytes());
        f[54..56].copy_from_slice(&56u16.to_le_bytes());
        f[56..58].copy_from_slice(&2u16.to_le_bytes());
        let ph = |f: &mut Vec<u8>, i: usize, t: u32, off: u64, pa: u64, sz: u64| {
            let h = 64 + i * 56;
            f[h..h + 4].copy_from_slice(&t.to_le_bytes());
            f[h + 8..h + 16].copy_from_slice(&off.to_le_bytes());
            f[h + 24..h + 32].copy_from_slice(&pa.to_le_bytes());
            f[h + 32..h + 40].copy_from_slice(&sz.to_le_bytes());
            f[h + 40..h + 48].copy_from_slice(&sz.to_le_bytes());
        };
        ph(&mut f, 0, PT_NOTE, note_off, 0, note.len() as u64);
        ph(&mut f, 1, PT_LOAD, load_off, paddr, mem.len() as u64);
        f[note_off as usize..note_off as usize + note.len()].copy_from_slice(&note);
        f.extend_from_slice(mem);
        f
    }

    #[test]
    fn reads_segments_and_notes() {
        let mut mem = vec![0u8; 3 * 4096];
        mem[4096] = 0xaa;
        let core = ElfCore::parse(core_file(Some("OSRELEASE=6.1.0\n"), 4096, &mem)).unwrap();
        assert_eq!(core.vmcoreinfo(), Some("OSRELEASE=6.1.0\n"));
        assert_eq!(core.size(), 4 * 4096);
        assert!(core.page(0).is_none(), "frame 0 is in no segment");
        assert_eq!(core.page(2).unwrap()[0], 0xaa);
        let mut b = [0u8; 2];
        assert!(core.read(4 * 4096 - 1, &mut b).is_err());
        core.read(2 * 4096, &mut b).unwrap();
        assert_eq!(b, [0xaa, 0]);
    }

    #[test]
    fn bad_files_get_specific_errors() {
        let good = core_file(Some("X=1\n"), 0, &[0u8; 8192]);
        let cut = good[..good.len() - 100].to_vec();
        let e = ElfCore::parse(cut).err().unwrap();
        assert!(matches!(e, ElfCoreError::Truncated { .. }), "{e}");
        assert!(e.to_string().contains("truncated"));
        let e = ElfCore::parse(b"#!/bin/sh\necho hi\n".to_vec())
            .err()
            .unwrap();
        assert!(matches!(e, ElfCoreError::NotElf(_)), "{e}");
        let mut exe = good.clone();
        exe[16] = 2; // ET_EXEC
        let e = ElfCore::parse(exe).err().unwrap();
        assert!(e.to_string().contains("not a core file"), "{e}");
        let mut arm = good.clone();
        arm[18] = 183; // aarch64
        assert!(matches!(
            ElfCore::parse(arm).err().unwrap(),
            ElfCoreError::Foreign(_)
        ));
        let e = ElfCore::parse(good[..40].to_vec()).err().unwrap();
        assert!(matches!(e, ElfCoreError::Truncated { .. }), "{e}");
        let core = ElfCore::parse(core_file(None, 0, &[0u8; 4096])).unwrap();
        assert!(core.vmcoreinfo().is_none());
    }
}
