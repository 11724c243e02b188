//! A seeded generator of AT&T-style hosting load traces from documented parameters.
//!
//! Kaleidoscope's slides describe the AT&T hosting data as loads that "fluctuate sharply over
//! time", with bursts, daily cycles, and, in a simulated agile cloud, a median worker lifetime
//! of about 10 minutes with 85% of workers living under an hour. Per service the rate is
//!
//! ```text
//! rate(t) = base * diurnal(t) * exp(noise(t)) * burst(t)
//! base      ~ LogNormal(ln rate_median, rate_sigma)           (popularity, heavy-tailed)
//! diurnal   = 1 + diurnal_amp * sin(2 pi (t + phase) / period) (phase uniform in +-phase_jitter_s)
//! noise     = AR(1) on the log rate: x' = rho x + sigma sqrt(1 - rho^2) e,  e ~ N(0, 1)
//! burst     = product of active bursts' factors; bursts arrive as a Poisson process of
//!             bursts_per_hour, last Pareto(burst_alpha, burst_min_s) seconds (capped at
//!             burst_max_s) and multiply the rate by LogNormal(ln burst_factor, 0.5)
//! ```
//!
//! [`agile_lifetimes`] replays a trace through an idealised agile cloud (as many workers as the
//! rate needs at `worker_rps` each, started at once, the newest released first after
//! `cooldown_s` of lower demand) and returns the worker lifetimes the tests check.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use super::trace::{ServiceSpec, Trace};

/// Parameters of the generator (every one documented in docs/EXPERIMENTS.md).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenParams {
    /// Number of services.
    pub services: usize,
    /// Trace length (s).
    pub duration_s: f64,
    /// Rate sample length (s).
    pub step_s: f64,
    /// Seed of everything.
    pub seed: u64,
    /// Median of the services' mean rates (req/s).
    pub rate_median: f64,
    /// Log-space spread of the services' mean rates.
    pub rate_sigma: f64,
    /// Diurnal amplitude (0..1).
    pub diurnal_amp: f64,
    /// Diurnal period (s).
    pub period_s: f64,
    /// Per-service phase offsets, uniform in +- this (s).
    pub phase_jitter_s: f64,
    /// Log-rate noise standard deviation.
    pub noise_sigma: f64,
    /// Log-rate noise lag-1 autocorrelation per step.
    pub noise_rho: f64,
    /// Bursts per hour per service.
    pub bursts_per_hour: f64,
    /// Pareto shape of burst durations.
    pub burst_alpha: f64,
    /// Shortest burst (s): the Pareto scale.
    pub burst_min_s: f64,
    /// Longest burst (s).
    pub burst_max_s: f64,
    /// Median burst rate factor.
    pub burst_factor: f64,
    /// Fractions of web, olap and function services (normalised).
    pub mix: [f64; 3],
}

impl Default for GenParams {
    fn default() -> Self {
        GenParams {
            services: 100,
            duration_s: 86_400.0,
            step_s: 60.0,
            seed: 1,
            rate_median: 40.0,
            rate_sigma: 1.0,
            diurnal_amp: 0.6,
            period_s: 86_400.0,
            phase_jitter_s: 7_200.0,
            noise_sigma: 0.25,
            noise_rho: 0.98,
            bursts_per_hour: 0.1,
            burst_alpha: 1.5,
            burst_min_s: 120.0,
            burst_max_s: 3.0 * 3600.0,
            burst_factor: 3.0,
            mix: [0.5, 0.2, 0.3],
        }
    }
}

/// A burst the generator placed (returned for tests and plots).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Burst {
    /// Service index.
    pub service: usize,
    /// Start (s).
    pub start_s: f64,
    /// Duration (s).
    pub duration_s: f64,
    /// Rate factor.
    pub factor: f64,
}

/// Errors of the generator's parameters.
#[derive(Debug, thiserror::Error)]
pub enum GenError {
    /// A parameter is out of range.
    #[error("generator parameter {name} = {value}: {what}")]
    Param {
        /// Parameter.
        name: &'static str,
        /// Value.
        value: f64,
        /// Allowed range.
        what: &'static str,
    },
}

const FUNCTIONS: [&str; 4] = ["json", "aes", "matmul", "compress"];

/// A standard normal sample (Box-Muller).
pub(crate) fn normal(rng: &mut StdRng) -> f64 {
    let u1: f64 = rng.random_range(f64::MIN_POSITIVE..1.0);
    let u2: f64 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

fn exp_sample(rng: &mut StdRng, mean: f64) -> f64 {
    let u: f64 = rng.random_range(f64::MIN_POSITIVE..1.0);
    -u.ln() * mean
}

impl GenParams {
    fn check(&self) -> Result<(), GenError> {
        let p = |name, value: f64, ok: bool, what| {
            if ok && value.is_finite() {
                Ok(())
            } else {
                Err(GenError::Param { name, value, what })
            }
        };
        p(
            "services",
            self.services as f64,
            self.services > 0,
            "use at least 1",
        )?;
        p("step_s", self.step_s, self.step_s > 0.0, "must be > 0")?;
        p(
            "duration_s",
            self.duration_s,
            self.duration_s >= self.step_s,
            "must be >= step_s",
        )?;
        p(
            "rate_median",
            self.rate_median,
            self.rate_median > 0.0,
            "must be > 0",
        )?;
        p(
            "rate_sigma",
            self.rate_sigma,
            self.rate_sigma >= 0.0,
            "must be >= 0",
        )?;
        p(
            "diurnal_amp",
            self.diurnal_amp,
            (0.0..1.0).contains(&self.diurnal_amp),
            "must be in [0, 1)",
        )?;
        p(
            "period_s",
            self.period_s,
            self.period_s > 0.0,
            "must be > 0",
        )?;
        p(
            "noise_sigma",
            self.noise_sigma,
            self.noise_sigma >= 0.0,
            "must be >= 0",
        )?;
        p(
            "noise_rho",
            self.noise_rho,
            (0.0..1.0).contains(&self.noise_rho),
            "must be in [0, 1)",
        )?;
        p(
            "bursts_per_hour",
            self.bursts_per_hour,
            self.bursts_per_hour >= 0.0,
            "must be >= 0",
        )?;
        p(
            "burst_alpha",
            self.burst_alpha,
            self.burst_alpha > 1.0,
            "must be > 1",
        )?;
        p(
            "burst_min_s",
            self.burst_min_s,
            self.burst_min_s > 0.0,
            "must be > 0",
        )?;
        p(
            "burst_max_s",
            self.burst_max_s,
            self.burst_max_s >= self.burst_min_s,
            "must be >= burst_min_s",
        )?;
        p(
            "burst_factor",
            self.burst_factor,
            self.burst_factor >= 1.0,
            "must be >= 1",
        )?;
        let m: f64 = self.mix.iter().sum();
        p(
            "mix",
            m,
            m > 0.0 && self.mix.iter().all(|x| *x >= 0.0),
            "fractions >= 0, sum > 0",
        )
    }

    /// The workload of service `i` (a deterministic interleaving that follows `mix`).
    fn workload_of(&self, i: usize, rng: &mut StdRng) -> &'static str {
        let m: f64 = self.mix.iter().sum();
        let u: f64 = rng.random::<f64>() * m;
        if u < self.mix[0] {
            "web"
        } else if u < self.mix[0] + self.mix[1] {
            "olap"
        } else {
            FUNCTIONS[i % FUNCTIONS.len()]
        }
    }
}

/// Generate a trace (and the bursts placed in it).
pub fn generate(p: &GenParams) -> Result<(Trace, Vec<Burst>), GenError> {
    p.check()?;
    let mut rng = StdRng::seed_from_u64(p.seed);
    let steps = (p.duration_s / p.step_s).round().max(1.0) as usize;
    let mut services = Vec::with_capacity(p.services);
    let mut rates = Vec::with_capacity(p.services);
    let mut bursts = Vec::new();
    let mean_gap_s = if p.bursts_per_hour > 0.0 {
        3600.0 / p.bursts_per_hour
    } else {
        f64::INFINITY
    };
    for i in 0..p.services {
        let workload = p.workload_of(i, &mut rng);
        services.push(ServiceSpec {
            name: format!("{workload}-{i}"),
            workload: workload.to_string(),
            mix_seed: rng.random_range(1..1_000_000),
        });
        let base = p.rate_median * (p.rate_sigma * normal(&mut rng)).exp();
        let phase = rng.random_range(-1.0..=1.0) * p.phase_jitter_s;
        // Bursts of this service.
        let mut factor = vec![1.0f64; steps];
        let mut t = exp_sample(&mut rng, mean_gap_s);
        while t < p.duration_s {
            let u: f64 = rng.random_range(f64::MIN_POSITIVE..1.0);
            let d = (p.burst_min_s * u.powf(-1.0 / p.burst_alpha)).min(p.burst_max_s);
            let f = p.burst_factor * (0.5 * normal(&mut rng)).exp();
            let f = f.max(1.0);
            let (a, b) = (
                (t / p.step_s).floor() as usize,
                (((t + d) / p.step_s).ceil() as usize).min(steps),
            );
            for x in &mut factor[a.min(steps)..b] {
                *x *= f;
            }
            bursts.push(Burst {
                service: i,
                start_s: t,
                duration_s: d,
                factor: f,
            });
            t += exp_sample(&mut rng, mean_gap_s);
        }
        let mut x = p.noise_sigma * normal(&mut rng);
        let innov = p.noise_sigma * (1.0 - p.noise_rho * p.noise_rho).sqrt();
        let mut r = Vec::with_capacity(steps);
        for (k, bf) in factor.iter().enumerate() {
            let t = k as f64 * p.step_s;
            let d =
                1.0 + p.diurnal_amp * (2.0 * std::f64::consts::PI * (t + phase) / p.period_s).sin();
            r.push(base * d * x.exp() * bf);
            x = p.noise_rho * x + innov * normal(&mut rng);
        }
        rates.push(r);
    }
    Ok((
        Trace {
            step_s: p.step_s,
            services,
            rates,
        },
        bursts,
    ))
}

/// Worker lifetimes (s) of an idealised agile cloud replaying `trace`: each service runs
/// `ceil(rate / worker_rps)` workers (at least one), starts new ones at once and releases the
/// newest one after `cooldown_s` of lower demand. Workers alive at the end are not counted.
pub fn agile_lifetimes(trace: &Trace, worker_rps: f64, cooldown_s: f64) -> Vec<f64> {
    let mut out = Vec::new();
    let hold = (cooldown_s / trace.step_s).ceil().max(1.0) as usize;
    for rates in &trace.rates {
        let need: Vec<usize> = rates
            .iter()
            .map(|r| ((r / worker_rps).ceil() as usize).max(1))
            .collect();
        let mut alive: Vec<usize> = Vec::new(); // start steps, oldest first
        for k in 0..need.len() {
            // Demand over the cool-down window ending now.
            let lo = (k + 1).saturating_sub(hold);
            let keep = need[lo..=k].iter().copied().max().unwrap_or(1);
            while alive.len() < need[k] {
                alive.push(k);
            }
            while alive.len() > keep {
                let s = alive.pop().expect("non-empty");
                out.push((k - s) as f64 * trace.step_s);
            }
        }
    }
    out
}

/// The `q` quantile (0..1) of `v` (sorted copy, nearest rank).
pub fn quantile(v: &[f64], q: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let i = ((q * s.len() as f64).ceil() as usize).clamp(1, s.len()) - 1;
    s[i]
}

/// Capacity of a worker in the reference agile cloud (req/s) used to check lifetimes.
pub const AGILE_WORKER_RPS: f64 = 20.0;
/// Scale-in cool-down of the reference agile cloud (s).
pub const AGILE_COOLDOWN_S: f64 = 300.0;

#[cfg(test)]
mod tests {
    use super::*;

    fn quiet() -> GenParams {
        GenParams {
            services: 20,
            rate_sigma: 0.0,
            noise_sigma: 0.0,
            bursts_per_hour: 0.0,
            phase_jitter_s: 0.0,
            ..GenParams::default()
        }
    }

    #[test]
    fn same_seed_same_trace_and_bad_params_refused() {
        let p = GenParams {
            services: 5,
            duration_s: 7200.0,
            ..GenParams::default()
        };
        assert_eq!(generate(&p).unwrap().0, generate(&p).unwrap().0);
        let q = GenParams {
            seed: 2,
            ..p.clone()
        };
        assert_ne!(generate(&p).unwrap().0, generate(&q).unwrap().0);
        let bad = GenParams {
            burst_alpha: 0.9,
            ..p
        };
        assert!(generate(&bad)
            .unwrap_err()
            .to_string()
            .contains("burst_alpha"));
    }

    #[test]
    fn diurnal_cycle_and_base_rate_match() {
        let p = quiet();
        let (t, _) = generate(&p).unwrap();
        let r = &t.rates[0];
        let max = r.iter().cloned().fold(0.0, f64::max);
        let min = r.iter().cloned().fold(f64::MAX, f64::min);
        let mean = r.iter().sum::<f64>() / r.len() as f64;
        assert!((mean / p.rate_median - 1.0).abs() < 0.01, "mean {mean}");
        let want = (1.0 + p.diurnal_amp) / (1.0 - p.diurnal_amp);
        assert!(
            (max / min / want - 1.0).abs() < 0.02,
            "max/min {}",
            max / min
        );
    }

    #[test]
    fn noise_has_the_asked_spread_and_correlation() {
        let p = GenParams {
            diurnal_amp: 0.0,
            noise_sigma: 0.4,
            noise_rho: 0.8,
            services: 50,
            ..quiet()
        };
        let (t, _) = generate(&p).unwrap();
        let (mut n, mut s1, mut s2, mut c) = (0.0, 0.0, 0.0, 0.0);
        for r in &t.rates {
            let x: Vec<f64> = r.iter().map(|v| (v / p.rate_median).ln()).collect();
            for w in x.windows(2) {
                n += 1.0;
                s1 += w[0];
                s2 += w[0] * w[0];
                c += w[0] * w[1];
            }
        }
        let var = s2 / n - (s1 / n).powi(2);
        let rho = (c / n - (s1 / n).powi(2)) / var;
        assert!(
            (var.sqrt() / p.noise_sigma - 1.0).abs() < 0.08,
            "sd {}",
            var.sqrt()
        );
        assert!((rho - p.noise_rho).abs() < 0.04, "rho {rho}");
    }

    #[test]
    fn bursts_are_poisson_with_pareto_durations() {
        let p = GenParams {
            services: 200,
            bursts_per_hour: 1.0,
            burst_max_s: 1e9,
            ..quiet()
        };
        let (_, b) = generate(&p).unwrap();
        let expected = p.services as f64 * p.duration_s / 3600.0 * p.bursts_per_hour;
        let n = b.len() as f64;
        assert!(
            (n / expected - 1.0).abs() < 0.05,
            "{n} bursts vs {expected}"
        );
        let d: Vec<f64> = b.iter().map(|x| x.duration_s).collect();
        // Pareto: median = xmin 2^(1/alpha); P(D > 4 xmin) = 4^-alpha (heavy tail).
        let med = quantile(&d, 0.5);
        let want = p.burst_min_s * 2f64.powf(1.0 / p.burst_alpha);
        assert!((med / want - 1.0).abs() < 0.06, "median {med} vs {want}");
        let tail = d.iter().filter(|x| **x > 4.0 * p.burst_min_s).count() as f64 / n;
        let want_tail = 4f64.powf(-p.burst_alpha);
        assert!(
            (tail / want_tail - 1.0).abs() < 0.15,
            "tail {tail} vs {want_tail}"
        );
        assert!(d.iter().all(|x| *x >= p.burst_min_s));
    }

    #[test]
    fn agile_worker_lifetimes_match_att() {
        // The default parameters, replayed through the agile cloud the docs describe, give
        // AT&T's lifetimes: median about 10 minutes, 85% under an hour.
        let p = GenParams::default();
        let (t, _) = generate(&p).unwrap();
        let l = agile_lifetimes(&t, AGILE_WORKER_RPS, AGILE_COOLDOWN_S);
        let med = quantile(&l, 0.5);
        let under_hour = l.iter().filter(|x| **x < 3600.0).count() as f64 / l.len() as f64;
        assert!(l.len() > 1000, "{} lifetimes", l.len());
        assert!((300.0..=1200.0).contains(&med), "median lifetime {med} s");
        assert!(
            (0.78..=0.92).contains(&under_hour),
            "{under_hour} under an hour"
        );
    }

    #[test]
    fn agile_lifetimes_count_the_newest_first() {
        let t = Trace {
            step_s: 60.0,
            services: vec![],
            rates: vec![vec![1.0, 25.0, 25.0, 1.0, 1.0, 1.0, 1.0]],
        };
        // 10 rps workers, 2-step cool-down: 2 extra workers live from step 1 to step 4.
        let l = agile_lifetimes(&t, 10.0, 120.0);
        assert_eq!(l, vec![180.0, 180.0]);
    }
}
