//! Reading HTTP/1.1 responses from a stream, for the host-side clients of the workloads'
//! TCP path (system tests of the guests' web servers and of the balancer's front end).

use std::io::Read;

/// Reads one response (the head and a `Content-Length` body, or the head alone when
/// `head_only`, the answer to a HEAD request) from `s`. `buf` holds bytes already read from
/// the connection; what follows the response stays in it for the next call.
pub fn read_http_response(
    s: &mut impl Read,
    buf: &mut Vec<u8>,
    head_only: bool,
) -> std::io::Result<Vec<u8>> {
    let mut tmp = [0u8; 16384];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            let len = if head_only { 0 } else { len };
            if buf.len() >= end + 4 + len {
                let rest = buf.split_off(end + 4 + len);
                return Ok(std::mem::replace(buf, rest));
            }
        }
        let n = s.read(&mut tmp)?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "connection closed",
            ));
        }
        buf.extend_from_slice(&tmp[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_are_split_at_their_length() {
        let wire = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabcHTTP/1.1 204 No\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n";
        let mut s = &wire[..];
        let mut buf = Vec::new();
        let a = read_http_response(&mut s, &mut buf, false).unwrap();
        assert!(a.ends_with(b"\r\n\r\nabc"));
        let b = read_http_response(&mut s, &mut buf, false).unwrap();
        assert_eq!(b, b"HTTP/1.1 204 No\r\n\r\n");
        // A HEAD answer carries the length of a body it does not send.
        let c = read_http_response(&mut s, &mut buf, true).unwrap();
        assert!(c.ends_with(b"Content-Length: 9\r\n\r\n"));
        assert!(read_http_response(&mut s, &mut buf, false).is_err());
    }
}
