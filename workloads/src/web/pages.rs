//! Dynamic pages of the `web` workload: banking, e-commerce and support.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt::Write as _;

use super::{http, BytesSrc, Reply, Web};
use crate::data::web::{
    Account, Product, SupportFile, Txn, ACCOUNTS_PATH, ACCOUNT_KINDS, ACCOUNT_SIZE, PRODUCTS_PATH,
    PRODUCT_SIZE, SUPPORT_INDEX_PATH, TXNS_PATH, TXN_SIZE,
};
use crate::files::{FileError, Files};
use crate::util::{fmt_cents, param};

/// Products per catalog page.
pub const PAGE_SIZE: usize = 20;

/// A plain-text error reply.
pub(crate) fn error(status: u16, msg: &str) -> Reply {
    Reply::Page(
        status,
        "text/plain",
        format!("{} {}: {msg}\n", status, http::reason(status)),
    )
}

fn html(title: &str, body: &str) -> Reply {
    let mut s = String::with_capacity(body.len() + 160);
    let _ = write!(
        s,
        "<!DOCTYPE html>\n<html><head><title>{title}</title></head><body>\n<h1>{title}</h1>\n{body}</body></html>\n"
    );
    Reply::Page(200, "text/html", s)
}

fn num_param(query: &str, key: &str) -> Result<u64, Reply> {
    param(query, key)
        .ok_or_else(|| error(400, &format!("missing parameter `{key}`")))?
        .parse()
        .map_err(|_| error(400, &format!("parameter `{key}` must be a number")))
}

/// `yyyymmdd` as `yyyy-mm-dd`.
fn date(ymd: u32) -> String {
    let (y, m, d) = (ymd / 10000, ymd / 100 % 100, ymd % 100);
    format!("{y:04}-{m:02}-{d:02}")
}

/// Unwrap a parameter or answer with its 400 reply.
macro_rules! p {
    ($e:expr) => {
        match $e {
            Ok(v) => v,
            Err(reply) => return Ok(reply),
        }
    };
}

/// Route a dynamic request.
pub(crate) fn dynamic<F: Files>(
    w: &mut Web<F>,
    req: &http::Request<'_>,
) -> Result<Reply, FileError> {
    let q = req.query;
    let opt = |key: &str, default: u64| param(q, key).map_or(Ok(default), |_| num_param(q, key));
    match req.path {
        "/bank/login" => Ok(login(w, req).unwrap_or_else(|e| e)),
        "/bank/summary" => summary(w, p!(num_param(q, "user"))),
        "/bank/transactions" => transactions(w, p!(num_param(q, "acct"))),
        "/shop/catalog" => catalog(w, p!(opt("cat", 0)), p!(opt("page", 1))),
        "/shop/product" => product(w, p!(num_param(q, "id"))),
        "/support/downloads" => downloads(w, p!(opt("cat", u64::MAX))),
        "/support/download" => download(w, p!(num_param(q, "id"))),
        _ => Ok(error(404, "no such page")),
    }
}

fn login<F: Files>(w: &mut Web<F>, req: &http::Request<'_>) -> Result<Reply, Reply> {
    if req.method != "POST" {
        return Ok(html(
            "Bank login",
            "<form method=\"post\" action=\"/bank/login\"><input name=\"user\">\
             <input name=\"password\" type=\"password\"><button>Log in</button></form>\n",
        ));
    }
    let body = core::str::from_utf8(req.body).map_err(|_| error(400, "body is not UTF-8"))?;
    let user = num_param(body, "user")?;
    let pw = param(body, "password").unwrap_or("");
    let accounts = user_accounts(w, user).map_err(|e| error(500, &format!("{e}")))?;
    let Some(first) = accounts.first() else {
        return Err(error(404, "no such user"));
    };
    if pw != format!("pw{user}") {
        return Ok(html("Login failed", "<p>Wrong user or password.</p>\n"));
    }
    Ok(html(
        &format!("Welcome {}", first.name),
        &format!("<p><a href=\"/bank/summary?user={user}\">Your accounts</a></p>\n"),
    ))
}

/// The accounts of `user` (binary search over the user-sorted accounts file).
fn user_accounts<F: Files>(w: &mut Web<F>, user: u64) -> Result<Vec<Account>, FileError> {
    let data = w.mapped(ACCOUNTS_PATH)?;
    let n = data.len() / ACCOUNT_SIZE;
    let user_at = |i: usize| Account::decode(&data[i * ACCOUNT_SIZE..(i + 1) * ACCOUNT_SIZE]);
    let (mut lo, mut hi) = (0, n);
    while lo < hi {
        let mid = (lo + hi) / 2;
        if (user_at(mid).user as u64) < user {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    let mut out = Vec::new();
    while lo < n {
        let a = user_at(lo);
        if a.user as u64 != user {
            break;
        }
        out.push(a);
        lo += 1;
    }
    Ok(out)
}

fn summary<F: Files>(w: &mut Web<F>, user: u64) -> Result<Reply, FileError> {
    let accounts = user_accounts(w, user)?;
    let Some(first) = accounts.first() else {
        return Ok(error(404, "no such user"));
    };
    let mut b = String::from("<table>\n<tr><th>Account</th><th>Type</th><th>Balance</th></tr>\n");
    let mut total = 0;
    for a in &accounts {
        let _ = write!(
            b,
            "<tr><td><a href=\"/bank/transactions?acct={0}\">{0}</a></td><td>{1}</td><td class=\"amt\">",
            a.id,
            ACCOUNT_KINDS.get(a.kind as usize).unwrap_or(&"?")
        );
        fmt_cents(&mut b, a.balance);
        b.push_str("</td></tr>\n");
        total += a.balance;
    }
    b.push_str("</table>\n<p>Total: ");
    fmt_cents(&mut b, total);
    b.push_str("</p>\n");
    Ok(html(&format!("Accounts of {}", first.name), &b))
}

fn transactions<F: Files>(w: &mut Web<F>, acct: u64) -> Result<Reply, FileError> {
    let accounts = w.mapped(ACCOUNTS_PATH)?;
    let idx = acct.wrapping_sub(100_000) as usize;
    if idx >= accounts.len() / ACCOUNT_SIZE {
        return Ok(error(404, "no such account"));
    }
    let a = Account::decode(&accounts[idx * ACCOUNT_SIZE..(idx + 1) * ACCOUNT_SIZE]);
    if a.id as u64 != acct {
        return Err(FileError::Malformed(ACCOUNTS_PATH.into()));
    }
    let txns = w.mapped(TXNS_PATH)?;
    let start = a.first_txn as usize * TXN_SIZE;
    let end = start + a.n_txn as usize * TXN_SIZE;
    let recs = txns
        .get(start..end)
        .ok_or_else(|| FileError::Malformed(TXNS_PATH.into()))?;
    let mut b =
        String::from("<table>\n<tr><th>Id</th><th>Date</th><th>Memo</th><th>Amount</th></tr>\n");
    let mut net = 0;
    for rec in recs.chunks(TXN_SIZE) {
        let t = Txn::decode(rec);
        let _ = write!(
            b,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td class=\"amt\">",
            t.id,
            date(t.date),
            t.memo
        );
        fmt_cents(&mut b, t.amount);
        b.push_str("</td></tr>\n");
        net += t.amount;
    }
    b.push_str("</table>\n<p>Net: ");
    fmt_cents(&mut b, net);
    b.push_str("</p>\n<p>Balance: ");
    fmt_cents(&mut b, a.balance);
    b.push_str("</p>\n");
    Ok(html(&format!("Account {acct}"), &b))
}

fn product_at(data: &[u8], i: usize) -> Product {
    Product::decode(&data[i * PRODUCT_SIZE..(i + 1) * PRODUCT_SIZE])
}

fn catalog<F: Files>(w: &mut Web<F>, cat: u64, page: u64) -> Result<Reply, FileError> {
    let data = w.mapped(PRODUCTS_PATH)?;
    let n = data.len() / PRODUCT_SIZE;
    let cat_of = |i: usize| {
        u16::from_le_bytes([data[i * PRODUCT_SIZE + 4], data[i * PRODUCT_SIZE + 5]]) as u64
    };
    let first = partition_point(n, |i| cat_of(i) < cat);
    let end = partition_point(n, |i| cat_of(i) <= cat);
    let count = end - first;
    let pages = count.div_ceil(PAGE_SIZE).max(1);
    if count == 0 || page == 0 || page as usize > pages {
        return Ok(error(404, "no such catalog page"));
    }
    let from = first + (page as usize - 1) * PAGE_SIZE;
    let mut b = String::from("<ul>\n");
    for i in from..end.min(from + PAGE_SIZE) {
        let p = product_at(data, i);
        let _ = write!(
            b,
            "<li><a href=\"/shop/product?id={}\">{}</a> ",
            p.id, p.name
        );
        fmt_cents(&mut b, p.price as i64);
        b.push_str("</li>\n");
    }
    let _ = writeln!(b, "</ul>\n<p>Page {page} of {pages}</p>");
    Ok(html(&format!("Category {cat}"), &b))
}

fn partition_point(n: usize, pred: impl Fn(usize) -> bool) -> usize {
    let (mut lo, mut hi) = (0, n);
    while lo < hi {
        let mid = (lo + hi) / 2;
        if pred(mid) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    lo
}

fn product<F: Files>(w: &mut Web<F>, id: u64) -> Result<Reply, FileError> {
    let data = w.mapped(PRODUCTS_PATH)?;
    if id as usize >= data.len() / PRODUCT_SIZE {
        return Ok(error(404, "no such product"));
    }
    let p = product_at(data, id as usize);
    let mut b = format!(
        "<p>{}</p>\n<p>Category: {}</p>\n<p>Price: ",
        p.desc, p.category
    );
    fmt_cents(&mut b, p.price as i64);
    let _ = writeln!(b, "</p>\n<p>In stock: {}</p>", p.stock);
    Ok(html(&p.name, &b))
}

fn support_index<F: Files>(w: &mut Web<F>) -> Result<&[SupportFile], FileError> {
    if w.support.is_none() {
        let data = w.mapped(SUPPORT_INDEX_PATH)?;
        let text = core::str::from_utf8(data)
            .map_err(|_| FileError::Malformed(SUPPORT_INDEX_PATH.into()))?;
        let list: Option<Vec<SupportFile>> = text.lines().map(SupportFile::parse).collect();
        w.support = Some(list.ok_or_else(|| FileError::Malformed(SUPPORT_INDEX_PATH.into()))?);
    }
    Ok(w.support.as_deref().unwrap_or(&[]))
}

fn downloads<F: Files>(w: &mut Web<F>, cat: u64) -> Result<Reply, FileError> {
    let list = support_index(w)?;
    let mut b = String::from("<ul>\n");
    for f in list
        .iter()
        .filter(|f| cat == u64::MAX || f.category as u64 == cat)
    {
        let _ = writeln!(
            b,
            "<li><a href=\"/support/download?id={}\">{}</a> ({} bytes)</li>",
            f.id, f.title, f.size
        );
    }
    b.push_str("</ul>\n");
    let title = if cat == u64::MAX {
        String::from("Downloads")
    } else {
        format!("Downloads of category {cat}")
    };
    Ok(html(&title, &b))
}

fn download<F: Files>(w: &mut Web<F>, id: u64) -> Result<Reply, FileError> {
    let list = support_index(w)?;
    let Some(f) = list.iter().find(|f| f.id as u64 == id) else {
        return Ok(error(404, "no such download"));
    };
    let (path, size) = (f.path.clone(), f.size as usize);
    Ok(Reply::Bytes(
        200,
        "application/octet-stream",
        BytesSrc::Read(path, size),
    ))
}
