//! System-call ABI of the kscope guest kernel.
//!
//! On this platform neither `syscall` nor `int n` work from ring 3 (see PLATFORM.md), so the
//! system-call gate is an exception: user code executes `ud2` (bytes `0f 0b`) with the call
//! number in `rax` and arguments in `rdi, rsi, rdx, r10, r8, r9`. The kernel's #UD handler
//! recognises the two bytes at the faulting RIP, runs the call, puts the result in `rax` and
//! resumes at RIP + 2. A negative result is `-errno` (see [`errno`]). All other registers are
//! preserved.

/// Terminate the calling process: `exit(code)`.
pub const EXIT: u64 = 0;
/// `write(fd, buf, len) -> len`: fd 1 and 2 go to the serial console.
pub const WRITE: u64 = 1;
/// `open(path, path_len) -> fd`: open a file of the root file system read-only.
pub const OPEN: u64 = 2;
/// `close(fd) -> 0`.
pub const CLOSE: u64 = 3;
/// `pread(fd, buf, len, offset) -> bytes read`: read through the page cache.
pub const PREAD: u64 = 4;
/// `fstat(fd, *mut FileStat) -> 0`.
pub const FSTAT: u64 = 5;
/// `mmap(len, prot, fd, offset) -> addr`: map `len` bytes; `fd == u64::MAX` for anonymous
/// zero-filled memory, otherwise a read-only private mapping of the file (page cache pages are
/// mapped directly). Pages are populated on demand (page faults).
pub const MMAP: u64 = 6;
/// `munmap(addr, len) -> 0`.
pub const MUNMAP: u64 = 7;
/// `recv_request(buf, len, *mut RequestMeta) -> payload length`: block until the host sends a
/// request through the request device; copies its payload to `buf`.
pub const RECV_REQUEST: u64 = 8;
/// `send_response(id, buf, len, status) -> 0`: answer request `id`.
pub const SEND_RESPONSE: u64 = 9;
/// `getrandom(buf, len) -> len`: bytes from the kernel RNG.
pub const GETRANDOM: u64 = 10;
/// `clock_ns() -> ns`: monotonic nanoseconds since boot.
pub const CLOCK_NS: u64 = 11;
/// `sigclone_register(handler, trampoline) -> 0`: on SIGCLONE, the kernel saves the user
/// context and calls `handler(info: *const CloneInfo)` on the user stack with the return
/// address set to `trampoline`, which must call [`SIGRETURN`].
pub const SIGCLONE_REGISTER: u64 = 12;
/// `sigreturn() -> !`: restore the context saved when a signal was delivered.
pub const SIGRETURN: u64 = 13;
/// `reseed(buf, len) -> 0`: mix bytes into the kernel RNG and rekey it.
pub const RESEED: u64 = 14;
/// `set_identity(*const Identity) -> 0`.
pub const SET_IDENTITY: u64 = 15;
/// `get_identity(*mut Identity) -> 0`.
pub const GET_IDENTITY: u64 = 16;
/// `spawn(path, path_len) -> pid`: start a new process from an executable.
pub const SPAWN: u64 = 17;
/// `yield() -> 0`.
pub const YIELD: u64 = 18;
/// `getpid() -> pid`.
pub const GETPID: u64 = 19;
/// `drop_inflight() -> dropped`: forget requests received but not answered (used on clone).
pub const DROP_INFLIGHT: u64 = 20;
/// `listdir(buf, len) -> bytes`: NUL-separated paths of all files.
pub const LISTDIR: u64 = 21;
/// `cpu_mode() -> mode`: the `abi::boot::cpu_mode` the kernel runs in at this moment.
pub const CPU_MODE: u64 = 22;
/// `reply_recv(id, buf, len, status, rbuf, *mut RequestMeta) -> payload length`: answer
/// request `id` (none if `id` is `u64::MAX`) and block for the next request as
/// [`RECV_REQUEST`] does, into `rbuf` of `meta.len` bytes (the meta's `len` is read first):
/// a server's whole loop in one kernel entry per request.
pub const REPLY_RECV: u64 = 23;

/// Error numbers (returned negated).
pub mod errno {
    /// No such file.
    pub const ENOENT: i64 = 2;
    /// Bad file descriptor.
    pub const EBADF: i64 = 9;
    /// Out of memory.
    pub const ENOMEM: i64 = 12;
    /// Bad user address.
    pub const EFAULT: i64 = 14;
    /// Invalid argument.
    pub const EINVAL: i64 = 22;
    /// Too many open files / processes.
    pub const EMFILE: i64 = 24;
    /// No such system call.
    pub const ENOSYS: i64 = 38;
}

/// `mmap` protection bits.
pub mod prot {
    /// Readable.
    pub const READ: u64 = 1;
    /// Writable (anonymous mappings only).
    pub const WRITE: u64 = 2;
    /// Executable.
    pub const EXEC: u64 = 4;
}

/// Result of [`FSTAT`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct FileStat {
    /// Size in bytes.
    pub size: u64,
    /// A [`crate::abi::kinfo::file_kind`] value.
    pub kind: u32,
    /// Inode number.
    pub ino: u32,
}

/// Metadata of a received request ([`RECV_REQUEST`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct RequestMeta {
    /// Request id, to pass to [`SEND_RESPONSE`].
    pub id: u64,
    /// Full payload length (may exceed the buffer: the payload was truncated).
    pub len: u64,
}

/// Information passed to a SIGCLONE handler.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct CloneInfo {
    /// New clone generation.
    pub generation: u64,
    /// Clone id.
    pub clone_id: u64,
    /// Seed bytes from the host (the agent mixes them into the RNG).
    pub seed: [u8; 32],
    /// New identity.
    pub identity: crate::abi::boot::Identity,
}
