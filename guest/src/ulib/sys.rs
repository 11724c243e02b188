//! Raw system calls through the `ud2` gate (see [`crate::abi::syscall`]).

use crate::abi::boot::Identity;
use crate::abi::syscall as nr;
use crate::abi::syscall::{CloneInfo, FileStat, RequestMeta};

/// A failed system call: the kernel's errno.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Errno(pub i64);

/// Result of a system call.
pub type SysResult = Result<u64, Errno>;

/// The system-call gate the kernel handed this process at start (in RDI): 1 = `syscall`
/// (the kernel runs natively and takes `syscall`), 0 = the `ud2` gate, which works in every
/// mode. Written once by `_start`, before any other code runs.
#[no_mangle]
pub static mut GATE: u8 = 0;

/// Issue system call `n` with up to six arguments.
#[inline(always)]
pub fn syscall6(n: u64, a0: u64, a1: u64, a2: u64, a3: u64, a4: u64, a5: u64) -> i64 {
    let ret: i64;
    // SAFETY: both gates trap into the kscope kernel, which treats them as a system call, may
    // read or write user memory passed in the arguments (hence no `nomem`), preserves every
    // register but `rax` (and `rcx`/`r11`, which `syscall` itself overwrites), and resumes
    // after the two-byte instruction. `GATE` is only written by `_start`.
    unsafe {
        core::arch::asm!(
            "cmp byte ptr [rip + {gate}], 0",
            "je 2f",
            "syscall",
            "jmp 3f",
            "2:",
            "ud2",
            "3:",
            gate = sym GATE,
            inlateout("rax") n as i64 => ret,
            in("rdi") a0, in("rsi") a1, in("rdx") a2,
            in("r10") a3, in("r8") a4, in("r9") a5,
            out("rcx") _, out("r11") _,
            options(nostack)
        );
    }
    ret
}

fn check(ret: i64) -> SysResult {
    if ret < 0 {
        Err(Errno(-ret))
    } else {
        Ok(ret as u64)
    }
}

/// Terminate the calling process.
pub fn exit(code: i32) -> ! {
    syscall6(nr::EXIT, code as u64, 0, 0, 0, 0, 0);
    // The kernel never returns from EXIT; spin defensively.
    #[allow(clippy::empty_loop)]
    loop {}
}

/// Write bytes to a console descriptor (1 = stdout, 2 = stderr).
pub fn write(fd: u64, buf: &[u8]) -> SysResult {
    check(syscall6(
        nr::WRITE,
        fd,
        buf.as_ptr() as u64,
        buf.len() as u64,
        0,
        0,
        0,
    ))
}

/// Open a file of the root file system.
pub fn open(path: &str) -> SysResult {
    check(syscall6(
        nr::OPEN,
        path.as_ptr() as u64,
        path.len() as u64,
        0,
        0,
        0,
        0,
    ))
}

/// Close a descriptor.
pub fn close(fd: u64) -> SysResult {
    check(syscall6(nr::CLOSE, fd, 0, 0, 0, 0, 0))
}

/// Read up to `buf.len()` bytes at `offset` through the page cache.
pub fn pread(fd: u64, buf: &mut [u8], offset: u64) -> SysResult {
    check(syscall6(
        nr::PREAD,
        fd,
        buf.as_mut_ptr() as u64,
        buf.len() as u64,
        offset,
        0,
        0,
    ))
}

/// File metadata.
pub fn fstat(fd: u64) -> Result<FileStat, Errno> {
    let mut st = FileStat::default();
    check(syscall6(
        nr::FSTAT,
        fd,
        &mut st as *mut FileStat as u64,
        0,
        0,
        0,
        0,
    ))?;
    Ok(st)
}

/// Map `len` bytes: anonymous (`fd = None`) or a read-only view of a file.
pub fn mmap(len: u64, prot: u64, fd: Option<u64>, offset: u64) -> SysResult {
    check(syscall6(
        nr::MMAP,
        len,
        prot,
        fd.unwrap_or(u64::MAX),
        offset,
        0,
        0,
    ))
}

/// Unmap a range.
pub fn munmap(addr: u64, len: u64) -> SysResult {
    check(syscall6(nr::MUNMAP, addr, len, 0, 0, 0, 0))
}

/// Block until a request arrives; returns its metadata (payload copied into `buf`).
pub fn recv_request(buf: &mut [u8]) -> Result<RequestMeta, Errno> {
    let mut meta = RequestMeta::default();
    check(syscall6(
        nr::RECV_REQUEST,
        buf.as_mut_ptr() as u64,
        buf.len() as u64,
        &mut meta as *mut RequestMeta as u64,
        0,
        0,
        0,
    ))?;
    Ok(meta)
}

/// Answer request `id` (none if `id` is `u64::MAX`) and block for the next request, in one
/// kernel entry.
pub fn reply_recv(
    id: u64,
    payload: &[u8],
    status: u32,
    buf: &mut [u8],
) -> Result<RequestMeta, Errno> {
    let mut meta = RequestMeta {
        id: 0,
        len: buf.len() as u64,
    };
    check(syscall6(
        nr::REPLY_RECV,
        id,
        payload.as_ptr() as u64,
        payload.len() as u64,
        status as u64,
        buf.as_mut_ptr() as u64,
        &mut meta as *mut RequestMeta as u64,
    ))?;
    Ok(meta)
}

/// Answer request `id`.
pub fn send_response(id: u64, payload: &[u8], status: u32) -> SysResult {
    check(syscall6(
        nr::SEND_RESPONSE,
        id,
        payload.as_ptr() as u64,
        payload.len() as u64,
        status as u64,
        0,
        0,
    ))
}

/// Fill `buf` from the kernel RNG.
pub fn getrandom(buf: &mut [u8]) -> SysResult {
    check(syscall6(
        nr::GETRANDOM,
        buf.as_mut_ptr() as u64,
        buf.len() as u64,
        0,
        0,
        0,
        0,
    ))
}

/// Monotonic nanoseconds since boot.
pub fn clock_ns() -> u64 {
    syscall6(nr::CLOCK_NS, 0, 0, 0, 0, 0, 0) as u64
}

/// Register a SIGCLONE handler (see [`crate::abi::syscall::SIGCLONE_REGISTER`]).
pub fn sigclone_register(handler: extern "C" fn(*const CloneInfo), trampoline: u64) -> SysResult {
    check(syscall6(
        nr::SIGCLONE_REGISTER,
        handler as usize as u64,
        trampoline,
        0,
        0,
        0,
        0,
    ))
}

/// Mix `seed` into the kernel RNG.
pub fn reseed(seed: &[u8]) -> SysResult {
    check(syscall6(
        nr::RESEED,
        seed.as_ptr() as u64,
        seed.len() as u64,
        0,
        0,
        0,
        0,
    ))
}

/// Set the VM's identity.
pub fn set_identity(id: &Identity) -> SysResult {
    check(syscall6(
        nr::SET_IDENTITY,
        id as *const Identity as u64,
        0,
        0,
        0,
        0,
        0,
    ))
}

/// Read the VM's identity.
pub fn get_identity() -> Result<Identity, Errno> {
    let mut id = Identity::default();
    check(syscall6(
        nr::GET_IDENTITY,
        &mut id as *mut Identity as u64,
        0,
        0,
        0,
        0,
        0,
    ))?;
    Ok(id)
}

/// Start a new process.
pub fn spawn(path: &str) -> SysResult {
    check(syscall6(
        nr::SPAWN,
        path.as_ptr() as u64,
        path.len() as u64,
        0,
        0,
        0,
        0,
    ))
}

/// Let other processes run.
pub fn yield_now() {
    syscall6(nr::YIELD, 0, 0, 0, 0, 0, 0);
}

/// The `abi::boot::cpu_mode` the kernel runs in right now.
pub fn cpu_mode() -> u64 {
    syscall6(nr::CPU_MODE, 0, 0, 0, 0, 0, 0) as u64
}

/// The id of the calling process.
pub fn getpid() -> u64 {
    syscall6(nr::GETPID, 0, 0, 0, 0, 0, 0) as u64
}

/// Forget requests received but not answered (on clone).
pub fn drop_inflight() -> SysResult {
    check(syscall6(nr::DROP_INFLIGHT, 0, 0, 0, 0, 0, 0))
}

/// NUL-separated paths of all files, into `buf`.
pub fn listdir(buf: &mut [u8]) -> SysResult {
    check(syscall6(
        nr::LISTDIR,
        buf.as_mut_ptr() as u64,
        buf.len() as u64,
        0,
        0,
        0,
        0,
    ))
}
