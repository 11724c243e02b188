//! Guest side (feature `guest-bins`): file access through `kscope_guest::ulib` and the
//! request loop every program runs.

use alloc::string::String;
use alloc::vec::Vec;

use kscope_guest::ulib::{self, File};

use crate::files::{FileError, Files};
use crate::handlers::Handler;

/// [`Files`] over the guest's root file system: `map` maps page-cache pages once per file
/// (mappings live for the rest of the process and are reused), `read_at` is one `pread` on a
/// descriptor kept open.
#[derive(Default)]
pub struct GuestFiles {
    open: Vec<(String, File)>,
    mapped: Vec<(String, &'static [u8])>,
}

impl Clone for GuestFiles {
    /// A clone shares nothing: it opens its own descriptors.
    fn clone(&self) -> Self {
        GuestFiles::default()
    }
}

/// Files kept open at most (the kernel gives a process 61 descriptors, shared with sockets;
/// `map` needs one more for a moment).
const MAX_OPEN: usize = 8;

fn sys_err(op: &'static str, path: &str, e: ulib::Errno) -> FileError {
    if e.0 == kscope_guest::abi::syscall::errno::ENOENT {
        FileError::NotFound(path.into())
    } else {
        FileError::Sys {
            op,
            path: path.into(),
            errno: e.0,
        }
    }
}

impl GuestFiles {
    fn file(&mut self, path: &str) -> Result<&File, FileError> {
        if let Some(i) = self.open.iter().position(|(p, _)| p == path) {
            return Ok(&self.open[i].1);
        }
        if self.open.len() >= MAX_OPEN {
            self.open.remove(0);
        }
        let f = self.open_fresh(path)?;
        self.open.push((path.into(), f));
        Ok(&self.open[self.open.len() - 1].1)
    }

    /// Open `path`; out of descriptors, close the cached ones and retry once.
    fn open_fresh(&mut self, path: &str) -> Result<File, FileError> {
        match File::open(path) {
            Err(e) if e.0 == kscope_guest::abi::syscall::errno::EMFILE && !self.open.is_empty() => {
                self.open.clear();
                File::open(path).map_err(|e| sys_err("open", path, e))
            }
            r => r.map_err(|e| sys_err("open", path, e)),
        }
    }
}

impl Files for GuestFiles {
    fn map(&mut self, path: &str) -> Result<&'static [u8], FileError> {
        if let Some((_, m)) = self.mapped.iter().find(|(p, _)| p == path) {
            return Ok(m);
        }
        let f = self.open_fresh(path)?;
        let m = f.map().map_err(|e| sys_err("mmap", path, e))?;
        self.mapped.push((path.into(), m));
        Ok(m)
    }

    fn read_at(&mut self, path: &str, offset: u64, buf: &mut [u8]) -> Result<usize, FileError> {
        self.file(path)?
            .read_at(offset, buf)
            .map_err(|e| sys_err("pread", path, e))
    }

    fn size(&mut self, path: &str) -> Result<u64, FileError> {
        Ok(self.file(path)?.size())
    }
}

/// Serve requests forever: with a network, the request device and HTTP over TCP together
/// (see `serve_tcp`); otherwise the handler between `reply_recv` calls (one kernel entry per
/// request: the answer to one request and the wait for the next).
pub fn serve(name: &str, handler: &mut dyn Handler) -> i32 {
    kscope_guest::println!("{name}: ready");
    if let Some(code) = serve_tcp(name, handler) {
        return code;
    }
    let mut buf = alloc::vec![0u8; kscope_guest::abi::request::MAX_REQUEST];
    let mut answer: (u64, u32, &[u8]) = (u64::MAX, 0, &[]);
    loop {
        let (id, status, payload) = answer;
        let payload = &payload[..payload.len().min(kscope_guest::abi::request::MAX_RESPONSE)];
        let meta = match ulib::sys::reply_recv(id, payload, status, &mut buf) {
            Ok(m) => m,
            Err(e) if id != u64::MAX => {
                // The answer could not be sent (e.g. out of memory): say so, then wait again.
                kscope_guest::println!("{name}: send_response failed: errno {}", e.0);
                answer = (u64::MAX, 0, &[]);
                continue;
            }
            Err(e) => {
                kscope_guest::println!("{name}: recv_request failed: errno {}", e.0);
                return 1;
            }
        };
        let len = (meta.len as usize).min(buf.len());
        let (status, payload) = handler.handle(&buf[..len]);
        answer = (meta.id, status, payload);
    }
}

/// The TCP port every workload serves HTTP/1.1 on (when the VM has a network).
pub const HTTP_PORT: u16 = 80;
/// Connections served at once (more wait in the kernel's backlog).
const MAX_CONNS: usize = 24;

struct Conn {
    fd: u64,
    inbuf: Vec<u8>,
    out: Vec<u8>,
    sent: usize,
    close_after: bool,
}

/// `core::fmt::Write` into a byte vector.
struct OutStr<'a>(&'a mut Vec<u8>);

impl core::fmt::Write for OutStr<'_> {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

fn out_str(out: &mut Vec<u8>) -> OutStr<'_> {
    OutStr(out)
}

/// Length of the first complete HTTP request in `buf` and whether it asks to close the
/// connection; `None` while incomplete; `Err` for a header block that can never complete.
fn frame_request(buf: &[u8]) -> Result<Option<(usize, bool)>, ()> {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return if buf.len() > 64 * 1024 {
            Err(())
        } else {
            Ok(None)
        };
    };
    let head = core::str::from_utf8(&buf[..end]).map_err(|_| ())?;
    let mut len = 0usize;
    let mut close = head.starts_with("GET / HTTP/1.0") || head.contains(" HTTP/1.0\r");
    for line in head.split("\r\n").skip(1) {
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        let v = v.trim();
        if k.eq_ignore_ascii_case("content-length") {
            len = v.parse().map_err(|_| ())?;
        } else if k.eq_ignore_ascii_case("connection") {
            close = v.eq_ignore_ascii_case("close");
        }
    }
    let total = end + 4 + len;
    Ok((buf.len() >= total).then_some((total, close)))
}

fn answer(handler: &mut dyn Handler, req: &[u8], out: &mut Vec<u8>) {
    use core::fmt::Write;
    if req.starts_with(b"GET /kscope/id ") {
        // The VM's own view of its network identity (clones answer with theirs).
        let body = match kscope_guest::ulib::net::info() {
            Ok(i) => {
                let [a, b, c, d] = i.ip;
                let m = i.mac;
                alloc::format!(
                    "ip={a}.{b}.{c}.{d} mac={:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x} rx={} tx={}\n",
                    m[0], m[1], m[2], m[3], m[4], m[5], i.rx_frames, i.tx_frames
                )
            }
            Err(e) => alloc::format!("no network: errno {}\n", e.0),
        };
        let _ = write!(
            out_str(out),
            "HTTP/1.1 200 OK\r\nServer: kscope\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        return;
    }
    if handler.speaks_http() {
        let (_, payload) = handler.handle(req);
        out.extend_from_slice(payload);
        return;
    }
    // Not an HTTP workload: the request is the POST body, the answer the response body.
    let end = req
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(0, |e| e + 4);
    let (status, payload) = handler.handle(&req[end..]);
    let mut head = String::new();
    let code = if status == crate::handlers::STATUS_OK {
        "200 OK"
    } else {
        "400 Bad Request"
    };
    let _ = write!(
        head,
        "HTTP/1.1 {code}\r\nServer: kscope\r\nX-Kscope-Status: {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n",
        payload.len()
    );
    out.extend_from_slice(head.as_bytes());
    out.extend_from_slice(payload);
}

/// Serve the request device and HTTP/1.1 over TCP on [`HTTP_PORT`] (keep-alive, many
/// connections) from one event loop. Returns `None` when the VM has no network.
fn serve_tcp(name: &str, handler: &mut dyn Handler) -> Option<i32> {
    use kscope_guest::abi::net::{self as nabi, errno as nerr, PollFd, POLL_IN, POLL_OUT};
    use kscope_guest::ulib::net;
    let info = net::info().ok()?;
    let lfd = net::socket(nabi::SOCK_STREAM).ok()?;
    if net::bind(lfd, HTTP_PORT).is_err() || net::listen(lfd, nabi::MAX_BACKLOG).is_err() {
        kscope_guest::println!("{name}: cannot listen on port {HTTP_PORT}");
        return None;
    }
    let [a, b, c, d] = info.ip;
    kscope_guest::println!("{name}: listening on {a}.{b}.{c}.{d}:{HTTP_PORT}");
    let mut reqbuf = alloc::vec![0u8; kscope_guest::abi::request::MAX_REQUEST];
    let mut rbuf = alloc::vec![0u8; 16 * 1024];
    let mut conns: Vec<Conn> = Vec::new();
    let mut set: Vec<PollFd> = Vec::new();
    // Out of descriptors: leave new connections in the kernel's backlog until one closes.
    let mut out_of_fds = false;
    loop {
        set.clear();
        set.push(PollFd {
            fd: nabi::REQUEST_FD,
            events: POLL_IN,
            revents: 0,
        });
        set.push(PollFd {
            fd: lfd as i32,
            events: if conns.len() < MAX_CONNS && !out_of_fds {
                POLL_IN
            } else {
                0
            },
            revents: 0,
        });
        for c in &conns {
            let pending = c.sent < c.out.len();
            set.push(PollFd {
                fd: c.fd as i32,
                events: if pending { POLL_OUT } else { POLL_IN },
                revents: 0,
            });
        }
        if let Err(e) = net::poll(&mut set, u64::MAX) {
            kscope_guest::println!("{name}: poll failed: errno {}", e.0);
            return Some(1);
        }
        if set[0].revents & POLL_IN != 0 {
            match ulib::sys::recv_request(&mut reqbuf) {
                Ok(meta) => {
                    let len = (meta.len as usize).min(reqbuf.len());
                    let (status, payload) = handler.handle(&reqbuf[..len]);
                    let payload =
                        &payload[..payload.len().min(kscope_guest::abi::request::MAX_RESPONSE)];
                    if let Err(e) = ulib::respond(meta.id, status, payload) {
                        kscope_guest::println!("{name}: send_response failed: errno {}", e.0);
                    }
                }
                Err(e) => kscope_guest::println!("{name}: recv_request failed: errno {}", e.0),
            }
        }
        if set[1].revents & POLL_IN != 0 {
            while conns.len() < MAX_CONNS {
                match net::accept(lfd) {
                    Ok((fd, _)) => conns.push(Conn {
                        fd,
                        inbuf: Vec::new(),
                        out: Vec::new(),
                        sent: 0,
                        close_after: false,
                    }),
                    Err(e) if e.0 == nerr::EAGAIN => break,
                    Err(e) => {
                        kscope_guest::println!("{name}: accept: errno {}", e.0);
                        out_of_fds = true;
                        break;
                    }
                }
            }
        }
        let mut k = 0;
        while k < conns.len() {
            let c = &mut conns[k];
            let mut dead = false;
            // Read what is there.
            if c.sent >= c.out.len() {
                loop {
                    match net::recv(c.fd, &mut rbuf) {
                        Ok(0) => {
                            dead = true;
                            break;
                        }
                        Ok(n) => c.inbuf.extend_from_slice(&rbuf[..n as usize]),
                        Err(e) if e.0 == nerr::EAGAIN => break,
                        Err(_) => {
                            dead = true;
                            break;
                        }
                    }
                }
                // Answer every complete request (pipelining included).
                if c.sent >= c.out.len() {
                    c.out.clear();
                    c.sent = 0;
                }
                loop {
                    match frame_request(&c.inbuf) {
                        Ok(Some((n, close))) => {
                            answer(handler, &c.inbuf[..n], &mut c.out);
                            c.inbuf.drain(..n);
                            if close {
                                c.close_after = true;
                                break;
                            }
                        }
                        Ok(None) => break,
                        Err(()) => {
                            c.close_after = true;
                            c.inbuf.clear();
                            break;
                        }
                    }
                }
            }
            // Send what is pending.
            while c.sent < c.out.len() {
                match net::send(c.fd, &c.out[c.sent..]) {
                    Ok(n) => c.sent += n as usize,
                    Err(e) if e.0 == nerr::EAGAIN => break,
                    Err(_) => {
                        dead = true;
                        break;
                    }
                }
            }
            if c.sent >= c.out.len() && c.close_after {
                dead = true;
            }
            if dead {
                let _ = net::close(c.fd);
                conns.swap_remove(k);
                out_of_fds = false;
            } else {
                k += 1;
            }
        }
    }
}
