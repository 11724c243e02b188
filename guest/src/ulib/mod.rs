//! The user-mode runtime of kscope guest programs (ring 3): entry point, system calls, heap,
//! console output, files, requests and the SIGCLONE hook. The "libc" of the kscope guest.
//!
//! A program is a `#![no_std] #![no_main]` binary:
//!
//! ```ignore
//! #![no_std]
//! #![no_main]
//! extern crate alloc;
//! use kscope_guest::ulib::{self, println};
//! fn main() -> i32 { println!("hello"); 0 }
//! kscope_guest::user_main!(main);
//! ```
//!
//! Guest processes are single-threaded, so the runtime's globals need no locking.

pub mod alloc_impl;
pub mod mem;
pub mod net;
pub mod sys;

extern crate alloc;

use alloc::vec::Vec;
use core::fmt;

pub use crate::abi::syscall::{CloneInfo, FileStat, RequestMeta};
pub use sys::Errno;

/// Define the program entry point `_start`, which calls `$main() -> i32` and exits with its
/// value.
#[macro_export]
macro_rules! user_main {
    ($main:path) => {
        #[no_mangle]
        extern "C" fn __kscope_user_main() -> ! {
            let code: i32 = $main();
            $crate::ulib::sys::exit(code)
        }
    };
}

// The process entry: the kernel starts a process with RSP 16-byte aligned at the top of its
// stack and the system-call gate in RDI (see `sys::GATE`); keep the gate, realign defensively
// and call the program's main through the symbol defined by `user_main!`.
core::arch::global_asm!(
    ".section .text.entry,\"ax\"",
    ".globl _start",
    "_start:",
    "mov byte ptr [rip + {gate}], dil",
    "and rsp, -16",
    "xor ebp, ebp",
    "call __kscope_user_main",
    "ud2",
    ".text",
    gate = sym sys::GATE,
);

// The return address of every SIGCLONE handler: returns to the interrupted context.
core::arch::global_asm!(
    ".text",
    ".globl __kscope_sigreturn",
    "__kscope_sigreturn:",
    "mov eax, {nr}",
    "ud2",
    "ud2",
    nr = const crate::abi::syscall::SIGRETURN,
);

extern "C" {
    fn __kscope_sigreturn();
}

/// Console writer for `print!`.
pub struct Console(pub u64);

impl fmt::Write for Console {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let mut rest = s.as_bytes();
        while !rest.is_empty() {
            match sys::write(self.0, rest) {
                Ok(0) | Err(_) => return Err(fmt::Error),
                Ok(n) => rest = &rest[n as usize..],
            }
        }
        Ok(())
    }
}

/// Print to the console (formatted; user mode may use `core::fmt`).
#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => {{
        use core::fmt::Write as _;
        let _ = write!($crate::ulib::Console(1), $($arg)*);
    }};
}

/// Print a line to the console.
#[macro_export]
macro_rules! println {
    () => { $crate::print!("\n") };
    ($($arg:tt)*) => {{
        use core::fmt::Write as _;
        let mut s = $crate::ulib::LineBuf::new();
        let _ = write!(s, $($arg)*);
        let _ = s.write_str("\n");
        s.flush();
    }};
}

/// A line buffer so that a `println!` costs one system call.
pub struct LineBuf(Vec<u8>);

impl LineBuf {
    /// An empty buffer.
    pub fn new() -> Self {
        LineBuf(Vec::with_capacity(128))
    }
    /// Write the buffer to stdout.
    pub fn flush(&mut self) {
        let _ = sys::write(1, &self.0);
        self.0.clear();
    }
}

impl Default for LineBuf {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Write for LineBuf {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    use core::fmt::Write as _;
    let mut s = LineBuf::new();
    let _ = writeln!(s, "user panic: {info}");
    let _ = sys::write(2, &s.0);
    sys::exit(101)
}

/// Required by the precompiled `core` of the host target.
#[no_mangle]
pub extern "C" fn rust_eh_personality() {}

// The precompiled `alloc` (built with unwinding) refers to `_Unwind_Resume` from landing pads
// that never run under `panic = "abort"`. Should one ever be reached, exit with status 134.
core::arch::global_asm!(
    ".section .text._Unwind_Resume,\"ax\"",
    ".globl _Unwind_Resume",
    "_Unwind_Resume:",
    "mov eax, {exit}",
    "mov edi, 134",
    "ud2",
    "2:",
    "jmp 2b",
    ".text",
    exit = const crate::abi::syscall::EXIT,
);

/// An open file of the root file system.
#[derive(Debug)]
pub struct File {
    fd: u64,
    stat: FileStat,
}

impl File {
    /// Open `path` read-only.
    pub fn open(path: &str) -> Result<File, Errno> {
        let fd = sys::open(path)?;
        match sys::fstat(fd) {
            Ok(stat) => Ok(File { fd, stat }),
            Err(e) => {
                let _ = sys::close(fd);
                Err(e)
            }
        }
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.stat.size
    }

    /// Metadata.
    pub fn stat(&self) -> FileStat {
        self.stat
    }

    /// Read at `offset` into `buf`, looping until `buf` is full or end of file.
    pub fn read_at(&self, mut offset: u64, buf: &mut [u8]) -> Result<usize, Errno> {
        let mut done = 0;
        while done < buf.len() {
            let n = sys::pread(self.fd, &mut buf[done..], offset)? as usize;
            if n == 0 {
                break;
            }
            done += n;
            offset += n as u64;
        }
        Ok(done)
    }

    /// Read the whole file.
    pub fn read_all(&self) -> Result<Vec<u8>, Errno> {
        let mut v = alloc::vec![0u8; self.stat.size as usize];
        let n = self.read_at(0, &mut v)?;
        v.truncate(n);
        Ok(v)
    }

    /// Map the whole file read-only (page-cache pages mapped into the process on demand).
    /// The mapping lives until the process exits.
    pub fn map(&self) -> Result<&'static [u8], Errno> {
        if self.stat.size == 0 {
            return Ok(&[]);
        }
        let addr = sys::mmap(
            self.stat.size,
            crate::abi::syscall::prot::READ,
            Some(self.fd),
            0,
        )?;
        // SAFETY: the kernel mapped `size` readable bytes at `addr` for the rest of the
        // process's life (we never unmap it), and nothing writes to a read-only file mapping.
        Ok(unsafe { core::slice::from_raw_parts(addr as *const u8, self.stat.size as usize) })
    }
}

impl Drop for File {
    fn drop(&mut self) {
        let _ = sys::close(self.fd);
    }
}

/// A request received from the host.
#[derive(Debug)]
pub struct Request {
    /// Request id (answer with [`respond`]).
    pub id: u64,
    /// Payload.
    pub payload: Vec<u8>,
}

/// Block until the next request (payloads up to [`crate::abi::request::MAX_REQUEST`]).
pub fn recv() -> Result<Request, Errno> {
    let mut buf = alloc::vec![0u8; crate::abi::request::MAX_REQUEST];
    let meta = sys::recv_request(&mut buf)?;
    buf.truncate((meta.len as usize).min(crate::abi::request::MAX_REQUEST));
    Ok(Request {
        id: meta.id,
        payload: buf,
    })
}

/// Answer a request.
pub fn respond(id: u64, status: u32, payload: &[u8]) -> Result<(), Errno> {
    sys::send_response(id, payload, status).map(|_| ())
}

/// A SIGCLONE hook (runs on the process's own stack inside the signal frame).
pub type CloneHook = fn(&CloneInfo);

static mut CLONE_HOOK: Option<CloneHook> = None;

extern "C" fn clone_dispatch(info: *const CloneInfo) {
    // SAFETY: single-threaded process: the hook is only written by `on_clone` before any
    // signal can be delivered (registration happens after the store).
    let hook = unsafe { *core::ptr::addr_of!(CLONE_HOOK) };
    if let (Some(hook), false) = (hook, info.is_null()) {
        // SAFETY: the kernel passes a pointer to a CloneInfo it wrote on our stack.
        hook(unsafe { &*info });
    }
}

/// Register `hook` to run when this VM has been cloned (SIGCLONE).
pub fn on_clone(hook: CloneHook) -> Result<(), Errno> {
    // SAFETY: single-threaded process; no signal handler runs concurrently with this store.
    unsafe { *core::ptr::addr_of_mut!(CLONE_HOOK) = Some(hook) };
    sys::sigclone_register(
        clone_dispatch,
        __kscope_sigreturn as *const () as usize as u64,
    )
    .map(|_| ())
}
