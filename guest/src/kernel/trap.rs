//! Exception and system-call entry and exit: the IDT (filled in place where the VMM's IDTR
//! points), the trampoline (assembly stubs that switch page tables in native mode and save
//! the full register state on the kernel stack), the dispatcher, and `resume_user`, which
//! returns to a process through an `iretq` frame.

use core::arch::global_asm;

use kscope_guest::abi::layout::{
    phys_to_virt, ports, selectors, KERNEL_STACK_TOP_GPA, TRAP_STACK_TOP_GPA,
};
use kscope_guest::abi::panic_code;

use crate::arch;

/// Saved register state of a process, in the order the entry stubs push it (lowest address
/// first), followed by the hardware exception frame.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct Context {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rbp: u64,
    pub rdi: u64,
    pub rsi: u64,
    pub rdx: u64,
    pub rcx: u64,
    pub rbx: u64,
    pub rax: u64,
    /// Exception vector.
    pub vector: u64,
    /// Error code (0 when the exception has none).
    pub error: u64,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

impl Context {
    /// The initial user context of a process.
    pub fn user(rip: u64, rsp: u64) -> Self {
        Context {
            rip,
            rsp,
            cs: selectors::USER_CS as u64,
            ss: selectors::USER_DS as u64,
            // IF stays clear: the kernel takes no interrupts (bit 1 is reserved, always 1).
            rflags: 0x2,
            ..Default::default()
        }
    }
}

/// Exception vectors.
pub mod vector {
    /// Invalid opcode (the system-call gate `ud2`).
    pub const UD: u64 = 6;
    /// Page fault.
    pub const PF: u64 = 14;
    /// Not an exception: a `syscall` instruction (native mode, see `native`).
    pub const SYSCALL: u64 = 0x100;
}

/// Trampoline state, readable (not writable) from the user-mode tables: the CR3 of the
/// current process's kernel-mode tables, of its user-mode tables, and the isolation flag
/// (native mode: switch tables on every entry and exit).
#[link_section = ".data.tramp_ro"]
#[no_mangle]
static mut KSCOPE_TRAMP: [u64; 4] = [0; 4];

/// Trampoline scratch (user RSP and RAX during `syscall` entry), writable from user mode.
#[link_section = ".data.tramp_rw"]
#[no_mangle]
static mut KSCOPE_TRAMP_RW: [u64; 2] = [0; 2];

/// Switch the trampoline to process tables `cr3` (kernel mode) and `user_cr3` (user mode);
/// `isolate` turns the table switch on entry and exit on.
pub fn set_tables(cr3: u64, user_cr3: u64, isolate: bool) {
    // SAFETY: single vCPU with interrupts off; the trampoline reads these words only while
    // the kernel is not running Rust code.
    unsafe {
        let t = &raw mut KSCOPE_TRAMP;
        (*t)[0] = cr3;
        (*t)[1] = user_cr3;
        (*t)[2] = u64::from(isolate);
    }
}

// Entry and exit. In native mode the kernel half of a process's kernel-mode tables is
// user-accessible (PVM runs the kernel at hardware CPL3), so user mode runs on separate
// user-mode tables that map, of the kernel half, only this trampoline (the `.text.tramp`
// page, the `.data.tramp_*` pages, the GDT/TSS/IDT and the top page of the trap stack).
// Entry from user mode: the exception frame lands on the trampoline stack (TSS.RSP0); the
// stub switches to the kernel-mode tables, moves the frame to the kernel stack below and
// joins `trap_common`. Exit copies the `iretq` frame back to the trampoline stack, restores
// the registers, switches to the user-mode tables and returns.
global_asm!(
    r#"
    .section .text.tramp, "ax"
    .irp n, 0,1,2,3,4,5,6,7,9,15,16,18,19,20,22,23,24,25,26,27,28,31
    trap_stub_\n:
        push 0
        push \n
        jmp tramp_entry
    .endr
    .irp n, 8,10,11,12,13,14,17,21,29,30
    trap_stub_\n:
        push \n
        jmp tramp_entry
    .endr

    tramp_entry:
        test byte ptr [rsp + 24], 3
        jz kscope_trap_common
        cmp byte ptr [rip + KSCOPE_TRAMP + 16], 0
        je 1f
        push rax
        mov rax, [rip + KSCOPE_TRAMP]
        mov cr3, rax
        pop rax
    1:
        push rax
        mov rax, rsp
        movabs rsp, {kstack}
        push qword ptr [rax + 56]
        push qword ptr [rax + 48]
        push qword ptr [rax + 40]
        push qword ptr [rax + 32]
        push qword ptr [rax + 24]
        push qword ptr [rax + 16]
        push qword ptr [rax + 8]
        mov rax, [rax]
        jmp kscope_trap_common

    .global kscope_syscall_entry
    kscope_syscall_entry:
        mov [rip + KSCOPE_TRAMP_RW], rsp
        cmp byte ptr [rip + KSCOPE_TRAMP + 16], 0
        je 2f
        mov [rip + KSCOPE_TRAMP_RW + 8], rax
        mov rax, [rip + KSCOPE_TRAMP]
        mov cr3, rax
        mov rax, [rip + KSCOPE_TRAMP_RW + 8]
    2:
        movabs rsp, {kstack}
        push {uds}
        push qword ptr [rip + KSCOPE_TRAMP_RW]
        push r11
        push {ucs}
        push rcx
        push 0
        push {sysvec}
        jmp kscope_trap_common

    .global kscope_trap_common
    kscope_trap_common:
        push rax
        push rbx
        push rcx
        push rdx
        push rsi
        push rdi
        push rbp
        push r8
        push r9
        push r10
        push r11
        push r12
        push r13
        push r14
        push r15
        cld
        mov rdi, rsp
        xor ebp, ebp
        call {entry}
        ud2

    .global kscope_resume_user
    kscope_resume_user:
        movabs rax, {tstack}
        mov rcx, [rdi + 168]
        mov [rax - 8], rcx
        mov rcx, [rdi + 160]
        mov [rax - 16], rcx
        mov rcx, [rdi + 152]
        mov [rax - 24], rcx
        mov rcx, [rdi + 144]
        mov [rax - 32], rcx
        mov rcx, [rdi + 136]
        mov [rax - 40], rcx
        mov rsp, rdi
        pop r15
        pop r14
        pop r13
        pop r12
        pop r11
        pop r10
        pop r9
        pop r8
        pop rbp
        pop rdi
        pop rsi
        pop rdx
        pop rcx
        pop rbx
        pop rax
        movabs rsp, {tframe}
        cmp byte ptr [rip + KSCOPE_TRAMP + 16], 0
        je 3f
        push rax
        mov rax, [rip + KSCOPE_TRAMP + 8]
        mov cr3, rax
        pop rax
    3:
        iretq

    .section .rodata
    .balign 8
    .global kscope_trap_stubs
    kscope_trap_stubs:
    .irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
        .quad trap_stub_\n
    .endr
    .section .text
    "#,
    entry = sym trap_entry,
    kstack = const phys_to_virt(KERNEL_STACK_TOP_GPA),
    tstack = const phys_to_virt(TRAP_STACK_TOP_GPA),
    tframe = const phys_to_virt(TRAP_STACK_TOP_GPA) - 40,
    uds = const selectors::USER_DS as u64,
    ucs = const selectors::USER_CS as u64,
    sysvec = const vector::SYSCALL,
);

extern "C" {
    static kscope_trap_stubs: [u64; 32];
    fn kscope_resume_user(ctx: *const Context) -> !;
}

/// Fill the 32 exception gates of the IDT the VMM installed (IDTR base).
pub fn init_idt() {
    let idtr = arch::sidt();
    let base = idtr.base;
    for v in 0..32u64 {
        // SAFETY: reading the stub table defined in assembly above.
        let h = unsafe { kscope_trap_stubs[v as usize] };
        // #DF runs on IST1 (the trap stack) so that a kernel stack overflow is still reported.
        let ist = if v == 8 { 1u64 } else { 0 };
        let lo = (h & 0xffff)
            | ((selectors::KERNEL_CS as u64) << 16)
            | (ist << 32)
            | (0x8eu64 << 40)
            | (((h >> 16) & 0xffff) << 48);
        let hi = h >> 32;
        let gate = (base + v * 16) as *mut u64;
        // SAFETY: the IDT holds 256 16-byte gates at `base` (limit 4095), mapped by the
        // kernel tables (direct map or low image map); interrupts are off while we write.
        unsafe {
            gate.write_volatile(lo);
            gate.add(1).write_volatile(hi);
        }
    }
}

/// Return to user mode with `ctx` (CS/SS forced to the user selectors).
pub fn resume_user(ctx: &mut Context) -> ! {
    ctx.cs = selectors::USER_CS as u64;
    ctx.ss = selectors::USER_DS as u64;
    ctx.rflags = (ctx.rflags & 0xcd5) | 0x2;
    // SAFETY: `ctx` is a complete user context with user selectors and sanitised flags, and
    // lives in the process table (kernel memory mapped in every address space); the current
    // CR3 is the process's.
    unsafe { kscope_resume_user(ctx) }
}

extern "C" fn trap_entry(frame: &mut Context) -> ! {
    if frame.cs & 3 != 3 {
        kernel_exception(frame);
    }
    crate::sched::from_user(frame)
}

fn kernel_exception(f: &Context) -> ! {
    crate::kprint!(s "\nkscope: KERNEL EXCEPTION vector=", d f.vector, s " error=", x f.error,
        s " rip=", x f.rip, s " cr2=", x arch::read_cr2(), s " rsp=", x f.rsp,
        s " rax=", x f.rax, s " rdi=", x f.rdi, s "\n");
    arch::outl(ports::PANIC, panic_code::KERNEL_EXCEPTION);
    loop {
        arch::hlt();
    }
}
