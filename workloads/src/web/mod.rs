//! The `web` workload: an HTTP/1.1 server for a SPECweb2005-like site.
//!
//! One request payload = the raw bytes of one HTTP request; the response payload = the raw
//! HTTP response. Routes:
//!
//! | method | path | answer |
//! |---|---|---|
//! | GET, HEAD | `/` and any other path | static file `/www<path>` (404 if absent) |
//! | GET, HEAD, POST | `/bank/login` | login form; POST `user=ID&password=pwID` logs in |
//! | GET, HEAD | `/bank/summary?user=ID` | the user's accounts, balances, total |
//! | GET, HEAD | `/bank/transactions?acct=ID` | an account's transactions |
//! | GET, HEAD | `/shop/catalog?cat=C&page=P` | 20 products of category C per page |
//! | GET, HEAD | `/shop/product?id=N` | one product |
//! | GET, HEAD | `/support/downloads?cat=C` | downloads of a category |
//! | GET, HEAD | `/support/download?id=N` | a download's bytes (read with `pread`) |
//!
//! Other methods get 405 (with `Allow`), malformed requests or parameters 400, unknown
//! files, users, accounts, products and downloads 404. Small static files (up to
//! [`HOT_FILE_MAX`]) are kept in an in-heap LRU cache of [`HOT_CACHE_BYTES`]; larger ones are
//! mapped once and served from the page cache; data files are mapped.

pub mod http;
pub mod pages;

use alloc::string::String;
use alloc::vec::Vec;

use crate::data::web::SupportFile;
use crate::files::{FileError, Files};
use crate::util::FxHashMap;

/// Largest static file kept in the heap cache.
pub const HOT_FILE_MAX: usize = 32 * 1024;
/// Budget of the heap cache of static files.
pub const HOT_CACHE_BYTES: usize = 2 << 20;

/// Request counters.
#[derive(Clone, Copy, Debug, Default)]
pub struct Stats {
    /// Requests handled.
    pub requests: u64,
    /// Static requests answered from the heap cache.
    pub hot_hits: u64,
    /// Static requests that loaded a file.
    pub hot_misses: u64,
}

struct HotEntry {
    data: Vec<u8>,
    last_use: u64,
}

/// The server: file access, caches and the reusable response buffer.
pub struct Web<F: Files> {
    pub(crate) files: F,
    hot: FxHashMap<String, HotEntry>,
    hot_bytes: usize,
    mapped: FxHashMap<String, &'static [u8]>,
    pub(crate) support: Option<Vec<SupportFile>>,
    out: Vec<u8>,
    stats: Stats,
}

/// Outcome of a handler: status, content type and body (empty for HEAD is handled later).
pub(crate) enum Reply {
    /// A body generated into a string.
    Page(u16, &'static str, String),
    /// File bytes (mapped or cached).
    Bytes(u16, &'static str, BytesSrc),
    /// 405 with the methods the resource allows.
    NotAllowed(&'static str),
}

/// Where file bytes come from.
pub(crate) enum BytesSrc {
    /// A mapped file.
    Mapped(&'static [u8]),
    /// An entry of the heap cache.
    Hot(String),
    /// Read with `read_at` into the response: `(path, size)`.
    Read(String, usize),
}

impl<F: Files> Web<F> {
    /// A server over `files`.
    pub fn new(files: F) -> Self {
        Web {
            files,
            hot: FxHashMap::default(),
            hot_bytes: 0,
            mapped: FxHashMap::default(),
            support: None,
            out: Vec::with_capacity(64 * 1024),
            stats: Stats::default(),
        }
    }

    /// Counters so far.
    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// Handle one raw HTTP request; returns the raw response (valid until the next call).
    pub fn handle(&mut self, raw: &[u8]) -> &[u8] {
        self.stats.requests += 1;
        let req = match http::parse(raw) {
            Ok(r) => r,
            Err(e) => {
                let reply = pages::error(400, &alloc::format!("{e}"));
                self.emit(reply, false);
                return &self.out;
            }
        };
        let head_only = req.method == "HEAD";
        let reply = match self.route(&req) {
            Ok(r) => r,
            Err(FileError::NotFound(p)) => pages::error(404, &alloc::format!("{p} not found")),
            Err(e) => pages::error(500, &alloc::format!("{e}")),
        };
        self.emit(reply, head_only);
        &self.out
    }

    fn route(&mut self, req: &http::Request<'_>) -> Result<Reply, FileError> {
        let dynamic = [
            "/bank/",
            "/shop/",
            "/support/downloads",
            "/support/download",
        ]
        .iter()
        .any(|p| req.path.starts_with(p));
        let post_ok = req.path == "/bank/login";
        match req.method {
            "GET" | "HEAD" => {}
            "POST" if post_ok => {}
            _ => {
                let allow = if post_ok {
                    "GET, HEAD, POST"
                } else {
                    "GET, HEAD"
                };
                return Ok(Reply::NotAllowed(allow));
            }
        }
        if dynamic {
            pages::dynamic(self, req)
        } else {
            self.static_file(req.path)
        }
    }

    fn static_file(&mut self, path: &str) -> Result<Reply, FileError> {
        let path = if path == "/" { "/index.html" } else { path };
        if path.contains("..") || path.contains("//") || path.len() + 4 >= 64 {
            return Ok(pages::error(404, "no such file"));
        }
        let full = alloc::format!("/www{path}");
        let ctype = http::content_type(path);
        if let Some(e) = self.hot.get_mut(&full) {
            self.stats.hot_hits += 1;
            e.last_use = self.stats.requests;
            return Ok(Reply::Bytes(200, ctype, BytesSrc::Hot(full)));
        }
        if let Some(m) = self.mapped.get(&full) {
            return Ok(Reply::Bytes(200, ctype, BytesSrc::Mapped(m)));
        }
        self.stats.hot_misses += 1;
        let size = self.files.size(&full)? as usize;
        if size <= HOT_FILE_MAX {
            let mut data = alloc::vec![0u8; size];
            let n = self.files.read_at(&full, 0, &mut data)?;
            data.truncate(n);
            self.insert_hot(full.clone(), data);
            Ok(Reply::Bytes(200, ctype, BytesSrc::Hot(full)))
        } else {
            let m = self.files.map(&full)?;
            self.mapped.insert(full, m);
            Ok(Reply::Bytes(200, ctype, BytesSrc::Mapped(m)))
        }
    }

    fn insert_hot(&mut self, path: String, data: Vec<u8>) {
        while self.hot_bytes + data.len() > HOT_CACHE_BYTES && !self.hot.is_empty() {
            let victim = self
                .hot
                .iter()
                .min_by_key(|(_, e)| e.last_use)
                .map(|(k, _)| k.clone());
            if let Some(v) = victim.and_then(|k| self.hot.remove(&k)) {
                self.hot_bytes -= v.data.len();
            }
        }
        self.hot_bytes += data.len();
        self.hot.insert(
            path,
            HotEntry {
                data,
                last_use: self.stats.requests,
            },
        );
    }

    /// Map a data file once (kept for the life of the process).
    pub(crate) fn mapped(&mut self, path: &str) -> Result<&'static [u8], FileError> {
        if let Some(m) = self.mapped.get(path) {
            return Ok(m);
        }
        let m = self.files.map(path)?;
        self.mapped.insert(path.into(), m);
        Ok(m)
    }

    fn emit(&mut self, reply: Reply, head_only: bool) {
        match reply {
            Reply::Page(status, ctype, body) => {
                http::head(&mut self.out, status, ctype, body.len(), None);
                if !head_only {
                    self.out.extend_from_slice(body.as_bytes());
                }
            }
            Reply::NotAllowed(allow) => {
                let body = alloc::format!("method not allowed; allowed: {allow}\n");
                http::head(&mut self.out, 405, "text/plain", body.len(), Some(allow));
                self.out.extend_from_slice(body.as_bytes());
            }
            Reply::Bytes(status, ctype, src) => {
                let len = match &src {
                    BytesSrc::Mapped(m) => m.len(),
                    BytesSrc::Hot(k) => self.hot.get(k).map_or(0, |e| e.data.len()),
                    BytesSrc::Read(_, size) => *size,
                };
                http::head(&mut self.out, status, ctype, len, None);
                if head_only {
                    return;
                }
                match src {
                    BytesSrc::Mapped(m) => self.out.extend_from_slice(m),
                    BytesSrc::Hot(k) => {
                        if let Some(e) = self.hot.get(&k) {
                            self.out.extend_from_slice(&e.data);
                        }
                    }
                    BytesSrc::Read(path, size) => {
                        let at = self.out.len();
                        self.out.resize(at + size, 0);
                        let n = self
                            .files
                            .read_at(&path, 0, &mut self.out[at..])
                            .unwrap_or(0);
                        if n != size {
                            // The file shrank or failed mid-way: answer 500 instead.
                            let r = pages::error(500, "short read");
                            self.emit(r, false);
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
