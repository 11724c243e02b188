//! `/bin/ktest`: the kernel's test workload. An echo server that also runs commands carried
//! in its requests, to exercise kernel paths from the outside:
//!
//! - `echo <bytes>`: answer `<bytes>`;
//! - `cat <path>`: the file's bytes, read with `pread` through the page cache;
//! - `mmap <path>`: the file's bytes, read through a read-only file mapping;
//! - `alloc <n>`: map `n` anonymous pages, touch each, unmap; answers `ok <n> <sum>`;
//! - `crash`: spawn `/bin/kcrash` (dereferences null: killed by the kernel); answers its pid;
//! - `spin`: loop forever without answering (a runaway guest for the VMM's watchdog);
//! - `random`: 32 bytes from `getrandom`;
//! - `sigclone`: the number of SIGCLONEs this process's handler saw, and the last generation;
//! - `pid`, `clock`, `ls`, `identity`, `exit <code>`, `sleep <ms>` (busy-waits, then
//!   answers `slept`);
//! - `fpu`: put a value in xmm7, spawn `/bin/kcrash` (which should be in `fpu-clobber`
//!   mode), yield 40 times, check xmm7; answers `ok` or `corrupted <value>`;
//! - `scatter <n>`: answer `n` pages of a pattern from a buffer whose 8-page runs are
//!   interleaved in physical memory with another area's (exercises the kernel's bounce path
//!   for responses too fragmented for one descriptor chain);
//! - `connect <a.b.c.d> <port>`: open a TCP connection (the VM's network); answers
//!   `connected`, `refused`, `timeout` (nothing within 1 s) or `error <errno>`;
//! - `bench-syscall <n>`: ns per `getpid` round trip; `bench-fault <n>`: ns per first touch
//!   of an anonymous page;
//! - anything else: echoed unchanged.
#![no_std]
#![no_main]

extern crate alloc;

use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};

use kscope_guest::abi::syscall::{prot, CloneInfo};
use kscope_guest::println;
use kscope_guest::ulib::{self, sys, File};

/// A `Vec<u8>` sink for `core::fmt` (avoids `alloc::format!`, whose precompiled code needs the
/// unwinder).
struct Buf(Vec<u8>);

impl core::fmt::Write for Buf {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

macro_rules! bformat {
    ($($t:tt)*) => {{
        let mut b = Buf(Vec::new());
        let _ = core::fmt::Write::write_fmt(&mut b, format_args!($($t)*));
        b.0
    }};
}

static SIGCLONES: AtomicU64 = AtomicU64::new(0);
static LAST_GEN: AtomicU64 = AtomicU64::new(0);

fn on_clone(info: &CloneInfo) {
    SIGCLONES.fetch_add(1, Ordering::Relaxed);
    LAST_GEN.store(info.generation, Ordering::Relaxed);
}

fn arg(p: &[u8], cmd: &[u8]) -> Option<Vec<u8>> {
    if p.len() > cmd.len() && p.starts_with(cmd) && p[cmd.len()] == b' ' {
        Some(p[cmd.len() + 1..].to_vec())
    } else {
        None
    }
}

fn text(b: &[u8]) -> &str {
    core::str::from_utf8(b).unwrap_or("").trim()
}

fn num(b: &[u8]) -> Option<u64> {
    text(b).parse().ok()
}

fn alloc_pages(n: u64) -> Result<Vec<u8>, sys::Errno> {
    let len = n * 4096;
    let addr = sys::mmap(len, prot::READ | prot::WRITE, None, 0)?;
    let mut sum = 0u64;
    for i in 0..n {
        let p = (addr + i * 4096) as *mut u64;
        // SAFETY: the kernel mapped `len` writable bytes at `addr`; page `i` is inside it.
        unsafe {
            p.write_volatile(i + 1);
            sum += p.read_volatile();
        }
    }
    sys::munmap(addr, len)?;
    Ok(bformat!("ok {n} {sum}"))
}

/// `connect <a.b.c.d> <port>`: try a TCP connection for at most a second.
fn try_connect(arg: &[u8]) -> Result<Vec<u8>, sys::Errno> {
    use kscope_guest::abi::net::{self as nabi, PollFd, SockAddr};
    let mut words = text(arg).split(' ');
    let mut ip = [0u8; 4];
    let mut octets = words.next().unwrap_or("").split('.');
    for o in ip.iter_mut() {
        *o = octets
            .next()
            .and_then(|x| x.parse().ok())
            .ok_or(sys::Errno(22))?;
    }
    let port: u16 = words
        .next()
        .and_then(|x| x.parse().ok())
        .ok_or(sys::Errno(22))?;
    let fd = ulib::net::socket(nabi::SOCK_STREAM)?;
    let to = SockAddr { ip, port, pad: 0 };
    if let Err(e) = ulib::net::connect(fd, &to) {
        let _ = ulib::net::close(fd);
        return Ok(bformat!("error {}", e.0));
    }
    let mut set = [PollFd {
        fd: fd as i32,
        events: nabi::POLL_OUT,
        revents: 0,
    }];
    let ready = ulib::net::poll(&mut set, 1_000_000_000);
    let _ = ulib::net::close(fd);
    let r = set[0].revents;
    Ok(match ready {
        Err(e) => bformat!("error {}", e.0),
        Ok(0) => b"timeout".to_vec(),
        Ok(_) if r & (nabi::POLL_ERR | nabi::POLL_HUP) != 0 => b"refused".to_vec(),
        Ok(_) if r & nabi::POLL_OUT != 0 => b"connected".to_vec(),
        Ok(_) => bformat!("revents {r}"),
    })
}

/// Run one command; `None` means: answer with an error status.
fn run(p: &[u8]) -> Result<Vec<u8>, sys::Errno> {
    if let Some(rest) = arg(p, b"echo") {
        return Ok(rest);
    }
    if let Some(path) = arg(p, b"cat") {
        return File::open(text(&path))?.read_all();
    }
    if let Some(path) = arg(p, b"mmap") {
        let f = File::open(text(&path))?;
        return Ok(f.map()?.to_vec());
    }
    if let Some(n) = arg(p, b"alloc") {
        return alloc_pages(num(&n).ok_or(sys::Errno(22))?);
    }
    if let Some(path) = arg(p, b"spawn") {
        return Ok(bformat!("{}", sys::spawn(text(&path))?));
    }
    if let Some(a) = arg(p, b"connect") {
        return try_connect(&a);
    }
    if let Some(n) = arg(p, b"bench-syscall") {
        let n = num(&n).ok_or(sys::Errno(22))?.max(1);
        let t = sys::clock_ns();
        for _ in 0..n {
            sys::getpid();
        }
        return Ok(bformat!("{}", (sys::clock_ns() - t) / n));
    }
    if let Some(n) = arg(p, b"bench-fault") {
        let n = num(&n).ok_or(sys::Errno(22))?.max(1);
        let addr = sys::mmap(n * 4096, prot::READ | prot::WRITE, None, 0)?;
        let t = sys::clock_ns();
        for i in 0..n {
            // SAFETY: inside the mapping just created.
            unsafe { ((addr + i * 4096) as *mut u8).write_volatile(1) };
        }
        let per = (sys::clock_ns() - t) / n;
        sys::munmap(addr, n * 4096)?;
        return Ok(bformat!("{per}"));
    }
    if let Some(ms) = arg(p, b"sleep") {
        let until = sys::clock_ns() + num(&ms).ok_or(sys::Errno(22))? * 1_000_000;
        while sys::clock_ns() < until {}
        return Ok(b"slept".to_vec());
    }
    if let Some(code) = arg(p, b"exit") {
        sys::exit(num(&code).unwrap_or(0) as i32);
    }
    match p {
        b"crash" => Ok(bformat!("{}", sys::spawn("/bin/kcrash")?)),
        b"spin" => {
            println!("ktest: spinning forever");
            #[allow(clippy::empty_loop)]
            loop {}
        }
        b"random" => {
            let mut b = [0u8; 32];
            sys::getrandom(&mut b)?;
            Ok(b.to_vec())
        }
        b"sigclone" => Ok(bformat!(
            "{} {}",
            SIGCLONES.load(Ordering::Relaxed),
            LAST_GEN.load(Ordering::Relaxed)
        )),
        b"pid" => Ok(bformat!("{}", sys::getpid())),
        b"cpumode" => Ok(bformat!("{}", sys::cpu_mode())),
        b"fpu" => {
            let mine = 0x1234_5678_9abc_def0u64;
            sys::spawn("/bin/kcrash")?;
            let got: u64;
            // SAFETY: only xmm7 and the yield system call (ud2 gate, preserves registers but
            // rax; the kernel restores xmm7 from this process's saved FPU state).
            unsafe {
                core::arch::asm!(
                    "movq xmm7, {v}",
                    "mov {n:e}, 40",
                    "2:",
                    "mov eax, {nr}",
                    "ud2",
                    "dec {n:e}",
                    "jnz 2b",
                    "movq {out}, xmm7",
                    v = in(reg) mine,
                    n = out(reg) _,
                    out = lateout(reg) got,
                    nr = const kscope_guest::abi::syscall::YIELD,
                    out("rax") _,
                    out("xmm7") _,
                );
            }
            if got == mine {
                Ok(b"ok".to_vec())
            } else {
                Ok(bformat!("corrupted {got:#x}"))
            }
        }
        b"clock" => Ok(bformat!("{}", sys::clock_ns())),
        b"identity" => {
            let id = sys::get_identity()?;
            let n = id.hostname.iter().position(|&c| c == 0).unwrap_or(32);
            Ok(id.hostname[..n].to_vec())
        }
        b"ls" => {
            let mut b = alloc::vec![0u8; 16384];
            let n = sys::listdir(&mut b)? as usize;
            b.truncate(n);
            Ok(b)
        }
        _ => Ok(p.to_vec()),
    }
}

/// `scatter <n>`: answer straight from a buffer whose 8-page runs alternate in physical memory
/// with another area's.
fn scatter(id: u64, n: &[u8]) -> Result<(), sys::Errno> {
    let n = num(n).ok_or(sys::Errno(22))?.max(1);
    let len = n * 4096;
    let a = sys::mmap(len, prot::READ | prot::WRITE, None, 0)?;
    let b = sys::mmap(len, prot::READ | prot::WRITE, None, 0)?;
    for i in 0..n {
        for (base, v) in [(a, i as u8), (b, 0xee)] {
            // SAFETY: page `i` of a mapping of `n` pages just created.
            unsafe { ((base + i * 4096) as *mut u8).write_volatile(v) };
        }
    }
    // SAFETY: `a` maps `len` readable bytes, written above.
    let body = unsafe { core::slice::from_raw_parts(a as *const u8, len as usize) };
    ulib::respond(id, 0, body)?;
    sys::munmap(a, len)?;
    sys::munmap(b, len)?;
    Ok(())
}

fn main() -> i32 {
    if let Err(e) = ulib::on_clone(on_clone) {
        println!("ktest: sigclone_register failed: {e:?}");
    }
    println!("ktest: pid {} serving", sys::getpid());
    loop {
        let req = match ulib::recv() {
            Ok(r) => r,
            Err(e) => {
                println!("ktest: recv failed: {e:?}");
                return 1;
            }
        };
        if let Some(n) = arg(&req.payload, b"scatter") {
            if let Err(e) = scatter(req.id, &n) {
                let _ = ulib::respond(req.id, e.0 as u32, b"scatter failed");
            }
            continue;
        }
        let (status, body) = match run(&req.payload) {
            Ok(b) => (0, b),
            Err(e) => (e.0 as u32, bformat!("error {}", e.0)),
        };
        if let Err(e) = ulib::respond(req.id, status, &body) {
            println!("ktest: respond failed: {e:?}");
        }
    }
}

kscope_guest::user_main!(main);
