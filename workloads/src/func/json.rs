//! The `json` function: parse a JSON document, transform it, serialise the result.
//!
//! Request: `small` or `large` (the input `/data/json/<name>.json`). The program maps the
//! file, deserialises every record (serde_json), keeps the active customers with purchases,
//! computes each one's total and item count, sorts by total (descending, then id), and
//! serialises the result document (the whole output lives in the heap). Answer (compact
//! JSON): `{"dataset","input_records","output_records","output_bytes","fnv64","top"}` where
//! `fnv64` is the FNV-1a-64 of the serialised output document (16 hex digits) and `top` its
//! first three records.

use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

use serde::{Deserialize, Serialize};

use crate::data::func::JSON_INPUTS;
use crate::files::{FileError, Files};
use crate::util::fnv1a64;

/// Why the function failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JsonError {
    /// Unknown input name.
    #[error("unknown input {0:?}: use `small` or `large`")]
    UnknownInput(String),
    /// The input is not valid JSON of the expected shape.
    #[error("input is not a valid document: {0}")]
    Parse(String),
    /// The input could not be read.
    #[error(transparent)]
    File(#[from] FileError),
}

#[derive(Deserialize)]
struct Doc {
    dataset: String,
    records: Vec<InRecord>,
}

#[derive(Deserialize)]
struct InRecord {
    id: u64,
    name: String,
    #[allow(dead_code)]
    email: String,
    #[allow(dead_code)]
    age: u32,
    active: bool,
    tags: Vec<String>,
    address: Address,
    purchases: Vec<InPurchase>,
}

#[derive(Deserialize)]
struct Address {
    city: String,
    #[allow(dead_code)]
    zip: String,
}

#[derive(Deserialize)]
struct InPurchase {
    #[allow(dead_code)]
    sku: String,
    qty: u32,
    cents: u64,
}

/// One output record.
#[derive(Serialize, Clone)]
pub struct OutRecord {
    /// Customer id.
    pub id: u64,
    /// Name.
    pub name: String,
    /// City.
    pub city: String,
    /// Sum of quantity x unit price, in cents.
    pub total_cents: u64,
    /// Sum of quantities.
    pub items: u32,
    /// Tags joined with `,`.
    pub tags: String,
}

#[derive(Serialize)]
struct OutDoc<'a> {
    dataset: &'a str,
    count: usize,
    records: &'a [OutRecord],
}

#[derive(Serialize)]
struct Answer<'a> {
    dataset: &'a str,
    input_records: usize,
    output_records: usize,
    output_bytes: usize,
    fnv64: String,
    top: &'a [OutRecord],
}

/// Run the function for request `input`.
pub fn run<F: Files>(files: &mut F, input: &str) -> Result<String, JsonError> {
    let name = input.trim();
    let name = name.strip_prefix("input=").unwrap_or(name);
    let path = JSON_INPUTS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, p)| *p)
        .ok_or_else(|| JsonError::UnknownInput(name.into()))?;
    let text = files.map(path)?;
    let doc: Doc = serde_json::from_slice(text).map_err(|e| JsonError::Parse(e.to_string()))?;
    let mut out: Vec<OutRecord> = doc
        .records
        .iter()
        .filter(|r| r.active && !r.purchases.is_empty())
        .map(|r| OutRecord {
            id: r.id,
            name: r.name.clone(),
            city: r.address.city.clone(),
            total_cents: r.purchases.iter().map(|p| p.qty as u64 * p.cents).sum(),
            items: r.purchases.iter().map(|p| p.qty).sum(),
            tags: r.tags.join(","),
        })
        .collect();
    out.sort_by(|a, b| b.total_cents.cmp(&a.total_cents).then(a.id.cmp(&b.id)));
    let doc_out = OutDoc {
        dataset: &doc.dataset,
        count: out.len(),
        records: &out,
    };
    let bytes = serde_json::to_vec(&doc_out).map_err(|e| JsonError::Parse(e.to_string()))?;
    let answer = Answer {
        dataset: &doc.dataset,
        input_records: doc.records.len(),
        output_records: out.len(),
        output_bytes: bytes.len(),
        fnv64: format!("{:016x}", fnv1a64(&bytes)),
        top: &out[..out.len().min(3)],
    };
    serde_json::to_string(&answer).map_err(|e| JsonError::Parse(e.to_string()))
}
