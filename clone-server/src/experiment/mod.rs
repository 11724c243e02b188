//! `kscope experiment`: the micro-elastic cloud experiment (Kaleidoscope's cluster study).
//!
//! - [`trace`]: the documented load-trace format; [`gen`]: a seeded AT&T-style generator;
//!   [`import`]: per-minute invocation counts of public serverless traces;
//! - [`replay`]: real VMs on this host, one elastic load balancer ([`crate::lb`]) per service,
//!   every strategy on the same arrivals; [`metrics`]: overloads, usage, datacenter size, QoS;
//! - [`model`]: cost models measured by a replay (and `kscope bench warmup`); [`sim`]: the
//!   datacenter-scale simulation driven by them; [`report`]: tables, CSV/JSON and SVG plots.
//!
//! The replay reaches the VMM only through the clone service's HTTP API (the load balancer's
//! request path), so changes to the VMM's clone API stay inside `crate::server`.

pub mod gen;
pub mod import;
pub mod metrics;
pub mod model;
pub mod replay;
pub mod report;
pub mod sim;
pub mod trace;

use serde::{Deserialize, Serialize};

use crate::lb::ScaleMode;

/// How a service gets new workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    /// Boot a new VM from the image (cold caches).
    Cold,
    /// Clone the warm parent, copying all its memory first.
    Eager,
    /// Clone the warm parent, fetching every page on demand.
    Lazy,
    /// Clone with Kaleidoscope's color-guided prefetch.
    Kaleidoscope,
    /// Clone and load the recorded working set before running (REAP).
    Reap,
    /// Clone and fetch the recorded working set concurrently (FaaSnap).
    Faasnap,
    /// Clone with per-color windows learned from a recorded run, the recorded working set
    /// fetched concurrently (kscope's `learned` policy).
    Learned,
}

impl Strategy {
    /// Every strategy, in report order.
    pub const ALL: [Strategy; 7] = [
        Strategy::Cold,
        Strategy::Eager,
        Strategy::Lazy,
        Strategy::Kaleidoscope,
        Strategy::Reap,
        Strategy::Faasnap,
        Strategy::Learned,
    ];

    /// Name.
    pub fn name(&self) -> &'static str {
        match self {
            Strategy::Cold => "cold",
            Strategy::Eager => "eager",
            Strategy::Lazy => "lazy",
            Strategy::Kaleidoscope => "kaleidoscope",
            Strategy::Reap => "reap",
            Strategy::Faasnap => "faasnap",
            Strategy::Learned => "learned",
        }
    }

    /// Parse a comma-separated list (`all` for every strategy).
    pub fn parse_list(s: &str) -> Result<Vec<Strategy>, String> {
        if s == "all" {
            return Ok(Strategy::ALL.to_vec());
        }
        s.split(',')
            .map(|x| {
                Strategy::ALL
                    .into_iter()
                    .find(|st| st.name() == x.trim())
                    .ok_or_else(|| {
                        format!(
                            "unknown strategy {x:?}: use all or a list of cold, eager, lazy, kaleidoscope, reap, faasnap, learned"
                        )
                    })
            })
            .collect()
    }

    /// Needs a recorded working set.
    pub fn needs_recording(&self) -> bool {
        matches!(self, Strategy::Reap | Strategy::Faasnap | Strategy::Learned)
    }

    /// The load balancer's scale mode, clone memory mode and prefetch policy (the thin
    /// adapter between the experiment and the clone API).
    pub fn lb_mode(&self) -> (ScaleMode, &'static str, &'static str) {
        match self {
            Strategy::Cold => (ScaleMode::Boot, "lazy", "lazy"),
            Strategy::Eager => (ScaleMode::Clone, "eager", "lazy"),
            Strategy::Lazy => (ScaleMode::Clone, "lazy", "lazy"),
            Strategy::Kaleidoscope => (ScaleMode::Clone, "lazy", "kaleidoscope"),
            Strategy::Reap => (ScaleMode::Clone, "lazy", "reap"),
            Strategy::Faasnap => (ScaleMode::Clone, "lazy", "faasnap"),
            Strategy::Learned => (ScaleMode::Clone, "lazy", "learned"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strategy_lists_parse() {
        assert_eq!(Strategy::parse_list("all").unwrap().len(), 7);
        assert_eq!(
            Strategy::parse_list("cold, kaleidoscope").unwrap(),
            vec![Strategy::Cold, Strategy::Kaleidoscope]
        );
        assert!(Strategy::parse_list("warp").unwrap_err().contains("warp"));
    }
}
