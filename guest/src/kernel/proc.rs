//! Processes: the process table (entries start with `abi::kinfo::ProcAbi`), creation from an
//! executable of the root file system, and teardown.

use kscope_guest::abi::kinfo::{file_kind, frame_use, proc_state, ProcAbi};
use kscope_guest::abi::layout::{USER_MMAP_BASE, USER_STACK_MAX, USER_STACK_TOP};
use kscope_guest::abi::syscall::prot;

use crate::arch::{FxArea, KCell};
use crate::mm::{frame, paging};
use crate::trap::Context;
use crate::{elf, fs, pagecache};

/// Capacity of the process table.
pub const PROC_MAX: usize = 16;
/// Memory areas per process.
pub const MAX_VMAS: usize = 64;
/// File descriptors per process (0..2 are the console).
pub const MAX_FDS: usize = 64;

/// What backs a memory area.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum VmaKind {
    /// Unused slot.
    Free,
    /// Anonymous zero-filled memory (heap, stack, bss).
    Anon,
    /// Read-only view of a file: page-cache pages mapped directly.
    File,
    /// Private copy of part of a file (an ELF's writable segment), zero-filled elsewhere.
    Private,
}

/// A memory area [start, end) of a process.
#[derive(Clone, Copy, Debug)]
pub struct Vma {
    /// First address (page aligned).
    pub start: u64,
    /// End (page aligned, exclusive).
    pub end: u64,
    /// `abi::syscall::prot` bits.
    pub prot: u64,
    /// Backing.
    pub kind: VmaKind,
    /// File index (File, Private).
    pub file: usize,
    /// File: file offset of `start`. Private: file offset of `seg_va`.
    pub offset: u64,
    /// Private: first address backed by file bytes.
    pub seg_va: u64,
    /// Private: end of the file-backed bytes.
    pub seg_end: u64,
}

impl Vma {
    /// An unused slot.
    pub const FREE: Vma = Vma {
        start: 0,
        end: 0,
        prot: 0,
        kind: VmaKind::Free,
        file: 0,
        offset: 0,
        seg_va: 0,
        seg_end: 0,
    };

    /// An anonymous area.
    pub fn anon(start: u64, end: u64, prot: u64) -> Vma {
        Vma {
            start,
            end,
            prot,
            kind: VmaKind::Anon,
            ..Vma::FREE
        }
    }
}

/// What a blocked process waits for.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Wait {
    /// Not waiting.
    None,
    /// In `recv_request(buf, len, meta)`.
    Recv {
        /// Payload buffer.
        buf: u64,
        /// Its length.
        len: u64,
        /// Where to store the `RequestMeta`.
        meta: u64,
    },
}

/// A process-table entry.
#[repr(C)]
pub struct Proc {
    /// Published part (read by the colorer).
    pub abi: ProcAbi,
    /// Saved user registers.
    pub ctx: Context,
    /// Saved user x87/SSE state (valid when this process does not own the FPU).
    pub fx: FxArea,
    /// FPU state saved at SIGCLONE delivery.
    pub sig_fx: FxArea,
    /// Registers saved at SIGCLONE delivery.
    pub sig_ctx: Context,
    /// Memory areas.
    pub vmas: [Vma; MAX_VMAS],
    /// Open files: file index + 1, or 0.
    pub fds: [u32; MAX_FDS],
    /// Next address handed out by `mmap`.
    pub mmap_next: u64,
    /// Index of the area found last (checked first on the next lookup).
    pub last_vma: usize,
    /// Blocking state.
    pub wait: Wait,
    /// Order in which waiters blocked (FIFO request delivery).
    pub wait_seq: u64,
    /// SIGCLONE handler (0 = none).
    pub sig_handler: u64,
    /// SIGCLONE return trampoline.
    pub sig_tramp: u64,
    /// A SIGCLONE is waiting to be delivered.
    pub sig_pending: bool,
    /// Running a SIGCLONE handler (until `sigreturn`).
    pub in_signal: bool,
    /// This is the agent process (it never receives workload requests).
    pub is_agent: bool,
}

/// A zeroed saved context (free slots, no signal in progress).
const ZERO_CTX: Context = Context {
    r15: 0,
    r14: 0,
    r13: 0,
    r12: 0,
    r11: 0,
    r10: 0,
    r9: 0,
    r8: 0,
    rbp: 0,
    rdi: 0,
    rsi: 0,
    rdx: 0,
    rcx: 0,
    rbx: 0,
    rax: 0,
    vector: 0,
    error: 0,
    rip: 0,
    cs: 0,
    rflags: 0,
    rsp: 0,
    ss: 0,
};

const EMPTY: Proc = Proc {
    abi: ProcAbi {
        state: proc_state::FREE,
        pid: 0,
        cr3: 0,
        name: [0; 32],
    },
    ctx: ZERO_CTX,
    // Zero here (so the table lives in .bss); `spawn` installs the initial FPU state.
    fx: FxArea([0; 512]),
    sig_fx: FxArea([0; 512]),
    sig_ctx: ZERO_CTX,
    vmas: [Vma::FREE; MAX_VMAS],
    fds: [0; MAX_FDS],
    mmap_next: 0,
    last_vma: 0,
    wait: Wait::None,
    wait_seq: 0,
    sig_handler: 0,
    sig_tramp: 0,
    sig_pending: false,
    in_signal: false,
    is_agent: false,
};

static PROCS: KCell<[Proc; PROC_MAX]> = KCell::new([EMPTY; PROC_MAX]);
static NEXT_PID: KCell<u32> = KCell::new(1);

/// Process slot `i`.
pub fn get(i: usize) -> &'static mut Proc {
    &mut PROCS.get()[i]
}

/// Address of the process table (for KInfo).
pub fn table_addr() -> u64 {
    PROCS.as_ptr() as u64
}

/// True if slot `i` holds a live process.
pub fn alive(i: usize) -> bool {
    let s = get(i).abi.state;
    s == proc_state::RUNNABLE || s == proc_state::BLOCKED
}

/// Why a process could not be created.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpawnError {
    /// No such executable.
    NotFound,
    /// Not a valid executable for this kernel.
    BadExec,
    /// The process table is full.
    TooMany,
    /// Out of memory.
    NoMem,
}

/// Create a process running the executable `path`; returns its slot.
pub fn spawn(path: &[u8], is_agent: bool) -> Result<usize, SpawnError> {
    let file = fs::lookup(path).ok_or(SpawnError::NotFound)?;
    if fs::file(file).abi.kind != file_kind::EXEC {
        return Err(SpawnError::BadExec);
    }
    let slot = (0..PROC_MAX)
        .find(|&i| get(i).abi.state == proc_state::FREE)
        .ok_or(SpawnError::TooMany)?;
    let pid = {
        let n = NEXT_PID.get();
        let pid = *n;
        *n += 1;
        pid
    };
    let pml4 = paging::new_user_pml4(pid).map_err(|_| SpawnError::NoMem)?;
    let p = get(slot);
    p.vmas = [Vma::FREE; MAX_VMAS];
    p.fds = [0; MAX_FDS];
    p.abi.pid = pid;
    p.abi.cr3 = pml4;
    p.abi.name = [0; 32];
    let n = path.len().min(31);
    p.abi.name[..n].copy_from_slice(&path[..n]);
    let entry = match elf::load(p, file) {
        Ok(e) => e,
        Err(e) => {
            paging::free_user_tables(pml4);
            p.abi = EMPTY.abi;
            return Err(e);
        }
    };
    let stack = Vma::anon(
        USER_STACK_TOP - USER_STACK_MAX,
        USER_STACK_TOP,
        prot::READ | prot::WRITE,
    );
    if crate::uvm::add_vma(p, stack).is_err() {
        paging::free_user_tables(pml4);
        p.abi = EMPTY.abi;
        return Err(SpawnError::NoMem);
    }
    p.ctx = Context::user(entry, USER_STACK_TOP - 64);
    // The system-call gate for this process (the user runtime keeps it; see `native`).
    p.ctx.rdi = crate::native::gate();
    p.fx = FxArea::initial();
    p.mmap_next = USER_MMAP_BASE;
    p.wait = Wait::None;
    p.sig_handler = 0;
    p.sig_tramp = 0;
    p.sig_pending = false;
    p.in_signal = false;
    p.is_agent = is_agent;
    p.abi.state = proc_state::RUNNABLE;
    Ok(slot)
}

/// Release the page mapped at `v` (entry `pte`) by area `vma` of process `pid`.
pub fn release_page(vma: &Vma, pid: u32, pte: u64) {
    let phys = pte & paging::ADDR;
    if pte & paging::ANON != 0 {
        frame::free(phys);
        return;
    }
    let g = frame::get_use(phys);
    if g & 0xff == frame_use::USER_CODE as u32 && g >> 8 == pid {
        let (u, owner) = pagecache::cache_use(vma.file);
        frame::set_use(phys, u, owner);
    }
}

/// Tear down process slot `i`: unmap and free its memory and page tables, free the slot.
pub fn destroy(i: usize) {
    let p = get(i);
    let pml4 = p.abi.cr3;
    let pid = p.abi.pid;
    if pml4 != 0 {
        for vma in p.vmas.iter().filter(|v| v.kind != VmaKind::Free) {
            paging::for_each_leaf(pml4, vma.start, vma.end, &mut |_, pte| {
                release_page(vma, pid, pte)
            });
        }
        if crate::arch::read_cr3() & paging::ADDR == pml4 {
            // SAFETY: the kernel PML4 maps the kernel half identically.
            unsafe { crate::arch::write_cr3(paging::kernel_pml4()) };
        }
        paging::free_user_tables(pml4);
    }
    crate::sched::forget(i);
    p.vmas = [Vma::FREE; MAX_VMAS];
    p.wait = Wait::None;
    p.abi = EMPTY.abi;
}
