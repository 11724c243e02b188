//! Sockets for guest programs (`abi::net`): non-blocking TCP and UDP over the kernel's
//! TCP/IP stack, and [`poll`], the one call that waits.

use crate::abi::net::{self as nabi, NetInfo, PollFd, SockAddr};
use crate::ulib::sys::{syscall6, Errno, SysResult};

fn check(ret: i64) -> SysResult {
    if ret < 0 {
        Err(Errno(-ret))
    } else {
        Ok(ret as u64)
    }
}

/// The network configuration; `Err(ENODEV)` when the VM has no network.
pub fn info() -> Result<NetInfo, Errno> {
    let mut i = NetInfo::default();
    check(syscall6(
        nabi::NET_INFO,
        &mut i as *mut NetInfo as u64,
        0,
        0,
        0,
        0,
        0,
    ))?;
    Ok(i)
}

/// `socket(kind)` with [`nabi::SOCK_STREAM`] or [`nabi::SOCK_DGRAM`].
pub fn socket(kind: u64) -> SysResult {
    check(syscall6(nabi::NET_SOCKET, kind, 0, 0, 0, 0, 0))
}

/// Bind to `port`.
pub fn bind(fd: u64, port: u16) -> SysResult {
    check(syscall6(nabi::NET_BIND, fd, port as u64, 0, 0, 0, 0))
}

/// Listen with up to `backlog` pending connections.
pub fn listen(fd: u64, backlog: u64) -> SysResult {
    check(syscall6(nabi::NET_LISTEN, fd, backlog, 0, 0, 0, 0))
}

/// Accept a connection (`Err(EAGAIN)` when none is pending).
pub fn accept(fd: u64) -> Result<(u64, SockAddr), Errno> {
    let mut a = SockAddr::default();
    let fd = check(syscall6(
        nabi::NET_ACCEPT,
        fd,
        &mut a as *mut SockAddr as u64,
        0,
        0,
        0,
        0,
    ))?;
    Ok((fd, a))
}

/// Start connecting to `to` (poll for [`nabi::POLL_OUT`]).
pub fn connect(fd: u64, to: &SockAddr) -> SysResult {
    check(syscall6(
        nabi::NET_CONNECT,
        fd,
        to as *const SockAddr as u64,
        0,
        0,
        0,
        0,
    ))
}

/// Receive bytes: `Ok(0)` at end of stream, `Err(EAGAIN)` when nothing is buffered.
pub fn recv(fd: u64, buf: &mut [u8]) -> SysResult {
    check(syscall6(
        nabi::NET_RECV,
        fd,
        buf.as_mut_ptr() as u64,
        buf.len() as u64,
        0,
        0,
        0,
    ))
}

/// Send bytes; may send fewer; `Err(EAGAIN)` when the send buffer is full.
pub fn send(fd: u64, buf: &[u8]) -> SysResult {
    check(syscall6(
        nabi::NET_SEND,
        fd,
        buf.as_ptr() as u64,
        buf.len() as u64,
        0,
        0,
        0,
    ))
}

/// Send a datagram.
pub fn sendto(fd: u64, buf: &[u8], to: &SockAddr) -> SysResult {
    check(syscall6(
        nabi::NET_SENDTO,
        fd,
        buf.as_ptr() as u64,
        buf.len() as u64,
        to as *const SockAddr as u64,
        0,
        0,
    ))
}

/// Receive a datagram (`Err(EAGAIN)` when none is queued).
pub fn recvfrom(fd: u64, buf: &mut [u8]) -> Result<(usize, SockAddr), Errno> {
    let mut a = SockAddr::default();
    let n = check(syscall6(
        nabi::NET_RECVFROM,
        fd,
        buf.as_mut_ptr() as u64,
        buf.len() as u64,
        &mut a as *mut SockAddr as u64,
        0,
        0,
    ))?;
    Ok((n as usize, a))
}

/// Close a socket (the same call as for files).
pub fn close(fd: u64) -> SysResult {
    check(syscall6(crate::abi::syscall::CLOSE, fd, 0, 0, 0, 0, 0))
}

/// Wait until an entry of `set` is ready or `timeout_ns` passed (`u64::MAX`: forever);
/// returns the number of ready entries (their `revents` are set).
pub fn poll(set: &mut [PollFd], timeout_ns: u64) -> SysResult {
    check(syscall6(
        nabi::NET_POLL,
        set.as_mut_ptr() as u64,
        set.len() as u64,
        timeout_ns,
        0,
        0,
        0,
    ))
}
