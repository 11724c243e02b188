//! Tap devices (`/dev/net/tun`, `IFF_TAP | IFF_NO_PI`, non-blocking) and the few interface
//! ioctls kscope needs (index, up, add to a bridge). Every call here acts in the network
//! namespace of the calling thread: [`super::Network`] runs them inside its namespace.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;

use super::NetError;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TAP: i16 = 0x0002;
const IFF_NO_PI: i16 = 0x1000;
const IFF_UP: i16 = 0x1;
const SIOCGIFINDEX: libc::c_ulong = 0x8933;
const SIOCGIFFLAGS: libc::c_ulong = 0x8913;
const SIOCSIFFLAGS: libc::c_ulong = 0x8914;
const SIOCBRADDIF: libc::c_ulong = 0x89a2;

/// `struct ifreq`: a name and a 24-byte union (flags or index at its start).
#[repr(C)]
#[derive(Clone, Copy)]
struct IfReq {
    name: [u8; 16],
    data: [u8; 24],
}

impl IfReq {
    fn new(name: &str) -> IfReq {
        let mut r = IfReq {
            name: [0; 16],
            data: [0; 24],
        };
        let n = name.len().min(15);
        r.name[..n].copy_from_slice(&name.as_bytes()[..n]);
        r
    }

    fn name(&self) -> String {
        let end = self.name.iter().position(|&b| b == 0).unwrap_or(16);
        String::from_utf8_lossy(&self.name[..end]).into_owned()
    }

    fn short(&self) -> i16 {
        i16::from_ne_bytes([self.data[0], self.data[1]])
    }

    fn set_short(&mut self, v: i16) {
        self.data[..2].copy_from_slice(&v.to_ne_bytes());
    }

    fn int(&self) -> i32 {
        i32::from_ne_bytes([self.data[0], self.data[1], self.data[2], self.data[3]])
    }

    fn set_int(&mut self, v: i32) {
        self.data[..4].copy_from_slice(&v.to_ne_bytes());
    }
}

fn ioctl(fd: i32, req: libc::c_ulong, r: &mut IfReq, what: &'static str) -> Result<(), NetError> {
    // SAFETY: every request used here takes a `struct ifreq` (40 bytes, `IfReq`), which
    // lives for the duration of the call.
    let rc = unsafe { libc::ioctl(fd, req as _, r as *mut IfReq) };
    if rc < 0 {
        return Err(NetError::Sys {
            what,
            name: r.name(),
            err: io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// A socket for interface ioctls (in the calling thread's namespace).
fn ctl_socket() -> Result<OwnedFd, NetError> {
    // SAFETY: plain socket(2) call; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(NetError::Sys {
            what: "socket(AF_INET) for interface ioctls",
            name: String::new(),
            err: io::Error::last_os_error(),
        });
    }
    // SAFETY: `fd` is a new descriptor owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Bring interface `name` up and, with `bridge`, make it a port of that bridge.
pub(crate) fn link_up(name: &str, bridge: Option<&str>) -> Result<(), NetError> {
    let s = ctl_socket()?;
    if let Some(br) = bridge {
        let mut r = IfReq::new(name);
        ioctl(s.as_raw_fd(), SIOCGIFINDEX, &mut r, "SIOCGIFINDEX")?;
        let index = r.int();
        let mut b = IfReq::new(br);
        b.set_int(index);
        ioctl(
            s.as_raw_fd(),
            SIOCBRADDIF,
            &mut b,
            "SIOCBRADDIF (add to the bridge)",
        )?;
    }
    let mut r = IfReq::new(name);
    ioctl(s.as_raw_fd(), SIOCGIFFLAGS, &mut r, "SIOCGIFFLAGS")?;
    let f = r.short() | IFF_UP;
    r.set_short(f);
    ioctl(s.as_raw_fd(), SIOCSIFFLAGS, &mut r, "SIOCSIFFLAGS (up)")?;
    Ok(())
}

/// A tap device; it disappears when dropped (not persistent), also when kscope is killed.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Create a tap named from `pattern` (e.g. `kst%d`) in the calling thread's namespace.
    pub(crate) fn create(pattern: &str) -> Result<Tap, NetError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(|err| NetError::Sys {
                what: "open /dev/net/tun (needs root and the tun module)",
                name: String::new(),
                err,
            })?;
        let mut r = IfReq::new(pattern);
        r.set_short(IFF_TAP | IFF_NO_PI);
        ioctl(file.as_raw_fd(), TUNSETIFF, &mut r, "TUNSETIFF")?;
        Ok(Tap {
            file,
            name: r.name(),
        })
    }

    /// Interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The descriptor (for polling).
    pub fn raw_fd(&self) -> i32 {
        self.file.as_raw_fd()
    }

    /// Read one frame; `Ok(None)` when none is queued.
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        // SAFETY: `buf` is valid for writes of `buf.len()` bytes.
        let n = unsafe { libc::read(self.raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::WouldBlock {
                return Ok(None);
            }
            return Err(e);
        }
        Ok(Some(n as usize))
    }

    /// Write one frame (dropped by the kernel if the tap's queue is full).
    pub fn send(&self, frame: &[u8]) -> io::Result<()> {
        // SAFETY: `frame` is valid for reads of `frame.len()` bytes.
        let n = unsafe { libc::write(self.raw_fd(), frame.as_ptr().cast(), frame.len()) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::WouldBlock {
                return Ok(());
            }
            return Err(e);
        }
        Ok(())
    }
}
