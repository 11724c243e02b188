//! 4-level page tables: the kernel's own address space (text 4 KiB pages R+X, rodata R+NX,
//! data RW+NX, a 2 MiB direct map of all RAM, the MMIO window uncached) and process address
//! spaces that share the kernel half (PML4 entries 256..511, copied from the kernel PML4 whose
//! PDPTs are all allocated at boot, so the kernel half never changes at the top level).

use kscope_guest::abi::kinfo::frame_use;
use kscope_guest::abi::layout::{
    DIRECT_MAP_BASE, KERNEL_VIRT_BASE, LARGE_PAGE_SIZE, MMIO_BASE, MMIO_VIRT_BASE, PAGE_SIZE,
    USER_END,
};

use super::{frame, va};
use crate::arch::{self, KCell};

/// Present.
pub const P: u64 = 1;
/// Writable.
pub const RW: u64 = 1 << 1;
/// User accessible.
pub const US: u64 = 1 << 2;
/// Write-through.
pub const PWT: u64 = 1 << 3;
/// Cache disable.
pub const PCD: u64 = 1 << 4;
/// Large page (in a PDPT or PD entry).
pub const PS: u64 = 1 << 7;
/// Software bit: the frame is private to this mapping (freed on unmap).
pub const ANON: u64 = 1 << 9;
/// No-execute.
pub const NX: u64 = 1 << 63;
/// Physical address bits of an entry.
pub const ADDR: u64 = 0x000f_ffff_ffff_f000;

static KERNEL_PML4: KCell<u64> = KCell::new(0);

/// Native mode's page-table isolation: the PML4 whose kernel half every process's user-mode
/// PML4 copies (only the trampoline mapped), or 0 when processes run on one PML4.
static USER_TEMPLATE: KCell<u64> = KCell::new(0);

/// What of the kernel the user-mode tables map (kernel virtual ranges, page aligned): the
/// trampoline text, its data pages and the trap stack's top page, the GDT/TSS and IDT pages.
pub struct Trampoline {
    /// Trampoline text [start, end).
    pub text: (u64, u64),
    /// Read-only trampoline data page.
    pub ro: u64,
    /// Writable trampoline scratch page.
    pub rw: u64,
    /// Writable pages (the trap stack's top page).
    pub stack: u64,
    /// Read-only pages (GDT/TSS, IDT).
    pub tables: [u64; 2],
}

/// True when processes have separate user-mode tables (native mode).
pub fn isolated() -> bool {
    *USER_TEMPLATE.get() != 0
}

/// The user-mode PML4 paired with process PML4 `pml4` (the next frame), or `pml4` itself
/// without isolation.
pub fn user_pml4(pml4: u64) -> u64 {
    if isolated() {
        pml4 + PAGE_SIZE
    } else {
        pml4
    }
}

/// Build the kernel half of the user-mode tables (native mode; after [`init_kernel`]).
pub fn init_isolation(t: &Trampoline) -> Result<(), NoMem> {
    let tpl = frame::alloc_zeroed(frame_use::PAGE_TABLE, 0).ok_or(NoMem)?;
    let mut v = t.text.0;
    while v < t.text.1 {
        map_4k(tpl, v, v - KERNEL_VIRT_BASE, US)?;
        v += PAGE_SIZE;
    }
    map_4k(tpl, t.ro, t.ro - KERNEL_VIRT_BASE, US | NX)?;
    map_4k(tpl, t.rw, t.rw - KERNEL_VIRT_BASE, US | RW | NX)?;
    map_4k(tpl, t.stack, t.stack - DIRECT_MAP_BASE, US | RW | NX)?;
    for &p in &t.tables {
        map_4k(tpl, p, p - DIRECT_MAP_BASE, US | NX)?;
    }
    *USER_TEMPLATE.get() = tpl;
    crate::kinfo::set_user_template(tpl);
    Ok(())
}

/// Copy a user-half PML4 entry of `pml4` into its user-mode twin.
fn mirror(pml4: u64, virt: u64) {
    if isolated() && virt < USER_END {
        let i = idx(virt, 4);
        write(pml4 + PAGE_SIZE, i, read(pml4, i));
    }
}

/// Out of memory while building page tables.
#[derive(Debug, Clone, Copy)]
pub struct NoMem;

fn entry(table: u64, i: u64) -> *mut u64 {
    (va(table) + i * 8) as *mut u64
}

fn read(table: u64, i: u64) -> u64 {
    // SAFETY: `table` is a page-table frame (direct-mapped) and `i < 512`.
    unsafe { entry(table, i).read_volatile() }
}

fn write(table: u64, i: u64, v: u64) {
    // SAFETY: as for `read`.
    unsafe { entry(table, i).write_volatile(v) }
}

fn idx(v: u64, level: u32) -> u64 {
    (v >> (12 + 9 * (level - 1))) & 511
}

/// The next-level table of entry `i` in `table`, allocating it (with `flags`) if absent.
fn next(table: u64, i: u64, flags: u64) -> Result<u64, NoMem> {
    let e = read(table, i);
    if e & P != 0 {
        if flags & US != 0 && e & US == 0 {
            write(table, i, e | US | RW);
        }
        return Ok(e & ADDR);
    }
    let t = frame::alloc_zeroed(frame_use::PAGE_TABLE, 0).ok_or(NoMem)?;
    write(table, i, t | flags);
    Ok(t)
}

/// The page table (last level) covering `virt`, creating missing levels (user-accessible
/// intermediate entries when `user`). All pages of an aligned 2 MiB range share it, so
/// callers mapping several neighbours walk the tree once.
pub fn pt_for(pml4: u64, virt: u64, user: bool) -> Result<u64, NoMem> {
    let inter = P | RW | if user { US } else { 0 };
    let pdpt = next(pml4, idx(virt, 4), inter)?;
    mirror(pml4, virt);
    let pd = next(pdpt, idx(virt, 3), inter)?;
    next(pd, idx(virt, 2), inter)
}

/// The entry of `virt` in page table `pt` (from [`pt_for`]).
pub fn pte(pt: u64, virt: u64) -> u64 {
    read(pt, idx(virt, 1))
}

/// Set the entry of `virt` in page table `pt` (a previously non-present entry: no flush).
pub fn set_pte(pt: u64, virt: u64, v: u64) {
    write(pt, idx(virt, 1), v)
}

/// Map the 4 KiB page `virt` to `phys` with `flags` (P is added).
pub fn map_4k(pml4: u64, virt: u64, phys: u64, flags: u64) -> Result<(), NoMem> {
    let inter = P | RW | (flags & US);
    let pdpt = next(pml4, idx(virt, 4), inter)?;
    mirror(pml4, virt);
    let pd = next(pdpt, idx(virt, 3), inter)?;
    let pt = next(pd, idx(virt, 2), inter)?;
    write(pt, idx(virt, 1), (phys & ADDR) | flags | P);
    Ok(())
}

fn map_2m(pml4: u64, virt: u64, phys: u64, flags: u64) -> Result<(), NoMem> {
    let inter = P | RW | (flags & US);
    let pdpt = next(pml4, idx(virt, 4), inter)?;
    let pd = next(pdpt, idx(virt, 3), inter)?;
    write(pd, idx(virt, 2), phys | flags | P | PS);
    Ok(())
}

/// The leaf entry of a 4 KiB mapping of `virt`, if the tables down to it exist.
fn leaf(pml4: u64, virt: u64) -> Option<*mut u64> {
    let mut t = pml4;
    for level in (2..=4).rev() {
        let e = read(t, idx(virt, level));
        if e & P == 0 || e & PS != 0 {
            return None;
        }
        t = e & ADDR;
    }
    Some(entry(t, idx(virt, 1)))
}

/// The leaf entry value of `virt` (0 if not mapped).
pub fn lookup(pml4: u64, virt: u64) -> u64 {
    match leaf(pml4, virt) {
        // SAFETY: `leaf` returns a pointer into a live page-table frame.
        Some(p) => unsafe { p.read_volatile() },
        None => 0,
    }
}

/// Remove the mapping of `virt` and flush it if `pml4` is live; returns the old entry.
pub fn unmap(pml4: u64, virt: u64) -> u64 {
    let Some(p) = leaf(pml4, virt) else { return 0 };
    // SAFETY: `leaf` returns a pointer into a live page-table frame.
    let old = unsafe { p.read_volatile() };
    // SAFETY: as above.
    unsafe { p.write_volatile(0) };
    if old & P != 0 && arch::read_cr3() & ADDR == pml4 {
        arch::invlpg(virt);
    }
    old
}

/// Call `f(va, entry)` for every present 4 KiB leaf in the user range [start, end), skipping
/// absent tables.
pub fn for_each_leaf(pml4: u64, start: u64, end: u64, f: &mut dyn FnMut(u64, u64)) {
    let mut v = start;
    while v < end {
        let mut t = pml4;
        let mut skip = 0;
        for level in (2..=4).rev() {
            let e = read(t, idx(v, level));
            if e & P == 0 {
                skip = 1u64 << (12 + 9 * (level - 1));
                break;
            }
            t = e & ADDR;
        }
        if skip != 0 {
            v = (v & !(skip - 1)) + skip;
            continue;
        }
        let e = read(t, idx(v, 1));
        if e & P != 0 {
            f(v, e);
        }
        v += PAGE_SIZE;
    }
}

/// Kernel image and devices to map.
pub struct KernelMap<'a> {
    /// Bytes of RAM.
    pub mem_bytes: u64,
    /// Kernel text [start, end) virtual.
    pub text: (u64, u64),
    /// Kernel rodata [start, end) virtual.
    pub rodata: (u64, u64),
    /// Kernel data + bss [start, end) virtual.
    pub data: (u64, u64),
    /// Guest-physical bases of the devices' MMIO pages.
    pub mmio: &'a [u64],
    /// The kernel runs natively (kernel-half entries need U/S, see [`init_kernel`]).
    pub native: bool,
}

/// Build the kernel address space and switch to it; returns the PML4's physical address.
pub fn init_kernel(m: &KernelMap) -> Result<u64, NoMem> {
    // U/S on every kernel-half entry in native mode: under PVM's native switch the kernel
    // executes at hardware CPL3 and can only reach pages that are user-accessible at every
    // level (a supervisor-only page refaults forever; docs/PERFORMANCE-NOTES.md).
    let us = if m.native { US } else { 0 };
    let pml4 = frame::alloc_zeroed(frame_use::PAGE_TABLE, 0).ok_or(NoMem)?;
    // Pre-allocate a PDPT for every kernel-half PML4 slot: process PML4s copy entries
    // 256..511 once and never need updating.
    for i in 256..512 {
        next(pml4, i, P | RW | us)?;
    }
    // Direct map of all RAM: supervisor, NX, 2 MiB pages.
    let mut p = 0;
    while p < m.mem_bytes {
        map_2m(pml4, DIRECT_MAP_BASE + p, p, RW | NX | us)?;
        p += LARGE_PAGE_SIZE;
    }
    let sections = [(m.text, 0), (m.rodata, NX), (m.data, RW | NX)];
    for ((start, end), flags) in sections {
        let mut v = start & !(PAGE_SIZE - 1);
        while v < end {
            map_4k(pml4, v, v - KERNEL_VIRT_BASE, flags | us)?;
            v += PAGE_SIZE;
        }
    }
    for &gpa in m.mmio {
        map_4k(pml4, mmio_va(gpa), gpa, RW | NX | PCD | PWT | us)?;
    }
    *KERNEL_PML4.get() = pml4;
    // SAFETY: the new tables map the kernel image, the direct map (stacks, boot structures,
    // IDT/GDT/TSS) exactly as the boot tables did for everything the kernel uses.
    unsafe { arch::write_cr3(pml4) };
    Ok(pml4)
}

/// Kernel virtual address of a device's MMIO page.
pub const fn mmio_va(gpa: u64) -> u64 {
    MMIO_VIRT_BASE + (gpa - MMIO_BASE)
}

/// Physical address of the kernel PML4.
pub fn kernel_pml4() -> u64 {
    *KERNEL_PML4.get()
}

/// A new process PML4: empty user half, kernel half shared with the kernel's tables. With
/// isolation it is the first of two frames; the second is its user-mode twin (same user
/// half, the trampoline's kernel half).
pub fn new_user_pml4(pid: u32) -> Result<u64, NoMem> {
    let tpl = *USER_TEMPLATE.get();
    let pml4 = if tpl != 0 {
        frame::alloc_contig(2, frame_use::PAGE_TABLE, pid).ok_or(NoMem)?
    } else {
        frame::alloc_zeroed(frame_use::PAGE_TABLE, pid).ok_or(NoMem)?
    };
    let k = kernel_pml4();
    for i in 0..512 {
        write(pml4, i, if i < 256 { 0 } else { read(k, i) });
        if tpl != 0 {
            write(pml4 + PAGE_SIZE, i, if i < 256 { 0 } else { read(tpl, i) });
        }
    }
    Ok(pml4)
}

/// Free every user-half page-table frame of `pml4` and the PML4 itself. Leaves must have
/// been released by the caller before.
pub fn free_user_tables(pml4: u64) {
    fn free_level(t: u64, level: u32) {
        for i in 0..512 {
            let e = read(t, i);
            if e & P != 0 && e & PS == 0 && level > 1 {
                let child = e & ADDR;
                if level > 2 {
                    free_level(child, level - 1);
                }
                frame::free(child);
            }
        }
    }
    for i in 0..256 {
        let e = read(pml4, i);
        if e & P != 0 {
            let pdpt = e & ADDR;
            free_level(pdpt, 3);
            frame::free(pdpt);
            write(pml4, i, 0);
        }
    }
    if isolated() {
        frame::free(pml4 + PAGE_SIZE);
    }
    frame::free(pml4);
}
