//! Minimal HTTP/1.1 request parsing and response writing.

use alloc::vec::Vec;
use core::fmt::Write as _;

/// A parsed request (borrowing from the raw bytes).
#[derive(Debug, PartialEq, Eq)]
pub struct Request<'a> {
    /// Method (`GET`, `HEAD`, `POST`, ...).
    pub method: &'a str,
    /// Path without the query.
    pub path: &'a str,
    /// Query string (after `?`), empty if none.
    pub query: &'a str,
    /// Body (`Content-Length` bytes after the headers).
    pub body: &'a [u8],
}

/// Why a request could not be parsed (answered with 400).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// No blank line ends the headers.
    #[error("incomplete request: headers must end with an empty line")]
    Incomplete,
    /// The request line is not `METHOD TARGET HTTP/1.x`.
    #[error("malformed request line: expected `METHOD /path HTTP/1.1`")]
    BadRequestLine,
    /// A header line has no colon or `Content-Length` is not a number.
    #[error("malformed header")]
    BadHeader,
    /// Fewer body bytes than `Content-Length` announced.
    #[error("body shorter than Content-Length")]
    ShortBody,
}

/// Parse raw request bytes.
pub fn parse(raw: &[u8]) -> Result<Request<'_>, ParseError> {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or(ParseError::Incomplete)?;
    let head = core::str::from_utf8(&raw[..end]).map_err(|_| ParseError::BadRequestLine)?;
    let mut lines = head.split("\r\n");
    let line = lines.next().ok_or(ParseError::BadRequestLine)?;
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(ParseError::BadRequestLine);
    };
    if method.is_empty()
        || !method.bytes().all(|b| b.is_ascii_uppercase())
        || !target.starts_with('/')
        || !(version == "HTTP/1.1" || version == "HTTP/1.0")
    {
        return Err(ParseError::BadRequestLine);
    }
    let mut content_length = 0usize;
    for h in lines {
        let (name, value) = h.split_once(':').ok_or(ParseError::BadHeader)?;
        if name.eq_ignore_ascii_case("content-length") {
            content_length = value.trim().parse().map_err(|_| ParseError::BadHeader)?;
        }
    }
    let body = &raw[end + 4..];
    if body.len() < content_length {
        return Err(ParseError::ShortBody);
    }
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    Ok(Request {
        method,
        path,
        query,
        body: &body[..content_length],
    })
}

/// Reason phrase of a status code.
pub fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        500 => "Internal Server Error",
        _ => "Unknown",
    }
}

/// Content type of a path by its extension.
pub fn content_type(path: &str) -> &'static str {
    match path.rsplit_once('.').map(|(_, e)| e) {
        Some("html") => "text/html",
        Some("gif") => "image/gif",
        Some("txt") => "text/plain",
        Some("css") => "text/css",
        _ => "application/octet-stream",
    }
}

/// Write the status line and headers for a body of `len` bytes into `out` (cleared first).
/// `allow` adds an `Allow` header (405 responses).
pub fn head(out: &mut Vec<u8>, status: u16, ctype: &str, len: usize, allow: Option<&str>) {
    out.clear();
    let mut s = alloc::string::String::with_capacity(128);
    let _ = write!(
        s,
        "HTTP/1.1 {status} {}\r\nServer: kscope-web\r\nContent-Type: {ctype}\r\nContent-Length: {len}\r\n",
        reason(status)
    );
    if let Some(a) = allow {
        let _ = write!(s, "Allow: {a}\r\n");
    }
    s.push_str("\r\n");
    out.extend_from_slice(s.as_bytes());
}

/// A parsed response (host side and tests).
#[derive(Debug, PartialEq, Eq)]
pub struct Response<'a> {
    /// Status code.
    pub status: u16,
    /// `Content-Type` value.
    pub content_type: &'a str,
    /// `Content-Length` value.
    pub content_length: usize,
    /// `Allow` value, if any.
    pub allow: Option<&'a str>,
    /// Body.
    pub body: &'a [u8],
}

/// Parse a response produced by [`head`] + body, checking `Content-Length`.
pub fn parse_response(raw: &[u8]) -> Result<Response<'_>, &'static str> {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("no end of headers")?;
    let head = core::str::from_utf8(&raw[..end]).map_err(|_| "headers not UTF-8")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().ok_or("no status line")?;
    let mut sp = status_line.splitn(3, ' ');
    if sp.next() != Some("HTTP/1.1") {
        return Err("status line does not start with HTTP/1.1");
    }
    let status: u16 = sp
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or("bad status code")?;
    let mut len = None;
    let mut ctype = None;
    let mut allow = None;
    for h in lines {
        let (n, v) = h.split_once(':').ok_or("bad header")?;
        if n.eq_ignore_ascii_case("content-length") {
            len = v.trim().parse::<usize>().ok();
        } else if n.eq_ignore_ascii_case("content-type") {
            ctype = Some(v.trim());
        } else if n.eq_ignore_ascii_case("allow") {
            allow = Some(v.trim());
        }
    }
    let len = len.ok_or("missing Content-Length")?;
    let body = &raw[end + 4..];
    if body.len() != len && !body.is_empty() {
        return Err("Content-Length does not match the body");
    }
    let content_type = ctype.ok_or("missing Content-Type")?;
    Ok(Response {
        status,
        content_type,
        content_length: len,
        allow,
        body,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_requests() {
        let r = parse(b"GET /a/b?x=1&y=2 HTTP/1.1\r\nHost: h\r\n\r\n").unwrap();
        assert_eq!((r.method, r.path, r.query), ("GET", "/a/b", "x=1&y=2"));
        let r = parse(b"POST /l HTTP/1.1\r\nContent-Length: 3\r\n\r\nabcdef").unwrap();
        assert_eq!(r.body, b"abc");
        assert_eq!(parse(b"GET / HTTP/1.1\r\n"), Err(ParseError::Incomplete));
        assert_eq!(parse(b"GET / FTP\r\n\r\n"), Err(ParseError::BadRequestLine));
        assert_eq!(
            parse(b"get / HTTP/1.1\r\n\r\n"),
            Err(ParseError::BadRequestLine)
        );
        assert_eq!(
            parse(b"GET / HTTP/1.1\r\nbad\r\n\r\n"),
            Err(ParseError::BadHeader)
        );
        assert_eq!(
            parse(b"POST / HTTP/1.1\r\nContent-Length: 9\r\n\r\nab"),
            Err(ParseError::ShortBody)
        );
    }

    #[test]
    fn writes_and_reparses_responses() {
        let mut out = Vec::new();
        head(&mut out, 405, "text/plain", 3, Some("GET, HEAD"));
        out.extend_from_slice(b"no\n");
        let r = parse_response(&out).unwrap();
        assert_eq!(
            (r.status, r.content_type, r.body),
            (405, "text/plain", &b"no\n"[..])
        );
        assert_eq!((r.content_length, r.allow), (3, Some("GET, HEAD")));
        assert!(core::str::from_utf8(&out)
            .unwrap()
            .contains("Allow: GET, HEAD\r\n"));
    }
}
