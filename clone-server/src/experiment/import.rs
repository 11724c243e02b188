//! Import of a public invocation-trace layout: the per-minute invocation counts of serverless
//! traces (Azure Functions 2019 layout), from a file the user has. Nothing is downloaded.
//!
//! ```text
//! HashOwner,HashApp,HashFunction,Trigger,1,2,...,1440
//! 7b2c...,a1f3...,9e0d...,http,0,3,5,...
//! ```
//!
//! Each row becomes one service whose rate in minute `m` is `count[m] / 60` req/s (a trace with
//! `step_s = 60`). Services are named `fn-<first 8 hex of HashFunction>` (with a suffix if two
//! collide) and given a function workload chosen from the hash, so the same row always maps to
//! the same workload. `--top N` keeps the N functions with the most invocations.

use std::collections::HashSet;
use std::path::Path;

use super::trace::{ServiceSpec, Trace, TraceError};

const FUNCTIONS: [&str; 4] = ["json", "aes", "matmul", "compress"];

/// Import options.
#[derive(Debug, Clone)]
pub struct ImportOptions {
    /// Keep only the busiest N functions (0: all).
    pub top: usize,
    /// Multiply every rate by this.
    pub scale: f64,
}

impl Default for ImportOptions {
    fn default() -> Self {
        ImportOptions { top: 0, scale: 1.0 }
    }
}

fn hash_u64(s: &str) -> u64 {
    // FNV-1a: a stable, documented choice of workload per function hash.
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

/// Parse the per-minute invocation-count CSV text; `origin` names it in errors.
pub fn parse_invocations(
    text: &str,
    origin: &str,
    opts: &ImportOptions,
) -> Result<Trace, TraceError> {
    let line_err = |line: usize, what: String| TraceError::Line {
        path: origin.to_string(),
        line,
        what,
    };
    let mut lines = text.lines().enumerate();
    let (minutes, _) = loop {
        let Some((i, l)) = lines.next() else {
            return Err(TraceError::Bad {
                path: origin.into(),
                what:
                    "empty file: expected the header HashOwner,HashApp,HashFunction,Trigger,1,..."
                        .into(),
            });
        };
        let l = l.trim_end_matches('\r');
        if l.trim().is_empty() {
            continue;
        }
        let f: Vec<&str> = l.split(',').map(str::trim).collect();
        if f.len() < 5 || f[..4] != ["HashOwner", "HashApp", "HashFunction", "Trigger"] {
            return Err(line_err(
                i + 1,
                "expected the header HashOwner,HashApp,HashFunction,Trigger,1,2,... (Azure Functions per-minute invocation counts)".into(),
            ));
        }
        for (k, col) in f[4..].iter().enumerate() {
            if col.parse::<usize>().ok() != Some(k + 1) {
                return Err(line_err(
                    i + 1,
                    format!(
                        "minute column {} is {col:?}; columns must be 1, 2, 3, ...",
                        k + 5
                    ),
                ));
            }
        }
        break (f.len() - 4, i);
    };
    let mut rows: Vec<(String, String, Vec<f64>, f64)> = Vec::new();
    for (i, l) in lines {
        let l = l.trim_end_matches('\r');
        if l.trim().is_empty() {
            continue;
        }
        let f: Vec<&str> = l.split(',').map(str::trim).collect();
        if f.len() != minutes + 4 {
            return Err(line_err(
                i + 1,
                format!("{} fields; the header has {}", f.len(), minutes + 4),
            ));
        }
        if f[2].is_empty() {
            return Err(line_err(i + 1, "empty HashFunction".into()));
        }
        let mut counts = Vec::with_capacity(minutes);
        let mut total = 0.0;
        for (k, c) in f[4..].iter().enumerate() {
            let v: f64 = c.parse().map_err(|_| {
                line_err(
                    i + 1,
                    format!("minute {}: count {c:?} is not a number", k + 1),
                )
            })?;
            if !(v >= 0.0 && v.is_finite()) {
                return Err(line_err(
                    i + 1,
                    format!("minute {}: count {v} must be >= 0", k + 1),
                ));
            }
            total += v;
            counts.push(v / 60.0 * opts.scale);
        }
        rows.push((f[2].to_string(), f[3].to_string(), counts, total));
    }
    if rows.is_empty() {
        return Err(TraceError::Bad {
            path: origin.into(),
            what: "no function rows after the header".into(),
        });
    }
    if opts.top > 0 && rows.len() > opts.top {
        // Stable: ties keep file order.
        let mut idx: Vec<usize> = (0..rows.len()).collect();
        idx.sort_by(|a, b| rows[*b].3.total_cmp(&rows[*a].3));
        let keep: HashSet<usize> = idx[..opts.top].iter().copied().collect();
        let mut k = 0;
        rows.retain(|_| {
            k += 1;
            keep.contains(&(k - 1))
        });
    }
    let mut names = HashSet::new();
    let mut services = Vec::new();
    let mut rates = Vec::new();
    for (hash, _trigger, counts, _) in rows {
        let h = hash_u64(&hash);
        let short: String = hash.chars().take(8).collect();
        let mut name = format!("fn-{short}");
        let mut n = 1;
        while !names.insert(name.clone()) {
            n += 1;
            name = format!("fn-{short}-{n}");
        }
        services.push(ServiceSpec {
            name,
            workload: FUNCTIONS[(h % FUNCTIONS.len() as u64) as usize].to_string(),
            mix_seed: h % 1_000_000 + 1,
        });
        rates.push(counts);
    }
    Ok(Trace {
        step_s: 60.0,
        services,
        rates,
    })
}

/// Read a per-minute invocation-count CSV file.
pub fn import_invocations(path: &Path, opts: &ImportOptions) -> Result<Trace, TraceError> {
    let p = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| TraceError::Io {
        path: p.clone(),
        source,
    })?;
    parse_invocations(&text, &p, opts)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CSV: &str = "HashOwner,HashApp,HashFunction,Trigger,1,2,3\no1,a1,deadbeef00,http,60,120,0\no1,a1,cafebabe11,timer,6,0,6\no2,a2,deadbeef99,queue,600,600,600\n";

    #[test]
    fn imports_rates_per_minute() {
        let t = parse_invocations(CSV, "f", &ImportOptions::default()).unwrap();
        assert_eq!(t.step_s, 60.0);
        assert_eq!(t.services.len(), 3);
        assert_eq!(t.rates[0], vec![1.0, 2.0, 0.0]);
        assert_eq!(t.services[0].name, "fn-deadbeef");
        assert_eq!(t.services[2].name, "fn-deadbeef-2");
        assert!(FUNCTIONS.contains(&t.services[1].workload.as_str()));
        // The result is a valid trace in the documented format.
        let again = Trace::parse(&t.to_csv(), "csv").unwrap();
        assert_eq!(again.services, t.services);
        let top = parse_invocations(CSV, "f", &ImportOptions { top: 1, scale: 1.0 }).unwrap();
        assert_eq!(top.services.len(), 1);
        assert_eq!(top.rates[0], vec![10.0, 10.0, 10.0]);
    }

    #[test]
    fn bad_rows_name_the_line() {
        let line = |text: &str| match parse_invocations(text, "f", &ImportOptions::default()) {
            Err(TraceError::Line { line, what, .. }) => (line, what),
            other => panic!("{other:?}"),
        };
        let (l, w) = line(&CSV.replace("6,0,6", "6,x,6"));
        assert_eq!(l, 3);
        assert!(w.contains("minute 2"), "{w}");
        let (l, _) = line(&CSV.replace("6,0,6", "6,0"));
        assert_eq!(l, 3);
        let (l, _) = line(&CSV.replace("600,600,600", "600,-1,600"));
        assert_eq!(l, 4);
        let (l, _) = line(&CSV.replace("HashApp", "App"));
        assert_eq!(l, 1);
        let (l, _) = line(&CSV.replace(",3\n", ",4\n"));
        assert_eq!(l, 1);
    }
}
