//! Request streams for the load balancer: bursty generated arrivals or a replay file.

use std::path::Path;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Errors building a request stream.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The replay file could not be read.
    #[error("cannot read the request file {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// A line of the replay file is malformed.
    #[error(
        "{path}:{line}: {what}; lines are `time_ms request` with \\r, \\n, \\t and \\\\ escapes"
    )]
    Parse {
        /// The file.
        path: String,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        what: String,
    },
    /// The pattern or rate is unusable.
    #[error("bad load: {0}")]
    Bad(String),
}

/// Shape of the generated arrival rate over time.
#[derive(Debug, Clone, PartialEq)]
pub enum Pattern {
    /// Constant rate (Poisson arrivals).
    Steady,
    /// `on` periods at the full rate alternating with `off` periods at `low` times the rate.
    OnOff {
        /// Length of a burst.
        on: Duration,
        /// Length of a quiet period.
        off: Duration,
        /// Rate factor during quiet periods (0..1).
        low: f64,
    },
    /// A sinusoidal day compressed to `period` (rate between 20% and 100%) with a burst of
    /// `burst_factor` times the rate for `burst` every `burst_every`.
    Diurnal {
        /// Length of one day.
        period: Duration,
        /// Time between bursts.
        burst_every: Duration,
        /// Burst length.
        burst: Duration,
        /// Burst rate factor (>= 1).
        burst_factor: f64,
    },
}

impl Pattern {
    /// Parse `steady`, `onoff[:on_ms,off_ms,low]` or
    /// `diurnal[:period_ms,burst_every_ms,burst_ms,factor]`.
    pub fn parse(s: &str) -> Result<Pattern, LoadError> {
        let (name, args) = s.split_once(':').unwrap_or((s, ""));
        let nums: Vec<f64> = if args.is_empty() {
            Vec::new()
        } else {
            args.split(',')
                .map(|a| a.trim().parse::<f64>())
                .collect::<Result<_, _>>()
                .map_err(|_| LoadError::Bad(format!("pattern {s:?}: arguments must be numbers")))?
        };
        let arg = |i: usize, d: f64| nums.get(i).copied().unwrap_or(d);
        let ms = |v: f64| Duration::from_secs_f64(v.max(1.0) / 1e3);
        match name {
            "steady" => Ok(Pattern::Steady),
            "onoff" => Ok(Pattern::OnOff {
                on: ms(arg(0, 2000.0)),
                off: ms(arg(1, 3000.0)),
                low: arg(2, 0.1).clamp(0.0, 1.0),
            }),
            "diurnal" => Ok(Pattern::Diurnal {
                period: ms(arg(0, 20000.0)),
                burst_every: ms(arg(1, 7000.0)),
                burst: ms(arg(2, 1000.0)),
                burst_factor: arg(3, 3.0).max(1.0),
            }),
            _ => Err(LoadError::Bad(format!(
                "unknown pattern {name:?}: use steady, onoff[:on_ms,off_ms,low] or diurnal[:period_ms,burst_every_ms,burst_ms,factor]"
            ))),
        }
    }

    /// Rate factor at `t` (0..=max_factor).
    pub fn factor(&self, t: Duration) -> f64 {
        let t = t.as_secs_f64();
        match self {
            Pattern::Steady => 1.0,
            Pattern::OnOff { on, off, low } => {
                let cycle = on.as_secs_f64() + off.as_secs_f64();
                if t % cycle < on.as_secs_f64() {
                    1.0
                } else {
                    *low
                }
            }
            Pattern::Diurnal {
                period,
                burst_every,
                burst,
                burst_factor,
            } => {
                let phase = 2.0 * std::f64::consts::PI * t / period.as_secs_f64();
                let base = 0.6 - 0.4 * phase.cos();
                if t % burst_every.as_secs_f64() >= burst_every.as_secs_f64() - burst.as_secs_f64()
                {
                    base * burst_factor
                } else {
                    base
                }
            }
        }
    }

    fn max_factor(&self) -> f64 {
        match self {
            Pattern::Diurnal { burst_factor, .. } => *burst_factor,
            _ => 1.0,
        }
    }
}

/// One request of the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Arrival {
    /// Offset from the start of the run.
    pub at: Duration,
    /// The workload request.
    pub payload: Vec<u8>,
}

/// Arrivals over `duration` at `rate` requests/s shaped by `pattern` (non-homogeneous
/// Poisson process by thinning), cycling through `payloads`.
pub fn generate(
    pattern: &Pattern,
    rate: f64,
    duration: Duration,
    seed: u64,
    payloads: &[Vec<u8>],
) -> Result<Vec<Arrival>, LoadError> {
    if !(rate > 0.0 && rate.is_finite()) {
        return Err(LoadError::Bad(format!(
            "rate {rate} req/s: use a positive rate"
        )));
    }
    if payloads.is_empty() {
        return Err(LoadError::Bad("no request payloads to send".into()));
    }
    let mut rng = StdRng::seed_from_u64(seed);
    let peak = rate * pattern.max_factor();
    let mut t = 0.0;
    let mut out = Vec::new();
    loop {
        let u: f64 = rng.random_range(f64::MIN_POSITIVE..1.0);
        t += -u.ln() / peak;
        if t >= duration.as_secs_f64() {
            break;
        }
        let at = Duration::from_secs_f64(t);
        if rng.random::<f64>() * peak <= rate * pattern.factor(at) {
            out.push(Arrival {
                at,
                payload: payloads[out.len() % payloads.len()].clone(),
            });
        }
    }
    Ok(out)
}

fn unescape(s: &str) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(s.len());
    let mut it = s.bytes();
    while let Some(b) = it.next() {
        if b != b'\\' {
            out.push(b);
            continue;
        }
        match it.next() {
            Some(b'r') => out.push(b'\r'),
            Some(b'n') => out.push(b'\n'),
            Some(b't') => out.push(b'\t'),
            Some(b'\\') => out.push(b'\\'),
            other => {
                return Err(format!(
                    "unknown escape \\{}",
                    other.map(char::from).unwrap_or(' ')
                ))
            }
        }
    }
    Ok(out)
}

/// Parse a replay file: one `time_ms request` per line (blank lines and `#` comments
/// skipped), sorted by time on return.
pub fn parse_file(path: &Path) -> Result<Vec<Arrival>, LoadError> {
    let p = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| LoadError::Io {
        path: p.clone(),
        source,
    })?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() || line.starts_with('#') {
            continue;
        }
        let bad = |what: String| LoadError::Parse {
            path: p.clone(),
            line: i + 1,
            what,
        };
        let (t, req) = line
            .split_once(' ')
            .ok_or_else(|| bad("no space between the time and the request".into()))?;
        let ms: f64 = t
            .parse()
            .map_err(|_| bad(format!("time {t:?} is not a number of milliseconds")))?;
        if !(ms >= 0.0 && ms.is_finite()) {
            return Err(bad(format!("time {t:?} must be >= 0")));
        }
        out.push(Arrival {
            at: Duration::from_secs_f64(ms / 1e3),
            payload: unescape(req).map_err(bad)?,
        });
    }
    out.sort_by_key(|a| a.at);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steady_rate_is_close_to_target() {
        let a = generate(
            &Pattern::Steady,
            200.0,
            Duration::from_secs(10),
            1,
            &[b"x".to_vec()],
        )
        .unwrap();
        assert!((1800..2200).contains(&a.len()), "{}", a.len());
        assert!(a.windows(2).all(|w| w[0].at <= w[1].at));
    }

    #[test]
    fn onoff_is_bursty() {
        let p = Pattern::parse("onoff:1000,1000,0.1").unwrap();
        let a = generate(&p, 500.0, Duration::from_secs(4), 2, &[b"x".to_vec()]).unwrap();
        let on = a.iter().filter(|x| x.at.as_secs_f64() % 2.0 < 1.0).count();
        let off = a.len() - on;
        assert!(on > 5 * off, "on {on} off {off}");
        assert!(Pattern::parse("sawtooth").is_err());
        assert!(Pattern::parse("onoff:x").is_err());
    }

    #[test]
    fn diurnal_has_bursts_above_the_rate() {
        let p = Pattern::parse("diurnal:10000,2000,500,4").unwrap();
        assert!(p.factor(Duration::from_millis(1800)) > 1.0 * 0.2 * 4.0 - 1e-9);
        assert!(p.factor(Duration::from_millis(5000)) > p.factor(Duration::from_millis(0)));
    }

    #[test]
    fn files_parse_with_escapes() {
        let dir = std::env::temp_dir().join(format!("kscope-lb-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("reqs.txt");
        std::fs::write(&f, "# comment\n20 Q6\n5 GET / HTTP/1.1\\r\\n\\r\\n\n").unwrap();
        let a = parse_file(&f).unwrap();
        assert_eq!(a.len(), 2);
        assert_eq!(a[0].at, Duration::from_millis(5));
        assert_eq!(a[0].payload, b"GET / HTTP/1.1\r\n\r\n");
        assert_eq!(a[1].payload, b"Q6");
        std::fs::write(&f, "abc Q6\n").unwrap();
        assert!(matches!(
            parse_file(&f),
            Err(LoadError::Parse { line: 1, .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
