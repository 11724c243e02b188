//! The load balancer's TCP path: real HTTP/1.1 connections (keep-alive, pooled per worker) to
//! a worker's own address inside the service's network namespace. Sockets are created by a
//! thread that entered the namespace; the connected socket then works from any thread.
//!
//! Two ways through it: [`Target::request`] sends the generated stream's raw requests (the
//! `kscope lb --tcp` dispatcher), [`Target::forward`] relays requests that the front end
//! ([`super::front`]) received, over hyper client connections (keep-alive, at most
//! [`MAX_CONNS`] per worker so that the guest's fixed socket table is never exhausted).

use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::client::conn::http1::SendRequest;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Most connections the front end keeps open to one worker (the guest has 24 TCP sockets).
pub const MAX_CONNS: usize = 16;

/// Errors of the TCP path.
#[derive(Debug, thiserror::Error)]
pub enum TcpError {
    /// The API did not report an address for the worker.
    #[error("worker {0} has no network address (create the parent with a network: `kscope lb --tcp` does)")]
    NoAddress(String),
    /// Connecting failed.
    #[error("connect to {addr} in namespace {netns}: {msg}")]
    Connect {
        /// Address.
        addr: SocketAddr,
        /// Namespace.
        netns: String,
        /// Error.
        msg: String,
    },
    /// The exchange failed.
    #[error("HTTP exchange with {addr}: {msg}")]
    Exchange {
        /// Address.
        addr: SocketAddr,
        /// Error.
        msg: String,
    },
    /// The worker did not answer in time (stopped, or overloaded).
    #[error("{addr} did not answer within {timeout:?} (is the worker still running? raise the upstream timeout if it is only slow)")]
    Timeout {
        /// Address.
        addr: SocketAddr,
        /// The limit.
        timeout: Duration,
    },
}

impl TcpError {
    /// True when the worker itself looks unreachable (no connection, or no answer at all),
    /// rather than one kept-alive connection having been closed.
    pub fn worker_down(&self) -> bool {
        matches!(self, TcpError::Connect { .. } | TcpError::Timeout { .. })
    }
}

/// A worker's HTTP endpoint and its idle keep-alive connections.
#[derive(Debug)]
pub struct Target {
    /// Namespace of the address.
    pub netns: String,
    /// Address (port 80).
    pub addr: SocketAddr,
    idle: Mutex<Vec<TcpStream>>,
    /// Idle hyper connections of [`Target::forward`].
    senders: Mutex<Vec<SendRequest<Full<Bytes>>>>,
    /// Bounds the connections of [`Target::forward`] to [`MAX_CONNS`].
    slots: tokio::sync::Semaphore,
}

impl Target {
    /// The endpoint `addr` in namespace `netns`.
    pub fn new(netns: String, addr: SocketAddr) -> Target {
        Target {
            netns,
            addr,
            idle: Mutex::new(Vec::new()),
            senders: Mutex::new(Vec::new()),
            slots: tokio::sync::Semaphore::new(MAX_CONNS),
        }
    }

    async fn connect(&self) -> Result<TcpStream, TcpError> {
        if let Some(s) = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop() {
            return Ok(s);
        }
        self.dial().await
    }

    /// A new connection, made by a thread inside the namespace.
    async fn dial(&self) -> Result<TcpStream, TcpError> {
        let (netns, addr) = (self.netns.clone(), self.addr);
        let err = |msg: String| TcpError::Connect {
            addr,
            netns: netns.clone(),
            msg,
        };
        let ns = netns.clone();
        let std = tokio::task::spawn_blocking(move || {
            kscope_vmm::net::run_in_netns(&ns, || {
                std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            })
        })
        .await
        .map_err(|e| err(e.to_string()))?
        .map_err(|e| err(e.to_string()))?
        .map_err(|e| err(e.to_string()))?;
        std.set_nonblocking(true).map_err(|e| err(e.to_string()))?;
        let _ = std.set_nodelay(true);
        TcpStream::from_std(std).map_err(|e| err(e.to_string()))
    }

    /// Send one request (raw HTTP when `http`, otherwise the body of a POST) and read the
    /// response: (guest status, body). The connection goes back to the pool.
    pub async fn request(
        &self,
        payload: &[u8],
        http: bool,
        timeout: Duration,
    ) -> Result<(u32, Vec<u8>), TcpError> {
        let addr = self.addr;
        let xerr = |msg: String| TcpError::Exchange { addr, msg };
        let mut s = self.connect().await?;
        let msg = if http {
            payload.to_vec()
        } else {
            let mut m = format!(
                "POST / HTTP/1.1\r\nHost: kscope\r\nContent-Length: {}\r\n\r\n",
                payload.len()
            )
            .into_bytes();
            m.extend_from_slice(payload);
            m
        };
        let exchange = async {
            s.write_all(&msg).await.map_err(|e| xerr(e.to_string()))?;
            read_response(&mut s).await.map_err(xerr)
        };
        let (head, body) = tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| xerr(format!("no answer within {timeout:?}")))??;
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).push(s);
        let status = header(&head, "x-kscope-status")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let mut full = head.into_bytes();
        full.extend_from_slice(&body);
        Ok((status, if http { full } else { body }))
    }

    /// An idle hyper connection that is still open, or a new one.
    async fn sender(&self) -> Result<SendRequest<Full<Bytes>>, TcpError> {
        loop {
            let idle = self.senders.lock().unwrap_or_else(|p| p.into_inner()).pop();
            match idle {
                Some(s) if !s.is_closed() => return Ok(s),
                Some(_) => continue,
                None => break,
            }
        }
        let addr = self.addr;
        let stream = self.dial().await?;
        let (sender, conn) = hyper::client::conn::http1::Builder::new()
            .preserve_header_case(true)
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| TcpError::Exchange {
                addr,
                msg: format!("HTTP/1.1 handshake: {e}"),
            })?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!("connection to worker {addr} ended: {e}");
            }
        });
        Ok(sender)
    }

    /// Relay one request to the worker over a kept-alive connection and return its answer
    /// (status, headers, the whole body). Waiting for a connection slot, connecting and the
    /// exchange together take at most `timeout`.
    pub async fn forward(
        &self,
        req: Request<Full<Bytes>>,
        timeout: Duration,
    ) -> Result<Response<Bytes>, TcpError> {
        let addr = self.addr;
        let xerr = |msg: String| TcpError::Exchange { addr, msg };
        let exchange = async {
            let _slot = self
                .slots
                .acquire()
                .await
                .map_err(|e| xerr(e.to_string()))?;
            let mut sender = self.sender().await?;
            sender.ready().await.map_err(|e| xerr(e.to_string()))?;
            let resp = sender
                .send_request(req)
                .await
                .map_err(|e| xerr(e.to_string()))?;
            let (parts, body) = resp.into_parts();
            let body = body
                .collect()
                .await
                .map_err(|e| xerr(format!("reading the body: {e}")))?
                .to_bytes();
            self.senders
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(sender);
            Ok(Response::from_parts(parts, body))
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| TcpError::Timeout { addr, timeout })?
    }
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// Read one response: (head including the blank line, body of Content-Length bytes).
async fn read_response(s: &mut TcpStream) -> Result<(String, Vec<u8>), String> {
    let mut buf = Vec::with_capacity(4096);
    let mut tmp = [0u8; 16384];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end + 4]).into_owned();
            let len: usize = header(&head, "content-length")
                .and_then(|v| v.parse().ok())
                .ok_or("response without Content-Length")?;
            while buf.len() < end + 4 + len {
                let n = s.read(&mut tmp).await.map_err(|e| e.to_string())?;
                if n == 0 {
                    return Err("connection closed inside the body".into());
                }
                buf.extend_from_slice(&tmp[..n]);
            }
            let body = buf[end + 4..end + 4 + len].to_vec();
            return Ok((head, body));
        }
        let n = s.read(&mut tmp).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("connection closed before a response".into());
        }
        buf.extend_from_slice(&tmp[..n]);
    }
}
