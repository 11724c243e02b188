//! The CPU mode the kernel runs in. On this platform's PVM hosts KVM interprets every CPL0
//! instruction unless the kernel registers a spare page with [`pvm::MSR_NATIVE`]; from the
//! next instruction on it runs on the hardware (`shared/PLATFORM.md`). The VMM says in the
//! boot information which mode to use; the kernel switches as its first act, checks which
//! mode it really got (`mov %cs` reads a ring-3 selector in native mode) and reports it.
//!
//! What native mode changes for the kernel:
//! - system calls can use `syscall` (entry `kscope_syscall_entry` in `trap`, return by
//!   `iretq`: cheaper than `sysretq` under PVM, 1.6 us against 3.5 us in the probe); the
//!   `ud2` gate keeps working in both modes, so user programs pick the gate the kernel hands
//!   them at start ([`gate`]);
//! - the kernel half must be user-accessible in the page tables (PVM runs the kernel at
//!   hardware CPL3), so processes run on separate user-mode tables that map only the entry
//!   trampoline of the kernel (`trap`, `mm::paging`), like Linux's page-table isolation;
//! - page-table writes are no longer trapped: every PTE change that removes or narrows a
//!   mapping is followed by `invlpg` or a CR3 reload (see `mm::paging::unmap`), exactly as on
//!   real hardware;
//! - interrupts (unused today: the kernel runs with IF=0) would need the low bits of the
//!   registered page's first word, which the kernel sets.

use kscope_guest::abi::boot::{cpu_mode, pvm};
use kscope_guest::abi::layout::{phys_to_virt, ports, selectors};

use crate::arch::{self, KCell};

/// IA32_EFER.
const MSR_EFER: u32 = 0xc000_0080;
/// IA32_STAR.
const MSR_STAR: u32 = 0xc000_0081;
/// IA32_LSTAR.
const MSR_LSTAR: u32 = 0xc000_0082;
/// IA32_FMASK.
const MSR_FMASK: u32 = 0xc000_0084;
/// EFER.SCE.
const EFER_SCE: u64 = 1;

static MODE: KCell<u32> = KCell::new(cpu_mode::EMULATED);

extern "C" {
    fn kscope_syscall_entry();
}

/// Switch to the mode the VMM asked for (`wanted`, registering `page` for native mode) and
/// return the mode the kernel really runs in. Called first thing at boot.
pub fn enter(wanted: u32, page: u64) -> u32 {
    if wanted == cpu_mode::NATIVE && page != 0 && page % 4096 == 0 {
        // Interrupt delivery in native mode needs one of the page's low bits (PLATFORM.md).
        // SAFETY: the page is reserved for this purpose by the boot contract and mapped by
        // the VMM's boot tables in the direct map.
        unsafe { (phys_to_virt(page) as *mut u64).write_volatile(1) };
        // SAFETY: the MSR only changes how the hypervisor runs this vCPU.
        unsafe { arch::wrmsr(pvm::MSR_NATIVE, page) };
    }
    let mode = detect();
    *MODE.get() = mode;
    if mode == cpu_mode::NATIVE {
        init_syscall();
    }
    mode
}

/// The mode the CPU runs in right now.
pub fn detect() -> u32 {
    if arch::read_cs() & 3 == 3 {
        cpu_mode::NATIVE
    } else {
        cpu_mode::EMULATED
    }
}

/// The mode found at boot (or at the last [`report`]).
pub fn mode() -> u32 {
    *MODE.get()
}

/// Tell the VMM which mode the kernel runs in now (at boot, and in a clone).
pub fn report() {
    let m = detect();
    *MODE.get() = m;
    arch::outl(ports::CPU_MODE, m);
}

/// The system-call gate user programs get at start: 1 for `syscall`, 0 for `ud2`.
pub fn gate() -> u64 {
    u64::from(mode() == cpu_mode::NATIVE)
}

fn init_syscall() {
    let star = (u64::from(selectors::KERNEL_CS) << 32)
        | (u64::from(selectors::USER_DS & !3).wrapping_sub(8) << 48);
    // SAFETY: SCE enables `syscall`, which enters at LSTAR = the entry stub below with
    // interrupts, traps, direction and alignment checks masked; STAR holds the GDT's kernel
    // selectors (and the user ones for `sysret`, which the kernel does not use).
    unsafe {
        arch::wrmsr(MSR_EFER, arch::rdmsr(MSR_EFER) | EFER_SCE);
        arch::wrmsr(MSR_STAR, star);
        arch::wrmsr(MSR_LSTAR, kscope_syscall_entry as usize as u64);
        arch::wrmsr(MSR_FMASK, 0x4_0700);
    }
}
