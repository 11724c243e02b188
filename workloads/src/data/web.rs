//! Data of the `web` workload (a SPECweb2005-like site).
//!
//! - Static file set (SPECweb99 classes): `/www/index.html` and `/www/dirNNNNN/classC_I.EXT`,
//!   class 0: (I+1) x 102 B `.html`, class 1: (I+1) x 1 KiB `.html`, class 2: (I+1) x 10 KiB
//!   `.gif`, class 3: (I+1) x 100 KiB `.bin` (I in 0..9, 0..4 for class 3).
//! - Banking: `/data/bank/accounts.dat`, [`ACCOUNT_SIZE`]-byte little-endian records sorted
//!   by user then account id (see [`Account::encode`]); `/data/bank/transactions.dat`,
//!   [`TXN_SIZE`]-byte records grouped by account (each account names its first record and
//!   count).
//! - E-commerce: `/data/shop/products.dat`, [`PRODUCT_SIZE`]-byte records sorted by category;
//!   the product id is the record index.
//! - Support: `/data/support/index.dat`, text lines `id|category|size|path|title`, and the
//!   downloads `/www/support/fNNNN.bin`.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use super::{phrase, words, ImageOptions};
use crate::util::Rng;

/// Path of the bank accounts file.
pub const ACCOUNTS_PATH: &str = "/data/bank/accounts.dat";
/// Path of the bank transactions file.
pub const TXNS_PATH: &str = "/data/bank/transactions.dat";
/// Path of the product catalog.
pub const PRODUCTS_PATH: &str = "/data/shop/products.dat";
/// Path of the support download index.
pub const SUPPORT_INDEX_PATH: &str = "/data/support/index.dat";
/// Bytes per account record.
pub const ACCOUNT_SIZE: usize = 64;
/// Bytes per transaction record.
pub const TXN_SIZE: usize = 48;
/// Bytes per product record.
pub const PRODUCT_SIZE: usize = 256;
/// Product categories.
pub const CATEGORIES: u16 = 16;
/// Files per class of a static directory.
pub const CLASS_FILES: [u32; 4] = [9, 9, 9, 4];
/// Support download categories.
pub const SUPPORT_CATEGORIES: u32 = 4;

/// Path of static file `(dir, class, index)`.
pub fn static_path(dir: u32, class: u32, index: u32) -> String {
    let ext = match class {
        0 | 1 => "html",
        2 => "gif",
        _ => "bin",
    };
    format!("/www/dir{dir:05}/class{class}_{index}.{ext}")
}

/// Size of static file `(class, index)`.
pub fn static_size(class: u32, index: u32) -> usize {
    let unit = [102, 1024, 10 * 1024, 100 * 1024][class as usize];
    unit * (index as usize + 1)
}

/// The contents of a static file.
pub fn static_content(seed: u64, path: &str, class: u32, size: usize) -> Vec<u8> {
    let mut rng = Rng::derive(seed, path);
    let mut out = Vec::with_capacity(size);
    match class {
        0 | 1 => {
            let head = format!("<html><head><title>{path}</title></head><body><pre>\n");
            out.extend_from_slice(head.as_bytes());
            let tail = b"\n</pre></body></html>\n";
            let body = size.saturating_sub(out.len() + tail.len());
            words(&mut rng, &mut out, body);
            out.extend_from_slice(tail);
            out.truncate(size);
        }
        2 => {
            out.extend_from_slice(b"GIF89a");
            out.resize(size, 0);
            rng.fill(&mut out[6.min(size)..]);
        }
        _ => {
            out.resize(size, 0);
            rng.fill(&mut out);
        }
    }
    out
}

/// `/www/index.html` and the static file set.
pub fn static_files(opts: &ImageOptions) -> Vec<(String, Vec<u8>)> {
    let mut files = Vec::new();
    let mut index = String::from("<html><head><title>kscope web</title></head><body>\n");
    index.push_str("<h1>kscope web</h1><ul>\n");
    for d in 0..opts.web_dirs {
        for (c, &n) in CLASS_FILES.iter().enumerate() {
            for i in 0..n {
                let p = static_path(d, c as u32, i);
                let data = static_content(opts.seed, &p, c as u32, static_size(c as u32, i));
                if c == 0 {
                    index.push_str(&format!("<li><a href=\"{p}\">{p}</a></li>\n"));
                }
                files.push((p, data));
            }
        }
    }
    index.push_str(
        "</ul><p><a href=\"/bank/login\">Bank</a> <a href=\"/shop/catalog\">Shop</a> \
                    <a href=\"/support/downloads\">Support</a></p></body></html>\n",
    );
    files.insert(0, ("/www/index.html".into(), index.into_bytes()));
    files
}

fn put_str(rec: &mut [u8], s: &str) {
    let n = s.len().min(rec.len());
    rec[..n].copy_from_slice(&s.as_bytes()[..n]);
}

fn get_str(rec: &[u8]) -> &str {
    let n = rec.iter().position(|&b| b == 0).unwrap_or(rec.len());
    core::str::from_utf8(&rec[..n]).unwrap_or("?")
}

fn u32_at(rec: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([rec[at], rec[at + 1], rec[at + 2], rec[at + 3]])
}

fn i64_at(rec: &[u8], at: usize) -> i64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&rec[at..at + 8]);
    i64::from_le_bytes(b)
}

/// Kinds of bank account.
pub const ACCOUNT_KINDS: [&str; 3] = ["checking", "savings", "credit"];

/// A bank account.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Account {
    /// Account id (unique, increasing in file order).
    pub id: u32,
    /// Owner.
    pub user: u32,
    /// Index into [`ACCOUNT_KINDS`].
    pub kind: u8,
    /// Balance in cents.
    pub balance: i64,
    /// Index of the first transaction record.
    pub first_txn: u32,
    /// Number of transactions.
    pub n_txn: u32,
    /// Holder name (at most 31 bytes).
    pub name: String,
}

impl Account {
    /// Encode: id u32 @0, user u32 @4, kind u8 @8, balance i64 @16, first_txn u32 @24,
    /// n_txn u32 @28, name NUL-padded @32..64.
    pub fn encode(&self, rec: &mut [u8]) {
        rec[0..4].copy_from_slice(&self.id.to_le_bytes());
        rec[4..8].copy_from_slice(&self.user.to_le_bytes());
        rec[8] = self.kind;
        rec[16..24].copy_from_slice(&self.balance.to_le_bytes());
        rec[24..28].copy_from_slice(&self.first_txn.to_le_bytes());
        rec[28..32].copy_from_slice(&self.n_txn.to_le_bytes());
        put_str(&mut rec[32..63], &self.name);
    }

    /// Decode a record written by [`Account::encode`].
    pub fn decode(rec: &[u8]) -> Account {
        Account {
            id: u32_at(rec, 0),
            user: u32_at(rec, 4),
            kind: rec[8],
            balance: i64_at(rec, 16),
            first_txn: u32_at(rec, 24),
            n_txn: u32_at(rec, 28),
            name: get_str(&rec[32..64]).into(),
        }
    }
}

/// A bank transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Txn {
    /// Transaction id.
    pub id: u32,
    /// Account.
    pub account: u32,
    /// Date as `yyyymmdd`.
    pub date: u32,
    /// Amount in cents (negative: debit).
    pub amount: i64,
    /// Memo (at most 23 bytes).
    pub memo: String,
}

impl Txn {
    /// Encode: id u32 @0, account u32 @4, date u32 @8, amount i64 @16, memo @24..48.
    pub fn encode(&self, rec: &mut [u8]) {
        rec[0..4].copy_from_slice(&self.id.to_le_bytes());
        rec[4..8].copy_from_slice(&self.account.to_le_bytes());
        rec[8..12].copy_from_slice(&self.date.to_le_bytes());
        rec[16..24].copy_from_slice(&self.amount.to_le_bytes());
        put_str(&mut rec[24..47], &self.memo);
    }

    /// Decode a record written by [`Txn::encode`].
    pub fn decode(rec: &[u8]) -> Txn {
        Txn {
            id: u32_at(rec, 0),
            account: u32_at(rec, 4),
            date: u32_at(rec, 8),
            amount: i64_at(rec, 16),
            memo: get_str(&rec[24..48]).into(),
        }
    }
}

const FIRST: [&str; 16] = [
    "Ada", "Alan", "Grace", "Edsger", "Barbara", "Ken", "Dennis", "Niklaus", "Frances", "John",
    "Leslie", "Radia", "Butler", "Margaret", "Tony", "Shafi",
];
const LAST: [&str; 16] = [
    "Lovelace",
    "Turing",
    "Hopper",
    "Dijkstra",
    "Liskov",
    "Thompson",
    "Ritchie",
    "Wirth",
    "Allen",
    "Backus",
    "Lamport",
    "Perlman",
    "Lampson",
    "Hamilton",
    "Hoare",
    "Goldwasser",
];

/// The bank's data.
#[derive(Clone, Debug)]
pub struct Bank {
    /// Accounts in file order.
    pub accounts: Vec<Account>,
    /// Transactions in file order.
    pub txns: Vec<Txn>,
}

impl Bank {
    /// Generate the bank of `opts`.
    pub fn generate(opts: &ImageOptions) -> Bank {
        let mut rng = Rng::derive(opts.seed, "bank");
        let mut accounts = Vec::new();
        let mut txns = Vec::new();
        for user in 0..opts.bank_users {
            let name = format!(
                "{} {}",
                FIRST[rng.range(0, 15) as usize],
                LAST[rng.range(0, 15) as usize]
            );
            for _ in 0..rng.range(1, 3) {
                let id = 100_000 + accounts.len() as u32;
                let n_txn = rng.range(2, 30) as u32;
                let first_txn = txns.len() as u32;
                let mut balance = rng.range(0, 500_000) as i64;
                for _ in 0..n_txn {
                    let amount = rng.range(0, 40_000) as i64 - 20_000;
                    balance += amount;
                    let date = 20240000 + rng.range(1, 12) as u32 * 100 + rng.range(1, 28) as u32;
                    let memo = phrase(&mut rng, 2);
                    txns.push(Txn {
                        id: txns.len() as u32 + 1,
                        account: id,
                        date,
                        amount,
                        memo,
                    });
                }
                let kind = rng.range(0, 2) as u8;
                accounts.push(Account {
                    id,
                    user,
                    kind,
                    balance,
                    first_txn,
                    n_txn,
                    name: name.clone(),
                });
            }
        }
        Bank { accounts, txns }
    }

    /// The two data files.
    pub fn files(&self) -> Vec<(String, Vec<u8>)> {
        let mut acc = alloc::vec![0u8; self.accounts.len() * ACCOUNT_SIZE];
        for (a, rec) in self.accounts.iter().zip(acc.chunks_mut(ACCOUNT_SIZE)) {
            a.encode(rec);
        }
        let mut tx = alloc::vec![0u8; self.txns.len() * TXN_SIZE];
        for (t, rec) in self.txns.iter().zip(tx.chunks_mut(TXN_SIZE)) {
            t.encode(rec);
        }
        alloc::vec![(ACCOUNTS_PATH.into(), acc), (TXNS_PATH.into(), tx)]
    }
}

/// A product.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Product {
    /// Id = record index.
    pub id: u32,
    /// Category (`0..CATEGORIES`).
    pub category: u16,
    /// Price in cents.
    pub price: u32,
    /// Units in stock.
    pub stock: u32,
    /// Name (at most 47 bytes).
    pub name: String,
    /// Description (at most 191 bytes).
    pub desc: String,
}

impl Product {
    /// Encode: id u32 @0, category u16 @4, price u32 @8, stock u32 @12, name @16..64,
    /// description @64..256.
    pub fn encode(&self, rec: &mut [u8]) {
        rec[0..4].copy_from_slice(&self.id.to_le_bytes());
        rec[4..6].copy_from_slice(&self.category.to_le_bytes());
        rec[8..12].copy_from_slice(&self.price.to_le_bytes());
        rec[12..16].copy_from_slice(&self.stock.to_le_bytes());
        put_str(&mut rec[16..63], &self.name);
        put_str(&mut rec[64..255], &self.desc);
    }

    /// Decode a record written by [`Product::encode`].
    pub fn decode(rec: &[u8]) -> Product {
        Product {
            id: u32_at(rec, 0),
            category: u16::from_le_bytes([rec[4], rec[5]]),
            price: u32_at(rec, 8),
            stock: u32_at(rec, 12),
            name: get_str(&rec[16..64]).into(),
            desc: get_str(&rec[64..256]).into(),
        }
    }
}

/// The shop's catalog.
#[derive(Clone, Debug)]
pub struct Shop {
    /// Products in file order (sorted by category; id = index).
    pub products: Vec<Product>,
}

impl Shop {
    /// Generate the catalog of `opts`.
    pub fn generate(opts: &ImageOptions) -> Shop {
        let mut rng = Rng::derive(opts.seed, "shop");
        let mut cats: Vec<u16> = (0..opts.shop_products)
            .map(|_| rng.range(0, CATEGORIES as u64 - 1) as u16)
            .collect();
        cats.sort_unstable();
        let products = cats
            .into_iter()
            .enumerate()
            .map(|(i, category)| {
                let name = phrase(&mut rng, 3);
                let mut d = Vec::new();
                let n = rng.range(60, 180) as usize;
                words(&mut rng, &mut d, n);
                let desc = String::from_utf8(d).unwrap_or_default().replace('\n', " ");
                Product {
                    id: i as u32,
                    category,
                    price: rng.range(99, 99_999) as u32,
                    stock: rng.range(0, 500) as u32,
                    name,
                    desc,
                }
            })
            .collect();
        Shop { products }
    }

    /// The catalog file.
    pub fn files(&self) -> Vec<(String, Vec<u8>)> {
        let mut data = alloc::vec![0u8; self.products.len() * PRODUCT_SIZE];
        for (p, rec) in self.products.iter().zip(data.chunks_mut(PRODUCT_SIZE)) {
            p.encode(rec);
        }
        alloc::vec![(PRODUCTS_PATH.into(), data)]
    }
}

/// A support download.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SupportFile {
    /// Id.
    pub id: u32,
    /// Category (`0..SUPPORT_CATEGORIES`).
    pub category: u32,
    /// Size in bytes.
    pub size: u64,
    /// Path in the image.
    pub path: String,
    /// Title.
    pub title: String,
}

impl SupportFile {
    /// Parse one `id|category|size|path|title` line.
    pub fn parse(line: &str) -> Option<SupportFile> {
        let mut f = line.split('|');
        Some(SupportFile {
            id: f.next()?.parse().ok()?,
            category: f.next()?.parse().ok()?,
            size: f.next()?.parse().ok()?,
            path: f.next()?.into(),
            title: f.next()?.into(),
        })
    }
}

/// The support site's downloads.
#[derive(Clone, Debug)]
pub struct Support {
    /// Downloads in index order.
    pub files: Vec<SupportFile>,
}

impl Support {
    /// Generate the downloads of `opts`.
    pub fn generate(opts: &ImageOptions) -> Support {
        let mut rng = Rng::derive(opts.seed, "support");
        let files = (0..opts.support_files)
            .map(|id| SupportFile {
                id,
                category: id % SUPPORT_CATEGORIES,
                size: rng.range(4, 256) * 1024 - rng.range(0, 1000),
                path: format!("/www/support/f{id:04}.bin"),
                title: format!(
                    "{} v{}.{}",
                    phrase(&mut rng, 2),
                    rng.range(1, 9),
                    rng.range(0, 20)
                ),
            })
            .collect();
        Support { files }
    }

    /// Contents of download `f`.
    pub fn content(seed: u64, f: &SupportFile) -> Vec<u8> {
        let mut data = alloc::vec![0u8; f.size as usize];
        Rng::derive(seed, &f.path).fill(&mut data);
        data
    }

    /// The index and the downloads.
    pub fn files(&self, opts: &ImageOptions) -> Vec<(String, Vec<u8>)> {
        let mut index = String::new();
        for f in &self.files {
            index.push_str(&format!(
                "{}|{}|{}|{}|{}\n",
                f.id, f.category, f.size, f.path, f.title
            ));
        }
        let mut out = alloc::vec![(SUPPORT_INDEX_PATH.into(), index.into_bytes())];
        for f in &self.files {
            out.push((f.path.clone(), Support::content(opts.seed, f)));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip() {
        let opts = ImageOptions::tiny();
        let bank = Bank::generate(&opts);
        let files = bank.files();
        for (i, a) in bank.accounts.iter().enumerate() {
            assert_eq!(&Account::decode(&files[0].1[i * ACCOUNT_SIZE..]), a);
        }
        for (i, t) in bank.txns.iter().enumerate() {
            assert_eq!(&Txn::decode(&files[1].1[i * TXN_SIZE..]), t);
        }
        let shop = Shop::generate(&opts);
        let f = shop.files();
        for (i, p) in shop.products.iter().enumerate() {
            assert_eq!(&Product::decode(&f[0].1[i * PRODUCT_SIZE..]), p);
        }
        assert!(shop
            .products
            .windows(2)
            .all(|w| w[0].category <= w[1].category));
        let sup = Support::generate(&opts);
        let sf = sup.files(&opts);
        let idx = core::str::from_utf8(&sf[0].1).unwrap();
        let parsed: Vec<_> = idx
            .lines()
            .map(|l| SupportFile::parse(l).unwrap())
            .collect();
        assert_eq!(parsed, sup.files);
    }

    #[test]
    fn static_files_have_their_sizes_and_are_deterministic() {
        let opts = ImageOptions::tiny();
        let a = static_files(&opts);
        assert_eq!(a, static_files(&opts));
        for (p, d) in &a[1..] {
            let cls: u32 = p.split("class").nth(1).unwrap()[..1].parse().unwrap();
            let idx: u32 = p
                .split('_')
                .nth(1)
                .unwrap()
                .split('.')
                .next()
                .unwrap()
                .parse()
                .unwrap();
            assert_eq!(d.len(), static_size(cls, idx), "{p}");
            assert!(p.len() < 64);
        }
    }
}
