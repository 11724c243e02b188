//! User address spaces: memory areas (VMAs), demand paging (the #PF handler and the same
//! path for kernel accesses to user memory), `mmap`/`munmap`, and copies to and from user
//! memory. The kernel reaches user memory through the direct map after resolving (and if
//! needed populating) the page in the process's tables, so it never takes a fault itself and
//! can access processes other than the current one.

use kscope_guest::abi::kinfo::frame_use;
use kscope_guest::abi::layout::{
    PAGE_SIZE, USER_END, USER_IMAGE_BASE, USER_STACK_MAX, USER_STACK_TOP,
};
use kscope_guest::abi::syscall::prot;

use crate::mm::{frame, page_down, page_up, paging, va};
use crate::pagecache;
use crate::proc::{self, Proc, Vma, VmaKind, MAX_VMAS};

/// A failed access to user memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// No memory area covers the address.
    NoVma,
    /// The area does not allow the access.
    Perm,
    /// Out of memory.
    NoMem,
    /// The backing file could not be read (or the area extends beyond it).
    Io,
}

/// Kind of access.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Read.
    Read,
    /// Write.
    Write,
    /// Instruction fetch.
    Exec,
}

fn find(p: &mut Proc, v: u64) -> Option<usize> {
    let hit = |m: &Vma| m.kind != VmaKind::Free && m.start <= v && v < m.end;
    if hit(&p.vmas[p.last_vma % MAX_VMAS]) {
        return Some(p.last_vma % MAX_VMAS);
    }
    let i = p.vmas.iter().position(hit)?;
    p.last_vma = i;
    Some(i)
}

/// Add an area (must not overlap an existing one).
pub fn add_vma(p: &mut Proc, vma: Vma) -> Result<(), Fault> {
    if vma.start >= vma.end || vma.end > USER_END || vma.start < USER_IMAGE_BASE {
        return Err(Fault::Perm);
    }
    if p.vmas
        .iter()
        .any(|m| m.kind != VmaKind::Free && m.start < vma.end && vma.start < m.end)
    {
        return Err(Fault::Perm);
    }
    let slot = p
        .vmas
        .iter()
        .position(|m| m.kind == VmaKind::Free)
        .ok_or(Fault::NoMem)?;
    p.vmas[slot] = vma;
    Ok(())
}

fn pte_flags(vma: &Vma) -> u64 {
    let mut f = paging::US;
    if vma.prot & prot::WRITE != 0 && vma.kind != VmaKind::File {
        f |= paging::RW;
    }
    if vma.prot & prot::EXEC == 0 {
        f |= paging::NX;
    }
    f
}

/// Resolve user page `v` of process slot `slot` for `access`, populating it on demand;
/// returns the physical address of the page.
pub fn fault_in(slot: usize, v: u64, access: Access) -> Result<u64, Fault> {
    let p = proc::get(slot);
    let v = page_down(v);
    let vi = find(p, v).ok_or(Fault::NoVma)?;
    let vma = p.vmas[vi];
    let writable = vma.prot & prot::WRITE != 0 && vma.kind != VmaKind::File;
    match access {
        Access::Write if !writable => return Err(Fault::Perm),
        Access::Exec if vma.prot & prot::EXEC == 0 => return Err(Fault::Perm),
        Access::Read if vma.prot & (prot::READ | prot::EXEC) == 0 => return Err(Fault::Perm),
        _ => {}
    }
    let pml4 = p.abi.cr3;
    let pid = p.abi.pid;
    // One walk for the fault and its fault-around window (they share the page table).
    let pt = paging::pt_for(pml4, v, true).map_err(|_| Fault::NoMem)?;
    let old = paging::pte(pt, v);
    if old & paging::P != 0 {
        return Ok(old & paging::ADDR);
    }
    let flags = pte_flags(&vma) | paging::P;
    let phys = match vma.kind {
        VmaKind::Free => return Err(Fault::NoVma),
        VmaKind::Anon => {
            let use_ = if vma.prot & prot::EXEC != 0 {
                frame_use::USER_CODE
            } else {
                frame_use::USER_DATA
            };
            let f = frame::alloc_zeroed(use_, pid).ok_or(Fault::NoMem)?;
            paging::set_pte(pt, v, f | flags | paging::ANON);
            anon_around(&vma, pid, pt, v, flags | paging::ANON, use_);
            f
        }
        VmaKind::File => {
            let index = (vma.offset + (v - vma.start)) / PAGE_SIZE;
            let f = pagecache::get(vma.file, index).map_err(|e| match e {
                pagecache::PcError::NoMem => Fault::NoMem,
                _ => Fault::Io,
            })?;
            map_cached(&vma, pid, pt, v, f, flags);
            fault_around(&vma, pid, pt, v, flags);
            f
        }
        VmaKind::Private => {
            let use_ = if vma.prot & prot::EXEC != 0 {
                frame_use::USER_CODE
            } else {
                frame_use::USER_DATA
            };
            let f = frame::alloc_zeroed(use_, pid).ok_or(Fault::NoMem)?;
            if let Err(e) = fill_private(&vma, v, f) {
                frame::free(f);
                return Err(e);
            }
            paging::set_pte(pt, v, f | flags | paging::ANON);
            f
        }
    };
    Ok(phys)
}

/// Pages mapped around a file-mapping fault (an aligned window, like Linux's fault-around):
/// every fault is an emulated trap on this platform, so mapping already cached neighbours
/// saves whole faults.
const FAULT_AROUND_PAGES: u64 = 16;

/// Window of anonymous fault-around (pages).
const ANON_AROUND_PAGES: u64 = 8;

/// Map page-cache page `f` at `v` in page table `pt` (tagging it as code when mapped
/// executable).
fn map_cached(vma: &Vma, pid: u32, pt: u64, v: u64, f: u64, flags: u64) {
    if vma.prot & prot::EXEC != 0 {
        let g = frame::get_use(f) & 0xff;
        if g == frame_use::PAGE_CACHE_EXEC as u32 || g == frame_use::PAGE_CACHE_DATA as u32 {
            frame::set_use(f, frame_use::USER_CODE, pid);
        }
    }
    paging::set_pte(pt, v, f | flags);
}

/// The aligned window of `pages` pages around `v`, clipped to the area.
fn window(vma: &Vma, v: u64, pages: u64) -> (u64, u64) {
    let win = pages * PAGE_SIZE;
    let base = v & !(win - 1);
    (base.max(vma.start), (base + win).min(vma.end))
}

/// Map the cached, not yet mapped pages of the fault-around window of `v`.
fn fault_around(vma: &Vma, pid: u32, pt: u64, v: u64, flags: u64) {
    let (lo, hi) = window(vma, v, FAULT_AROUND_PAGES);
    let mut w = lo;
    while w < hi {
        if w != v && paging::pte(pt, w) & paging::P == 0 {
            let index = (vma.offset + (w - vma.start)) / PAGE_SIZE;
            if let Some(f) = pagecache::lookup(vma.file, index) {
                map_cached(vma, pid, pt, w, f, flags);
            }
        }
        w += PAGE_SIZE;
    }
}

/// Anonymous fault-around: map never-used (hence zero, no zeroing cost) frames for the rest
/// of the aligned window of `v`, while the allocator's fresh frontier lasts.
fn anon_around(vma: &Vma, pid: u32, pt: u64, v: u64, flags: u64, use_: u8) {
    let (lo, hi) = window(vma, v, ANON_AROUND_PAGES);
    let mut w = lo;
    while w < hi {
        if w != v && paging::pte(pt, w) & paging::P == 0 {
            let Some(f) = frame::alloc_fresh(use_, pid) else {
                return;
            };
            paging::set_pte(pt, w, f | flags);
        }
        w += PAGE_SIZE;
    }
}

/// Copy the file bytes that fall into page `v` of a private area into frame `f`.
fn fill_private(vma: &Vma, v: u64, f: u64) -> Result<(), Fault> {
    let lo = v.max(vma.seg_va);
    let hi = (v + PAGE_SIZE).min(vma.seg_end);
    let mut a = lo;
    while a < hi {
        let off = vma.offset + (a - vma.seg_va);
        let src = pagecache::get(vma.file, off / PAGE_SIZE).map_err(|_| Fault::Io)?;
        let n = (PAGE_SIZE - off % PAGE_SIZE).min(hi - a);
        crate::klib::copy(va(f) + (a - v), va(src) + off % PAGE_SIZE, n as usize);
        a += n;
    }
    Ok(())
}

/// Handle a user page fault at `addr` with error code `err`; `Err` means: kill the process.
pub fn page_fault(slot: usize, addr: u64, err: u64) -> Result<(), Fault> {
    let access = if err & 0x10 != 0 {
        Access::Exec
    } else if err & 2 != 0 {
        Access::Write
    } else {
        Access::Read
    };
    if addr >= USER_END {
        return Err(Fault::NoVma);
    }
    // Error code bit 0 clear: the page was not present (the common case): populate it.
    if err & 1 == 0 {
        return fault_in(slot, addr, access).map(|_| ());
    }
    let pte = paging::lookup(proc::get(slot).abi.cr3, page_down(addr));
    if pte & paging::P != 0 {
        // Present but the access is not allowed by the entry: a protection violation
        // (entries are never made more permissive after they are created).
        let denied = match access {
            Access::Write => pte & paging::RW == 0,
            Access::Exec => pte & paging::NX != 0,
            Access::Read => false,
        };
        if denied {
            return Err(Fault::Perm);
        }
        crate::arch::invlpg(addr);
        return Ok(());
    }
    fault_in(slot, addr, access).map(|_| ())
}

/// Visit user range [addr, addr+len) of process `slot` page by page: `f(kernel_va, n)`.
pub fn for_user_chunks(
    slot: usize,
    addr: u64,
    len: u64,
    access: Access,
    f: &mut dyn FnMut(u64, usize),
) -> Result<(), Fault> {
    let end = addr.checked_add(len).ok_or(Fault::NoVma)?;
    if end > USER_END {
        return Err(Fault::NoVma);
    }
    let mut a = addr;
    while a < end {
        let phys = fault_in(slot, a, access)?;
        let n = (PAGE_SIZE - a % PAGE_SIZE).min(end - a);
        f(va(phys) + a % PAGE_SIZE, n as usize);
        a += n;
    }
    Ok(())
}

/// Copy kernel bytes to user memory.
pub fn copy_to_user(slot: usize, addr: u64, src: &[u8]) -> Result<(), Fault> {
    let mut done = 0usize;
    for_user_chunks(slot, addr, src.len() as u64, Access::Write, &mut |k, n| {
        crate::klib::copy(k, src[done..].as_ptr() as u64, n);
        done += n;
    })
}

/// Copy user bytes into a kernel buffer.
pub fn copy_from_user(slot: usize, addr: u64, dst: &mut [u8]) -> Result<(), Fault> {
    let mut done = 0usize;
    let base = dst.as_mut_ptr() as u64;
    for_user_chunks(slot, addr, dst.len() as u64, Access::Read, &mut |k, n| {
        crate::klib::copy(base + done as u64, k, n);
        done += n;
    })
}

/// Copy a plain-data value to user memory.
pub fn put<T: Copy>(slot: usize, addr: u64, v: &T) -> Result<(), Fault> {
    copy_to_user(slot, addr, kscope_guest::abi::as_bytes(v))
}

/// Read a plain-data ABI value from user memory.
pub fn get<T: Copy + Default>(slot: usize, addr: u64) -> Result<T, Fault> {
    let mut v = T::default();
    let n = core::mem::size_of::<T>();
    // SAFETY: `v` is a valid `T`, viewed as its bytes; ABI types accept any bit pattern.
    let bytes = unsafe { core::slice::from_raw_parts_mut(&mut v as *mut T as *mut u8, n) };
    copy_from_user(slot, addr, bytes)?;
    Ok(v)
}

/// `mmap`: a new anonymous or read-only file area; returns its address.
pub fn mmap(slot: usize, len: u64, prot_: u64, file: Option<(usize, u64)>) -> Result<u64, Fault> {
    if len == 0 || len > (1 << 40) {
        return Err(Fault::Perm);
    }
    let p = proc::get(slot);
    let len = page_up(len);
    let start = p.mmap_next;
    if start + len > USER_STACK_TOP - USER_STACK_MAX {
        return Err(Fault::NoMem);
    }
    if file.is_none() {
        // Extend the previous anonymous area when it ends here with the same protection
        // (like Linux's VMA merging): heaps grow without using up area slots.
        let prot_ = prot_ | prot::READ;
        let prev = p
            .vmas
            .iter_mut()
            .find(|m| m.kind == VmaKind::Anon && m.end == start && m.prot == prot_);
        if let Some(m) = prev {
            m.end = start + len;
            p.mmap_next = start + len;
            return Ok(start);
        }
    }
    let vma = match file {
        None => Vma::anon(start, start + len, prot_ | prot::READ),
        Some((f, offset)) => {
            if prot_ & prot::WRITE != 0 || offset % PAGE_SIZE != 0 {
                return Err(Fault::Perm);
            }
            Vma {
                start,
                end: start + len,
                prot: prot_ | prot::READ,
                kind: VmaKind::File,
                file: f,
                offset,
                ..Vma::FREE
            }
        }
    };
    add_vma(p, vma)?;
    p.mmap_next = start + len;
    Ok(start)
}

/// `munmap`: remove [addr, addr+len) from every area (areas are trimmed or split).
pub fn munmap(slot: usize, addr: u64, len: u64) -> Result<(), Fault> {
    if !addr.is_multiple_of(PAGE_SIZE) || len == 0 {
        return Err(Fault::Perm);
    }
    let end = page_up(addr.checked_add(len).ok_or(Fault::Perm)?);
    let p = proc::get(slot);
    let (pml4, pid) = (p.abi.cr3, p.abi.pid);
    for i in 0..MAX_VMAS {
        let m = p.vmas[i];
        if m.kind == VmaKind::Free || m.end <= addr || end <= m.start {
            continue;
        }
        let (lo, hi) = (addr.max(m.start), end.min(m.end));
        let split = lo != m.start && hi != m.end;
        if split && !p.vmas.iter().any(|v| v.kind == VmaKind::Free) {
            return Err(Fault::NoMem);
        }
        paging::for_each_leaf(pml4, lo, hi, &mut |v, pte| {
            paging::unmap(pml4, v);
            proc::release_page(&m, pid, pte);
        });
        let shift = |mut n: Vma, new_start: u64| {
            if n.kind == VmaKind::File {
                n.offset += new_start - n.start;
            }
            n.start = new_start;
            n
        };
        match (lo == m.start, hi == m.end) {
            (true, true) => p.vmas[i] = Vma::FREE,
            (true, false) => p.vmas[i] = shift(m, hi),
            (false, true) => p.vmas[i].end = lo,
            (false, false) => {
                let tail = shift(m, hi);
                p.vmas[i].end = lo;
                if let Some(free) = p.vmas.iter().position(|v| v.kind == VmaKind::Free) {
                    p.vmas[free] = tail;
                }
            }
        }
    }
    Ok(())
}

/// A human-readable description of a fault (for the kill message).
pub fn fault_name(f: Fault) -> &'static str {
    match f {
        Fault::NoVma => "address outside any mapping",
        Fault::Perm => "access not permitted",
        Fault::NoMem => "out of memory",
        Fault::Io => "file read failed",
    }
}
