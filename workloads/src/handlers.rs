//! One request in, one response out: the request handlers the guest programs run (and host
//! tests run on the same data through [`crate::files::MemFiles`]).

use alloc::boxed::Box;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

use crate::files::Files;
use crate::func::{aes, compress, json, matmul};
use crate::olap::Olap;
use crate::web::Web;
use crate::Workload;

/// Response status (the request device's status field): success.
pub const STATUS_OK: u32 = 0;
/// Response status: the request was malformed (payload: a message saying what to send).
pub const STATUS_BAD_REQUEST: u32 = 1;
/// Response status: the program failed (payload: the error).
pub const STATUS_FAILED: u32 = 2;

/// A request handler.
pub trait Handler {
    /// Handle one request payload; returns `(status, response payload)`.
    fn handle(&mut self, request: &[u8]) -> (u32, &[u8]);
    /// True if requests and responses are HTTP messages themselves (served as they are over
    /// TCP); otherwise TCP clients send the request as the body of an HTTP POST.
    fn speaks_http(&self) -> bool {
        false
    }
}

/// The `web` handler (always status 0: errors are HTTP responses).
pub struct WebHandler<F: Files>(pub Web<F>);

impl<F: Files> Handler for WebHandler<F> {
    fn handle(&mut self, request: &[u8]) -> (u32, &[u8]) {
        (STATUS_OK, self.0.handle(request))
    }

    fn speaks_http(&self) -> bool {
        true
    }
}

/// Handler for the text-answer workloads (olap and the functions).
pub struct TextHandler<F: Files> {
    kind: Workload,
    files: F,
    olap: Option<Olap<F>>,
    buf: Vec<u8>,
    out: Vec<u8>,
}

fn text(req: &[u8]) -> Result<&str, (u32, String)> {
    core::str::from_utf8(req).map_err(|_| (STATUS_BAD_REQUEST, "request is not UTF-8 text".into()))
}

impl<F: Files + Clone> TextHandler<F> {
    /// A handler of `kind` (not [`Workload::Web`]).
    pub fn new(kind: Workload, files: F) -> Self {
        let olap = (kind == Workload::Olap).then(|| Olap::new(files.clone()));
        TextHandler {
            kind,
            files,
            olap,
            buf: Vec::new(),
            out: Vec::new(),
        }
    }

    fn run(&mut self, req: &[u8]) -> Result<(), (u32, String)> {
        let req = text(req)?;
        let bad = |e: &dyn core::fmt::Display| (STATUS_BAD_REQUEST, e.to_string());
        let failed = |e: &dyn core::fmt::Display| (STATUS_FAILED, e.to_string());
        let answer = match self.kind {
            Workload::Olap => {
                let olap = self
                    .olap
                    .as_mut()
                    .ok_or((STATUS_FAILED, String::from("no engine")))?;
                olap.run(req).map_err(|e| match e {
                    crate::olap::QueryError::Bad(_) => bad(&e),
                    _ => failed(&e),
                })?
            }
            Workload::Json => json::run(&mut self.files, req).map_err(|e| match e {
                json::JsonError::UnknownInput(_) => bad(&e),
                _ => failed(&e),
            })?,
            Workload::Aes => {
                aes::run(&mut self.files, req, &mut self.buf).map_err(|e| match e {
                    aes::AesError::File(_) => failed(&e),
                    _ => bad(&e),
                })?
            }
            Workload::Matmul => matmul::run(req).map_err(|e| bad(&e))?,
            Workload::Compress => {
                compress::run(&mut self.files, req, &mut self.out).map_err(|e| match e {
                    compress::CompressError::File(_) => failed(&e),
                    _ => bad(&e),
                })?;
                return Ok(());
            }
            Workload::Web => return Err((STATUS_FAILED, "web has its own handler".into())),
        };
        self.out.clear();
        self.out.extend_from_slice(answer.as_bytes());
        Ok(())
    }
}

impl<F: Files + Clone> Handler for TextHandler<F> {
    fn handle(&mut self, request: &[u8]) -> (u32, &[u8]) {
        match self.run(request) {
            Ok(()) => (STATUS_OK, &self.out),
            Err((status, msg)) => {
                self.out.clear();
                self.out.extend_from_slice(msg.as_bytes());
                (status, &self.out)
            }
        }
    }
}

/// The handler of workload `kind` over `files`.
pub fn handler_for<F: Files + Clone + 'static>(kind: Workload, files: F) -> Box<dyn Handler> {
    match kind {
        Workload::Web => Box::new(WebHandler(Web::new(files))),
        k => Box::new(TextHandler::new(k, files)),
    }
}
