//! kscope workloads: real programs that run as ring-3 processes in kscope's guest and touch
//! memory the way servers and functions do, their data, and the image builder.
//!
//! - [`web`]: HTTP/1.1 server of a SPECweb2005-like site (static files, banking, e-commerce,
//!   support) — `/bin/web`;
//! - [`olap`]: TPC-H Q1/Q6/Q18 over a `lineitem` table — `/bin/olap`;
//! - [`func`]: FaaSnap-style functions `json`, `aes`, `matmul`, `compress` — `/bin/<name>`;
//! - [`data`]: deterministic generators of every data file;
//! - on the host: [`build_image`], [`default_image`], [`Workload::requests`] and
//!   [`Workload::check`] (answers recomputed independently on the host).
//!
//! The logic is `no_std + alloc`; with the `guest-bins` feature the library is `no_std` and
//! `src/bin/*` are the guest programs (built by `build.rs` through the nested guest build).
#![cfg_attr(feature = "guest-bins", no_std)]

extern crate alloc;

pub mod data;
pub mod files;
pub mod func;
pub mod handlers;
pub mod olap;
pub mod util;
pub mod web;

#[cfg(feature = "guest-bins")]
pub mod guest;

#[cfg(not(feature = "guest-bins"))]
mod host;
#[cfg(not(feature = "guest-bins"))]
pub use host::{
    build_image, check, dataset, default_image, host_handler, lz_decode, read_http_response,
    requests, try_build_image, Dataset, ImageError,
};

pub use data::ImageOptions;

/// The workload programs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Workload {
    /// HTTP server (SPECweb2005-like).
    Web,
    /// TPC-H-like analytics.
    Olap,
    /// JSON parse/transform/serialise.
    Json,
    /// AES-128-CTR.
    Aes,
    /// Dense matrix multiplication.
    Matmul,
    /// LZ77 compression.
    Compress,
}

impl Workload {
    /// Every workload.
    pub const ALL: [Workload; 6] = [
        Workload::Web,
        Workload::Olap,
        Workload::Json,
        Workload::Aes,
        Workload::Matmul,
        Workload::Compress,
    ];

    /// Short name (also the program's file name).
    pub fn name(&self) -> &'static str {
        match self {
            Workload::Web => "web",
            Workload::Olap => "olap",
            Workload::Json => "json",
            Workload::Aes => "aes",
            Workload::Matmul => "matmul",
            Workload::Compress => "compress",
        }
    }

    /// Path of the program in the image (`/bin/<name>`), for `init=`.
    pub fn program_path(&self) -> &'static str {
        match self {
            Workload::Web => "/bin/web",
            Workload::Olap => "/bin/olap",
            Workload::Json => "/bin/json",
            Workload::Aes => "/bin/aes",
            Workload::Matmul => "/bin/matmul",
            Workload::Compress => "/bin/compress",
        }
    }

    /// The workload called `name`.
    pub fn from_name(name: &str) -> Option<Workload> {
        Workload::ALL.into_iter().find(|w| w.name() == name)
    }
}

/// The guest programs built by `build.rs`, as `(name, ELF bytes)`.
#[cfg(kscope_embed)]
pub static PROGRAMS: &[(&str, &[u8])] = &[
    ("web", include_bytes!(concat!(env!("OUT_DIR"), "/web"))),
    ("olap", include_bytes!(concat!(env!("OUT_DIR"), "/olap"))),
    ("json", include_bytes!(concat!(env!("OUT_DIR"), "/json"))),
    ("aes", include_bytes!(concat!(env!("OUT_DIR"), "/aes"))),
    (
        "matmul",
        include_bytes!(concat!(env!("OUT_DIR"), "/matmul")),
    ),
    (
        "compress",
        include_bytes!(concat!(env!("OUT_DIR"), "/compress")),
    ),
    ("agent", include_bytes!(concat!(env!("OUT_DIR"), "/agent"))),
];
