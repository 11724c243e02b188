//! System calls through the `ud2` gate (`abi::syscall`): number in rax, arguments in
//! rdi, rsi, rdx, r10, r8, r9; result in rax (negative errno on failure). A bad user pointer
//! kills the caller.

use kscope_guest::abi::boot::Identity;
use kscope_guest::abi::fs::NAME_MAX;
use kscope_guest::abi::kinfo::frame_use;
use kscope_guest::abi::layout::{virt_to_phys, PAGE_SIZE};
use kscope_guest::abi::net as nabi;
use kscope_guest::abi::request::MAX_RESPONSE;
use kscope_guest::abi::syscall::{self as nr, errno, FileStat};

use crate::mm::{frame, va};
use crate::proc::{self, SpawnError, MAX_FDS};
use crate::trap::Context;
use crate::uvm::{self, Access, Fault};
use crate::{clone, console, fs, pagecache, request, rng, sched};

/// Outcome of a call.
enum Ret {
    /// Return this value in rax.
    Val(i64),
    /// The process blocked, exited or had its context replaced: leave rax alone.
    Done,
}

fn err(e: i64) -> Result<Ret, Fault> {
    Ok(Ret::Val(-e))
}

/// Handle a #UD from user mode in process `slot`; `frame` is its live context (see
/// [`sched::spill`]).
pub fn handle(slot: usize, frame: &mut Context) {
    let rip = frame.rip;
    if !is_ud2(slot, rip) {
        crate::kprint!(s "kscope: invalid opcode at rip ", x rip, s "\n");
        sched::kill(slot, "illegal instruction");
        return;
    }
    frame.rip += 2;
    dispatch(slot, frame);
}

/// Run the system call in `frame` (number in rax, arguments in rdi, rsi, rdx, r10, r8, r9)
/// for process `slot`; the `syscall` entry comes here directly (RIP already past it).
pub fn dispatch(slot: usize, frame: &mut Context) {
    let (n, a) = (
        frame.rax,
        [
            frame.rdi, frame.rsi, frame.rdx, frame.r10, frame.r8, frame.r9,
        ],
    );
    if matches!(
        n,
        nr::RECV_REQUEST | nr::REPLY_RECV | nr::SIGRETURN | nr::YIELD | nabi::NET_POLL
    ) {
        // These block, replace or hand over the context: work on the saved copy.
        sched::spill(slot, frame);
    }
    match call(slot, n, a) {
        Ok(Ret::Val(v)) if sched::is_live() => frame.rax = v as u64,
        Ok(Ret::Val(v)) => proc::get(slot).ctx.rax = v as u64,
        Ok(Ret::Done) => {}
        Err(f) => {
            crate::kprint!(s "kscope: system call ", d n, s ": bad user pointer (", s uvm::fault_name(f), s ")\n");
            sched::kill(slot, "bad pointer in system call");
        }
    }
}

/// True if the instruction at user `rip` is `ud2` (0f 0b). Fast path: the page is mapped
/// (it just executed) and the two bytes do not straddle a page.
fn is_ud2(slot: usize, rip: u64) -> bool {
    if rip % PAGE_SIZE <= PAGE_SIZE - 2 {
        let pte = crate::mm::paging::lookup(proc::get(slot).abi.cr3, rip & !(PAGE_SIZE - 1));
        if pte & crate::mm::paging::P != 0 {
            let at = va(pte & crate::mm::paging::ADDR) + rip % PAGE_SIZE;
            // SAFETY: two bytes inside a mapped user page, read through the direct map.
            return unsafe { (at as *const [u8; 2]).read() } == [0x0f, 0x0b];
        }
    }
    let mut op = [0u8; 2];
    uvm::copy_from_user(slot, rip, &mut op).is_ok() && op == [0x0f, 0x0b]
}

fn fd_file(slot: usize, fd: u64) -> Option<usize> {
    let p = proc::get(slot);
    if fd < 3
        || fd >= MAX_FDS as u64
        || p.fds[fd as usize] == 0
        || p.fds[fd as usize] & crate::net::socket::SOCK_TAG != 0
    {
        return None;
    }
    Some(p.fds[fd as usize] as usize - 1)
}

fn read_path(slot: usize, ptr: u64, len: u64) -> Result<Option<([u8; NAME_MAX], usize)>, Fault> {
    if len == 0 || len >= NAME_MAX as u64 {
        return Ok(None);
    }
    let mut b = [0u8; NAME_MAX];
    uvm::copy_from_user(slot, ptr, &mut b[..len as usize])?;
    Ok(Some((b, len as usize)))
}

fn call(slot: usize, n: u64, a: [u64; 6]) -> Result<Ret, Fault> {
    match n {
        nr::EXIT => {
            sched::exit(slot, a[0] as i32);
            Ok(Ret::Done)
        }
        nr::WRITE => {
            if a[0] != 1 && a[0] != 2 {
                return err(errno::EBADF);
            }
            uvm::for_user_chunks(slot, a[1], a[2], Access::Read, &mut |k, len| {
                // SAFETY: `k` is the direct-map address of `len` bytes of a user page.
                console::write(unsafe { core::slice::from_raw_parts(k as *const u8, len) })
            })?;
            Ok(Ret::Val(a[2] as i64))
        }
        nr::OPEN => {
            let Some((b, len)) = read_path(slot, a[0], a[1])? else {
                return err(errno::ENOENT);
            };
            let Some(f) = fs::lookup(&b[..len]) else {
                return err(errno::ENOENT);
            };
            let p = proc::get(slot);
            let Some(fd) = (3..MAX_FDS).find(|&i| p.fds[i] == 0) else {
                return err(errno::EMFILE);
            };
            p.fds[fd] = f as u32 + 1;
            Ok(Ret::Val(fd as i64))
        }
        nr::CLOSE if crate::net::socket::is_socket(slot, a[0]) => {
            Ok(Ret::Val(crate::net::socket::close(slot, a[0])))
        }
        nabi::NET_SOCKET..=nabi::NET_CONNECT => match crate::net::socket::call(slot, n, a)? {
            crate::net::socket::Outcome::Val(v) => Ok(Ret::Val(v)),
            crate::net::socket::Outcome::Blocked => Ok(Ret::Done),
        },
        nr::CLOSE => {
            if fd_file(slot, a[0]).is_none() {
                return err(errno::EBADF);
            }
            proc::get(slot).fds[a[0] as usize] = 0;
            Ok(Ret::Val(0))
        }
        nr::PREAD => pread(slot, a[0], a[1], a[2], a[3]),
        nr::FSTAT => {
            let Some(f) = fd_file(slot, a[0]) else {
                return err(errno::EBADF);
            };
            let e = fs::file(f);
            let st = FileStat {
                size: e.abi.size,
                kind: e.abi.kind,
                ino: e.abi.ino,
            };
            uvm::put(slot, a[1], &st)?;
            Ok(Ret::Val(0))
        }
        nr::MMAP => {
            let file = if a[2] == u64::MAX {
                None
            } else {
                let Some(f) = fd_file(slot, a[2]) else {
                    return err(errno::EBADF);
                };
                Some((f, a[3]))
            };
            match uvm::mmap(slot, a[0], a[1], file) {
                Ok(addr) => Ok(Ret::Val(addr as i64)),
                Err(Fault::NoMem) => err(errno::ENOMEM),
                Err(_) => err(errno::EINVAL),
            }
        }
        nr::MUNMAP => match uvm::munmap(slot, a[0], a[1]) {
            Ok(()) => Ok(Ret::Val(0)),
            Err(Fault::NoMem) => err(errno::ENOMEM),
            Err(_) => err(errno::EINVAL),
        },
        nr::RECV_REQUEST => {
            sched::recv(slot, a[0], a[1], a[2]);
            Ok(Ret::Done)
        }
        nr::SEND_RESPONSE => send_response(slot, a[0], a[1], a[2], a[3] as u32),
        nr::REPLY_RECV => {
            let m: kscope_guest::abi::syscall::RequestMeta = uvm::get(slot, a[5])?;
            if a[0] != u64::MAX {
                if let Ret::Val(e) = send_response(slot, a[0], a[1], a[2], a[3] as u32)? {
                    if e < 0 {
                        return Ok(Ret::Val(e));
                    }
                }
            }
            sched::recv(slot, a[4], m.len, a[5]);
            Ok(Ret::Done)
        }
        nr::GETRANDOM => {
            let mut buf = [0u8; 256];
            let mut off = 0;
            while off < a[1] {
                let n = (a[1] - off).min(256) as usize;
                rng::fill(&mut buf[..n]);
                uvm::copy_to_user(slot, a[0] + off, &buf[..n])?;
                off += n as u64;
            }
            Ok(Ret::Val(a[1] as i64))
        }
        nr::CLOCK_NS => Ok(Ret::Val(crate::clock_ns() as i64)),
        nr::SIGCLONE_REGISTER => {
            let p = proc::get(slot);
            p.sig_handler = a[0];
            p.sig_tramp = a[1];
            Ok(Ret::Val(0))
        }
        nr::SIGRETURN => {
            if clone::sigreturn(slot) {
                Ok(Ret::Done)
            } else {
                err(errno::EINVAL)
            }
        }
        nr::RESEED => {
            let mut buf = [0u8; 256];
            let mut off = 0;
            while off < a[1] {
                let n = (a[1] - off).min(256) as usize;
                uvm::copy_from_user(slot, a[0] + off, &mut buf[..n])?;
                rng::reseed(&buf[..n]);
                off += n as u64;
            }
            Ok(Ret::Val(0))
        }
        nr::SET_IDENTITY => {
            let id: Identity = uvm::get(slot, a[0])?;
            clone::set_identity(id);
            Ok(Ret::Val(0))
        }
        nr::GET_IDENTITY => {
            uvm::put(slot, a[0], &clone::identity())?;
            Ok(Ret::Val(0))
        }
        nr::SPAWN => {
            let Some((b, len)) = read_path(slot, a[0], a[1])? else {
                return err(errno::ENOENT);
            };
            match proc::spawn(&b[..len], false) {
                Ok(s) => {
                    sched::started(s, false);
                    Ok(Ret::Val(proc::get(s).abi.pid as i64))
                }
                Err(SpawnError::NotFound) => err(errno::ENOENT),
                Err(SpawnError::BadExec) => err(errno::EINVAL),
                Err(SpawnError::TooMany) => err(errno::EMFILE),
                Err(SpawnError::NoMem) => err(errno::ENOMEM),
            }
        }
        nr::YIELD => {
            sched::yield_now();
            Ok(Ret::Val(0))
        }
        nr::GETPID => Ok(Ret::Val(proc::get(slot).abi.pid as i64)),
        nr::CPU_MODE => Ok(Ret::Val(crate::native::detect() as i64)),
        nr::DROP_INFLIGHT => Ok(Ret::Val(request::drop_inflight() as i64)),
        nr::LISTDIR => {
            let (buf, cap) = (a[0], a[1]);
            let mut off = 0u64;
            for i in 0..fs::count() {
                let name = fs::file(i).abi.name;
                let l = fs::name_len(&name) as u64;
                if off + l + 1 > cap {
                    break;
                }
                uvm::copy_to_user(slot, buf + off, &name[..l as usize + 1])?;
                off += l + 1;
            }
            Ok(Ret::Val(off as i64))
        }
        _ => err(errno::ENOSYS),
    }
}

fn pread(slot: usize, fd: u64, buf: u64, len: u64, off: u64) -> Result<Ret, Fault> {
    let Some(f) = fd_file(slot, fd) else {
        return err(errno::EBADF);
    };
    let size = fs::file(f).abi.size;
    if off >= size {
        return Ok(Ret::Val(0));
    }
    let total = len.min(size - off);
    let mut done = 0;
    while done < total {
        let pos = off + done;
        let page = match pagecache::get(f, pos / PAGE_SIZE) {
            Ok(p) => p,
            Err(pagecache::PcError::NoMem) => return err(errno::ENOMEM),
            Err(_) => return err(5), // EIO
        };
        let n = (PAGE_SIZE - pos % PAGE_SIZE).min(total - done);
        // SAFETY: `n` bytes inside a cached page (direct-mapped, never freed).
        let src = unsafe {
            core::slice::from_raw_parts((va(page) + pos % PAGE_SIZE) as *const u8, n as usize)
        };
        uvm::copy_to_user(slot, buf + done, src)?;
        done += n;
    }
    Ok(Ret::Val(total as i64))
}

fn send_response(slot: usize, id: u64, buf: u64, len: u64, status: u32) -> Result<Ret, Fault> {
    if len > MAX_RESPONSE as u64 {
        return err(errno::EINVAL);
    }
    // Copy the payload into frames the request driver owns until the device has read them
    // (the process goes on at once; no exit). A bad pointer kills the caller before anything
    // is sent.
    let pages = len.div_ceil(PAGE_SIZE);
    let phys = if pages == 0 {
        0
    } else {
        match frame::alloc_contig(pages, frame_use::KERNEL_DATA, 0) {
            Some(p) => p,
            None => return err(errno::ENOMEM),
        }
    };
    let mut off = 0u64;
    let copied = uvm::for_user_chunks(slot, buf, len, Access::Read, &mut |k, n| {
        crate::klib::copy(va(phys) + off, k, n);
        off += n as u64;
    });
    // A clone must not answer its parent's requests: notice a new generation first.
    clone::check();
    if copied.is_err() || !request::take_inflight(id) {
        for i in 0..pages {
            frame::free(phys + i * PAGE_SIZE);
        }
        // Not in flight (dropped by a clone, or never handed out): discard the answer.
        return copied.map(|_| Ret::Val(0));
    }
    request::respond(id, status, phys, len as u32, pages);
    Ok(Ret::Val(0))
}
