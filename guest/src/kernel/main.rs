//! kscope's guest kernel: a small x86-64 kernel (CPL0, `#![no_std]`, never any SSE) that
//! runs workload programs as ring-3 processes and looks like a real OS from the outside
//! (its own page tables, a page cache with radix trees, a frame allocator), described for
//! outside readers by the KInfo page. See `abi` for every contract it implements.
//!
//! Physical memory: below 1 MiB the VMM's boot structures (the kernel fills the IDT and the
//! KInfo page at 0x9000); the image at 1 MiB (text, rodata, data+bss with the process and file
//! tables); right after it the frame bitmap and the ground-truth table; everything above is
//! handed out by the frame allocator (page tables, virtqueue rings and RX buffers, radix
//! nodes from a slab, page-cache pages, user memory), fresh (never used, zero) frames last.
//!
//! Virtual memory: the image at `KERNEL_VIRT_BASE + phys` (4 KiB pages: text R+X, rodata R,
//! data RW, both NX), all RAM at `DIRECT_MAP_BASE` (2 MiB pages, RW, NX), devices at
//! `MMIO_VIRT_BASE` (uncached, NX); the 256 kernel-half PDPTs exist from boot so every process
//! PML4 copies entries 256..511 once. User half: the ELF at 4 MiB, `mmap` from
//! `USER_MMAP_BASE` up, the stack below `USER_STACK_TOP`.
//!
//! Control flow: exceptions from ring 3 enter on the single trap stack (TSS.RSP0); `ud2` is
//! the system-call gate. A call or fault that lets the process go on returns straight from
//! the trap frame; otherwise the context is saved in the process table and the cooperative
//! round-robin scheduler picks the next runnable process, or polls the devices and halts.
//!
//! Cost model: on this platform every kernel instruction is emulated (CPL0 under PVM's
//! native mode), so the kernel avoids work: no zeroing of never-used frames, fault-around,
//! readahead, zero-copy DMA for page-cache fills and responses, fast trap returns.
#![no_std]
#![no_main]

pub mod arch;
pub mod blk;
pub mod clone;
pub mod console;
pub mod elf;
pub mod fs;
pub mod kinfo;
pub mod klib;
pub mod mm;
pub mod native;
pub mod net;
pub mod pagecache;
pub mod proc;
pub mod request;
pub mod rng;
pub mod sched;
pub mod syscall;
pub mod trap;
pub mod uvm;
pub mod virtio;

use kscope_guest::abi::boot::{BootInfo, DeviceKind, BOOT_INFO_MAGIC, BOOT_INFO_VERSION};
use kscope_guest::abi::layout::{
    ports, DIRECT_MAP_BASE, KERNEL_VIRT_BASE, LOW_RESERVED_END, MAX_GUEST_RAM, MMIO_BASE,
};
use kscope_guest::abi::panic_code;

use crate::arch::KCell;
use crate::mm::{frame, paging};

core::arch::global_asm!(
    ".section .text.entry, \"ax\"",
    ".global _start",
    "_start:",
    "and rsp, -16",
    "xor ebp, ebp",
    "call {kmain}",
    "2: hlt",
    "jmp 2b",
    kmain = sym kmain,
);

// Target of the `--wrap`ped panic functions of the precompiled `core` (see build.rs): report
// the caller's address instead of formatting a message (core::fmt would execute SSE).
core::arch::global_asm!(
    ".text",
    ".global kscope_core_panic",
    "kscope_core_panic:",
    "mov rdi, [rsp]",
    "and rsp, -16",
    "call {report}",
    "ud2",
    report = sym core_panic_report,
);

extern "C" fn core_panic_report(caller: u64) -> ! {
    kprint!(s "\nkscope: KERNEL PANIC (core check: index out of bounds, division by zero, unwrap ...) called from ", x caller, s "\n");
    arch::outl(ports::PANIC, panic_code::RUST_PANIC);
    loop {
        arch::hlt();
    }
}

extern "C" {
    static __text_start: u8;
    static __text_end: u8;
    static __rodata_start: u8;
    static __rodata_end: u8;
    static __data_start: u8;
    static __data_end: u8;
    static __kernel_end: u8;
    static __tramp_text_start: u8;
    static __tramp_text_end: u8;
    static __tramp_ro: u8;
    static __tramp_rw: u8;
}

struct Clock {
    tsc0: u64,
    khz: u64,
}

static CLOCK: KCell<Clock> = KCell::new(Clock { tsc0: 0, khz: 1 });

/// Monotonic nanoseconds since boot.
pub fn clock_ns() -> u64 {
    let c = CLOCK.get();
    let d = arch::rdtsc().wrapping_sub(c.tsc0);
    (d / c.khz) * 1_000_000 + (d % c.khz) * 1_000_000 / c.khz
}

/// Report a fatal kernel error on the console and to the VMM, then stop.
pub fn fatal(msg: &str, code: u32) -> ! {
    kprint!(s "\nkscope: KERNEL PANIC: ", s msg, s "\n");
    arch::outl(ports::PANIC, code);
    loop {
        arch::hlt();
    }
}

fn sym(s: &u8) -> u64 {
    s as *const u8 as u64
}

/// Parse `key=value` out of the command line.
fn cmdline_arg<'a>(cmdline: &'a [u8], key: &[u8]) -> Option<&'a [u8]> {
    cmdline
        .split(|&b| b == b' ' || b == b'\n' || b == b'\t')
        .find_map(|w| {
            if w.len() > key.len() && w[key.len()] == b'=' && klib::bytes_eq(&w[..key.len()], key) {
                Some(&w[key.len() + 1..])
            } else {
                None
            }
        })
}

fn rng_selftest() {
    // RFC 8439, 2.3.2: key 00..1f, counter 1, nonce 00:00:00:09:00:00:00:4a:00:00:00:00.
    let mut key = [0u32; 8];
    for (i, k) in key.iter_mut().enumerate() {
        let b = (i * 4) as u32;
        *k = b | (b + 1) << 8 | (b + 2) << 16 | (b + 3) << 24;
    }
    let out = rng::block(&key, 1, [0x0900_0000, 0x4a00_0000, 0]);
    if out[0] != 0xe4e7_f110 || out[15] != 0x4e3c_50a2 {
        fatal("ChaCha20 self-test failed", panic_code::RUST_PANIC);
    }
}

extern "C" fn kmain(bi_va: u64) -> ! {
    // First act: leave KVM's instruction emulator if the VMM asks for it (before the copy of
    // the boot information, which would otherwise run instruction by instruction).
    // SAFETY: the VMM passes the direct-map address of the BootInfo page in RDI.
    let (magic, version, wanted, page) = unsafe {
        let b = bi_va as *const BootInfo;
        (
            core::ptr::addr_of!((*b).magic).read_volatile(),
            core::ptr::addr_of!((*b).version).read_volatile(),
            core::ptr::addr_of!((*b).guest_mode).read_volatile(),
            core::ptr::addr_of!((*b).pvm_page).read_volatile(),
        )
    };
    let mode = if magic == BOOT_INFO_MAGIC && version == BOOT_INFO_VERSION {
        native::enter(wanted, page)
    } else {
        native::detect()
    };
    let t0 = arch::rdtsc();
    console::puts("\nkscope kernel starting\n");
    // SAFETY: as above; we copy the whole block.
    let bi: BootInfo = unsafe { core::ptr::read_volatile(bi_va as *const BootInfo) };
    if bi.magic != BOOT_INFO_MAGIC || bi.version != BOOT_INFO_VERSION {
        fatal("bad boot information (magic/version)", panic_code::BAD_BOOT);
    }
    native::report();
    if mode == kscope_guest::abi::boot::cpu_mode::NATIVE {
        console::puts("kscope: running natively (PVM)\n");
    } else if wanted == kscope_guest::abi::boot::cpu_mode::NATIVE {
        console::puts("kscope: native mode requested but not granted: running emulated\n");
    } else {
        console::puts("kscope: running in the instruction emulator\n");
    }
    if bi.mem_bytes == 0 || bi.mem_bytes > MAX_GUEST_RAM {
        fatal("bad guest memory size", panic_code::BAD_BOOT);
    }
    {
        let c = CLOCK.get();
        c.tsc0 = t0;
        c.khz = bi.tsc_khz.max(1);
    }
    // SAFETY: linker-script symbols; only their addresses are used.
    let (text, rodata, data, kend) = unsafe {
        (
            (sym(&__text_start), sym(&__text_end)),
            (sym(&__rodata_start), sym(&__rodata_end)),
            (sym(&__data_start), sym(&__data_end)),
            sym(&__kernel_end),
        )
    };
    kinfo::init_header();
    let phys = |v: u64| v - KERNEL_VIRT_BASE;
    let free_start = (kend - KERNEL_VIRT_BASE).max(bi.kernel_phys_end);
    frame::init(&frame::BootLayout {
        mem_bytes: bi.mem_bytes,
        text: (phys(text.0), phys(text.1)),
        data: (phys(rodata.0), phys(data.1)),
        free_start,
    });

    let mut mmio = [0u64; kscope_guest::abi::boot::MAX_DEVICES];
    let ndev = (bi.device_count as usize).min(mmio.len());
    for (m, d) in mmio.iter_mut().zip(&bi.devices[..ndev]) {
        *m = d.gpa;
        if d.gpa < MMIO_BASE {
            fatal("device outside the MMIO window", panic_code::BAD_BOOT);
        }
    }
    // The kernel's own tables map no low identity or image alias of the boot structures:
    // the descriptor tables must be reached through the direct map.
    let (gdtr, idtr) = (arch::sgdt(), arch::sidt());
    let (gb, ib) = (gdtr.base, idtr.base);
    let in_dm = |b: u64| (DIRECT_MAP_BASE..DIRECT_MAP_BASE + LOW_RESERVED_END).contains(&b);
    if !in_dm(gb) || !in_dm(ib) {
        fatal(
            "GDTR/IDTR must point into the direct map",
            panic_code::BAD_BOOT,
        );
    }
    let map = paging::KernelMap {
        mem_bytes: bi.mem_bytes,
        text,
        rodata,
        data,
        mmio: &mmio[..ndev],
        native: mode == kscope_guest::abi::boot::cpu_mode::NATIVE,
    };
    let Ok(pml4) = paging::init_kernel(&map) else {
        fatal(
            "out of memory building the kernel page tables",
            panic_code::OUT_OF_MEMORY,
        )
    };
    if mode == kscope_guest::abi::boot::cpu_mode::NATIVE {
        // SAFETY: linker-script symbols; only their addresses are used.
        let t = unsafe {
            paging::Trampoline {
                text: (sym(&__tramp_text_start), sym(&__tramp_text_end)),
                ro: sym(&__tramp_ro),
                rw: sym(&__tramp_rw),
                stack: kscope_guest::abi::layout::phys_to_virt(
                    kscope_guest::abi::layout::TRAP_STACK_TOP_GPA - 4096,
                ),
                tables: [
                    kscope_guest::abi::layout::phys_to_virt(kscope_guest::abi::layout::GDT_GPA),
                    kscope_guest::abi::layout::phys_to_virt(kscope_guest::abi::layout::IDT_GPA),
                ],
            }
        };
        if paging::init_isolation(&t).is_err() {
            fatal(
                "out of memory building the user-mode tables",
                panic_code::OUT_OF_MEMORY,
            );
        }
    }
    kinfo::set_layout(&kinfo::Layout {
        mem_bytes: bi.mem_bytes,
        kernel_pml4: pml4,
        text,
        rodata,
        data,
    });
    trap::init_idt();
    kinfo::set_tables(
        proc::table_addr(),
        proc::PROC_MAX as u32,
        core::mem::size_of::<proc::Proc>() as u32,
        fs::table_addr(),
        fs::FILE_MAX as u32,
        core::mem::size_of::<fs::FileEntry>() as u32,
    );
    rng_selftest();
    clone::init();

    let mut disk = None;
    for d in &bi.devices[..ndev] {
        let va = paging::mmio_va(d.gpa);
        if d.kind == DeviceKind::Block as u32 {
            match blk::init(va) {
                Ok(bytes) => disk = Some(bytes),
                Err(_) => fatal("virtio-blk device setup failed", panic_code::BAD_BOOT),
            }
        } else if d.kind == DeviceKind::Request as u32 && request::init(va).is_err() {
            fatal("request device setup failed", panic_code::BAD_BOOT);
        } else if d.kind == DeviceKind::Net as u32 && net::init(va).is_err() {
            fatal("virtio-net device setup failed", panic_code::BAD_BOOT);
        }
    }
    let Some(disk_bytes) = disk else {
        fatal("no block device", panic_code::BAD_BOOT)
    };
    let nfiles = match fs::mount(disk_bytes) {
        Ok(n) => n,
        Err(_) => fatal("cannot mount the root file system", panic_code::BAD_FS),
    };
    kprint!(s "kscope: ", d bi.mem_bytes >> 20, s " MiB RAM, ", d frame::free_count(), s " free frames, ",
        d nfiles, s " files, kernel pml4 ", x pml4, s "\n");

    let cmdline = bi.cmdline();
    let Some(init) = cmdline_arg(cmdline, b"init") else {
        fatal("no init= on the command line", panic_code::NO_INIT)
    };
    match proc::spawn(init, false) {
        Ok(s) => sched::started(s, true),
        Err(_) => fatal("cannot start the init program", panic_code::NO_INIT),
    }
    if let Some(agent) = cmdline_arg(cmdline, b"agent") {
        match proc::spawn(agent, true) {
            Ok(s) => sched::started(s, false),
            Err(_) => {
                console::puts("kscope: cannot start the agent ");
                console::write(agent);
                console::puts("\n");
            }
        }
    }
    kprint!(s "kscope: booted in ", d clock_ns() / 1000, s " us\n");
    sched::schedule()
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    console::puts("\nkscope: KERNEL PANIC (rust)");
    if let Some(m) = info.message().as_str() {
        console::puts(": ");
        console::puts(m);
    }
    if let Some(l) = info.location() {
        kprint!(s " at ", s l.file(), s ":", d l.line());
    }
    console::puts("\n");
    arch::outl(ports::PANIC, panic_code::RUST_PANIC);
    loop {
        arch::hlt();
    }
}
