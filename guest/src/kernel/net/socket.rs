//! Socket system calls (`abi::net`): a table of user-visible sockets over the stack's fixed
//! smoltcp sockets. A descriptor of a process holds [`SOCK_TAG`] | entry index. A listener
//! owns a backlog of smoltcp sockets listening on its port (smoltcp turns a listening socket
//! into the connection); `accept` hands an established one out and re-arms a fresh one.
//! `poll` is the only blocking call: its waiters are re-checked after every stack poll.

use kscope_guest::abi::kinfo::proc_state;
use kscope_guest::abi::net::{
    self as nabi, errno as nerr, NetInfo, PollFd, SockAddr, MAX_BACKLOG, POLL_ERR, POLL_HUP,
    POLL_IN, POLL_OUT, REQUEST_FD,
};
use kscope_guest::abi::syscall::errno;
use smoltcp::socket::tcp::State;
use smoltcp::wire::{IpAddress, IpEndpoint, Ipv4Address};

use super::{poll_stack, virtio_net, Net};
use crate::arch::KCell;
use crate::proc::{self, MAX_FDS, PROC_MAX};
use crate::uvm::{self, Fault};

/// Tag of socket descriptors in a process's descriptor table.
pub const SOCK_TAG: u32 = 0x8000_0000;
const MAX_ENTRIES: usize = 48;
const BACKLOG: usize = MAX_BACKLOG as usize;
const NONE: u8 = 0xff;
/// Largest `poll` set.
const MAX_POLL: usize = 32;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Free,
    TcpNew,
    TcpBound(u16),
    TcpListen {
        port: u16,
        pool: [u8; BACKLOG],
    },
    TcpConn(u8),
    /// Closed by its process; the connection finishes its FIN exchange.
    TcpClosing(u8),
    Udp(u8),
}

#[derive(Clone, Copy)]
struct Entry {
    kind: Kind,
    slot: usize,
    pid: u32,
}

#[derive(Clone, Copy)]
struct Waiter {
    pid: u32,
    fds: u64,
    n: usize,
    deadline_ns: u64,
}

struct Table {
    e: [Entry; MAX_ENTRIES],
    waiters: [Option<Waiter>; PROC_MAX],
}

static T: KCell<Table> = KCell::new(Table {
    e: [Entry {
        kind: Kind::Free,
        slot: 0,
        pid: 0,
    }; MAX_ENTRIES],
    waiters: [None; PROC_MAX],
});

/// Outcome of a socket call: a value for rax, or the caller blocked.
pub enum Outcome {
    /// Return this.
    Val(i64),
    /// The caller blocked in `poll`.
    Blocked,
}

fn val(v: i64) -> Result<Outcome, Fault> {
    Ok(Outcome::Val(v))
}

fn owner_alive(e: &Entry) -> bool {
    proc::alive(e.slot) && proc::get(e.slot).abi.pid == e.pid
}

/// The entry behind descriptor `fd` of process `slot`.
fn entry_of(slot: usize, fd: u64) -> Option<usize> {
    if fd >= MAX_FDS as u64 {
        return None;
    }
    let v = proc::get(slot).fds[fd as usize];
    if v & SOCK_TAG == 0 {
        return None;
    }
    let i = (v & !SOCK_TAG) as usize;
    (i < MAX_ENTRIES && T.get().e[i].kind != Kind::Free).then_some(i)
}

/// True if descriptor `fd` of `slot` is a socket.
pub fn is_socket(slot: usize, fd: u64) -> bool {
    fd < MAX_FDS as u64 && proc::get(slot).fds[fd as usize] & SOCK_TAG != 0
}

fn new_entry(slot: usize, kind: Kind) -> Option<usize> {
    let t = T.get();
    let i = t.e.iter().position(|e| e.kind == Kind::Free)?;
    t.e[i] = Entry {
        kind,
        slot,
        pid: proc::get(slot).abi.pid,
    };
    Some(i)
}

fn install_fd(slot: usize, entry: usize) -> Option<u64> {
    let p = proc::get(slot);
    let fd = (3..MAX_FDS).find(|&i| p.fds[i] == 0)?;
    p.fds[fd] = SOCK_TAG | entry as u32;
    Some(fd as u64)
}

fn endpoint(a: &SockAddr) -> IpEndpoint {
    let [x, y, z, w] = a.ip;
    IpEndpoint::new(IpAddress::v4(x, y, z, w), a.port)
}

fn sockaddr(e: IpEndpoint) -> SockAddr {
    let ip = match e.addr {
        IpAddress::Ipv4(a) => a.octets(),
    };
    SockAddr {
        ip,
        port: e.port,
        pad: 0,
    }
}

/// Release entry `i` (its descriptor is already gone): connections close gracefully.
fn release(n: &mut Net, i: usize) {
    let t = T.get();
    match t.e[i].kind {
        Kind::TcpConn(c) => {
            n.tcp(c as usize).close();
            t.e[i].kind = Kind::TcpClosing(c);
            return;
        }
        Kind::TcpListen { pool, .. } => {
            for &s in pool.iter().filter(|&&s| s != NONE) {
                n.free_tcp(s as usize);
            }
        }
        Kind::TcpClosing(c) => n.free_tcp(c as usize),
        Kind::Udp(u) => n.free_udp(u as usize),
        Kind::Free | Kind::TcpNew | Kind::TcpBound(_) => {}
    }
    t.e[i].kind = Kind::Free;
}

/// `close` of a socket descriptor.
pub fn close(slot: usize, fd: u64) -> i64 {
    let Some(i) = entry_of(slot, fd) else {
        return -errno::EBADF;
    };
    proc::get(slot).fds[fd as usize] = 0;
    if let Some(n) = super::net() {
        release(n, i);
        poll_stack(n);
    }
    0
}

/// Tidy the table: finish closing connections, free the sockets of dead processes, re-arm
/// listener backlogs.
pub fn maintain(n: &mut Net) {
    let t = T.get();
    for i in 0..MAX_ENTRIES {
        let e = t.e[i];
        if e.kind == Kind::Free {
            continue;
        }
        if !owner_alive(&e) {
            if let Kind::TcpClosing(_) = e.kind {
            } else {
                release(n, i);
                continue;
            }
        }
        match e.kind {
            Kind::TcpClosing(c) => {
                let st = n.tcp(c as usize).state();
                if matches!(st, State::Closed | State::TimeWait) {
                    n.free_tcp(c as usize);
                    t.e[i].kind = Kind::Free;
                }
            }
            Kind::TcpListen { port, mut pool } => {
                for s in pool.iter_mut() {
                    if *s == NONE {
                        if let Some(k) = n.alloc_tcp() {
                            *s = k as u8;
                        } else {
                            continue;
                        }
                    }
                    let sock = n.tcp(*s as usize);
                    if sock.state() == State::Closed {
                        let _ = sock.listen(port);
                    }
                }
                t.e[i].kind = Kind::TcpListen { port, pool };
            }
            _ => {}
        }
    }
}

/// Drop every connection (clone): established sockets and half-open backlog entries are
/// reset without a packet; listeners and UDP sockets stay. Returns how many were dropped.
pub fn drop_connections(n: &mut Net) -> u64 {
    let t = T.get();
    let mut dropped = 0;
    for i in 0..MAX_ENTRIES {
        match t.e[i].kind {
            Kind::TcpConn(c) => {
                super::silent_reset(n.tcp(c as usize));
                dropped += 1;
            }
            Kind::TcpClosing(c) => {
                n.free_tcp(c as usize);
                t.e[i].kind = Kind::Free;
                dropped += 1;
            }
            Kind::TcpListen { pool, .. } => {
                for &s in pool.iter().filter(|&&s| s != NONE) {
                    let sock = n.tcp(s as usize);
                    if sock.state() != State::Listen {
                        super::silent_reset(sock);
                        dropped += 1;
                    }
                }
            }
            _ => {}
        }
    }
    maintain(n);
    dropped
}

/// Readiness of one `poll` entry of process `slot`.
fn readiness(n: &mut Net, slot: usize, pf: &PollFd) -> u16 {
    if pf.fd == REQUEST_FD {
        return if crate::request::peek().is_some() {
            POLL_IN
        } else {
            0
        };
    }
    if pf.fd < 0 {
        return 0;
    }
    let Some(i) = entry_of(slot, pf.fd as u64) else {
        return POLL_ERR;
    };
    let r = match T.get().e[i].kind {
        Kind::TcpListen { pool, .. } => {
            let ready = pool.iter().filter(|&&s| s != NONE).any(|&s| {
                matches!(
                    n.tcp(s as usize).state(),
                    State::Established | State::CloseWait
                )
            });
            if ready {
                POLL_IN
            } else {
                0
            }
        }
        Kind::TcpConn(c) => {
            let s = n.tcp(c as usize);
            let mut r = 0;
            if s.state() == State::Closed {
                r |= POLL_ERR | POLL_IN | POLL_HUP;
            } else if matches!(s.state(), State::SynSent | State::SynReceived) {
                // Still connecting: nothing to report yet (not "closed for reading").
            } else {
                if s.can_recv() || !s.may_recv() {
                    r |= POLL_IN;
                }
                if !s.may_recv() {
                    r |= POLL_HUP;
                }
                if s.can_send() || !s.may_send() {
                    r |= POLL_OUT;
                }
            }
            r
        }
        Kind::Udp(u) => {
            let s = n.udp(u as usize);
            let mut r = 0;
            if s.can_recv() {
                r |= POLL_IN;
            }
            if s.can_send() {
                r |= POLL_OUT;
            }
            r
        }
        _ => 0,
    };
    r & (pf.events | POLL_ERR | POLL_HUP)
}

/// Evaluate a poll set in user memory; writes `revents` back; returns the ready count.
fn eval(n: &mut Net, slot: usize, fds: u64, cnt: usize) -> Result<usize, Fault> {
    let mut set = [PollFd::default(); MAX_POLL];
    let sz = core::mem::size_of::<PollFd>() as u64;
    let mut ready = 0;
    for (k, pf) in set.iter_mut().enumerate().take(cnt) {
        *pf = uvm::get(slot, fds + k as u64 * sz)?;
        pf.revents = readiness(n, slot, pf);
        if pf.revents != 0 {
            ready += 1;
        }
    }
    for (k, pf) in set.iter().enumerate().take(cnt) {
        uvm::put(slot, fds + k as u64 * sz, pf)?;
    }
    Ok(ready)
}

fn wake(slot: usize, v: i64) {
    let p = proc::get(slot);
    p.ctx.rax = v as u64;
    p.abi.state = proc_state::RUNNABLE;
    T.get().waiters[slot] = None;
}

/// Wake the `poll` waiters whose sets became ready or whose timeout passed.
pub fn wake_waiters(n: &mut Net) {
    let now = crate::clock_ns();
    for slot in 0..PROC_MAX {
        let Some(w) = T.get().waiters[slot] else {
            continue;
        };
        let p = proc::get(slot);
        if !proc::alive(slot) || p.abi.pid != w.pid || p.abi.state != proc_state::BLOCKED {
            T.get().waiters[slot] = None;
            continue;
        }
        match eval(n, slot, w.fds, w.n) {
            Ok(0) if now < w.deadline_ns => {}
            Ok(r) => wake(slot, r as i64),
            Err(_) => {
                T.get().waiters[slot] = None;
                crate::sched::kill(slot, "bad pointer in poll");
            }
        }
    }
}

/// Wake every `poll` waiter with 0 (a clone generation began).
pub fn wake_all(_n: &mut Net) {
    for slot in 0..PROC_MAX {
        if let Some(w) = T.get().waiters[slot] {
            if proc::alive(slot) && proc::get(slot).abi.pid == w.pid {
                wake(slot, 0);
            } else {
                T.get().waiters[slot] = None;
            }
        }
    }
}

/// The nearest `poll` deadline (clock ns), if any waiter has one.
pub fn next_deadline_ns() -> Option<u64> {
    T.get()
        .waiters
        .iter()
        .flatten()
        .map(|w| w.deadline_ns)
        .filter(|&d| d != u64::MAX)
        .min()
}

/// The socket system call `nr` of process `slot`.
pub fn call(slot: usize, nr: u64, a: [u64; 6]) -> Result<Outcome, Fault> {
    let Some(n) = super::net() else {
        if nr == nabi::NET_POLL {
            // Without a network only the request device can be polled: let the caller use
            // `recv_request`.
            return val(-nerr::ENODEV);
        }
        return val(-nerr::ENODEV);
    };
    match nr {
        nabi::NET_SOCKET => {
            let kind = match a[0] {
                nabi::SOCK_STREAM => Kind::TcpNew,
                nabi::SOCK_DGRAM => match n.alloc_udp() {
                    Some(u) => Kind::Udp(u as u8),
                    None => return val(-nerr::ENOBUFS),
                },
                _ => return val(-errno::EINVAL),
            };
            let Some(i) = new_entry(slot, kind) else {
                if let Kind::Udp(u) = kind {
                    n.free_udp(u as usize);
                }
                return val(-nerr::ENOBUFS);
            };
            match install_fd(slot, i) {
                Some(fd) => val(fd as i64),
                None => {
                    release(n, i);
                    val(-errno::EMFILE)
                }
            }
        }
        nabi::NET_BIND => {
            let Some(i) = entry_of(slot, a[0]) else {
                return val(-nerr::ENOTSOCK);
            };
            let port = a[1] as u16;
            if port == 0 || a[1] > 0xffff {
                return val(-errno::EINVAL);
            }
            let t = T.get();
            let taken = t.e.iter().any(|e| match e.kind {
                Kind::TcpBound(p) | Kind::TcpListen { port: p, .. } => p == port,
                _ => false,
            });
            match t.e[i].kind {
                Kind::TcpNew if taken => val(-nerr::EADDRINUSE),
                Kind::TcpNew => {
                    t.e[i].kind = Kind::TcpBound(port);
                    val(0)
                }
                Kind::Udp(u) => match n.udp(u as usize).bind(port) {
                    Ok(()) => val(0),
                    Err(_) => val(-errno::EINVAL),
                },
                _ => val(-errno::EINVAL),
            }
        }
        nabi::NET_LISTEN => {
            let Some(i) = entry_of(slot, a[0]) else {
                return val(-nerr::ENOTSOCK);
            };
            let Kind::TcpBound(port) = T.get().e[i].kind else {
                return val(-errno::EINVAL);
            };
            let want = (a[1] as usize).clamp(1, BACKLOG);
            let mut pool = [NONE; BACKLOG];
            for s in pool.iter_mut().take(want) {
                let Some(k) = n.alloc_tcp() else { break };
                let _ = n.tcp(k).listen(port);
                *s = k as u8;
            }
            if pool[0] == NONE {
                return val(-nerr::ENOBUFS);
            }
            T.get().e[i].kind = Kind::TcpListen { port, pool };
            val(0)
        }
        nabi::NET_ACCEPT => accept(n, slot, a[0], a[1]),
        nabi::NET_CONNECT => {
            let Some(i) = entry_of(slot, a[0]) else {
                return val(-nerr::ENOTSOCK);
            };
            if T.get().e[i].kind != Kind::TcpNew {
                return val(-errno::EINVAL);
            }
            let addr: SockAddr = uvm::get(slot, a[1])?;
            let Some(c) = n.alloc_tcp() else {
                return val(-nerr::ENOBUFS);
            };
            let local = n.ephemeral_port();
            let r = {
                let h = n.tcp[c];
                let s = n.sockets.get_mut::<smoltcp::socket::tcp::Socket>(h);
                s.connect(n.iface.context(), endpoint(&addr), local)
            };
            if r.is_err() {
                n.free_tcp(c);
                return val(-errno::EINVAL);
            }
            T.get().e[i].kind = Kind::TcpConn(c as u8);
            poll_stack(n);
            val(0)
        }
        nabi::NET_RECV => {
            let Some(i) = entry_of(slot, a[0]) else {
                return val(-nerr::ENOTSOCK);
            };
            let Kind::TcpConn(c) = T.get().e[i].kind else {
                return val(-nerr::ENOTCONN);
            };
            let s = n.tcp(c as usize);
            if s.state() == State::Closed {
                return val(-nerr::ECONNRESET);
            }
            if !s.can_recv() {
                return val(if s.may_recv() { -nerr::EAGAIN } else { 0 });
            }
            let (buf, len) = (a[1], a[2] as usize);
            let r = s.recv(|data| {
                let k = data.len().min(len);
                (k, uvm::copy_to_user(slot, buf, &data[..k]).map(|_| k))
            });
            match r {
                Ok(res) => {
                    let k = res?;
                    // A window update may be due.
                    poll_stack(n);
                    val(k as i64)
                }
                Err(_) => val(-nerr::ECONNRESET),
            }
        }
        nabi::NET_SEND => {
            let Some(i) = entry_of(slot, a[0]) else {
                return val(-nerr::ENOTSOCK);
            };
            let Kind::TcpConn(c) = T.get().e[i].kind else {
                return val(-nerr::ENOTCONN);
            };
            let s = n.tcp(c as usize);
            if s.state() == State::Closed {
                return val(-nerr::ECONNRESET);
            }
            if !s.may_send() {
                return val(if s.state() == State::SynSent {
                    -nerr::EAGAIN
                } else {
                    -nerr::EPIPE
                });
            }
            if !s.can_send() {
                return val(-nerr::EAGAIN);
            }
            let (buf, len) = (a[1], a[2] as usize);
            let r = s.send(|space| {
                let k = space.len().min(len);
                (
                    k,
                    uvm::copy_from_user(slot, buf, &mut space[..k]).map(|_| k),
                )
            });
            match r {
                Ok(res) => {
                    let k = res?;
                    poll_stack(n);
                    val(k as i64)
                }
                Err(_) => val(-nerr::EPIPE),
            }
        }
        nabi::NET_SENDTO => {
            let Some(i) = entry_of(slot, a[0]) else {
                return val(-nerr::ENOTSOCK);
            };
            let Kind::Udp(u) = T.get().e[i].kind else {
                return val(-errno::EINVAL);
            };
            let addr: SockAddr = uvm::get(slot, a[3])?;
            let (buf, len) = (a[1], a[2] as usize);
            let r = match n.udp(u as usize).send(len, endpoint(&addr)) {
                Ok(space) => uvm::copy_from_user(slot, buf, space).map(|_| len as i64),
                Err(smoltcp::socket::udp::SendError::BufferFull) => Ok(-nerr::EAGAIN),
                Err(_) => Ok(-errno::EINVAL),
            };
            let v = r?;
            poll_stack(n);
            val(v)
        }
        nabi::NET_RECVFROM => {
            let Some(i) = entry_of(slot, a[0]) else {
                return val(-nerr::ENOTSOCK);
            };
            let Kind::Udp(u) = T.get().e[i].kind else {
                return val(-errno::EINVAL);
            };
            let (buf, len, addr_ptr) = (a[1], a[2] as usize, a[3]);
            let (k, from) = match n.udp(u as usize).recv() {
                Ok((data, meta)) => {
                    let k = data.len().min(len);
                    uvm::copy_to_user(slot, buf, &data[..k])?;
                    (k, meta.endpoint)
                }
                Err(_) => return val(-nerr::EAGAIN),
            };
            if addr_ptr != 0 {
                uvm::put(slot, addr_ptr, &sockaddr(from))?;
            }
            val(k as i64)
        }
        nabi::NET_POLL => {
            let (fds, cnt, timeout) = (a[0], a[1] as usize, a[2]);
            if cnt > MAX_POLL {
                return val(-errno::EINVAL);
            }
            if proc::get(slot).abi.pid == crate::sched::init_pid() {
                crate::sched::note_ready(slot);
            }
            poll_stack(n);
            let r = eval(n, slot, fds, cnt)?;
            if r > 0 || timeout == 0 {
                // The caller goes on without halting: send what it queued (TX is otherwise
                // drained at the idle exit, which a busy process may not reach soon).
                virtio_net::kick();
                return val(r as i64);
            }
            let now = crate::clock_ns();
            T.get().waiters[slot] = Some(Waiter {
                pid: proc::get(slot).abi.pid,
                fds,
                n: cnt,
                deadline_ns: if timeout == u64::MAX {
                    u64::MAX
                } else {
                    now.saturating_add(timeout)
                },
            });
            let p = proc::get(slot);
            p.abi.state = proc_state::BLOCKED;
            Ok(Outcome::Blocked)
        }
        nabi::NET_INFO => {
            let (rx, tx) = virtio_net::counters();
            let info = NetInfo {
                mac: n.cfg.mac,
                prefix_len: n.cfg.prefix_len,
                pad: 0,
                ip: n.cfg.ip,
                rx_frames: rx,
                tx_frames: tx,
            };
            uvm::put(slot, a[0], &info)?;
            val(0)
        }
        _ => val(-errno::ENOSYS),
    }
}

fn accept(n: &mut Net, slot: usize, fd: u64, addr_ptr: u64) -> Result<Outcome, Fault> {
    let Some(i) = entry_of(slot, fd) else {
        return val(-nerr::ENOTSOCK);
    };
    let Kind::TcpListen { port, mut pool } = T.get().e[i].kind else {
        return val(-errno::EINVAL);
    };
    let Some(k) = pool.iter().position(|&s| {
        s != NONE
            && matches!(
                n.tcp(s as usize).state(),
                State::Established | State::CloseWait
            )
    }) else {
        return val(-nerr::EAGAIN);
    };
    let c = pool[k];
    let Some(e) = new_entry(slot, Kind::TcpConn(c)) else {
        return val(-nerr::ENOBUFS);
    };
    let Some(newfd) = install_fd(slot, e) else {
        T.get().e[e].kind = Kind::Free;
        return val(-errno::EMFILE);
    };
    let remote = n.tcp(c as usize).remote_endpoint();
    pool[k] = match n.alloc_tcp() {
        Some(r) => {
            let _ = n.tcp(r).listen(port);
            r as u8
        }
        None => NONE,
    };
    T.get().e[i].kind = Kind::TcpListen { port, pool };
    if addr_ptr != 0 {
        let a = remote.map(sockaddr).unwrap_or(SockAddr {
            ip: Ipv4Address::UNSPECIFIED.octets(),
            port: 0,
            pad: 0,
        });
        uvm::put(slot, addr_ptr, &a)?;
    }
    val(newfd as i64)
}
