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

/// Files kept open at most (the kernel gives a process 13 descriptors; `map` needs one more
/// for a moment).
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

/// Serve requests forever: the handler between `reply_recv` calls (one kernel entry per
/// request: the answer to one request and the wait for the next).
pub fn serve(name: &str, handler: &mut dyn Handler) -> i32 {
    kscope_guest::println!("{name}: ready");
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
