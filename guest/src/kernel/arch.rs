//! Thin wrappers over the x86-64 instructions the kernel needs (port I/O, control registers,
//! TLB, TSC, FPU state), plus [`KCell`], the cell type of the kernel's globals.
//!
//! Everything here runs at CPL0 with interrupts disabled on a single vCPU.

use core::arch::asm;
use core::cell::UnsafeCell;

/// A kernel global. The kernel runs on one vCPU with interrupts off and never re-enters itself
/// (kernel-mode exceptions are fatal), so at any time at most one piece of code uses a global;
/// callers keep the returned references short-lived and never hold two at once.
pub struct KCell<T>(UnsafeCell<T>);

// SAFETY: single vCPU, interrupts disabled, no kernel threads: no concurrent access exists.
unsafe impl<T> Sync for KCell<T> {}

impl<T> KCell<T> {
    /// A new cell.
    pub const fn new(v: T) -> Self {
        KCell(UnsafeCell::new(v))
    }

    /// Mutable access to the global (see the type's documentation for the discipline).
    #[allow(clippy::mut_from_ref)]
    pub fn get(&self) -> &mut T {
        // SAFETY: single-threaded kernel without re-entrancy (see the type documentation):
        // callers never keep two live references to the same global.
        unsafe { &mut *self.0.get() }
    }

    /// Raw pointer to the value (for publishing its address).
    pub fn as_ptr(&self) -> *mut T {
        self.0.get()
    }
}

/// Write a byte to an I/O port.
pub fn outb(port: u16, v: u8) {
    // SAFETY: port I/O has no memory effects; the kernel only uses the ports of its ABI.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") v, options(nomem, nostack, preserves_flags))
    };
}

/// Write a 32-bit value to an I/O port.
pub fn outl(port: u16, v: u32) {
    // SAFETY: as for `outb`.
    unsafe {
        asm!("out dx, eax", in("dx") port, in("eax") v, options(nomem, nostack, preserves_flags))
    };
}

/// Read the time-stamp counter.
pub fn rdtsc() -> u64 {
    let lo: u32;
    let hi: u32;
    // SAFETY: `rdtsc` only reads the TSC.
    unsafe {
        asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags))
    };
    ((hi as u64) << 32) | lo as u64
}

/// CR2 (the faulting linear address of the last page fault).
pub fn read_cr2() -> u64 {
    let v: u64;
    // SAFETY: reading CR2 has no side effects.
    unsafe { asm!("mov {}, cr2", out(reg) v, options(nomem, nostack, preserves_flags)) };
    v
}

/// CR3 (the current page-table root).
pub fn read_cr3() -> u64 {
    let v: u64;
    // SAFETY: reading CR3 has no side effects.
    unsafe { asm!("mov {}, cr3", out(reg) v, options(nomem, nostack, preserves_flags)) };
    v
}

/// Load CR3.
///
/// # Safety
/// `pml4` must be the physical address of a valid PML4 that maps the kernel half exactly like
/// the kernel's own tables (so that the code, stack and data in use stay mapped).
pub unsafe fn write_cr3(pml4: u64) {
    // SAFETY: the caller guarantees the new tables map the running kernel identically.
    unsafe { asm!("mov cr3, {}", in(reg) pml4, options(nostack, preserves_flags)) };
}

/// Invalidate the TLB entry of `va` in the current address space.
pub fn invlpg(va: u64) {
    // SAFETY: invalidating a TLB entry is always safe (it can only cost a page walk).
    unsafe { asm!("invlpg [{}]", in(reg) va, options(nostack, preserves_flags)) };
}

/// Halt until the VMM resumes the vCPU (interrupts stay disabled: the VMM gets an HLT exit).
pub fn hlt() {
    // SAFETY: `hlt` with IF=0 just exits to the VMM, which resumes after the instruction.
    unsafe { asm!("hlt", options(nomem, nostack, preserves_flags)) };
}

/// The GDTR/IDTR contents as stored by `sgdt`/`sidt`.
#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
pub struct DescTable {
    /// Limit.
    pub limit: u16,
    /// Linear base.
    pub base: u64,
}

/// Read the GDTR.
pub fn sgdt() -> DescTable {
    let mut t = DescTable::default();
    // SAFETY: `sgdt` writes 10 bytes into `t`, which is exactly that large.
    unsafe {
        asm!("sgdt [{}]", in(reg) &mut t as *mut DescTable, options(nostack, preserves_flags))
    };
    t
}

/// Read the IDTR.
pub fn sidt() -> DescTable {
    let mut t = DescTable::default();
    // SAFETY: `sidt` writes 10 bytes into `t`, which is exactly that large.
    unsafe {
        asm!("sidt [{}]", in(reg) &mut t as *mut DescTable, options(nostack, preserves_flags))
    };
    t
}

/// Read the task register selector.
pub fn str_sel() -> u16 {
    let v: u16;
    // SAFETY: `str` only reads TR.
    unsafe { asm!("str {0:x}", out(reg) v, options(nomem, nostack, preserves_flags)) };
    v
}

/// A 512-byte `fxsave` area (user x87/SSE state).
#[repr(C, align(16))]
#[derive(Clone, Copy)]
pub struct FxArea(pub [u8; 512]);

impl FxArea {
    /// The state after `fninit` with the default MXCSR (all exceptions masked).
    pub const fn initial() -> Self {
        let mut b = [0u8; 512];
        // FCW = 0x037f
        b[0] = 0x7f;
        b[1] = 0x03;
        // MXCSR = 0x1f80
        b[24] = 0x80;
        b[25] = 0x1f;
        FxArea(b)
    }
}

/// Save the x87/SSE state into `area` (allowed at CPL0 on this platform; it is not an SSE
/// instruction).
pub fn fxsave(area: &mut FxArea) {
    // SAFETY: `area` is 512 bytes, 16-byte aligned, writable.
    unsafe {
        asm!("fxsave64 [{}]", in(reg) area as *mut FxArea, options(nostack, preserves_flags))
    };
}

/// Load the x87/SSE state from `area`.
pub fn fxrstor(area: &FxArea) {
    // SAFETY: `area` is 512 bytes, 16-byte aligned; its MXCSR comes from `initial` or from
    // `fxsave`, so reserved bits are clear.
    unsafe {
        asm!("fxrstor64 [{}]", in(reg) area as *const FxArea, options(nostack, preserves_flags))
    };
}

/// Read a model-specific register.
pub fn rdmsr(msr: u32) -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: the kernel only reads MSRs that exist on every host it runs on (EFER, STAR...)
    // or that it probed for first; reading has no memory effects.
    unsafe {
        asm!("rdmsr", in("ecx") msr, out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags))
    };
    ((hi as u64) << 32) | lo as u64
}

/// Write a model-specific register.
///
/// # Safety
/// The write must keep the kernel's execution environment valid (e.g. EFER keeps LME/LMA/NXE,
/// LSTAR points at the system-call entry).
pub unsafe fn wrmsr(msr: u32, v: u64) {
    // SAFETY: the caller guarantees the value is valid for the MSR.
    unsafe {
        asm!("wrmsr", in("ecx") msr, in("eax") v as u32, in("edx") (v >> 32) as u32, options(nostack, preserves_flags))
    };
}

/// The code-segment selector the CPU really runs with. Under PVM's native mode the kernel
/// runs on the hardware at CPL3 (`mov %cs` reads a ring-3 selector), while the VMM and the
/// exception frames still show the kernel's CPL0 selector.
pub fn read_cs() -> u16 {
    let v: u16;
    // SAFETY: reading CS has no side effects.
    unsafe { asm!("mov {0:x}, cs", out(reg) v, options(nomem, nostack, preserves_flags)) };
    v
}
