//! The load-trace format of `kscope experiment`: per-service request rates over time.
//!
//! A trace file is CSV with `#` directives (format version 1):
//!
//! ```text
//! # kscope-trace v1
//! # step_s=60
//! # service name=web-0 workload=web mix_seed=1
//! # service name=fn-3 workload=json mix_seed=7
//! t_s,service,rate_rps
//! 0,web-0,12.5
//! 0,fn-3,0.8
//! 60,web-0,30.1
//! ```
//!
//! - `step_s` is the length of each rate sample: a service's rate is piecewise constant, the
//!   value at `t_s` holding until `t_s + step_s`. A service with no row at a step has rate 0.
//! - Each `service` directive declares one service: its name, the workload its workers run
//!   (`web`, `olap`, `json`, `aes`, `matmul`, `compress`) and its request mix: the workload's
//!   standard request generator with seed `mix_seed` (e.g. `web`'s SPECweb-like mix of static
//!   files, banking, e-commerce and support pages).
//! - Rows: times are non-negative multiples of `step_s` in non-decreasing order; rates are
//!   finite and `>= 0`; every service named in a row is declared. A bad line is an error that
//!   names the line; nothing is loaded half-way.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::Path;

use kscope_workloads::Workload;
use serde::{Deserialize, Serialize};

/// Errors reading or validating a trace.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    /// The file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// A line is malformed.
    #[error("{path}:{line}: {what} (see docs/EXPERIMENTS.md, trace format v1)")]
    Line {
        /// The file.
        path: String,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        what: String,
    },
    /// The trace as a whole is unusable.
    #[error("{path}: {what}")]
    Bad {
        /// The file.
        path: String,
        /// What is wrong.
        what: String,
    },
}

/// One service of a trace.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceSpec {
    /// Unique name.
    pub name: String,
    /// Workload name (see [`Workload::from_name`]).
    pub workload: String,
    /// Seed of the workload's request generator (the request mix).
    pub mix_seed: u64,
}

impl ServiceSpec {
    /// The workload.
    pub fn workload(&self) -> Workload {
        Workload::from_name(&self.workload).unwrap_or(Workload::Web)
    }
}

/// A trace: services and, per service, one rate (req/s) per step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Trace {
    /// Length of one rate sample (s).
    pub step_s: f64,
    /// The services.
    pub services: Vec<ServiceSpec>,
    /// `rates[service][step]`, every service the same length.
    pub rates: Vec<Vec<f64>>,
}

impl Trace {
    /// Number of steps.
    pub fn steps(&self) -> usize {
        self.rates.first().map_or(0, Vec::len)
    }

    /// Length of the trace (s).
    pub fn duration_s(&self) -> f64 {
        self.steps() as f64 * self.step_s
    }

    /// Rate of service `s` at time `t` (s).
    pub fn rate_at(&self, s: usize, t: f64) -> f64 {
        let i = (t / self.step_s).floor();
        if i < 0.0 {
            return 0.0;
        }
        self.rates[s].get(i as usize).copied().unwrap_or(0.0)
    }

    /// Keep the services whose index passes `keep` (in order).
    pub fn select(&self, keep: impl Fn(usize, &ServiceSpec) -> bool) -> Trace {
        let idx: Vec<usize> = (0..self.services.len())
            .filter(|&i| keep(i, &self.services[i]))
            .collect();
        Trace {
            step_s: self.step_s,
            services: idx.iter().map(|&i| self.services[i].clone()).collect(),
            rates: idx.iter().map(|&i| self.rates[i].clone()).collect(),
        }
    }

    /// Render in the documented CSV format.
    pub fn to_csv(&self) -> String {
        let mut s = String::from("# kscope-trace v1\n");
        let _ = writeln!(s, "# step_s={}", self.step_s);
        for sv in &self.services {
            let _ = writeln!(
                s,
                "# service name={} workload={} mix_seed={}",
                sv.name, sv.workload, sv.mix_seed
            );
        }
        s.push_str("t_s,service,rate_rps\n");
        for i in 0..self.steps() {
            for (k, sv) in self.services.iter().enumerate() {
                let r = self.rates[k][i];
                if r > 0.0 {
                    let _ = writeln!(s, "{},{},{:.4}", i as f64 * self.step_s, sv.name, r);
                }
            }
        }
        s
    }

    /// Write to `path`.
    pub fn save(&self, path: &Path) -> Result<(), TraceError> {
        std::fs::write(path, self.to_csv()).map_err(|source| TraceError::Io {
            path: path.display().to_string(),
            source,
        })
    }

    /// Read and validate a trace file.
    pub fn load(path: &Path) -> Result<Trace, TraceError> {
        let p = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| TraceError::Io {
            path: p.clone(),
            source,
        })?;
        Trace::parse(&text, &p)
    }

    /// Parse and validate trace text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Trace, TraceError> {
        let line_err = |line: usize, what: String| TraceError::Line {
            path: origin.to_string(),
            line,
            what,
        };
        let mut step_s: Option<f64> = None;
        let mut services: Vec<ServiceSpec> = Vec::new();
        let mut index: HashMap<String, usize> = HashMap::new();
        let mut rows: Vec<(usize, usize, f64)> = Vec::new(); // (step, service, rate)
        let mut header_seen = false;
        let mut last_t = f64::NEG_INFINITY;
        let mut version_seen = false;
        for (i, raw) in text.lines().enumerate() {
            let n = i + 1;
            let line = raw.trim_end_matches('\r').trim();
            if line.is_empty() {
                continue;
            }
            if let Some(d) = line.strip_prefix('#') {
                let d = d.trim();
                if let Some(v) = d.strip_prefix("kscope-trace") {
                    if v.trim() != "v1" {
                        return Err(line_err(
                            n,
                            format!("trace format {:?} is not supported: use v1", v.trim()),
                        ));
                    }
                    version_seen = true;
                } else if let Some(v) = d.strip_prefix("step_s=") {
                    let s: f64 = v.trim().parse().map_err(|_| {
                        line_err(n, format!("step_s {v:?} is not a number of seconds"))
                    })?;
                    if !(s > 0.0 && s.is_finite()) {
                        return Err(line_err(n, format!("step_s {s} must be > 0")));
                    }
                    step_s = Some(s);
                } else if let Some(v) = d.strip_prefix("service ") {
                    let sv = parse_service(v).map_err(|w| line_err(n, w))?;
                    if index.contains_key(&sv.name) {
                        return Err(line_err(n, format!("service {:?} declared twice", sv.name)));
                    }
                    index.insert(sv.name.clone(), services.len());
                    services.push(sv);
                }
                continue;
            }
            if !header_seen {
                if line.replace(' ', "") != "t_s,service,rate_rps" {
                    return Err(line_err(
                        n,
                        format!("expected the header `t_s,service,rate_rps`, found {line:?}"),
                    ));
                }
                header_seen = true;
                continue;
            }
            let step = step_s.ok_or_else(|| {
                line_err(n, "no `# step_s=` directive before the first row".into())
            })?;
            let f: Vec<&str> = line.split(',').map(str::trim).collect();
            if f.len() != 3 {
                return Err(line_err(
                    n,
                    format!("{} fields; a row is `t_s,service,rate_rps`", f.len()),
                ));
            }
            let t: f64 = f[0]
                .parse()
                .map_err(|_| line_err(n, format!("time {:?} is not a number", f[0])))?;
            if !(t >= 0.0 && t.is_finite()) {
                return Err(line_err(n, format!("time {t} must be >= 0")));
            }
            if t < last_t {
                return Err(line_err(
                    n,
                    format!("time {t} is before the previous row's {last_t}: rows must be sorted by time"),
                ));
            }
            last_t = t;
            let k = (t / step).round();
            if (k * step - t).abs() > 1e-6 * step.max(1.0) {
                return Err(line_err(
                    n,
                    format!("time {t} is not a multiple of step_s {step}"),
                ));
            }
            let s = *index.get(f[1]).ok_or_else(|| {
                line_err(
                    n,
                    format!(
                        "unknown service {:?}: declare it with `# service name={} workload=...`",
                        f[1], f[1]
                    ),
                )
            })?;
            let r: f64 = f[2]
                .parse()
                .map_err(|_| line_err(n, format!("rate {:?} is not a number", f[2])))?;
            if !(r >= 0.0 && r.is_finite()) {
                return Err(line_err(
                    n,
                    format!("rate {r} must be finite and >= 0 requests/s"),
                ));
            }
            rows.push((k as usize, s, r));
        }
        let bad = |what: String| TraceError::Bad {
            path: origin.to_string(),
            what,
        };
        if !version_seen {
            return Err(bad("no `# kscope-trace v1` line".into()));
        }
        let step_s = step_s.ok_or_else(|| bad("no `# step_s=` directive".into()))?;
        if services.is_empty() {
            return Err(bad("no `# service` directive".into()));
        }
        if !header_seen || rows.is_empty() {
            return Err(bad("no rows".into()));
        }
        let steps = rows.iter().map(|r| r.0).max().unwrap_or(0) + 1;
        let mut rates = vec![vec![0.0; steps]; services.len()];
        for (k, s, r) in rows {
            rates[s][k] = r;
        }
        Ok(Trace {
            step_s,
            services,
            rates,
        })
    }
}

fn parse_service(v: &str) -> Result<ServiceSpec, String> {
    let mut name = None;
    let mut workload = None;
    let mut mix_seed = 1u64;
    for kv in v.split_whitespace() {
        let (k, val) = kv
            .split_once('=')
            .ok_or_else(|| format!("service field {kv:?} is not key=value"))?;
        match k {
            "name" => {
                if val.is_empty() || val.contains(',') {
                    return Err(format!(
                        "service name {val:?} must be non-empty, without commas"
                    ));
                }
                name = Some(val.to_string());
            }
            "workload" => {
                if Workload::from_name(val).is_none() {
                    return Err(format!(
                        "unknown workload {val:?}: use web, olap, json, aes, matmul or compress"
                    ));
                }
                workload = Some(val.to_string());
            }
            "mix_seed" => {
                mix_seed = val
                    .parse()
                    .map_err(|_| format!("mix_seed {val:?} is not an unsigned integer"))?
            }
            _ => {
                return Err(format!(
                    "unknown service field {k:?}: use name, workload, mix_seed"
                ))
            }
        }
    }
    Ok(ServiceSpec {
        name: name.ok_or("service without name=")?,
        workload: workload.ok_or("service without workload=")?,
        mix_seed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "# kscope-trace v1\n# step_s=10\n# service name=a workload=web\n# service name=b workload=json mix_seed=3\nt_s,service,rate_rps\n0,a,1.5\n0,b,2\n20,a,3\n";

    #[test]
    fn parses_and_round_trips() {
        let t = Trace::parse(GOOD, "t").unwrap();
        assert_eq!(t.steps(), 3);
        assert_eq!(t.rates[0], vec![1.5, 0.0, 3.0]);
        assert_eq!(t.rates[1], vec![2.0, 0.0, 0.0]);
        assert_eq!(t.rate_at(0, 25.0), 3.0);
        assert_eq!(t.services[1].mix_seed, 3);
        let again = Trace::parse(&t.to_csv(), "t2").unwrap();
        assert_eq!(again, t);
    }

    fn err_line(text: &str) -> (usize, String) {
        match Trace::parse(text, "f") {
            Err(TraceError::Line { line, what, .. }) => (line, what),
            other => panic!("expected a line error, got {other:?}"),
        }
    }

    #[test]
    fn bad_lines_are_named() {
        let (l, w) = err_line(&GOOD.replace("20,a,3", "20,c,3"));
        assert_eq!(l, 8);
        assert!(w.contains("unknown service"), "{w}");
        let (l, w) = err_line(&GOOD.replace("20,a,3", "20,a,-3"));
        assert_eq!(l, 8);
        assert!(w.contains(">= 0"), "{w}");
        let (l, w) = err_line(&GOOD.replace("20,a,3", "0,a,3\n-"));
        assert_eq!(l, 9, "{w}");
        let (l, w) = err_line(&GOOD.replace("0,b,2\n20,a,3", "20,b,2\n10,a,3"));
        assert_eq!(l, 8);
        assert!(w.contains("sorted"), "{w}");
        let (l, w) = err_line(&GOOD.replace("0,b,2", "0,b"));
        assert_eq!(l, 7);
        assert!(w.contains("fields"), "{w}");
        let (l, w) = err_line(&GOOD.replace("workload=json", "workload=java"));
        assert_eq!(l, 4);
        assert!(w.contains("unknown workload"), "{w}");
        let (l, _) = err_line(&GOOD.replace("20,a,3", "15,a,3"));
        assert_eq!(l, 8);
        let (l, _) = err_line(&GOOD.replace("20,a,3", "20,a,NaN"));
        assert_eq!(l, 8);
    }

    #[test]
    fn incomplete_traces_are_refused() {
        assert!(matches!(
            Trace::parse(&GOOD.replace("# kscope-trace v1\n", ""), "f"),
            Err(TraceError::Bad { .. })
        ));
        assert!(Trace::parse("# kscope-trace v1\n# step_s=1\n", "f").is_err());
    }
}
