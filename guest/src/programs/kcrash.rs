//! `/bin/kcrash`: misbehaves on purpose; the kernel must kill it and go on. The way it
//! misbehaves comes from `/etc/kcrash` (one mode per line, chosen by `(pid - 2) % lines`),
//! default `null`:
//!
//! `null` (read address 0), `write-text` (write to its own code), `exec-data` (jump into a
//! stack buffer), `bad-syscall` (pass an unmapped buffer to `write`), `ud` (an invalid opcode
//! that is not the `ud2` gate), `gp` (`hlt` in user mode), `div0` (divide by zero),
//! `read-kernel` (read the kernel's text), `write-kernel` (write the kernel's data through
//! the direct map: in native mode the kernel half is user-accessible in the page tables
//! and only PVM's own user/kernel split protects it), `use-after-munmap` (touch a page,
//! unmap it, touch it again: the TLB entry must be gone), `write-mapped-file` (read a
//! read-only file mapping, then write it: the read-only entry must be enforced); and one
//! well-behaved mode, `fpu-clobber`: fill xmm7 with garbage and yield 20 times, then exit 0
//! (for ktest's `fpu` check that user SSE state survives process switches).
#![no_std]
#![no_main]

extern crate alloc;

use kscope_guest::abi::syscall::prot;
use kscope_guest::println;
use kscope_guest::ulib::{sys, File};

fn mode() -> alloc::vec::Vec<u8> {
    let Ok(f) = File::open("/etc/kcrash") else {
        return b"null".to_vec();
    };
    let all = f.read_all().unwrap_or_default();
    let lines: alloc::vec::Vec<&[u8]> = all
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .collect();
    if lines.is_empty() {
        return b"null".to_vec();
    }
    let pid = sys::getpid() as usize;
    lines[pid.saturating_sub(2) % lines.len()].to_vec()
}

fn main() -> i32 {
    let m = mode();
    println!("kcrash: mode {}", core::str::from_utf8(&m).unwrap_or("?"));
    match &m[..] {
        b"write-text" => {
            let p = main as *const () as *mut u8;
            // SAFETY: deliberately invalid: writes to read-only code.
            unsafe { p.write_volatile(0xc3) };
        }
        b"exec-data" => {
            let code = [0xc3u8; 16];
            // SAFETY: deliberately invalid: the stack is not executable.
            let f: extern "C" fn() = unsafe { core::mem::transmute(code.as_ptr()) };
            f();
        }
        b"bad-syscall" => {
            sys::syscall6(
                kscope_guest::abi::syscall::WRITE,
                1,
                0xdead_0000,
                10,
                0,
                0,
                0,
            );
        }
        b"fpu-clobber" => {
            for i in 0..20u64 {
                // SAFETY: writes xmm7 only (user mode may use SSE).
                unsafe {
                    core::arch::asm!("movq xmm7, {0}", in(reg) 0xdead_0000 + i, out("xmm7") _)
                };
                sys::yield_now();
            }
            return 0;
        }
        // SAFETY: deliberately an invalid opcode (not the ud2 gate).
        b"ud" => unsafe { core::arch::asm!(".byte 0x0f, 0xff") },
        // SAFETY: deliberately privileged in user mode (#GP).
        b"gp" => unsafe { core::arch::asm!("hlt") },
        b"read-kernel" => {
            let p = core::hint::black_box(0xffff_ffff_8010_0000usize) as *const u64;
            // SAFETY: deliberately invalid: reads kernel memory.
            let v = unsafe { p.read_volatile() };
            println!("kcrash: read kernel {v:#x}");
        }
        b"write-kernel" => {
            let p = core::hint::black_box(0xffff_8880_0010_0000usize) as *mut u64;
            // SAFETY: deliberately invalid: writes kernel memory through the direct map.
            unsafe { p.write_volatile(0xdead) };
        }
        b"use-after-munmap" => {
            if let Ok(a) = sys::mmap(4096, prot::READ | prot::WRITE, None, 0) {
                let p = a as *mut u64;
                // SAFETY: inside the mapping just created.
                unsafe { p.write_volatile(7) };
                let _ = sys::munmap(a, 4096);
                // SAFETY: deliberately invalid: the page was unmapped.
                let v = unsafe { p.read_volatile() };
                println!("kcrash: read {v} after munmap");
            }
        }
        b"write-mapped-file" => {
            if let Ok(m) = File::open("/bin/kcrash").and_then(|f| f.map()) {
                let p = m.as_ptr() as *mut u8;
                // SAFETY: reading the mapping (fills the TLB with a read-only entry).
                let v = unsafe { p.read_volatile() };
                // SAFETY: deliberately invalid: the mapping is read-only.
                unsafe { p.write_volatile(v ^ 0xff) };
            }
        }
        b"div0" => {
            let z = core::hint::black_box(0u64);
            // SAFETY: deliberately divides by zero (#DE); plain `/` would panic instead.
            unsafe {
                core::arch::asm!("div {0}", in(reg) z, inout("rax") 1u64 => _, inout("rdx") 0u64 => _)
            };
        }
        _ => {
            let p = core::hint::black_box(0usize) as *const u64;
            // SAFETY: deliberately invalid: reads address 0.
            let v = unsafe { p.read_volatile() };
            println!("kcrash: read {v}");
        }
    }
    println!("kcrash: survived?!");
    0
}

kscope_guest::user_main!(main);
