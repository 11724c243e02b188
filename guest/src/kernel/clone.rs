//! Clone awareness: the VMM bumps `GenPage.generation` in every clone. On a change the
//! kernel reseeds its RNG, drops requests in flight and pending (answers to them are
//! discarded), and delivers SIGCLONE to every process that registered a handler.

use kscope_guest::abi::boot::{GenPage, Identity, GENPAGE_MAGIC};
use kscope_guest::abi::kinfo::proc_state;
use kscope_guest::abi::layout::{phys_to_virt, GENPAGE_GPA};
use kscope_guest::abi::syscall::{CloneInfo, RECV_REQUEST};

use crate::arch::KCell;
use crate::proc::{self, Wait, PROC_MAX};
use crate::uvm::{self, Fault};
use crate::{kinfo, request, rng, sched};

struct CloneState {
    seen: u64,
    info: CloneInfo,
    identity: Identity,
}

static C: KCell<CloneState> = KCell::new(CloneState {
    seen: 0,
    info: CloneInfo {
        generation: 0,
        clone_id: 0,
        seed: [0; 32],
        identity: Identity {
            mac: [0; 8],
            ipv4: [0; 4],
            prefix_len: 0,
            hostname: [0; 32],
        },
    },
    identity: Identity {
        mac: [0; 8],
        ipv4: [0; 4],
        prefix_len: 0,
        hostname: [0; 32],
    },
});

fn genpage() -> GenPage {
    // SAFETY: the generation page is RAM written by the VMM, direct-mapped; a volatile read
    // sees the VMM's latest values (it only changes while the vCPU is stopped).
    unsafe { core::ptr::read_volatile(phys_to_virt(GENPAGE_GPA) as *const GenPage) }
}

/// Read the generation page at boot: seed the RNG, take the identity.
pub fn init() {
    let g = genpage();
    let c = C.get();
    if g.magic == GENPAGE_MAGIC {
        c.seen = g.generation;
        c.identity = g.identity;
        rng::reseed(&g.seed);
    } else {
        crate::console::puts("kscope: warning: no clone-generation page\n");
        rng::reseed(&[]);
    }
    kinfo::set_generation(c.seen);
}

/// Check for a new clone generation and act on it.
pub fn check() {
    // Only the generation word on the fast path (every instruction is emulated here).
    // SAFETY: `generation` is the second word of the direct-mapped generation page.
    let generation = unsafe { ((phys_to_virt(GENPAGE_GPA) + 8) as *const u64).read_volatile() };
    let c = C.get();
    if generation == c.seen {
        return;
    }
    let g = genpage();
    if g.magic != GENPAGE_MAGIC || g.generation == c.seen {
        return;
    }
    c.seen = g.generation;
    c.identity = g.identity;
    c.info = CloneInfo {
        generation: g.generation,
        clone_id: g.clone_id,
        seed: g.seed,
        identity: g.identity,
    };
    rng::reseed(&g.seed);
    crate::native::report();
    let dropped = request::drop_all();
    crate::net::on_clone(&g.identity);
    kinfo::set_generation(g.generation);
    crate::kprint!(s "kscope: clone generation ", d g.generation, s " (clone id ", d g.clone_id, s "), dropped ", d dropped, s " requests\n");
    for i in 0..PROC_MAX {
        let p = proc::get(i);
        if !proc::alive(i) || p.sig_handler == 0 {
            continue;
        }
        p.sig_pending = true;
        if let Wait::Recv { buf, len, meta } = p.wait {
            // Restart the blocking call after the handler as a plain `recv_request` (also
            // when it was a `reply_recv`, whose reply is sent): back to the gate instruction
            // (`ud2` and `syscall` are both two bytes).
            p.wait = Wait::None;
            p.ctx.rip -= 2;
            p.ctx.rax = RECV_REQUEST;
            (p.ctx.rdi, p.ctx.rsi, p.ctx.rdx) = (buf, len, meta);
            p.abi.state = proc_state::RUNNABLE;
        }
    }
}

/// Deliver SIGCLONE to `slot`: save its context, call the handler on its stack.
pub fn deliver(slot: usize) -> Result<(), Fault> {
    sched::sync_fpu(slot);
    let p = proc::get(slot);
    let info = C.get().info;
    let mut sp = p.ctx.rsp.wrapping_sub(128);
    sp = (sp - core::mem::size_of::<CloneInfo>() as u64) & !15;
    let info_ptr = sp;
    sp -= 8;
    uvm::put(slot, info_ptr, &info)?;
    uvm::put(slot, sp, &p.sig_tramp)?;
    p.sig_ctx = p.ctx;
    p.sig_fx = p.fx;
    p.ctx.rsp = sp;
    p.ctx.rip = p.sig_handler;
    p.ctx.rdi = info_ptr;
    p.ctx.rflags &= !(1 << 10);
    p.in_signal = true;
    p.sig_pending = false;
    kinfo::count_sigclone();
    Ok(())
}

/// `sigreturn`: restore the context saved at delivery. False if no handler is running.
pub fn sigreturn(slot: usize) -> bool {
    let p = proc::get(slot);
    if !p.in_signal {
        return false;
    }
    p.ctx = p.sig_ctx;
    p.fx = p.sig_fx;
    p.in_signal = false;
    sched::reload_fpu(slot);
    true
}

/// The VM's identity.
pub fn identity() -> Identity {
    C.get().identity
}

/// Replace the VM's identity.
pub fn set_identity(id: Identity) {
    C.get().identity = id;
}
