//! Policy configuration: the per-color window table of the `kaleidoscope` policy and the
//! parameters of the baselines, parsed from `key=value` items separated by commas or lines
//! (TOML-like files work: `#` comments, blank lines, quotes and `[section]` headers are
//! ignored).
//!
//! ```text
//! page_cache_data = file:8     # read ahead 8 cached pages in file order
//! page_cache_exec = pivot:4    # 4-page pivot window (file order)
//! user_code       = pivot:4    # 4-page pivot window (physical, same color)
//! user_data       = local:8    # next 8 frames, same color only
//! page_table      = upfront    # before the clone resumes
//! kernel_code     = upfront
//! kernel_data     = local:4
//! free            = zero       # never fetched: zero-filled on demand
//! zero            = zero
//! unknown         = none       # the faulting page only
//! zero_pages      = true       # zero-fill every all-zero frame, whatever its color
//! blind_window = 8, faasnap_readahead = 8, activeset_block = 32
//! learned_replay  = true       # learned: also fetch the recording in the background
//! ramp            = true       # file:N / local:N windows grow on sequential streams
//! ```
//!
//! Two rules are not in the paper's table; the `learned` policy picks them where a recording
//! shows they pay: `span:N` (the next N physical frames whatever their color, zero-served ones
//! as zero pages) and `zero:N` (zero-served, plus the next N frames of the color as zero
//! pages on each fault).

use kscope_colorer::Color;
use std::fmt;
use std::path::Path;

/// Errors of configuration parsing.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// An item could not be parsed.
    #[error("policy config item {item:?}: {why}")]
    Item {
        /// The item.
        item: String,
        /// What is wrong and what is accepted.
        why: String,
    },
    /// The file could not be read.
    #[error("cannot read policy config {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
}

/// What the `kaleidoscope` policy does for frames of one color.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rule {
    /// Fetch only the faulting page.
    None,
    /// On a fault, also fetch the next `n` cached pages of the same file in file order
    /// (radix order); frames not in a file fall back to `Local(n)`.
    File(u64),
    /// On a fault, fetch a window of `n` pages around the faulting page (the pivot), which
    /// moves with every fault: in file order for cached pages, else the `n` nearest physical
    /// neighbours (alternating sides, starting on the side the pivot moved to) that have the
    /// same color.
    Pivot(u64),
    /// On a fault, fetch those of the next `n` physical frames that have the same color.
    Local(u64),
    /// On a fault, install the next `n` physical frames whatever their color (the `blind`
    /// window, but chosen per color of the faulting frame); frames served as zero pages are
    /// installed as zero pages (nothing read). Not in the paper's table; `learned` picks it
    /// where colors interleave in physical memory so that a same-color window misses what
    /// runs next.
    Span(u64),
    /// Fetch every frame of the color before the clone resumes.
    Upfront,
    /// Fetch every frame of the color with the background fetcher.
    Background,
    /// Never fetch: serve as a zero page (allocation on demand).
    Zero,
    /// Like `Zero`, and on a fault also install the next `n` frames of the same color as zero
    /// pages (guest allocators hand out free frames in runs: a workload that allocates
    /// faults on each of them otherwise). Written `zero:N`.
    ZeroAhead(u64),
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rule::None => write!(f, "none"),
            Rule::File(n) => write!(f, "file:{n}"),
            Rule::Pivot(n) => write!(f, "pivot:{n}"),
            Rule::Local(n) => write!(f, "local:{n}"),
            Rule::Span(n) => write!(f, "span:{n}"),
            Rule::Upfront => write!(f, "upfront"),
            Rule::Background => write!(f, "background"),
            Rule::Zero => write!(f, "zero"),
            Rule::ZeroAhead(n) => write!(f, "zero:{n}"),
        }
    }
}

/// Largest window accepted.
pub const MAX_WINDOW: u64 = 4096;

fn parse_window(item: &str, v: &str) -> Result<u64, ConfigError> {
    let n: u64 = v.trim().parse().map_err(|_| ConfigError::Item {
        item: item.to_string(),
        why: format!("window {v:?} is not a number"),
    })?;
    if n == 0 || n > MAX_WINDOW {
        return Err(ConfigError::Item {
            item: item.to_string(),
            why: format!("window must be in 1..={MAX_WINDOW}"),
        });
    }
    Ok(n)
}

impl Rule {
    fn parse(item: &str, v: &str) -> Result<Rule, ConfigError> {
        let v = v.trim().to_ascii_lowercase();
        let (kind, arg) = match v.split_once(':') {
            Some((k, a)) => (k.trim(), Some(a)),
            None => (v.as_str(), None),
        };
        let window = || match arg {
            Some(a) => parse_window(item, a),
            None => Err(ConfigError::Item {
                item: item.to_string(),
                why: format!("{kind} needs a window, e.g. {kind}:8"),
            }),
        };
        Ok(match kind {
            "none" | "lazy" => Rule::None,
            "file" => Rule::File(window()?),
            "pivot" => Rule::Pivot(window()?),
            "local" => Rule::Local(window()?),
            "span" => Rule::Span(window()?),
            "upfront" => Rule::Upfront,
            "background" => Rule::Background,
            "zero" if arg.is_none() => Rule::Zero,
            "zero" => Rule::ZeroAhead(window()?),
            _ => {
                return Err(ConfigError::Item {
                    item: item.to_string(),
                    why: "rule must be none, file:N, pivot:N, local:N, span:N, upfront, background, zero or zero:N"
                        .into(),
                })
            }
        })
    }
}

/// Configuration of every policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyConfig {
    /// Rule per color, indexed by [`Color::index`].
    pub rules: [Rule; Color::COUNT],
    /// `kaleidoscope`: zero-fill every all-zero frame whatever its color's rule.
    pub zero_pages: bool,
    /// `blind`: frames fetched after the faulting one, by physical address.
    pub blind_window: u64,
    /// `faasnap`: frames after each recorded access added to the loading set (readahead).
    pub faasnap_readahead: u64,
    /// `activeset`: block size (aligned) in which pages are fetched.
    pub activeset_block: u64,
    /// `learned`: also install the recorded frames with the background fetcher, in
    /// first-touch order, from the clone's first instruction (the learned windows serve what
    /// the recording did not see).
    pub learned_replay: bool,
    /// `file:N` and `local:N` windows ramp up on a sequential stream: a fault just after the
    /// color's previous window doubles the window, up to [`RAMP_MAX`] x N (as the page cache's
    /// readahead does); any other fault starts again at N.
    pub ramp: bool,
}

/// How far a ramped window grows: this many times the rule's window.
pub const RAMP_MAX: u64 = 8;

impl Default for PolicyConfig {
    /// The table of the Kaleidoscope paper (see the module docs).
    fn default() -> Self {
        let mut rules = [Rule::None; Color::COUNT];
        for (c, r) in [
            (Color::PageCacheData, Rule::File(8)),
            (Color::PageCacheExec, Rule::Pivot(4)),
            (Color::UserCode, Rule::Pivot(4)),
            (Color::UserData, Rule::Local(8)),
            (Color::PageTable, Rule::Upfront),
            (Color::KernelCode, Rule::Upfront),
            (Color::KernelData, Rule::Local(4)),
            (Color::Free, Rule::Zero),
            (Color::Zero, Rule::Zero),
            (Color::Unknown, Rule::None),
        ] {
            rules[c.index()] = r;
        }
        PolicyConfig {
            rules,
            zero_pages: true,
            blind_window: 8,
            faasnap_readahead: 8,
            activeset_block: 32,
            learned_replay: true,
            ramp: true,
        }
    }
}

fn parse_bool(item: &str, v: &str) -> Result<bool, ConfigError> {
    match v {
        "true" | "1" | "yes" => Ok(true),
        "false" | "0" | "no" => Ok(false),
        _ => Err(ConfigError::Item {
            item: item.to_string(),
            why: "expected true or false".into(),
        }),
    }
}

impl PolicyConfig {
    /// The rule of `color`.
    pub fn rule(&self, color: Color) -> Rule {
        self.rules[color.index()]
    }

    /// The default configuration with the items of `s` applied.
    pub fn parse(s: &str) -> Result<Self, ConfigError> {
        let mut c = PolicyConfig::default();
        c.apply(s)?;
        Ok(c)
    }

    /// Read a configuration file (applied over the defaults).
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let s = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&s)
    }

    /// Apply `key=value` items (see the module docs) over the current values.
    pub fn apply(&mut self, s: &str) -> Result<(), ConfigError> {
        for line in s.lines() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() || (line.starts_with('[') && line.ends_with(']')) {
                continue;
            }
            for item in line.split(',').map(str::trim).filter(|i| !i.is_empty()) {
                let (k, v) = item.split_once('=').ok_or_else(|| ConfigError::Item {
                    item: item.to_string(),
                    why: "expected key=value".into(),
                })?;
                let k = k
                    .trim()
                    .trim_matches('"')
                    .to_ascii_lowercase()
                    .replace('-', "_");
                let v = v.trim().trim_matches('"').trim_matches('\'');
                match k.as_str() {
                    "zero_pages" => self.zero_pages = parse_bool(item, v)?,
                    "learned_replay" => self.learned_replay = parse_bool(item, v)?,
                    "ramp" => self.ramp = parse_bool(item, v)?,
                    "blind_window" => self.blind_window = parse_window(item, v)?,
                    "faasnap_readahead" => {
                        self.faasnap_readahead = if v.trim() == "0" {
                            0
                        } else {
                            parse_window(item, v)?
                        }
                    }
                    "activeset_block" => self.activeset_block = parse_window(item, v)?,
                    _ => {
                        let color: Color = k.parse().map_err(|e: kscope_colorer::color::ParseColorError| {
                            ConfigError::Item {
                                item: item.to_string(),
                                why: format!("{e}, or zero_pages, blind_window, faasnap_readahead, activeset_block, learned_replay, ramp"),
                            }
                        })?;
                        self.rules[color.index()] = Rule::parse(item, v)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// The configuration as `key=value` items, one per line (parseable by [`Self::parse`]).
    pub fn render(&self) -> String {
        let mut s = String::new();
        for c in Color::ALL {
            s.push_str(&format!("{} = {}\n", c.name(), self.rule(c)));
        }
        s.push_str(&format!(
            "zero_pages = {}\nblind_window = {}\nfaasnap_readahead = {}\nactiveset_block = {}\nlearned_replay = {}\nramp = {}\n",
            self.zero_pages,
            self.blind_window,
            self.faasnap_readahead,
            self.activeset_block,
            self.learned_replay,
            self.ramp
        ));
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_table_is_the_papers() {
        let c = PolicyConfig::default();
        assert_eq!(c.rule(Color::PageCacheData), Rule::File(8));
        assert_eq!(c.rule(Color::PageCacheExec), Rule::Pivot(4));
        assert_eq!(c.rule(Color::UserCode), Rule::Pivot(4));
        assert_eq!(c.rule(Color::PageTable), Rule::Upfront);
        assert_eq!(c.rule(Color::KernelCode), Rule::Upfront);
        assert_eq!(c.rule(Color::Free), Rule::Zero);
        assert_eq!(c.rule(Color::Zero), Rule::Zero);
    }

    #[test]
    fn parse_string_and_file_forms() {
        let c = PolicyConfig::parse("user_data=local:16, page-table = background,blind_window=4")
            .unwrap();
        assert_eq!(c.rule(Color::UserData), Rule::Local(16));
        assert_eq!(c.rule(Color::PageTable), Rule::Background);
        assert_eq!(c.blind_window, 4);
        assert_eq!(c.rule(Color::PageCacheData), Rule::File(8));
        let toml = "[kaleidoscope]\n# comment\nkernel_data = \"none\"\nzero_pages = false  # off\n\nfaasnap_readahead = 0\nlearned_replay=no\n";
        let c = PolicyConfig::parse(toml).unwrap();
        assert_eq!(c.rule(Color::KernelData), Rule::None);
        assert!(!c.zero_pages);
        assert!(!c.learned_replay);
        assert_eq!(c.faasnap_readahead, 0);
        // Render and parse back.
        assert_eq!(PolicyConfig::parse(&c.render()).unwrap(), c);
        let dir = std::env::temp_dir().join(format!("kscope-policy-{}.toml", std::process::id()));
        std::fs::write(&dir, toml).unwrap();
        assert_eq!(PolicyConfig::from_file(&dir).unwrap(), c);
        std::fs::remove_file(&dir).unwrap();
        assert!(matches!(
            PolicyConfig::from_file(&dir),
            Err(ConfigError::Io { .. })
        ));
    }

    #[test]
    fn parse_errors_say_what_is_accepted() {
        for (bad, hint) in [
            ("purple=file:8", "unknown color"),
            ("user_data=file", "needs a window"),
            ("user_data=file:0", "window must be"),
            ("user_data=file:x", "not a number"),
            ("user_data=sometimes", "rule must be"),
            ("user_data", "key=value"),
            ("zero_pages=maybe", "true or false"),
            ("learned_replay=2", "true or false"),
            ("blind_window=100000", "window must be"),
        ] {
            let e = PolicyConfig::parse(bad).unwrap_err().to_string();
            assert!(e.contains(hint), "{bad}: {e}");
        }
    }
}
