//! Host side: the image builder, the data set cache, request mixes and response checks.

mod http;
mod reference;
mod requests;
mod web_check;

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use kscope_guest::abi::kinfo::file_kind;
use kscope_guest::mkfs::{FsBuilder, MkfsError};

use crate::data::func::{self, Person};
use crate::data::tpch::{self, LineItem};
use crate::data::web::{Bank, Shop, Support};
use crate::data::{generate_all, ImageOptions};
use crate::files::MemFiles;
use crate::handlers::{handler_for, Handler};
use crate::Workload;

pub use http::read_http_response;
pub use reference::lz_decode;
pub use requests::requests;

/// Errors building an image.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The file system builder refused a file (bad program name, duplicate path).
    #[error("cannot add {path:?} to the image: {reason}; program names must be short and unique")]
    Mkfs {
        /// The file.
        path: String,
        /// The builder's error.
        reason: MkfsError,
    },
}

/// Build a KSFS image with `programs` (executables: a bare name `web` goes to `/bin/web`, an
/// absolute path such as `/bin/ktest` is kept) and every data file of `opts`. Panics only if
/// a program name is invalid (see [`try_build_image`]).
pub fn build_image(opts: &ImageOptions, programs: &[(&str, &[u8])]) -> Vec<u8> {
    match try_build_image(opts, programs) {
        Ok(img) => img,
        Err(e) => panic!("{e}"),
    }
}

/// [`build_image`], reporting invalid program names as errors.
pub fn try_build_image(
    opts: &ImageOptions,
    programs: &[(&str, &[u8])],
) -> Result<Vec<u8>, ImageError> {
    let data = &dataset(opts).files;
    let names: Vec<String> = programs
        .iter()
        .map(|(n, _)| {
            if n.starts_with('/') {
                n.to_string()
            } else {
                format!("/bin/{n}")
            }
        })
        .collect();
    let mut b = FsBuilder::new();
    let wrap = |path: &str, reason| ImageError::Mkfs {
        path: path.into(),
        reason,
    };
    for (path, (_, elf)) in names.iter().zip(programs) {
        b.add(path, file_kind::EXEC, elf)
            .map_err(|e| wrap(path, e))?;
    }
    for (path, bytes) in data {
        b.add(path, file_kind::DATA, bytes)
            .map_err(|e| wrap(path, e))?;
    }
    Ok(b.build())
}

/// The image with every embedded program and the default data (built once).
#[cfg(kscope_embed)]
pub fn default_image() -> &'static [u8] {
    static IMG: OnceLock<Vec<u8>> = OnceLock::new();
    IMG.get_or_init(|| build_image(&ImageOptions::default(), crate::PROGRAMS))
}

/// Without embedded programs (no nested build ran) the default image has data only.
#[cfg(not(kscope_embed))]
pub fn default_image() -> &'static [u8] {
    static IMG: OnceLock<Vec<u8>> = OnceLock::new();
    IMG.get_or_init(|| build_image(&ImageOptions::default(), &[]))
}

/// Everything generated for one set of options (kept for the life of the process).
pub struct Dataset {
    /// The options.
    pub opts: ImageOptions,
    /// Data files `(path, contents)`.
    pub files: Vec<(String, Vec<u8>)>,
    /// Index of `files` by path.
    pub by_path: HashMap<String, usize>,
    /// Bank records.
    pub bank: Bank,
    /// Shop records.
    pub shop: Shop,
    /// Support downloads.
    pub support: Support,
    /// `lineitem` rows.
    pub lineitem: Vec<LineItem>,
    /// json input records by input name.
    pub json: Vec<(&'static str, Vec<Person>)>,
}

impl Dataset {
    /// Contents of a data file.
    pub fn file(&self, path: &str) -> Option<&[u8]> {
        self.by_path.get(path).map(|&i| &self.files[i].1[..])
    }
}

/// The data set of `opts`, generated once per distinct options.
pub fn dataset(opts: &ImageOptions) -> &'static Dataset {
    static CACHE: OnceLock<Mutex<Vec<&'static Dataset>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    let mut list = cache.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(d) = list.iter().find(|d| &d.opts == opts) {
        return d;
    }
    let files = generate_all(opts);
    let by_path = files
        .iter()
        .enumerate()
        .map(|(i, (p, _))| (p.clone(), i))
        .collect();
    let d: &'static Dataset = Box::leak(Box::new(Dataset {
        opts: opts.clone(),
        files,
        by_path,
        bank: Bank::generate(opts),
        shop: Shop::generate(opts),
        support: Support::generate(opts),
        lineitem: tpch::generate(opts),
        json: func::JSON_INPUTS
            .iter()
            .map(|(n, _)| (*n, func::json_records(opts, n)))
            .collect(),
    }));
    list.push(d);
    d
}

/// Run workload `w`'s guest logic on the host over the data of `opts` (the same handler code
/// the guest program runs, with file access from memory).
pub fn host_handler(w: Workload, opts: &ImageOptions) -> Box<dyn Handler> {
    let d = dataset(opts);
    let files = MemFiles::from_static(d.files.iter().map(|(p, b)| (p.clone(), &b[..])));
    handler_for(w, files)
}

/// Check `response` (the payload of a status-0 answer) to `request` of workload `w` against
/// the data of `opts`, recomputed independently on the host.
pub fn check(
    w: Workload,
    opts: &ImageOptions,
    request: &[u8],
    response: &[u8],
) -> Result<(), String> {
    let d = dataset(opts);
    let text = || std::str::from_utf8(request).map_err(|_| "request is not UTF-8".to_string());
    let same = |want: String| {
        if response == want.as_bytes() {
            Ok(())
        } else {
            Err(format!(
                "expected {want:?}, got {:?}",
                String::from_utf8_lossy(response)
            ))
        }
    };
    match w {
        Workload::Web => web_check::check(d, request, response),
        Workload::Olap => reference_olap(d, text()?, response),
        Workload::Json => {
            let name = text()?.trim().trim_start_matches("input=");
            let (_, recs) = d
                .json
                .iter()
                .find(|(n, _)| *n == name)
                .ok_or("unknown json input")?;
            same(reference::json_answer(name, recs))
        }
        Workload::Aes => {
            let req = text()?;
            let p = |k| crate::util::param(req, k);
            let kib: usize = p("kib")
                .and_then(|v| v.parse().ok())
                .ok_or("request has no kib")?;
            let key = p("key")
                .map_or(
                    Some(crate::func::aes::DEFAULT_KEY),
                    crate::func::aes::parse_key,
                )
                .ok_or("bad key")?;
            let nonce: u64 = p("nonce")
                .map_or(Some(0), |v| v.parse().ok())
                .ok_or("bad nonce")?;
            let input = d.file(func::AES_INPUT_PATH).ok_or("no aes input")?;
            let mut ctr = [0u8; 16];
            ctr[..8].copy_from_slice(&nonce.to_be_bytes());
            let ct = reference::RefAes::new(&key)
                .ctr(ctr, input.get(..kib * 1024).ok_or("kib too large")?);
            let head: String = ct[..16].iter().map(|b| format!("{b:02x}")).collect();
            same(format!(
                "{{\"kib\":{kib},\"bytes\":{},\"fnv64\":\"{:016x}\",\"head\":\"{head}\"}}",
                kib * 1024,
                crate::util::fnv1a64(&ct)
            ))
        }
        Workload::Matmul => {
            let req = text()?;
            let n: usize = crate::util::param(req, "n")
                .and_then(|v| v.parse().ok())
                .ok_or("request has no n")?;
            let seed: u64 = crate::util::param(req, "seed")
                .map_or(Some(1), |v| v.parse().ok())
                .ok_or("bad seed")?;
            same(reference::matmul_answer(n, seed))
        }
        Workload::Compress => {
            let req = text()?;
            let kib: usize = crate::util::param(req, "kib")
                .and_then(|v| v.parse().ok())
                .ok_or("request has no kib")?;
            let input = d.file(func::CORPUS_PATH).ok_or("no corpus")?;
            let want = input.get(..kib * 1024).ok_or("kib too large")?;
            let got = lz_decode(response)?;
            if got != want {
                let at = got.iter().zip(want).position(|(a, b)| a != b);
                return Err(format!(
                    "decompressed output differs from the input (first difference at {at:?})"
                ));
            }
            if response.len() >= want.len() {
                return Err(format!(
                    "no compression: {} -> {} bytes",
                    want.len(),
                    response.len()
                ));
            }
            Ok(())
        }
    }
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * a.abs().max(b.abs()) + 0.006
}

fn reference_olap(d: &Dataset, req: &str, response: &[u8]) -> Result<(), String> {
    use crate::olap::Query;
    let resp = std::str::from_utf8(response).map_err(|_| "response is not UTF-8")?;
    let mut lines = resp.lines();
    let first = lines.next().ok_or("empty response")?;
    let header = lines.next().ok_or("no header line")?;
    let body: Vec<Vec<&str>> = lines.map(|l| l.split('|').collect()).collect();
    let query = Query::parse(req).map_err(|e| format!("check of an invalid query: {e}"))?;
    let num = |s: &str| s.parse::<f64>().map_err(|_| format!("not a number: {s:?}"));
    let (params, scanned) = first
        .rsplit_once(" rows_scanned=")
        .ok_or("first line lacks rows_scanned")?;
    let scanned: usize = scanned
        .parse()
        .map_err(|_| "rows_scanned is not a number")?;
    if scanned > d.lineitem.len() {
        return Err(format!(
            "rows_scanned={scanned} exceeds the table's {} rows",
            d.lineitem.len()
        ));
    }
    let want_header = match query {
        Query::Q1 { .. } => "l_returnflag|l_linestatus|sum_qty|sum_base_price|sum_disc_price|sum_charge|avg_qty|avg_price|avg_disc|count_order",
        Query::Q6 { .. } => "revenue",
        Query::Q18 { .. } => "l_orderkey|sum_qty",
    };
    if header != want_header {
        return Err(format!("header {header:?}, expected {want_header:?}"));
    }
    let want_params = match query {
        Query::Q1 { delta } => format!("Q1 delta={delta}"),
        Query::Q6 {
            date,
            discount,
            quantity,
        } => {
            let mut s = String::from("Q6 date=");
            tpch::fmt_date(&mut s, date);
            format!(
                "{s} discount={}.{:02} quantity={quantity}",
                discount / 100,
                discount % 100
            )
        }
        Query::Q18 { quantity, limit } => format!("Q18 quantity={quantity} limit={limit}"),
    };
    if params != want_params {
        return Err(format!(
            "first line {first:?}, expected {want_params:?} rows_scanned=N"
        ));
    }
    match query {
        Query::Q1 { delta } => {
            let want = reference::q1(&d.lineitem, delta);
            if body.len() != want.len() {
                return Err(format!("{} groups, expected {}", body.len(), want.len()));
            }
            for (got, (f, s, vals, n)) in body.iter().zip(&want) {
                if got.len() != 10 || got[0] != f.to_string() || got[1] != s.to_string() {
                    return Err(format!("bad group line {got:?}, expected group {f}|{s}"));
                }
                for (i, v) in vals.iter().enumerate() {
                    let g = num(got[2 + i])?;
                    if !close(g, *v) {
                        return Err(format!(
                            "group {f}|{s} column {}: got {g}, expected {v}",
                            i + 2
                        ));
                    }
                }
                if got[9] != n.to_string() {
                    return Err(format!("group {f}|{s}: count {} expected {n}", got[9]));
                }
            }
            Ok(())
        }
        Query::Q6 {
            date,
            discount,
            quantity,
        } => {
            let want = reference::q6(&d.lineitem, date, discount as f64 / 100.0, quantity as f64);
            let got = num(body
                .first()
                .and_then(|l| l.first())
                .ok_or("no revenue line")?)?;
            if body.len() != 1 || !close(got, want) {
                return Err(format!("Q6 revenue {got}, expected {want}"));
            }
            Ok(())
        }
        Query::Q18 { quantity, limit } => {
            let want = reference::q18(&d.lineitem, quantity.max(0) as u64, limit);
            let got: Vec<(u64, u64)> = body
                .iter()
                .map(|l| Some((l.first()?.parse().ok()?, l.get(1)?.parse().ok()?)))
                .collect::<Option<_>>()
                .ok_or("bad Q18 row")?;
            if got != want {
                return Err(format!("Q18 rows {got:?}, expected {want:?}"));
            }
            Ok(())
        }
    }
}

impl Workload {
    /// A realistic request mix of `n` requests for the default image.
    pub fn requests(&self, seed: u64, n: usize) -> Vec<Vec<u8>> {
        requests(*self, &ImageOptions::default(), seed, n)
    }

    /// Check a response against the default image's data (see [`check`]).
    pub fn check(&self, request: &[u8], response: &[u8]) -> Result<(), String> {
        check(*self, &ImageOptions::default(), request, response)
    }
}
