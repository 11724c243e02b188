//! Cost models for the simulation, measured by `kscope experiment replay` (never assumed):
//! per strategy, the distribution of the time from a scale-out decision to a serving worker,
//! the warm-up curve (a new worker's throughput as a fraction of the warm parent's, by age)
//! and the footprint growth (bytes by age); per workload, a warm worker's capacity and
//! service time. Re-running the replay (e.g. after the guest kernel gets faster) and then
//! `kscope experiment model` re-derives every number.
//!
//! File format: JSON with `magic = "kscope-cost-model"` and `version = 1`.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::replay::ReplayReport;
use super::Strategy;

/// Magic of the cost-model file.
pub const MAGIC: &str = "kscope-cost-model";
/// Version of the cost-model file.
pub const VERSION: u32 = 1;

/// Errors reading or deriving a cost model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The file could not be read or written.
    #[error("{path}: {msg}")]
    Io {
        /// The file.
        path: String,
        /// What failed.
        msg: String,
    },
    /// The file is not a cost model this version reads.
    #[error(
        "{path}: {what}; produce one with `kscope experiment replay` or `kscope experiment model`"
    )]
    Format {
        /// The file.
        path: String,
        /// What is wrong.
        what: String,
    },
    /// A strategy or workload has no measurements.
    #[error("no measurements for {0}: run `kscope experiment replay` with it")]
    Missing(String),
}

/// One strategy's measured costs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StrategyModel {
    /// Strategy.
    pub strategy: Strategy,
    /// Scale-out decision to serving worker (ms), every sample.
    pub ready_ms: Vec<f64>,
    /// Scale-out decision to first answer (ms), every sample.
    pub first_answer_ms: Vec<f64>,
    /// Speed as a fraction of the warm parent's by age bucket: the parent's mean in-VM
    /// service time over the worker's, from the guest's latency of every answered request.
    pub warm: Vec<f64>,
    /// Footprint (bytes) by age bucket.
    pub footprint: Vec<f64>,
    /// Worker windows the curves were measured on.
    pub samples: usize,
}

impl StrategyModel {
    fn at(v: &[f64], age_s: f64, bucket_s: f64) -> f64 {
        if v.is_empty() {
            return 0.0;
        }
        let i = (age_s.max(0.0) / bucket_s) as usize;
        v[i.min(v.len() - 1)]
    }

    /// Throughput fraction at `age_s`.
    pub fn warm_at(&self, age_s: f64, bucket_s: f64) -> f64 {
        Self::at(&self.warm, age_s, bucket_s).clamp(0.02, 1.0)
    }

    /// Footprint at `age_s` (bytes).
    pub fn footprint_at(&self, age_s: f64, bucket_s: f64) -> f64 {
        Self::at(&self.footprint, age_s, bucket_s)
    }
}

/// One workload's measured warm-worker costs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkloadModel {
    /// Workload.
    pub workload: String,
    /// Warm capacity (req/s).
    pub capacity_rps: f64,
    /// Median service time at one request in flight (ms).
    pub service_ms: f64,
    /// Its p90 (ms).
    pub service_p90_ms: f64,
    /// The warm parent's footprint (bytes).
    pub parent_bytes: f64,
}

/// A cost model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CostModel {
    /// [`MAGIC`].
    pub magic: String,
    /// [`VERSION`].
    pub version: u32,
    /// Age bucket of the curves (s).
    pub bucket_s: f64,
    /// Per strategy.
    pub strategies: Vec<StrategyModel>,
    /// Per workload.
    pub workloads: Vec<WorkloadModel>,
    /// Where the numbers come from.
    pub source: String,
}

fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        0.0
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

/// Buckets with fewer samples than this count as empty (too noisy on their own).
const MIN_SAMPLES: usize = 8;

/// Fill thin buckets from the previous one (or the first well-measured), trim the tail. If no
/// bucket is well measured (a short or quiet replay: few workers lived long), the curve is flat
/// at the mean of every sample, so a strategy that ran is never modeled as free or stalled.
fn fill(sum: &[f64], n: &[usize]) -> Vec<f64> {
    let all: usize = n.iter().sum();
    if all > 0 && n.iter().all(|c| *c < MIN_SAMPLES) {
        return vec![sum.iter().sum::<f64>() / all as f64];
    }
    let n: Vec<usize> = n
        .iter()
        .map(|c| if *c >= MIN_SAMPLES { *c } else { 0 })
        .collect();
    let n = n.as_slice();
    let first = sum
        .iter()
        .zip(n)
        .find(|(_, c)| **c > 0)
        .map(|(s, c)| s / *c as f64);
    let Some(mut last) = first else {
        return Vec::new();
    };
    let end = n.iter().rposition(|c| *c > 0).map_or(0, |i| i + 1);
    let mut out = Vec::with_capacity(end);
    for i in 0..end {
        if n[i] > 0 {
            last = sum[i] / n[i] as f64;
        }
        out.push(last);
    }
    out
}

impl CostModel {
    /// Derive the model from a replay: `buckets` age buckets of the balancer's window.
    pub fn from_replay(r: &ReplayReport, source: &str) -> Result<CostModel, ModelError> {
        let window_s = r.config.window_ms / 1e3;
        let buckets = 40usize;
        let mut strategies = Vec::new();
        for run in &r.runs {
            let mut ready = Vec::new();
            let mut first = Vec::new();
            let (mut ws, mut wn) = (vec![0.0; buckets], vec![0usize; buckets]);
            let (mut fs, mut fnn) = (vec![0.0; buckets], vec![0usize; buckets]);
            let mut samples = 0;
            for (s, rep) in run.reports.iter().enumerate() {
                let warm_ms = r.setup.get(s).map_or(0.0, |x| x.vm_service_ms);
                for w in rep["workers"].as_array().into_iter().flatten() {
                    // The cold strategy's initial worker is the warm parent: not a new worker.
                    let initial = w["initial"].as_bool().unwrap_or(true);
                    if initial && run.strategy == Strategy::Cold {
                        continue;
                    }
                    let decided = w["decided_s"].as_f64().unwrap_or(0.0);
                    let ready_s = w["ready_s"].as_f64().unwrap_or(0.0);
                    if !initial {
                        ready.push((ready_s - decided) * 1e3);
                        if let Some(f) = w["first_answer_s"].as_f64() {
                            first.push((f - decided) * 1e3);
                        }
                    }
                    for smp in w["samples"].as_array().into_iter().flatten() {
                        let t = smp[0].as_f64().unwrap_or(0.0);
                        let bytes = smp[1].as_f64().unwrap_or(0.0);
                        let done = smp[2].as_f64().unwrap_or(0.0);
                        let vm_ms = smp[4].as_f64().unwrap_or(0.0) / 1e3;
                        let age = t - ready_s;
                        if age < 0.0 {
                            continue;
                        }
                        let b = ((age / window_s) as usize).min(buckets - 1);
                        samples += 1;
                        if bytes > 0.0 {
                            fs[b] += bytes;
                            fnn[b] += 1;
                        }
                        if done > 0.0 && vm_ms > 0.0 && warm_ms > 0.0 {
                            // Requests that overlap in the VM sum to more than the window:
                            // the VM was busy at most the whole window.
                            let busy_ms = vm_ms.min(window_s * 1e3);
                            ws[b] += (warm_ms * done / busy_ms).min(1.0);
                            wn[b] += 1;
                        }
                    }
                }
            }
            strategies.push(StrategyModel {
                strategy: run.strategy,
                ready_ms: ready,
                first_answer_ms: first,
                warm: fill(&ws, &wn),
                footprint: fill(&fs, &fnn),
                samples,
            });
        }
        let mut workloads: Vec<WorkloadModel> = Vec::new();
        let mut names: Vec<&str> = r.setup.iter().map(|s| s.workload.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        for n in names {
            let of: Vec<_> = r.setup.iter().filter(|s| s.workload == n).collect();
            let m = |f: &dyn Fn(&super::replay::ServiceSetup) -> f64| {
                mean(&of.iter().map(|s| f(s)).collect::<Vec<_>>())
            };
            workloads.push(WorkloadModel {
                workload: n.to_string(),
                capacity_rps: m(&|s| s.capacity_rps),
                service_ms: m(&|s| s.service_ms),
                service_p90_ms: m(&|s| s.service_p90_ms),
                parent_bytes: m(&|s| s.parent_footprint_bytes as f64),
            });
        }
        Ok(CostModel {
            magic: MAGIC.into(),
            version: VERSION,
            bucket_s: window_s,
            strategies,
            workloads,
            source: source.to_string(),
        })
    }

    /// The model of `s`.
    pub fn strategy(&self, s: Strategy) -> Result<&StrategyModel, ModelError> {
        self.strategies
            .iter()
            .find(|m| m.strategy == s)
            .ok_or_else(|| ModelError::Missing(format!("strategy {}", s.name())))
    }

    /// The model of workload `w`, or the mean over the measured workloads.
    pub fn workload(&self, w: &str) -> Result<WorkloadModel, ModelError> {
        if let Some(m) = self.workloads.iter().find(|m| m.workload == w) {
            return Ok(m.clone());
        }
        if self.workloads.is_empty() {
            return Err(ModelError::Missing("any workload".into()));
        }
        let f = |g: &dyn Fn(&WorkloadModel) -> f64| {
            mean(&self.workloads.iter().map(g).collect::<Vec<_>>())
        };
        Ok(WorkloadModel {
            workload: w.to_string(),
            capacity_rps: f(&|m| m.capacity_rps),
            service_ms: f(&|m| m.service_ms),
            service_p90_ms: f(&|m| m.service_p90_ms),
            parent_bytes: f(&|m| m.parent_bytes),
        })
    }

    /// Write as JSON.
    pub fn save(&self, path: &Path) -> Result<(), ModelError> {
        let text = serde_json::to_string_pretty(self).map_err(|e| ModelError::Io {
            path: path.display().to_string(),
            msg: e.to_string(),
        })?;
        std::fs::write(path, text).map_err(|e| ModelError::Io {
            path: path.display().to_string(),
            msg: e.to_string(),
        })
    }

    /// Read a cost model, or derive one from a replay result (`replay.json`).
    pub fn load(path: &Path) -> Result<CostModel, ModelError> {
        let p = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::Io {
            path: p.clone(),
            msg: e.to_string(),
        })?;
        let v: Value = serde_json::from_str(&text).map_err(|e| ModelError::Format {
            path: p.clone(),
            what: format!("not JSON ({e})"),
        })?;
        if v["runs"].is_array() && v["setup"].is_array() {
            let r: ReplayReport = serde_json::from_value(v).map_err(|e| ModelError::Format {
                path: p.clone(),
                what: format!("not a replay result ({e})"),
            })?;
            return CostModel::from_replay(&r, &p);
        }
        if v["magic"] != MAGIC {
            return Err(ModelError::Format {
                path: p,
                what: format!("magic is {}, not {MAGIC:?}", v["magic"]),
            });
        }
        if v["version"] != VERSION {
            return Err(ModelError::Format {
                path: p,
                what: format!("version {} is not {VERSION}", v["version"]),
            });
        }
        serde_json::from_value(v).map_err(|e| ModelError::Format {
            path: p,
            what: e.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn curves_fill_gaps_and_clamp() {
        assert_eq!(
            fill(&[0.0, 20.0, 1.0, 60.0, 0.0], &[0, 10, 1, 10, 0]),
            vec![2.0, 2.0, 2.0, 6.0]
        );
        assert!(fill(&[0.0], &[0]).is_empty());
        // No bucket reaches MIN_SAMPLES: one flat bucket at the mean of all samples.
        assert_eq!(fill(&[4.0, 0.0, 8.0], &[2, 0, 2]), vec![3.0]);
        let m = StrategyModel {
            strategy: Strategy::Lazy,
            ready_ms: vec![],
            first_answer_ms: vec![],
            warm: vec![0.2, 0.5, 2.0],
            footprint: vec![1.0, 2.0],
            samples: 0,
        };
        assert_eq!(m.warm_at(0.6, 0.5), 0.5);
        assert_eq!(m.warm_at(99.0, 0.5), 1.0);
        assert_eq!(m.footprint_at(99.0, 0.5), 2.0);
    }
}
