//! Inputs of the function workloads (FaaSnap-style, two input sizes each).
//!
//! - `/data/json/small.json`, `/data/json/large.json`: `{"dataset":..,"records":[..]}` with
//!   [`Person`] records (input of `json`);
//! - `/data/aes/input.bin`: word text to encrypt (input of `aes`);
//! - `/data/text/corpus.txt`: word text with repeated phrases (input of `compress`).

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt::Write as _;

use super::{phrase, words, ImageOptions};
use crate::util::Rng;

/// Path of the `aes` input.
pub const AES_INPUT_PATH: &str = "/data/aes/input.bin";
/// Path of the `compress` input.
pub const CORPUS_PATH: &str = "/data/text/corpus.txt";
/// The json inputs: `(request name, path)`.
pub const JSON_INPUTS: [(&str, &str); 2] = [
    ("small", "/data/json/small.json"),
    ("large", "/data/json/large.json"),
];

/// A purchase of a [`Person`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Purchase {
    /// Stock-keeping unit.
    pub sku: String,
    /// Quantity.
    pub qty: u32,
    /// Unit price in cents.
    pub cents: u64,
}

/// A record of the json inputs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Person {
    /// Id.
    pub id: u64,
    /// Name.
    pub name: String,
    /// E-mail address.
    pub email: String,
    /// Age.
    pub age: u32,
    /// Active customer.
    pub active: bool,
    /// Tags.
    pub tags: Vec<String>,
    /// City.
    pub city: String,
    /// Postal code.
    pub zip: String,
    /// Purchases.
    pub purchases: Vec<Purchase>,
}

/// Generate the records of json input `name` (`small` or `large`).
pub fn json_records(opts: &ImageOptions, name: &str) -> Vec<Person> {
    let n = if name == "small" {
        opts.json_small_records
    } else {
        opts.json_large_records
    };
    let mut rng = Rng::derive(opts.seed, &format!("json-{name}"));
    (0..n as u64)
        .map(|id| {
            let name = phrase(&mut rng, 2);
            let email = format!(
                "{}{}@example.org",
                name.replace(' ', ".").to_lowercase(),
                id
            );
            Person {
                id: id + 1,
                age: rng.range(18, 90) as u32,
                active: rng.range(0, 3) != 0,
                tags: (0..rng.range(0, 4))
                    .map(|_| phrase(&mut rng, 1).to_lowercase())
                    .collect(),
                city: phrase(&mut rng, 1),
                zip: format!("{:05}", rng.range(0, 99_999)),
                purchases: (0..rng.range(0, 8))
                    .map(|_| Purchase {
                        sku: format!("SKU-{:06}", rng.range(0, 999_999)),
                        qty: rng.range(1, 9) as u32,
                        cents: rng.range(50, 50_000),
                    })
                    .collect(),
                name,
                email,
            }
        })
        .collect()
}

/// The JSON text of an input document (indented, as a file written by a tool would be).
pub fn json_text(dataset: &str, records: &[Person]) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "{{\n  \"dataset\": \"{dataset}\",\n  \"records\": [");
    for (i, p) in records.iter().enumerate() {
        let tags: Vec<String> = p.tags.iter().map(|t| format!("\"{t}\"")).collect();
        let purchases: Vec<String> = p
            .purchases
            .iter()
            .map(|b| {
                format!(
                    "{{\"sku\": \"{}\", \"qty\": {}, \"cents\": {}}}",
                    b.sku, b.qty, b.cents
                )
            })
            .collect();
        let _ = write!(
            s,
            "    {{\"id\": {}, \"name\": \"{}\", \"email\": \"{}\", \"age\": {}, \"active\": {}, \
             \"tags\": [{}], \"address\": {{\"city\": \"{}\", \"zip\": \"{}\"}}, \
             \"purchases\": [{}]}}",
            p.id,
            p.name,
            p.email,
            p.age,
            p.active,
            tags.join(", "),
            p.city,
            p.zip,
            purchases.join(", ")
        );
        s.push_str(if i + 1 < records.len() { ",\n" } else { "\n" });
    }
    s.push_str("  ]\n}\n");
    s
}

/// The `aes` input.
pub fn aes_input(opts: &ImageOptions) -> Vec<u8> {
    let mut rng = Rng::derive(opts.seed, "aes-input");
    let mut v = Vec::new();
    words(&mut rng, &mut v, opts.aes_input_kib as usize * 1024);
    v
}

/// The `compress` input: word text where earlier sentences recur (so LZ matches exist at
/// varying distances, like real text).
pub fn corpus(opts: &ImageOptions) -> Vec<u8> {
    let mut rng = Rng::derive(opts.seed, "corpus");
    let size = opts.corpus_kib as usize * 1024;
    let mut v: Vec<u8> = Vec::with_capacity(size);
    while v.len() < size {
        if v.len() > 4096 && rng.range(0, 2) == 0 {
            let len = rng.range(16, 200) as usize;
            let from = rng.range(0, (v.len() - len) as u64) as usize;
            v.extend_from_within(from..from + len);
        } else {
            let n = rng.range(20, 300) as usize;
            words(&mut rng, &mut v, n);
            v.push(b'\n');
        }
    }
    v.truncate(size);
    v
}

/// All function inputs.
pub fn files(opts: &ImageOptions) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for (name, path) in JSON_INPUTS {
        out.push((
            path.into(),
            json_text(name, &json_records(opts, name)).into_bytes(),
        ));
    }
    out.push((AES_INPUT_PATH.into(), aes_input(opts)));
    out.push((CORPUS_PATH.into(), corpus(opts)));
    out
}
