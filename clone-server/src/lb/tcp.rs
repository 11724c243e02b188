//! The load balancer's TCP path: real HTTP/1.1 connections (keep-alive, pooled per worker) to
//! a worker's own address inside the service's network namespace. Sockets are created by a
//! thread that entered the namespace; the connected socket then works from any thread.

use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

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
}

/// A worker's HTTP endpoint and its idle keep-alive connections.
#[derive(Debug)]
pub struct Target {
    /// Namespace of the address.
    pub netns: String,
    /// Address (port 80).
    pub addr: SocketAddr,
    idle: Mutex<Vec<TcpStream>>,
}

impl Target {
    /// The endpoint `addr` in namespace `netns`.
    pub fn new(netns: String, addr: SocketAddr) -> Target {
        Target {
            netns,
            addr,
            idle: Mutex::new(Vec::new()),
        }
    }

    async fn connect(&self) -> Result<TcpStream, TcpError> {
        if let Some(s) = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop() {
            return Ok(s);
        }
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
