//! The scheduler: cooperative round robin over the process table. Every entry from user mode
//! lands here (on the trap stack); the kernel then returns to the same process, or to the
//! next runnable one, by building its `iretq` frame. With nothing runnable it polls the
//! devices and halts (an exit to the VMM, which delivers pending requests).

use kscope_guest::abi::kinfo::proc_state;
use kscope_guest::abi::layout::ports;
use kscope_guest::abi::syscall::RequestMeta;

use crate::arch::{self, KCell};
use crate::proc::{self, Wait, PROC_MAX};
use crate::trap::{self, vector, Context};
use crate::{clone, request, syscall, uvm};

struct Sched {
    current: Option<usize>,
    live: bool,
    fpu_owner: Option<usize>,
    yielded: bool,
    seq: u64,
    init_pid: u32,
    ready_sent: bool,
    started: u32,
}

static S: KCell<Sched> = KCell::new(Sched {
    current: None,
    live: false,
    fpu_owner: None,
    yielded: false,
    seq: 0,
    init_pid: 0,
    ready_sent: false,
    started: 0,
});

/// Record that a process was started (`is_init` for the init process).
pub fn started(slot: usize, is_init: bool) {
    let s = S.get();
    s.started += 1;
    if is_init {
        s.init_pid = proc::get(slot).abi.pid;
    }
}

/// The slot of the running process.
pub fn current() -> Option<usize> {
    S.get().current
}

/// Forget a slot that is being freed.
pub fn forget(slot: usize) {
    let s = S.get();
    if s.fpu_owner == Some(slot) {
        s.fpu_owner = None;
    }
    if s.current == Some(slot) {
        s.current = None;
    }
}

/// Make the FPU state of `slot` current in its save area (before copying it).
pub fn sync_fpu(slot: usize) {
    let s = S.get();
    if s.fpu_owner == Some(slot) {
        arch::fxsave(&mut proc::get(slot).fx);
    }
}

/// Invalidate the loaded FPU state of `slot` (its save area was replaced).
pub fn reload_fpu(slot: usize) {
    let s = S.get();
    if s.fpu_owner == Some(slot) {
        s.fpu_owner = None;
    }
}

/// The running process gives up the CPU.
pub fn yield_now() {
    S.get().yielded = true;
}

/// Entry from user mode (any exception). The trap frame on the trap stack stays the live
/// context of the current process (no copy: every instruction is emulated at CPL0 here) until
/// something needs the saved copy in the process table: see [`spill`].
pub fn from_user(frame: &mut Context) -> ! {
    let Some(cur) = S.get().current else {
        crate::fatal(
            "trap from user mode without a current process",
            kscope_guest::abi::panic_code::KERNEL_EXCEPTION,
        );
    };
    S.get().live = true;
    match frame.vector {
        vector::SYSCALL => syscall::dispatch(cur, frame),
        vector::UD => syscall::handle(cur, frame),
        vector::PF => {
            let cr2 = arch::read_cr2();
            if let Err(f) = uvm::page_fault(cur, cr2, frame.error) {
                crate::kprint!(s "kscope: page fault at ", x cr2, s " rip ", x frame.rip, s " error ", x frame.error, s ": ", s uvm::fault_name(f), s "\n");
                kill(cur, "segmentation fault");
            }
        }
        v => {
            crate::kprint!(s "kscope: exception ", d v, s " at rip ", x frame.rip, s " error ", x frame.error, s "\n");
            kill(cur, "fatal exception");
        }
    }
    // Fast return: the process simply goes on running (no switch, no signal, no yield), so
    // resume it from the trap frame and skip the scheduler. Devices are polled and the clone
    // generation checked whenever a process blocks or yields.
    let s = S.get();
    if s.live {
        let p = proc::get(cur);
        if s.current == Some(cur)
            && !s.yielded
            && p.abi.state == proc_state::RUNNABLE
            && !p.sig_pending
        {
            s.live = false;
            trap::resume_user(frame);
        }
        spill(cur, frame);
    }
    schedule()
}

/// Save the live trap frame of the current process `cur` into its process-table entry;
/// from then on the entry is authoritative (blocking, signals, switches work on it).
pub fn spill(cur: usize, frame: &Context) {
    let s = S.get();
    if s.live {
        s.live = false;
        if proc::alive(cur) {
            proc::get(cur).ctx = *frame;
        }
    }
}

/// True while the current process's context lives in the trap frame.
pub fn is_live() -> bool {
    S.get().live
}

/// Kill process `slot` after a fault.
pub fn kill(slot: usize, why: &str) {
    let p = proc::get(slot);
    crate::kprint!(s "kscope: killed pid ", d p.abi.pid, s " (", n p.abi.name, s "): ", s why, s "\n");
    exit(slot, 139);
}

/// Terminate process `slot` with `code`; init's exit powers the VM off.
pub fn exit(slot: usize, code: i32) {
    let pid = proc::get(slot).abi.pid;
    proc::destroy(slot);
    if pid == S.get().init_pid {
        crate::kprint!(s "kscope: init exited with code ", d code as u32, s ", powering off\n");
        arch::outl(ports::POWEROFF, code as u32);
        loop {
            arch::hlt();
        }
    }
}

fn has_receiver() -> bool {
    (0..PROC_MAX).any(|i| proc::alive(i) && !proc::get(i).is_agent)
}

/// Block `slot` in `recv_request`, or complete it at once if a request is pending.
pub fn recv(slot: usize, buf: u64, len: u64, meta: u64) {
    note_ready(slot);
    let s = S.get();
    let p = proc::get(slot);
    p.wait = Wait::Recv { buf, len, meta };
    p.abi.state = proc_state::BLOCKED;
    s.seq += 1;
    p.wait_seq = s.seq;
    clone::check();
    deliver_requests();
}

/// The init process waits for work for the first time: tell the VMM the guest is READY.
pub fn note_ready(slot: usize) {
    let s = S.get();
    if !s.ready_sent && proc::get(slot).abi.pid == s.init_pid {
        s.ready_sent = true;
        crate::kprint!(s "kscope: ready (", d s.started, s " processes)\n");
        arch::outl(ports::READY, s.started);
    }
}

/// Pid of the init process.
pub fn init_pid() -> u32 {
    S.get().init_pid
}

/// Hand pending requests to waiting processes (oldest waiter first).
fn deliver_requests() {
    request::poll(has_receiver());
    while let Some(req) = request::peek() {
        let waiter = (0..PROC_MAX)
            .filter(|&i| {
                let p = proc::get(i);
                p.abi.state == proc_state::BLOCKED
                    && !p.is_agent
                    && matches!(p.wait, Wait::Recv { .. })
            })
            .min_by_key(|&i| proc::get(i).wait_seq);
        let Some(w) = waiter else { return };
        let Wait::Recv { buf, len, meta } = proc::get(w).wait else {
            return;
        };
        let n = (req.len as u64).min(len) as usize;
        // SAFETY: the payload lies in the request's RX buffer (kernel memory), `n` bytes.
        let payload = unsafe { core::slice::from_raw_parts(req.payload as *const u8, n) };
        let m = RequestMeta {
            id: req.hdr.id,
            len: req.hdr.len as u64,
        };
        let r = uvm::copy_to_user(w, buf, payload).and_then(|_| uvm::put(w, meta, &m));
        match r {
            Ok(()) => {
                request::consume(true);
                let p = proc::get(w);
                p.ctx.rax = n as u64;
                p.wait = Wait::None;
                p.abi.state = proc_state::RUNNABLE;
            }
            Err(f) => {
                crate::kprint!(s "kscope: recv_request: bad buffer: ", s uvm::fault_name(f), s "\n");
                kill(w, "bad pointer in system call");
            }
        }
    }
}

fn pick() -> Option<usize> {
    let s = S.get();
    if let Some(c) = s.current {
        if !s.yielded && proc::get(c).abi.state == proc_state::RUNNABLE {
            return Some(c);
        }
    }
    let start = s.current.map(|c| c + 1).unwrap_or(0);
    (0..PROC_MAX)
        .map(|k| (start + k) % PROC_MAX)
        .find(|&i| proc::get(i).abi.state == proc_state::RUNNABLE)
}

/// Run something: the heart of the kernel. Never returns.
pub fn schedule() -> ! {
    loop {
        clone::check();
        deliver_requests();
        crate::net::poll();
        if let Some(i) = pick() {
            let p = proc::get(i);
            if p.sig_pending && !p.in_signal {
                S.get().current = Some(i);
                if let Err(f) = clone::deliver(i) {
                    crate::kprint!(s "kscope: cannot deliver SIGCLONE: ", s uvm::fault_name(f), s "\n");
                    kill(i, "bad signal stack");
                    continue;
                }
            }
            run(i);
        }
        if crate::net::before_halt() {
            arch::hlt();
        }
    }
}

fn run(i: usize) -> ! {
    let s = S.get();
    s.current = Some(i);
    s.yielded = false;
    let p = proc::get(i);
    if arch::read_cr3() & crate::mm::paging::ADDR != p.abi.cr3 {
        // SAFETY: process PML4s share the kernel half with the kernel's tables.
        unsafe { arch::write_cr3(p.abi.cr3) };
        let isolated = crate::mm::paging::isolated();
        trap::set_tables(p.abi.cr3, crate::mm::paging::user_pml4(p.abi.cr3), isolated);
    }
    if s.fpu_owner != Some(i) {
        if let Some(o) = s.fpu_owner {
            arch::fxsave(&mut proc::get(o).fx);
        }
        arch::fxrstor(&p.fx);
        s.fpu_owner = Some(i);
    }
    trap::resume_user(&mut p.ctx)
}
