//! A pool of ready taps: a clone takes one at once; a background thread tops the pool up.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use super::{NetError, Tap};

type Factory = Arc<dyn Fn() -> Result<Tap, NetError> + Send + Sync>;

/// Hits and misses of [`TapPool::take`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct PoolStats {
    /// Taps taken ready from the pool.
    pub hits: u64,
    /// Taps created on demand (pool empty).
    pub misses: u64,
    /// Taps ready now.
    pub ready: usize,
}

struct Inner {
    taps: Mutex<(Vec<Tap>, bool)>,
    cond: Condvar,
    hits: AtomicU64,
    misses: AtomicU64,
    target: usize,
    factory: Factory,
}

/// The pool.
pub struct TapPool {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for TapPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TapPool")
            .field("stats", &self.stats())
            .finish()
    }
}

impl TapPool {
    /// Keep `target` taps made by `factory` ready (filled by a background thread).
    pub fn new(
        target: usize,
        factory: impl Fn() -> Result<Tap, NetError> + Send + Sync + 'static,
    ) -> TapPool {
        let inner = Arc::new(Inner {
            taps: Mutex::new((Vec::new(), false)),
            cond: Condvar::new(),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            target,
            factory: Arc::new(factory),
        });
        let weak = Arc::downgrade(&inner);
        let _ = std::thread::Builder::new()
            .name("kscope-tap-pool".into())
            .spawn(move || loop {
                let Some(inner) = weak.upgrade() else { return };
                {
                    let mut g = inner.taps.lock().unwrap_or_else(|p| p.into_inner());
                    while g.0.len() >= inner.target && !g.1 {
                        g = inner
                            .cond
                            .wait_timeout(g, std::time::Duration::from_millis(500))
                            .unwrap_or_else(|p| p.into_inner())
                            .0;
                        if Arc::strong_count(&inner) == 1 {
                            return;
                        }
                    }
                    if g.1 {
                        return;
                    }
                }
                match (inner.factory)() {
                    Ok(t) => {
                        let mut g = inner.taps.lock().unwrap_or_else(|p| p.into_inner());
                        if g.1 {
                            return;
                        }
                        g.0.push(t);
                    }
                    Err(e) => {
                        tracing::warn!("tap pool: {e}");
                        std::thread::sleep(std::time::Duration::from_secs(1));
                    }
                }
            });
        TapPool { inner }
    }

    /// A ready tap (hit) or a new one (miss).
    pub fn take(&self) -> Result<Tap, NetError> {
        let t = {
            let mut g = self.inner.taps.lock().unwrap_or_else(|p| p.into_inner());
            let t = g.0.pop();
            self.inner.cond.notify_all();
            t
        };
        match t {
            Some(t) => {
                self.inner.hits.fetch_add(1, Ordering::Relaxed);
                Ok(t)
            }
            None => {
                self.inner.misses.fetch_add(1, Ordering::Relaxed);
                (self.inner.factory)()
            }
        }
    }

    /// Statistics.
    pub fn stats(&self) -> PoolStats {
        PoolStats {
            hits: self.inner.hits.load(Ordering::Relaxed),
            misses: self.inner.misses.load(Ordering::Relaxed),
            ready: self
                .inner
                .taps
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .0
                .len(),
        }
    }

    /// Close every ready tap and stop refilling.
    pub fn clear(&self) {
        let mut g = self.inner.taps.lock().unwrap_or_else(|p| p.into_inner());
        g.1 = true;
        g.0.clear();
        self.inner.cond.notify_all();
    }
}
