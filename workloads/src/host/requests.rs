//! Request mixes: what a client of each workload sends.

use super::dataset;
use crate::data::web::{static_path, CATEGORIES, CLASS_FILES, SUPPORT_CATEGORIES};
use crate::data::ImageOptions;
use crate::util::Rng;
use crate::Workload;

fn get(path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: kscope\r\nUser-Agent: kscope-bench\r\n\r\n").into_bytes()
}

/// One request of a SPECweb2005-like mix: 40% static files (SPECweb99 class mix 35/50/14/1,
/// Zipf-popular directories and files), 20% banking, 25% e-commerce, 10% support, 5% errors
/// (404, 405, 400).
fn web_request(opts: &ImageOptions, rng: &mut Rng) -> Vec<u8> {
    let d = dataset(opts);
    let roll = rng.range(0, 99);
    match roll {
        0..=39 => {
            let c = match rng.range(0, 99) {
                0..=34 => 0,
                35..=84 => 1,
                85..=98 => 2,
                _ => 3,
            };
            let dir = rng.zipf(opts.web_dirs.max(1) as u64) as u32;
            let idx = rng.zipf(CLASS_FILES[c as usize] as u64) as u32;
            let path = static_path(dir, c, idx);
            let path = path.trim_start_matches("/www");
            if rng.range(0, 19) == 0 {
                format!("HEAD {path} HTTP/1.1\r\nHost: kscope\r\n\r\n").into_bytes()
            } else if rng.range(0, 9) == 0 {
                get("/")
            } else {
                get(path)
            }
        }
        40..=59 => {
            let users = opts.bank_users.max(1) as u64;
            let user = rng.zipf(users);
            match rng.range(0, 9) {
                0 => {
                    let pw = if rng.range(0, 9) == 0 {
                        "wrong".to_string()
                    } else {
                        format!("pw{user}")
                    };
                    let body = format!("user={user}&password={pw}");
                    format!(
                        "POST /bank/login HTTP/1.1\r\nHost: kscope\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{body}",
                        body.len()
                    )
                    .into_bytes()
                }
                1..=4 => get(&format!("/bank/summary?user={user}")),
                _ => {
                    let accts: Vec<_> = d
                        .bank
                        .accounts
                        .iter()
                        .filter(|a| a.user as u64 == user)
                        .collect();
                    let a = accts
                        .get(rng.range(0, accts.len().max(1) as u64 - 1) as usize)
                        .map_or(100_000, |a| a.id);
                    get(&format!("/bank/transactions?acct={a}"))
                }
            }
        }
        60..=84 => {
            if rng.range(0, 2) == 0 {
                let cat = rng.range(0, CATEGORIES as u64 - 1);
                let page = 1 + rng.zipf(3);
                get(&format!("/shop/catalog?cat={cat}&page={page}"))
            } else {
                let id = rng.zipf(opts.shop_products.max(1) as u64);
                get(&format!("/shop/product?id={id}"))
            }
        }
        85..=94 => {
            if rng.range(0, 9) < 6 || opts.support_files == 0 {
                get(&format!(
                    "/support/downloads?cat={}",
                    rng.range(0, SUPPORT_CATEGORIES as u64 - 1)
                ))
            } else {
                get(&format!(
                    "/support/download?id={}",
                    rng.zipf(opts.support_files as u64)
                ))
            }
        }
        _ => match rng.range(0, 4) {
            0 => get(&format!("/dir{:05}/class0_0.html", opts.web_dirs + 7)),
            1 => b"DELETE /index.html HTTP/1.1\r\nHost: kscope\r\n\r\n".to_vec(),
            2 => b"GARBAGE\r\n\r\n".to_vec(),
            3 => get("/shop/product?id=notanumber"),
            _ => get(&format!("/shop/product?id={}", opts.shop_products + 3)),
        },
    }
}

fn olap_request(rng: &mut Rng) -> Vec<u8> {
    match rng.range(0, 9) {
        0..=3 => format!("Q1 delta={}", rng.range(60, 120)),
        4..=7 => format!(
            "Q6 date={}-01-01 discount=0.0{} quantity={}",
            rng.range(1993, 1997),
            rng.range(2, 9),
            rng.range(24, 25)
        ),
        _ => format!("Q18 quantity={} limit=100", rng.range(250, 300)),
    }
    .into_bytes()
}

/// `n` requests of workload `w` for an image built with `opts`, drawn from `seed`.
///
/// Mixes: web — see the SPECweb-like mix above; olap — 40% Q1, 40% Q6, 20% Q18 with varying
/// parameters; json — 70% `small`, 30% `large`; aes — 70% 4 KiB, 30% the whole input
/// (at most 1 MiB), random nonces and keys; matmul — 70% n=48, 30% n=256; compress — 70%
/// 16 KiB, 30% the whole corpus (at most 1 MiB).
pub fn requests(w: Workload, opts: &ImageOptions, seed: u64, n: usize) -> Vec<Vec<u8>> {
    let mut rng = Rng::derive(seed, w.name());
    (0..n)
        .map(|_| {
            let large = rng.range(0, 9) >= 7;
            match w {
                Workload::Web => web_request(opts, &mut rng),
                Workload::Olap => olap_request(&mut rng),
                Workload::Json => (if large { "large" } else { "small" }).as_bytes().to_vec(),
                Workload::Aes => {
                    let kib = if large {
                        opts.aes_input_kib.min(1024)
                    } else {
                        4.min(opts.aes_input_kib)
                    };
                    let mut key = [0u8; 16];
                    rng.fill(&mut key);
                    let key: String = key.iter().map(|b| format!("{b:02x}")).collect();
                    format!("kib={kib} key={key} nonce={}", rng.next_u64()).into_bytes()
                }
                Workload::Matmul => format!(
                    "n={} seed={}",
                    if large { 256 } else { 48 },
                    rng.range(0, 1000)
                )
                .into_bytes(),
                Workload::Compress => {
                    let kib = if large {
                        opts.corpus_kib.min(1024)
                    } else {
                        16.min(opts.corpus_kib)
                    };
                    format!("kib={kib} level=4").into_bytes()
                }
            }
        })
        .collect()
}
