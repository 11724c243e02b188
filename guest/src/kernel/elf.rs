//! The ELF loader: validates a static x86-64 executable and creates its memory areas.
//! Read-only segments are mapped straight from the page cache (text U+X, rodata U+NX), the
//! writable segment becomes a private area filled from the file on first touch, bss and the
//! rest are zero-filled; nothing is populated until the process faults on it.

use kscope_guest::abi::layout::{PAGE_SIZE, USER_IMAGE_BASE, USER_MMAP_BASE};
use kscope_guest::abi::syscall::prot;

use crate::mm::{page_down, page_up, va};
use crate::proc::{Proc, SpawnError, Vma, VmaKind};
use crate::{fs, pagecache, uvm};

const PT_LOAD: u32 = 1;
const PF_X: u32 = 1;
const PF_W: u32 = 2;
const PF_R: u32 = 4;

fn rd16(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}

fn rd32(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}

fn rd64(b: &[u8], o: usize) -> u64 {
    (rd32(b, o) as u64) | ((rd32(b, o + 4) as u64) << 32)
}

/// Create the memory areas of executable `file` in `p`; returns the entry point.
pub fn load(p: &mut Proc, file: usize) -> Result<u64, SpawnError> {
    let size = fs::file(file).abi.size;
    let first = pagecache::get(file, 0).map_err(|_| SpawnError::BadExec)?;
    // SAFETY: a cached page of the file, direct-mapped, 4096 bytes; page-cache pages are
    // never freed.
    let h = unsafe { core::slice::from_raw_parts(va(first) as *const u8, PAGE_SIZE as usize) };
    if size < 64 || h[0..4] != *b"\x7fELF" || h[4] != 2 || h[5] != 1 {
        return Err(SpawnError::BadExec);
    }
    // ET_EXEC, x86-64.
    if rd16(h, 16) != 2 || rd16(h, 18) != 62 {
        return Err(SpawnError::BadExec);
    }
    let entry = rd64(h, 24);
    let phoff = rd64(h, 32) as usize;
    let phentsize = rd16(h, 54) as usize;
    let phnum = rd16(h, 56) as usize;
    if phentsize < 56 || phoff + phnum * phentsize > PAGE_SIZE as usize {
        return Err(SpawnError::BadExec);
    }
    let mut entry_ok = false;
    for i in 0..phnum {
        let ph = &h[phoff + i * phentsize..];
        if rd32(ph, 0) != PT_LOAD {
            continue;
        }
        let flags = rd32(ph, 4);
        let offset = rd64(ph, 8);
        let vaddr = rd64(ph, 16);
        let filesz = rd64(ph, 32);
        let memsz = rd64(ph, 40);
        let bad = memsz == 0
            || filesz > memsz
            || vaddr < USER_IMAGE_BASE
            || vaddr.checked_add(memsz).is_none_or(|e| e > USER_MMAP_BASE)
            || offset.checked_add(filesz).is_none_or(|e| e > size)
            || vaddr % PAGE_SIZE != offset % PAGE_SIZE;
        if bad {
            return Err(SpawnError::BadExec);
        }
        let mut pr = 0;
        if flags & PF_R != 0 {
            pr |= prot::READ;
        }
        if flags & PF_W != 0 {
            pr |= prot::WRITE;
        }
        if flags & PF_X != 0 {
            pr |= prot::EXEC;
        }
        let start = page_down(vaddr);
        let end = page_up(vaddr + memsz);
        let vma = if flags & PF_W == 0 && filesz == memsz {
            Vma {
                start,
                end,
                prot: pr,
                kind: VmaKind::File,
                file,
                offset: page_down(offset),
                ..Vma::FREE
            }
        } else {
            Vma {
                start,
                end,
                prot: pr,
                kind: VmaKind::Private,
                file,
                offset,
                seg_va: vaddr,
                seg_end: vaddr + filesz,
            }
        };
        uvm::add_vma(p, vma).map_err(|_| SpawnError::BadExec)?;
        if flags & PF_X != 0 && entry >= vaddr && entry < vaddr + memsz {
            entry_ok = true;
        }
    }
    if !entry_ok {
        return Err(SpawnError::BadExec);
    }
    Ok(entry)
}
