//! Host limits the service lives under: open files (RLIMIT_NOFILE) and guest memory
//! accounting with overcommit of lazy clones.
//!
//! **Open files.** Every clone holds a few descriptors (KVM VM and vCPU, its memfd shared by
//! the fault server and guest RAM, a userfaultfd, an eventfd: [`FDS_PER_CLONE`], measured by
//! the API tests). At start the service raises its soft RLIMIT_NOFILE to the hard limit
//! ([`raise_nofile`]); before it creates VMs it checks that the descriptors they need are
//! free ([`FdBudget::check`]) and answers 503 with the numbers otherwise, instead of failing
//! half-way with EMFILE and blaming the parent.
//!
//! **Memory.** `--max-guest-mem` bounds the guest memory the service commits. Parents and
//! eager clones are charged their full size. With `--overcommit R` (R > 1), a lazy clone is
//! charged `size / R` at creation, and at every later reservation its real footprint (pages
//! it has faulted in) if that grew past the charge ([`charge_of`]). When the host itself runs
//! short anyway, the kernel cannot allocate the page a lazy clone faults on: that clone's
//! fault server fails it (`failed`, "guest memory service failed: ... Cannot allocate
//! memory"), its requests get 502, the parent and the other VMs go on. The Linux OOM killer
//! remains the last resort for the whole process.

use std::sync::atomic::{AtomicU64, Ordering};

use super::error::ApiError;

/// Descriptors one VM holds (KVM VM, vCPU, memfd, userfaultfd, eventfd, and a share of the
/// parent's frozen image; a parent about as many). Checked by the API tests.
pub const FDS_PER_CLONE: u64 = 6;
/// Extra descriptors of a VM with a network: its tap, the tap watcher's epoll and eventfd.
pub const FDS_PER_NETWORK: u64 = 3;
/// Descriptors kept free for HTTP connections, snapshot files and logs.
pub const FD_RESERVE: u64 = 64;

/// The soft and hard RLIMIT_NOFILE.
fn nofile() -> std::io::Result<(u64, u64)> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one `rlimit` into `r`, a valid, exclusively borrowed struct.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((r.rlim_cur, r.rlim_max))
}

/// Raises the soft RLIMIT_NOFILE to the hard limit (capped at `cap`); returns the soft limit
/// now in force.
pub fn raise_nofile(cap: u64) -> u64 {
    let Ok((soft, hard)) = nofile() else {
        return 1024;
    };
    let want = hard.min(cap);
    if want <= soft {
        return soft;
    }
    let r = libc::rlimit {
        rlim_cur: want,
        rlim_max: hard,
    };
    // SAFETY: setrlimit reads one valid `rlimit`; raising the soft limit up to the hard one
    // needs no privilege and affects only this process.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &r) } != 0 {
        tracing::warn!(
            soft,
            hard,
            "cannot raise RLIMIT_NOFILE: {}",
            std::io::Error::last_os_error()
        );
        return soft;
    }
    tracing::info!(from = soft, to = want, "raised the open-file limit");
    want
}

/// Descriptors this process has open now.
pub fn open_fds() -> u64 {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count() as u64)
}

/// The open-file budget of the service.
#[derive(Debug)]
pub struct FdBudget {
    soft: AtomicU64,
}

impl FdBudget {
    /// A budget under the soft limit `soft`.
    pub fn new(soft: u64) -> Self {
        Self {
            soft: AtomicU64::new(soft),
        }
    }

    /// The soft limit.
    pub fn limit(&self) -> u64 {
        self.soft.load(Ordering::Relaxed)
    }

    /// Budget under a lower limit than the process's (tests; an operator's dry run). Never
    /// raises the real limit.
    pub fn set_limit(&self, soft: u64) {
        self.soft.store(soft, Ordering::Relaxed);
    }

    /// 503 unless `vms` more VMs fit under the limit, keeping [`FD_RESERVE`] free.
    pub fn check(&self, vms: usize) -> Result<(), ApiError> {
        self.check_vms(vms, false)
    }

    /// [`FdBudget::check`] for VMs that have a network when `network` (each needs
    /// [`FDS_PER_NETWORK`] more).
    pub fn check_vms(&self, vms: usize, network: bool) -> Result<(), ApiError> {
        let each = FDS_PER_CLONE + if network { FDS_PER_NETWORK } else { 0 };
        let limit = self.limit();
        let open = open_fds();
        let need = vms as u64 * each;
        if open + need + FD_RESERVE > limit {
            let fit = limit.saturating_sub(open + FD_RESERVE) / each;
            return Err(ApiError::Unavailable(format!(
                "the service has {open} of its {limit} open files in use; {vms} more VMs need about {need} (~{each} each) and {FD_RESERVE} stay in reserve, so at most {fit} fit now. No VM failed: delete VMs, or raise the open-file limit (ulimit -n / LimitNOFILE=) and restart the service"
            )));
        }
        Ok(())
    }
}

/// What a VM of `mem_bytes` is charged against `--max-guest-mem` at creation: its full size,
/// or `mem_bytes / overcommit` for a lazy clone (rounded up to 4 KiB).
pub fn charge_of(mem_bytes: u64, lazy_clone: bool, overcommit: f64) -> u64 {
    if !lazy_clone || overcommit <= 1.0 || !overcommit.is_finite() {
        return mem_bytes;
    }
    let c = (mem_bytes as f64 / overcommit).ceil() as u64;
    c.div_ceil(4096) * 4096
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charges_and_budgets() {
        assert_eq!(charge_of(256 << 20, false, 16.0), 256 << 20);
        assert_eq!(charge_of(256 << 20, true, 1.0), 256 << 20);
        assert_eq!(charge_of(256 << 20, true, 16.0), 16 << 20);
        assert_eq!(charge_of(64 << 20, true, 3.0) % 4096, 0);
        assert_eq!(charge_of(64 << 20, true, f64::NAN), 64 << 20);
        let open = open_fds();
        assert!(open > 2);
        let b = FdBudget::new(open + FD_RESERVE + 10 * FDS_PER_CLONE);
        b.check(5).unwrap();
        // Networked VMs need more each: 9 fit without a network, not with one.
        b.check_vms(9, false).unwrap();
        assert!(b.check_vms(9, true).is_err());
        let e = b.check(500).unwrap_err();
        assert_eq!(e.status(), axum::http::StatusCode::SERVICE_UNAVAILABLE);
        assert!(e.to_string().contains("No VM failed"), "{e}");
        let soft = raise_nofile(u64::MAX);
        assert_eq!(soft, nofile().unwrap().0);
    }
}
