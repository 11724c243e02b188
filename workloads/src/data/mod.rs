//! Deterministic generators of every data file in the image.
//!
//! All files derive from [`ImageOptions::seed`] through [`Rng`] streams labelled by file, so
//! the image builder and the host-side checks produce the same bytes.

pub mod func;
pub mod tpch;
pub mod web;

use alloc::string::String;
use alloc::vec::Vec;

use crate::util::Rng;

/// Sizes and seed of the generated data (the image's contents).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ImageOptions {
    /// Master seed of every generator.
    pub seed: u64,
    /// Rows of `/data/tpch/lineitem.tbl` (~128 bytes each; 30 000 rows ~ 3.7 MiB).
    pub olap_rows: u64,
    /// Static file-set directories `/www/dirNNNNN/` (~1.5 MiB each).
    pub web_dirs: u32,
    /// Bank customers (1-3 accounts each, 2-30 transactions per account).
    pub bank_users: u32,
    /// Products of the e-commerce catalog (256 bytes each).
    pub shop_products: u32,
    /// Downloadable files of the support site (4 KiB - 256 KiB each).
    pub support_files: u32,
    /// Records of `/data/json/small.json`.
    pub json_small_records: u32,
    /// Records of `/data/json/large.json`.
    pub json_large_records: u32,
    /// Size of `/data/aes/input.bin` in KiB.
    pub aes_input_kib: u32,
    /// Size of `/data/text/corpus.txt` (input of `compress`) in KiB.
    pub corpus_kib: u32,
}

impl Default for ImageOptions {
    /// About 19 MB of data (159 files): fits a 64 MiB VM with room for heaps.
    fn default() -> Self {
        ImageOptions {
            seed: 0x6b73_636f_7065,
            olap_rows: 30_000,
            web_dirs: 4,
            bank_users: 1000,
            shop_products: 5000,
            support_files: 24,
            json_small_records: 40,
            json_large_records: 4000,
            aes_input_kib: 1024,
            corpus_kib: 1024,
        }
    }
}

impl ImageOptions {
    /// Small options for fast tests.
    pub fn tiny() -> Self {
        ImageOptions {
            seed: 42,
            olap_rows: 3000,
            web_dirs: 1,
            bank_users: 60,
            shop_products: 300,
            support_files: 4,
            json_small_records: 10,
            json_large_records: 200,
            aes_input_kib: 64,
            corpus_kib: 64,
        }
    }
}

/// Every data file of the image (no programs), as `(path, contents)`.
pub fn generate_all(opts: &ImageOptions) -> Vec<(String, Vec<u8>)> {
    let mut files = Vec::new();
    files.extend(web::static_files(opts));
    let bank = web::Bank::generate(opts);
    files.extend(bank.files());
    let shop = web::Shop::generate(opts);
    files.extend(shop.files());
    let support = web::Support::generate(opts);
    files.extend(support.files(opts));
    let li = tpch::generate(opts);
    files.extend(tpch::files(&li));
    files.extend(func::files(opts));
    files
}

const WORDS: [&str; 64] = [
    "the", "of", "cloud", "memory", "page", "virtual", "machine", "clone", "server", "request",
    "kernel", "cache", "color", "prefetch", "lazy", "warm", "elastic", "worker", "burst", "load",
    "data", "file", "table", "query", "index", "scan", "hash", "join", "order", "line", "item",
    "price", "account", "balance", "transfer", "product", "catalog", "support", "download",
    "network", "packet", "fault", "region", "window", "pivot", "snapshot", "restore", "function",
    "and", "to", "in", "is", "for", "with", "on", "as", "by", "at", "from", "that", "this", "it",
    "a", "an",
];

/// Append `n` bytes of word text (lines of ~72 characters) drawn from `rng`.
pub fn words(rng: &mut Rng, out: &mut Vec<u8>, n: usize) {
    let end = out.len() + n;
    let mut col = 0;
    while out.len() < end {
        let w = WORDS[rng.range(0, WORDS.len() as u64 - 1) as usize];
        if col + w.len() > 72 {
            out.push(b'\n');
            col = 0;
        } else if col > 0 {
            out.push(b' ');
            col += 1;
        }
        out.extend_from_slice(w.as_bytes());
        col += w.len();
    }
    out.truncate(end);
}

/// A short capitalised phrase of `n` words.
pub fn phrase(rng: &mut Rng, n: usize) -> String {
    let mut s = String::new();
    for i in 0..n {
        if i > 0 {
            s.push(' ');
        }
        let w = WORDS[rng.range(0, WORDS.len() as u64 - 1) as usize];
        let mut cs = w.chars();
        if let Some(c) = cs.next() {
            s.push(c.to_ascii_uppercase());
            s.push_str(cs.as_str());
        }
    }
    s
}
