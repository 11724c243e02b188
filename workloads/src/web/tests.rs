//! Behaviour of the web server on the generated site.

use super::*;
use crate::data::{generate_all, ImageOptions};
use crate::files::MemFiles;

fn server() -> Web<MemFiles> {
    Web::new(MemFiles::new(generate_all(&ImageOptions::tiny())))
}

fn status(resp: &[u8]) -> u16 {
    http::parse_response(resp).unwrap().status
}

#[test]
fn serves_static_files_and_caches_small_ones() {
    let mut w = server();
    let r = w
        .handle(b"GET /dir00000/class1_2.html HTTP/1.1\r\n\r\n")
        .to_vec();
    let p = http::parse_response(&r).unwrap();
    assert_eq!(
        (p.status, p.content_type, p.body.len()),
        (200, "text/html", 3 * 1024)
    );
    w.handle(b"GET /dir00000/class1_2.html HTTP/1.1\r\n\r\n");
    assert_eq!(w.stats().hot_hits, 1);
    let r = w
        .handle(b"GET /dir00000/class3_1.bin HTTP/1.1\r\n\r\n")
        .to_vec();
    assert_eq!(http::parse_response(&r).unwrap().body.len(), 200 * 1024);
    let r = w
        .handle(b"HEAD /dir00000/class2_0.gif HTTP/1.1\r\n\r\n")
        .to_vec();
    let p = http::parse_response(&r).unwrap();
    assert_eq!(
        (p.content_length, p.body.len(), p.content_type),
        (10 * 1024, 0, "image/gif")
    );
    assert_eq!(status(w.handle(b"GET / HTTP/1.1\r\n\r\n")), 200);
}

#[test]
fn errors_are_proper_http() {
    let mut w = server();
    assert_eq!(status(w.handle(b"GET /nope.html HTTP/1.1\r\n\r\n")), 404);
    assert_eq!(
        status(w.handle(b"GET /../data/bank/accounts.dat HTTP/1.1\r\n\r\n")),
        404
    );
    assert_eq!(status(w.handle(b"hello\r\n\r\n")), 400);
    assert_eq!(
        status(w.handle(b"GET /shop/product?id=x HTTP/1.1\r\n\r\n")),
        400
    );
    assert_eq!(status(w.handle(b"GET /bank/summary HTTP/1.1\r\n\r\n")), 400);
    assert_eq!(
        status(w.handle(b"GET /bank/summary?user=999999 HTTP/1.1\r\n\r\n")),
        404
    );
    assert_eq!(status(w.handle(b"GET /bank/other HTTP/1.1\r\n\r\n")), 404);
    let r = w.handle(b"PUT /index.html HTTP/1.1\r\n\r\n").to_vec();
    let p = http::parse_response(&r).unwrap();
    assert_eq!((p.status, p.allow), (405, Some("GET, HEAD")));
    let r = w.handle(b"DELETE /bank/login HTTP/1.1\r\n\r\n").to_vec();
    assert_eq!(
        http::parse_response(&r).unwrap().allow,
        Some("GET, HEAD, POST")
    );
}

#[test]
fn dynamic_pages_render_records() {
    let mut w = server();
    let body = |w: &mut Web<MemFiles>, req: &[u8]| {
        let r = w.handle(req).to_vec();
        let p = http::parse_response(&r).unwrap();
        assert_eq!(p.status, 200, "{}", String::from_utf8_lossy(&r));
        String::from_utf8(p.body.to_vec()).unwrap()
    };
    let s = body(&mut w, b"GET /bank/summary?user=0 HTTP/1.1\r\n\r\n");
    assert!(s.contains("Accounts of ") && s.contains("Total: "), "{s}");
    let s = body(
        &mut w,
        b"GET /bank/transactions?acct=100000 HTTP/1.1\r\n\r\n",
    );
    assert!(s.contains("Balance: "), "{s}");
    let s = body(
        &mut w,
        b"POST /bank/login HTTP/1.1\r\nContent-Length: 22\r\n\r\nuser=3&password=pw3xyz",
    );
    assert!(s.contains("Login failed"), "{s}");
    let s = body(
        &mut w,
        b"POST /bank/login HTTP/1.1\r\nContent-Length: 19\r\n\r\nuser=3&password=pw3",
    );
    assert!(s.contains("Welcome "), "{s}");
    let s = body(&mut w, b"GET /shop/catalog?cat=1&page=1 HTTP/1.1\r\n\r\n");
    assert!(s.contains("Page 1 of "), "{s}");
    let s = body(&mut w, b"GET /shop/product?id=5 HTTP/1.1\r\n\r\n");
    assert!(s.contains("In stock: "), "{s}");
    let s = body(&mut w, b"GET /support/downloads HTTP/1.1\r\n\r\n");
    assert_eq!(
        s.matches("<li>").count(),
        ImageOptions::tiny().support_files as usize
    );
    let r = w
        .handle(b"GET /support/download?id=1 HTTP/1.1\r\n\r\n")
        .to_vec();
    assert_eq!(
        http::parse_response(&r).unwrap().content_type,
        "application/octet-stream"
    );
}
