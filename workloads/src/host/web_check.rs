//! Expected answers of the `web` workload, computed from the generator's records.

use super::Dataset;
use crate::data::web::{Support, ACCOUNT_KINDS, CATEGORIES};
use crate::web::http;

enum Expect {
    /// Exact body (and content type).
    Exact(&'static str, Vec<u8>),
    /// An HTML page containing these snippets, with `count` occurrences of `marker`.
    Page(Vec<String>, &'static str, usize),
    /// Only the status matters (an error page).
    Status(u16),
}

fn money(cents: i64) -> String {
    format!(
        "{}{}.{:02}",
        if cents < 0 { "-" } else { "" },
        cents.abs() / 100,
        cents.abs() % 100
    )
}

fn param<'a>(q: &'a str, k: &str) -> Option<&'a str> {
    q.split('&')
        .find_map(|kv| kv.strip_prefix(k).and_then(|r| r.strip_prefix('=')))
}

fn expect(d: &Dataset, req: &http::Request<'_>) -> Expect {
    let post_ok = req.path == "/bank/login";
    if !(req.method == "GET" || req.method == "HEAD" || (req.method == "POST" && post_ok)) {
        return Expect::Status(405);
    }
    let num = |k: &str| param(req.query, k).map(|v| v.parse::<u64>());
    let page = |title: String, mut snippets: Vec<String>, marker, count| {
        snippets.insert(0, format!("<h1>{title}</h1>"));
        Expect::Page(snippets, marker, count)
    };
    match req.path {
        "/bank/login" if req.method != "POST" => {
            page("Bank login".into(), vec!["<form".into()], "<form", 1)
        }
        "/bank/login" => {
            let body = std::str::from_utf8(req.body).unwrap_or("");
            let Some(Ok(user)) = param(body, "user").map(|v| v.parse::<u64>()) else {
                return Expect::Status(400);
            };
            let Some(a) = d.bank.accounts.iter().find(|a| a.user as u64 == user) else {
                return Expect::Status(404);
            };
            if param(body, "password") == Some(&format!("pw{user}")) {
                page(
                    format!("Welcome {}", a.name),
                    vec![format!("/bank/summary?user={user}")],
                    "<a ",
                    1,
                )
            } else {
                page("Login failed".into(), vec![], "<a ", 0)
            }
        }
        "/bank/summary" => {
            let Some(Ok(user)) = num("user") else {
                return Expect::Status(400);
            };
            let accts: Vec<_> = d
                .bank
                .accounts
                .iter()
                .filter(|a| a.user as u64 == user)
                .collect();
            let Some(first) = accts.first() else {
                return Expect::Status(404);
            };
            let mut s: Vec<String> = accts
                .iter()
                .map(|a| {
                    format!(
                        "<tr><td><a href=\"/bank/transactions?acct={0}\">{0}</a></td><td>{1}</td><td class=\"amt\">{2}</td></tr>",
                        a.id, ACCOUNT_KINDS[a.kind as usize], money(a.balance)
                    )
                })
                .collect();
            s.push(format!(
                "<p>Total: {}</p>",
                money(accts.iter().map(|a| a.balance).sum())
            ));
            page(
                format!("Accounts of {}", first.name),
                s,
                "<tr><td>",
                accts.len(),
            )
        }
        "/bank/transactions" => {
            let Some(Ok(acct)) = num("acct") else {
                return Expect::Status(400);
            };
            let Some(a) = d.bank.accounts.iter().find(|a| a.id as u64 == acct) else {
                return Expect::Status(404);
            };
            let txns: Vec<_> = d.bank.txns.iter().filter(|t| t.account == a.id).collect();
            let mut s: Vec<String> = txns
                .iter()
                .map(|t| {
                    format!(
                        "<tr><td>{}</td><td>{:04}-{:02}-{:02}</td><td>{}</td><td class=\"amt\">{}</td></tr>",
                        t.id,
                        t.date / 10000,
                        t.date / 100 % 100,
                        t.date % 100,
                        t.memo,
                        money(t.amount)
                    )
                })
                .collect();
            s.push(format!(
                "<p>Net: {}</p>",
                money(txns.iter().map(|t| t.amount).sum())
            ));
            s.push(format!("<p>Balance: {}</p>", money(a.balance)));
            page(format!("Account {acct}"), s, "<tr><td>", txns.len())
        }
        "/shop/catalog" => {
            let (Ok(cat), Ok(pg)) = (num("cat").unwrap_or(Ok(0)), num("page").unwrap_or(Ok(1)))
            else {
                return Expect::Status(400);
            };
            let prods: Vec<_> = d
                .shop
                .products
                .iter()
                .filter(|p| p.category as u64 == cat)
                .collect();
            let pages = prods.len().div_ceil(20).max(1);
            if cat >= CATEGORIES as u64 || prods.is_empty() || pg == 0 || pg as usize > pages {
                return Expect::Status(404);
            }
            let shown = &prods[(pg as usize - 1) * 20..prods.len().min(pg as usize * 20)];
            let mut s: Vec<String> = shown
                .iter()
                .map(|p| {
                    format!(
                        "<li><a href=\"/shop/product?id={}\">{}</a> {}</li>",
                        p.id,
                        p.name,
                        money(p.price as i64)
                    )
                })
                .collect();
            s.push(format!("<p>Page {pg} of {pages}</p>"));
            page(format!("Category {cat}"), s, "<li>", shown.len())
        }
        "/shop/product" => {
            let Some(Ok(id)) = num("id") else {
                return Expect::Status(400);
            };
            let Some(p) = d.shop.products.get(id as usize) else {
                return Expect::Status(404);
            };
            let s = vec![
                format!("<p>{}</p>", p.desc),
                format!("<p>Price: {}</p>", money(p.price as i64)),
                format!("<p>In stock: {}</p>", p.stock),
            ];
            page(p.name.clone(), s, "<p>", 4)
        }
        "/support/downloads" => {
            let cat = match num("cat") {
                None => None,
                Some(Ok(c)) => Some(c),
                Some(Err(_)) => return Expect::Status(400),
            };
            let files: Vec<_> = d
                .support
                .files
                .iter()
                .filter(|f| cat.is_none_or(|c| f.category as u64 == c))
                .collect();
            let s = files
                .iter()
                .map(|f| {
                    format!(
                        "<li><a href=\"/support/download?id={}\">{}</a> ({} bytes)</li>",
                        f.id, f.title, f.size
                    )
                })
                .collect();
            let title = cat.map_or("Downloads".into(), |c| format!("Downloads of category {c}"));
            page(title, s, "<li>", files.len())
        }
        "/support/download" => {
            let Some(Ok(id)) = num("id") else {
                return Expect::Status(400);
            };
            match d.support.files.iter().find(|f| f.id as u64 == id) {
                Some(f) => {
                    Expect::Exact("application/octet-stream", Support::content(d.opts.seed, f))
                }
                None => Expect::Status(404),
            }
        }
        p if p.starts_with("/bank/")
            || p.starts_with("/shop/")
            || p.starts_with("/support/download") =>
        {
            Expect::Status(404)
        }
        p => {
            let p = if p == "/" { "/index.html" } else { p };
            match d.file(&format!("/www{p}")) {
                Some(bytes) => Expect::Exact(http::content_type(p), bytes.to_vec()),
                None => Expect::Status(404),
            }
        }
    }
}

/// Check one web response.
pub fn check(d: &Dataset, request: &[u8], response: &[u8]) -> Result<(), String> {
    let resp =
        http::parse_response(response).map_err(|e| format!("malformed HTTP response: {e}"))?;
    let Ok(req) = http::parse(request) else {
        return if resp.status == 400 {
            Ok(())
        } else {
            Err(format!(
                "status {} for a malformed request, expected 400",
                resp.status
            ))
        };
    };
    let head = req.method == "HEAD";
    if head && !resp.body.is_empty() {
        return Err("HEAD response has a body".into());
    }
    if !head && resp.body.len() != resp.content_length {
        return Err("Content-Length does not match the body".into());
    }
    match expect(d, &req) {
        Expect::Status(s) => {
            if resp.status != s {
                return Err(format!(
                    "status {}, expected {s} for {} {}",
                    resp.status, req.method, req.path
                ));
            }
            if s == 405 && resp.allow.is_none() {
                return Err("405 without an Allow header".into());
            }
            Ok(())
        }
        Expect::Exact(ctype, bytes) => {
            if resp.status != 200 || resp.content_type != ctype {
                return Err(format!(
                    "got {} {}, expected 200 {ctype} for {}",
                    resp.status, resp.content_type, req.path
                ));
            }
            if resp.content_length != bytes.len() {
                return Err(format!(
                    "Content-Length {} expected {}",
                    resp.content_length,
                    bytes.len()
                ));
            }
            if !head && resp.body != &bytes[..] {
                return Err(format!("body of {} differs from the file", req.path));
            }
            Ok(())
        }
        Expect::Page(snippets, marker, count) => {
            if resp.status != 200 || resp.content_type != "text/html" {
                return Err(format!(
                    "got {} {}, expected a 200 HTML page for {}",
                    resp.status, resp.content_type, req.path
                ));
            }
            if head {
                return Ok(());
            }
            let body = std::str::from_utf8(resp.body).map_err(|_| "page is not UTF-8")?;
            for s in &snippets {
                if !body.contains(s.as_str()) {
                    return Err(format!("page {}?{} lacks {s:?}", req.path, req.query));
                }
            }
            let n = body.matches(marker).count();
            if n != count {
                return Err(format!(
                    "page {} has {n} x {marker:?}, expected {count}",
                    req.path
                ));
            }
            Ok(())
        }
    }
}
