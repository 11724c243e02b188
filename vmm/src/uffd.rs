//! A thin, safe wrapper over Linux userfaultfd.
//!
//! We own the few ioctls instead of using the `userfaultfd` crate (its bindgen build needs
//! libclang). Structures and request numbers follow the kernel UAPI header
//! `linux/userfaultfd.h`. The file descriptor is created *without* `UFFD_USER_MODE_ONLY`, so
//! faults that the kernel (KVM) takes on behalf of a guest are delivered too.
//!
//! Conventions of this wrapper:
//! - `UFFDIO_COPY`/`UFFDIO_ZEROPAGE` on a page that is already present
//!   (`EEXIST`) count as success ([`Install::AlreadyPresent`]); the caller decides whether to
//!   wake waiters explicitly (the kernel does not wake on `EEXIST`).
//! - `EAGAIN` (the address space is changing, or a partial copy) is retried from where the
//!   kernel stopped.
//! - The descriptor is non-blocking: [`Uffd::read_events`] returns an empty batch when nothing
//!   is pending; poll [`Uffd::as_raw_fd`] for readiness.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

pub use crate::hostmem::PAGE_SIZE;

// ---- UAPI facts (linux/userfaultfd.h) ----

/// API version handshaked through `UFFDIO_API`.
const UFFD_API: u64 = 0xAA;
const UFFDIO: u64 = 0xAA;

const fn ioc(dir: u64, nr: u64, size: usize) -> libc::c_ulong {
    ((dir << 30) | ((size as u64) << 16) | (UFFDIO << 8) | nr) as libc::c_ulong
}
const IOC_WRITE: u64 = 1;
const IOC_READ: u64 = 2;
const IOC_RW: u64 = IOC_READ | IOC_WRITE;

const UFFDIO_API: libc::c_ulong = ioc(IOC_RW, 0x3F, std::mem::size_of::<UffdioApi>());
const UFFDIO_REGISTER: libc::c_ulong = ioc(IOC_RW, 0x00, std::mem::size_of::<UffdioRegister>());
const UFFDIO_UNREGISTER: libc::c_ulong = ioc(IOC_READ, 0x01, std::mem::size_of::<UffdioRange>());
const UFFDIO_WAKE: libc::c_ulong = ioc(IOC_READ, 0x02, std::mem::size_of::<UffdioRange>());
const UFFDIO_COPY: libc::c_ulong = ioc(IOC_RW, 0x03, std::mem::size_of::<UffdioCopy>());
const UFFDIO_ZEROPAGE: libc::c_ulong = ioc(IOC_RW, 0x04, std::mem::size_of::<UffdioZeropage>());
const UFFDIO_WRITEPROTECT: libc::c_ulong =
    ioc(IOC_RW, 0x06, std::mem::size_of::<UffdioWriteprotect>());
/// `_IO(0xAA, 0x00)` on `/dev/userfaultfd`.
const USERFAULTFD_IOC_NEW: libc::c_ulong = ioc(0, 0x00, 0);

const UFFDIO_REGISTER_MODE_MISSING: u64 = 1 << 0;
const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
const UFFDIO_REGISTER_MODE_MINOR: u64 = 1 << 2;
const UFFDIO_COPY_MODE_DONTWAKE: u64 = 1 << 0;
const UFFDIO_COPY_MODE_WP: u64 = 1 << 1;
const UFFDIO_ZEROPAGE_MODE_DONTWAKE: u64 = 1 << 0;
const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1 << 0;
const UFFDIO_WRITEPROTECT_MODE_DONTWAKE: u64 = 1 << 1;

const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
const UFFD_EVENT_FORK: u8 = 0x13;
const UFFD_EVENT_REMAP: u8 = 0x14;
const UFFD_EVENT_REMOVE: u8 = 0x15;
const UFFD_EVENT_UNMAP: u8 = 0x16;

const UFFD_PAGEFAULT_FLAG_WRITE: u64 = 1 << 0;
const UFFD_PAGEFAULT_FLAG_WP: u64 = 1 << 1;
const UFFD_PAGEFAULT_FLAG_MINOR: u64 = 1 << 2;

/// Feature bits requested through `UFFDIO_API` (values of `UFFD_FEATURE_*`).
pub mod features {
    /// Write-protect fault flag reported in page-fault messages.
    pub const PAGEFAULT_FLAG_WP: u64 = 1 << 0;
    /// `UFFD_EVENT_FORK`.
    pub const EVENT_FORK: u64 = 1 << 1;
    /// `UFFD_EVENT_REMAP`.
    pub const EVENT_REMAP: u64 = 1 << 2;
    /// `UFFD_EVENT_REMOVE` (`MADV_DONTNEED`/`MADV_REMOVE` on a registered range).
    pub const EVENT_REMOVE: u64 = 1 << 3;
    /// MISSING mode on hugetlbfs.
    pub const MISSING_HUGETLBFS: u64 = 1 << 4;
    /// MISSING mode on shmem/memfd mappings.
    pub const MISSING_SHMEM: u64 = 1 << 5;
    /// `UFFD_EVENT_UNMAP`.
    pub const EVENT_UNMAP: u64 = 1 << 6;
    /// Deliver SIGBUS instead of a message.
    pub const SIGBUS: u64 = 1 << 7;
    /// Faulting thread id in messages.
    pub const THREAD_ID: u64 = 1 << 8;
    /// MINOR mode on shmem.
    pub const MINOR_SHMEM: u64 = 1 << 10;
    /// Unmasked fault addresses.
    pub const EXACT_ADDRESS: u64 = 1 << 11;
    /// WP mode on hugetlbfs and shmem.
    pub const WP_HUGETLBFS_SHMEM: u64 = 1 << 12;
    /// WP on unpopulated ptes.
    pub const WP_UNPOPULATED: u64 = 1 << 13;
}

#[repr(C)]
#[derive(Default)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioZeropage {
    range: UffdioRange,
    mode: u64,
    zeropage: i64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioWriteprotect {
    range: UffdioRange,
    mode: u64,
}

/// `struct uffd_msg` (packed, 32 bytes): event byte, 7 reserved bytes, a 24-byte union.
#[repr(C, packed)]
#[derive(Clone, Copy)]
struct UffdMsg {
    event: u8,
    reserved1: u8,
    reserved2: u16,
    reserved3: u32,
    arg: [u64; 3],
}

const _: () = assert!(std::mem::size_of::<UffdMsg>() == 32);

/// Errors of the userfaultfd wrapper.
#[derive(Debug, thiserror::Error)]
pub enum UffdError {
    /// Neither `/dev/userfaultfd` nor the syscall gave a descriptor.
    #[error("cannot create a userfaultfd ({0}); run as root or set vm.unprivileged_userfaultfd=1")]
    Create(#[source] io::Error),
    /// The API handshake failed (usually: a requested feature is not supported).
    #[error("UFFDIO_API handshake failed for features {requested:#x} (kernel offers {available:#x}): {source}")]
    Api {
        /// Features we asked for.
        requested: u64,
        /// Features the kernel reported (0 if unknown).
        available: u64,
        /// The ioctl error.
        source: io::Error,
    },
    /// An ioctl on a range failed.
    #[error("{op} on [{start:#x}, +{len:#x}) failed: {source}")]
    Ioctl {
        /// Name of the operation.
        op: &'static str,
        /// Start of the range.
        start: u64,
        /// Length of the range.
        len: u64,
        /// The ioctl error.
        source: io::Error,
    },
    /// Reading event messages failed.
    #[error("reading userfaultfd events failed: {0}")]
    Read(#[source] io::Error),
    /// A range was not page aligned.
    #[error("range [{start:#x}, +{len:#x}) is not page aligned; pass 4 KiB aligned ranges")]
    Unaligned {
        /// Start of the range.
        start: u64,
        /// Length of the range.
        len: u64,
    },
}

/// Result type of this module.
pub type Result<T> = std::result::Result<T, UffdError>;

/// Registration modes (combinable).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RegisterMode {
    /// Faults on missing pages (`UFFDIO_REGISTER_MODE_MISSING`).
    pub missing: bool,
    /// Write-protect faults (`UFFDIO_REGISTER_MODE_WP`).
    pub wp: bool,
    /// Minor faults on shmem pages present in the page cache but not mapped.
    pub minor: bool,
}

impl RegisterMode {
    /// Only MISSING faults.
    pub const MISSING: Self = Self {
        missing: true,
        wp: false,
        minor: false,
    };

    fn bits(self) -> u64 {
        (if self.missing {
            UFFDIO_REGISTER_MODE_MISSING
        } else {
            0
        }) | (if self.wp { UFFDIO_REGISTER_MODE_WP } else { 0 })
            | (if self.minor {
                UFFDIO_REGISTER_MODE_MINOR
            } else {
                0
            })
    }
}

/// Outcome of an install operation (COPY, ZEROPAGE, CONTINUE).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Install {
    /// Every page of the range was installed by this call.
    Installed,
    /// Some leading pages were installed, then a page was already present (`EEXIST`): the
    /// value is the number of bytes this call installed. Waiters were not woken for the
    /// present page.
    AlreadyPresent(u64),
}

/// A userfaultfd event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// A thread (or the kernel on a thread's behalf) faulted on a registered page.
    Pagefault {
        /// Faulting address (page aligned unless EXACT_ADDRESS was requested).
        address: u64,
        /// The access was a write.
        write: bool,
        /// Write-protect fault (WP mode).
        wp: bool,
        /// Minor fault (MINOR mode).
        minor: bool,
    },
    /// The process forked; the new descriptor is for the child (EVENT_FORK only).
    Fork {
        /// Raw descriptor of the child's userfaultfd (owned by the caller).
        uffd: RawFd,
    },
    /// A registered range moved (mremap).
    Remap {
        /// Old start.
        from: u64,
        /// New start.
        to: u64,
        /// Length.
        len: u64,
    },
    /// Pages of `[start, end)` were discarded (`MADV_DONTNEED`/`MADV_REMOVE`).
    Remove {
        /// Start address.
        start: u64,
        /// End address (exclusive).
        end: u64,
    },
    /// `[start, end)` was unmapped.
    Unmap {
        /// Start address.
        start: u64,
        /// End address (exclusive).
        end: u64,
    },
    /// An event type this wrapper does not know.
    Unknown(u8),
}

impl Event {
    fn from_msg(m: &UffdMsg) -> Self {
        let arg = m.arg;
        match m.event {
            UFFD_EVENT_PAGEFAULT => Event::Pagefault {
                address: arg[1],
                write: arg[0] & UFFD_PAGEFAULT_FLAG_WRITE != 0,
                wp: arg[0] & UFFD_PAGEFAULT_FLAG_WP != 0,
                minor: arg[0] & UFFD_PAGEFAULT_FLAG_MINOR != 0,
            },
            UFFD_EVENT_FORK => Event::Fork {
                uffd: arg[0] as u32 as RawFd,
            },
            UFFD_EVENT_REMAP => Event::Remap {
                from: arg[0],
                to: arg[1],
                len: arg[2],
            },
            UFFD_EVENT_REMOVE => Event::Remove {
                start: arg[0],
                end: arg[1],
            },
            UFFD_EVENT_UNMAP => Event::Unmap {
                start: arg[0],
                end: arg[1],
            },
            other => Event::Unknown(other),
        }
    }
}

/// An open, handshaked userfaultfd.
#[derive(Debug)]
pub struct Uffd {
    fd: OwnedFd,
    features: u64,
}

fn check_aligned(start: u64, len: u64) -> Result<()> {
    let p = PAGE_SIZE as u64;
    if !start.is_multiple_of(p) || !len.is_multiple_of(p) || len == 0 {
        return Err(UffdError::Unaligned { start, len });
    }
    Ok(())
}

impl Uffd {
    /// Opens a non-blocking, close-on-exec userfaultfd (through `/dev/userfaultfd`, falling
    /// back to the `userfaultfd(2)` syscall) that also receives kernel-mode faults, and
    /// handshakes the API with the given feature bits (see [`features`]).
    pub fn new(features: u64) -> Result<Self> {
        let fd = Self::open_raw()?;
        let mut api = UffdioApi {
            api: UFFD_API,
            features,
            ioctls: 0,
        };
        // SAFETY: `fd` is a valid userfaultfd and `api` is a properly sized, writable
        // `struct uffdio_api` that outlives the call.
        let r = unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_API, &mut api as *mut UffdioApi) };
        if r != 0 {
            let source = io::Error::last_os_error();
            return Err(UffdError::Api {
                requested: features,
                available: api.features,
                source,
            });
        }
        Ok(Self {
            fd,
            features: api.features,
        })
    }

    fn open_raw() -> Result<OwnedFd> {
        let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
        let dev_err = match OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/userfaultfd")
        {
            Ok(dev) => {
                // SAFETY: USERFAULTFD_IOC_NEW takes its flags by value and returns a new
                // descriptor or -1; `dev` is open for the duration of the call.
                let r = unsafe { libc::ioctl(dev.as_raw_fd(), USERFAULTFD_IOC_NEW, flags) };
                if r >= 0 {
                    // SAFETY: the ioctl returned a fresh descriptor that nothing else owns.
                    return Ok(unsafe { OwnedFd::from_raw_fd(r) });
                }
                io::Error::last_os_error()
            }
            Err(e) => e,
        };
        // SAFETY: plain syscall with integer flags; returns a new descriptor or -1.
        let r = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
        if r >= 0 {
            // SAFETY: the syscall returned a fresh descriptor that nothing else owns.
            return Ok(unsafe { OwnedFd::from_raw_fd(r as RawFd) });
        }
        let sys_err = io::Error::last_os_error();
        Err(UffdError::Create(io::Error::new(
            sys_err.kind(),
            format!("/dev/userfaultfd: {dev_err}; userfaultfd(2): {sys_err}"),
        )))
    }

    /// Feature bits the kernel granted in the handshake.
    pub fn features(&self) -> u64 {
        self.features
    }

    /// Registers `[start, start + len)` for the given modes. Returns the bit mask of ioctls
    /// the kernel allows on the range.
    pub fn register(&self, start: u64, len: u64, mode: RegisterMode) -> Result<u64> {
        check_aligned(start, len)?;
        let mut reg = UffdioRegister {
            range: UffdioRange { start, len },
            mode: mode.bits(),
            ioctls: 0,
        };
        self.ioctl("UFFDIO_REGISTER", UFFDIO_REGISTER, &mut reg, start, len)?;
        Ok(reg.ioctls)
    }

    /// Unregisters a range.
    pub fn unregister(&self, start: u64, len: u64) -> Result<()> {
        check_aligned(start, len)?;
        let mut range = UffdioRange { start, len };
        self.ioctl(
            "UFFDIO_UNREGISTER",
            UFFDIO_UNREGISTER,
            &mut range,
            start,
            len,
        )
    }

    /// Wakes threads waiting on faults in a range.
    pub fn wake(&self, start: u64, len: u64) -> Result<()> {
        check_aligned(start, len)?;
        let mut range = UffdioRange { start, len };
        self.ioctl("UFFDIO_WAKE", UFFDIO_WAKE, &mut range, start, len)
    }

    /// Atomically copies `len` bytes from `src` into the missing pages at `dst`, waking the
    /// faulting threads unless `dontwake`. `wp` maps the pages write-protected (WP mode).
    ///
    /// `src` must be readable for `len` bytes; it is a byte slice so the borrow checker
    /// guarantees it.
    pub fn copy(&self, dst: u64, src: &[u8], dontwake: bool, wp: bool) -> Result<Install> {
        let len = src.len() as u64;
        check_aligned(dst, len)?;
        let mode = (if dontwake {
            UFFDIO_COPY_MODE_DONTWAKE
        } else {
            0
        }) | (if wp { UFFDIO_COPY_MODE_WP } else { 0 });
        self.install_range("UFFDIO_COPY", dst, len, |done| {
            let mut c = UffdioCopy {
                dst: dst + done,
                src: src.as_ptr() as u64 + done,
                len: len - done,
                mode,
                copy: 0,
            };
            // SAFETY: `c` is a valid `struct uffdio_copy`; its source range lies within the
            // borrowed `src` slice; the destination is checked by the kernel against the
            // registered ranges of this descriptor.
            let r =
                unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_COPY, &mut c as *mut UffdioCopy) };
            (r, c.copy)
        })
    }

    /// Maps zero pages over the missing range (anonymous: the shared zero page; shmem: a
    /// zeroed page-cache page).
    pub fn zeropage(&self, start: u64, len: u64, dontwake: bool) -> Result<Install> {
        check_aligned(start, len)?;
        let mode = if dontwake {
            UFFDIO_ZEROPAGE_MODE_DONTWAKE
        } else {
            0
        };
        self.install_range("UFFDIO_ZEROPAGE", start, len, |done| {
            let mut z = UffdioZeropage {
                range: UffdioRange {
                    start: start + done,
                    len: len - done,
                },
                mode,
                zeropage: 0,
            };
            // SAFETY: `z` is a valid `struct uffdio_zeropage`; the kernel checks the range.
            let r = unsafe {
                libc::ioctl(
                    self.fd.as_raw_fd(),
                    UFFDIO_ZEROPAGE,
                    &mut z as *mut UffdioZeropage,
                )
            };
            (r, z.zeropage)
        })
    }

    /// Drives a page-installing ioctl over `[start, start + len)`: `call(done)` issues it for
    /// the part from `start + done` and returns the ioctl's result and the bytes the kernel
    /// reports done. Partial progress with EAGAIN is resumed where the kernel stopped; EEXIST
    /// (a page already present) is success ([`Install::AlreadyPresent`]).
    fn install_range(
        &self,
        op: &'static str,
        start: u64,
        len: u64,
        mut call: impl FnMut(u64) -> (libc::c_int, i64),
    ) -> Result<Install> {
        let mut done = 0u64;
        loop {
            let (r, progressed) = call(done);
            if r == 0 {
                return Ok(Install::Installed);
            }
            let err = io::Error::last_os_error();
            if progressed > 0 {
                done += progressed as u64;
            }
            match err.raw_os_error() {
                Some(libc::EAGAIN) if done < len => continue,
                Some(libc::EAGAIN) => return Ok(Install::Installed),
                Some(libc::EEXIST) => return Ok(Install::AlreadyPresent(done)),
                _ => {
                    return Err(UffdError::Ioctl {
                        op,
                        start: start + done,
                        len: len - done,
                        source: err,
                    })
                }
            }
        }
    }

    /// Sets (`protect`) or clears write protection on a range registered in WP mode; clearing
    /// wakes the blocked writers unless `dontwake`.
    pub fn writeprotect(&self, start: u64, len: u64, protect: bool, dontwake: bool) -> Result<()> {
        check_aligned(start, len)?;
        let mode = (if protect {
            UFFDIO_WRITEPROTECT_MODE_WP
        } else {
            0
        }) | (if dontwake {
            UFFDIO_WRITEPROTECT_MODE_DONTWAKE
        } else {
            0
        });
        let mut w = UffdioWriteprotect {
            range: UffdioRange { start, len },
            mode,
        };
        loop {
            match self.ioctl(
                "UFFDIO_WRITEPROTECT",
                UFFDIO_WRITEPROTECT,
                &mut w,
                start,
                len,
            ) {
                Err(UffdError::Ioctl { source, .. })
                    if source.raw_os_error() == Some(libc::EAGAIN) =>
                {
                    continue
                }
                other => return other,
            }
        }
    }

    /// Reads the pending events (at most `max`) without blocking; an empty vector means none
    /// is pending.
    pub fn read_events(&self, out: &mut Vec<Event>, max: usize) -> Result<()> {
        const BATCH: usize = 32;
        let mut buf = [UffdMsg {
            event: 0,
            reserved1: 0,
            reserved2: 0,
            reserved3: 0,
            arg: [0; 3],
        }; BATCH];
        let want = max.clamp(1, BATCH);
        // SAFETY: `buf` is writable for `want * 32` bytes; the kernel writes whole messages.
        let n = unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                want * std::mem::size_of::<UffdMsg>(),
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EAGAIN) | Some(libc::EINTR) => Ok(()),
                _ => Err(UffdError::Read(e)),
            };
        }
        let count = n as usize / std::mem::size_of::<UffdMsg>();
        out.extend(buf[..count].iter().map(Event::from_msg));
        Ok(())
    }

    fn ioctl<T>(
        &self,
        op: &'static str,
        req: libc::c_ulong,
        arg: &mut T,
        start: u64,
        len: u64,
    ) -> Result<()> {
        // SAFETY: every caller passes the structure type matching `req` (the request number
        // encodes its size), exclusively borrowed for the duration of the call.
        let r = unsafe { libc::ioctl(self.fd.as_raw_fd(), req, arg as *mut T) };
        if r != 0 {
            return Err(UffdError::Ioctl {
                op,
                start,
                len,
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }
}

/// Which of the descriptors given to [`Uffd::wait`] became readable.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Ready {
    /// The userfaultfd has events to read.
    pub uffd: bool,
    /// The other descriptor (typically a stop eventfd) is readable.
    pub other: bool,
}

impl Uffd {
    /// Waits up to `timeout_ms` (-1: forever) until this descriptor or `other` is readable.
    /// Returns both false on timeout or signal interruption.
    pub fn wait(&self, other: &dyn AsRawFd, timeout_ms: i32) -> Result<Ready> {
        let mut fds = [
            libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: other.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a valid array of two pollfd structures that outlives the call.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, timeout_ms) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINTR) {
                return Ok(Ready::default());
            }
            return Err(UffdError::Read(e));
        }
        let ready =
            |p: &libc::pollfd| p.revents & (libc::POLLIN | libc::POLLERR | libc::POLLHUP) != 0;
        Ok(Ready {
            uffd: ready(&fds[0]),
            other: ready(&fds[1]),
        })
    }
}

impl AsRawFd for Uffd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl AsFd for Uffd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_numbers_match_the_uapi_header() {
        assert_eq!(UFFDIO_API, 0xC018_AA3F);
        assert_eq!(UFFDIO_REGISTER, 0xC020_AA00);
        assert_eq!(UFFDIO_UNREGISTER, 0x8010_AA01);
        assert_eq!(UFFDIO_WAKE, 0x8010_AA02);
        assert_eq!(UFFDIO_COPY, 0xC028_AA03);
        assert_eq!(UFFDIO_ZEROPAGE, 0xC020_AA04);
        assert_eq!(UFFDIO_WRITEPROTECT, 0xC018_AA06);
        assert_eq!(USERFAULTFD_IOC_NEW, 0xAA00);
    }

    #[test]
    fn unaligned_ranges_are_rejected() {
        let _g = crate::lazy::tests::fd_guard();
        let u = Uffd::new(0).expect("userfaultfd (run as root)");
        assert!(matches!(u.wake(1, 4096), Err(UffdError::Unaligned { .. })));
        assert!(matches!(
            u.zeropage(0, 100, false),
            Err(UffdError::Unaligned { .. })
        ));
    }

    #[test]
    fn unsupported_feature_is_reported() {
        let _g = crate::lazy::tests::fd_guard();
        let e = Uffd::new(1 << 62).unwrap_err();
        assert!(matches!(e, UffdError::Api { .. }), "{e}");
    }
}
