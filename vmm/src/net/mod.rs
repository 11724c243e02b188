//! Guest networking on the host: a network namespace that kscope creates and owns
//! (`kscope-<pid>`), a bridge inside it with the host side's address, and one tap device per
//! VM on that bridge. Nothing is attached to the host's real interfaces; processes reach the
//! VMs only from inside the namespace ([`Network::connect`], `ip netns exec`), and the VMs
//! cannot reach the host's loopback (another namespace).
//!
//! Address plan (one /16 per namespace): booted VMs `10.0.255.x`, clones
//! [`crate::clone::identity_for`] (`10.0.a.b`), the bridge [`BRIDGE_IP`].
//!
//! Cleanup: taps vanish with their descriptors (also on SIGKILL); the namespace is deleted by
//! [`Network::shutdown`], at normal process exit, and by the next kscope process that finds
//! it with its owner gone ([`sweep_leftovers`]).

pub mod pool;
pub mod tap;

use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use kscope_guest::abi::boot::Identity;
pub use pool::{PoolStats, TapPool};
pub use tap::Tap;

/// Errors of host networking setup.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// A system call failed.
    #[error(
        "{what} {name}: {err} (guest networking needs root, /dev/net/tun and `ip` from iproute2)"
    )]
    Sys {
        /// What was done.
        what: &'static str,
        /// The interface or namespace.
        name: String,
        /// The error.
        err: std::io::Error,
    },
    /// An `ip` command failed.
    #[error("`ip {args}` failed: {msg} (is iproute2 installed and are we root?)")]
    Ip {
        /// Its arguments.
        args: String,
        /// Its output.
        msg: String,
    },
}

/// Prefix of the namespaces kscope creates (`kscope-<pid>`).
pub const NETNS_PREFIX: &str = "kscope-";
/// The bridge inside the namespace.
pub const BRIDGE: &str = "kbr0";
/// The bridge's address (the host side of the VMs' network).
pub const BRIDGE_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 255, 254);
/// Prefix length of the VMs' network.
pub const PREFIX_LEN: u8 = 16;
/// Tap name pattern.
const TAP_PATTERN: &str = "kst%d";
/// Taps kept ready for clones.
pub const POOL_TARGET: usize = 8;

fn run_ip(args: &[&str]) -> Result<(), NetError> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| NetError::Ip {
            args: args.join(" "),
            msg: e.to_string(),
        })?;
    if !out.status.success() {
        return Err(NetError::Ip {
            args: args.join(" "),
            msg: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

fn netns_path(name: &str) -> PathBuf {
    PathBuf::from("/run/netns").join(name)
}

/// Delete namespace `name` (unmount and remove its file). Taps inside go with it once no
/// process holds them.
fn delete_netns(name: &str) {
    let _ = run_ip(&["netns", "del", name]);
}

/// Delete every `kscope-<pid>` namespace whose process is gone (left by a killed kscope).
/// Returns the names removed.
pub fn sweep_leftovers() -> Vec<String> {
    let mut removed = Vec::new();
    let Ok(dir) = std::fs::read_dir("/run/netns") else {
        return removed;
    };
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(NETNS_PREFIX)
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        // SAFETY: kill with signal 0 only checks whether the process exists.
        let alive = unsafe { libc::kill(pid, 0) } == 0
            || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
        if !alive {
            delete_netns(&name);
            removed.push(name);
        }
    }
    removed
}

/// The namespace, its bridge and the tap pool of this process.
#[derive(Debug)]
pub struct Network {
    name: String,
    pool: TapPool,
    next_boot_host: AtomicU64,
    closed: Mutex<bool>,
}

static GLOBAL: OnceLock<Result<Arc<Network>, String>> = OnceLock::new();

extern "C" fn delete_at_exit() {
    if let Some(Ok(n)) = GLOBAL.get() {
        n.shutdown();
    }
}

impl Network {
    /// This process's network, created on first use (sweeping leftovers first).
    pub fn get() -> Result<Arc<Network>, String> {
        GLOBAL
            .get_or_init(|| {
                let swept = sweep_leftovers();
                if !swept.is_empty() {
                    tracing::info!("removed leftover namespaces {swept:?}");
                }
                let n = Network::create().map_err(|e| e.to_string())?;
                // SAFETY: registers a plain extern "C" function without arguments.
                unsafe { libc::atexit(delete_at_exit) };
                Ok(Arc::new(n))
            })
            .clone()
    }

    fn create() -> Result<Network, NetError> {
        let name = format!("{NETNS_PREFIX}{}", std::process::id());
        if netns_path(&name).exists() {
            delete_netns(&name);
        }
        run_ip(&["netns", "add", &name])?;
        let setup = || -> Result<(), NetError> {
            run_ip(&["-n", &name, "link", "set", "lo", "up"])?;
            run_ip(&["-n", &name, "link", "add", BRIDGE, "type", "bridge"])?;
            let cidr = format!("{BRIDGE_IP}/{PREFIX_LEN}");
            run_ip(&["-n", &name, "addr", "add", &cidr, "dev", BRIDGE])?;
            run_ip(&["-n", &name, "link", "set", BRIDGE, "up"])?;
            Ok(())
        };
        if let Err(e) = setup() {
            delete_netns(&name);
            return Err(e);
        }
        let ns = name.clone();
        let pool = TapPool::new(POOL_TARGET, move || create_tap_in(&ns));
        Ok(Network {
            name,
            pool,
            next_boot_host: AtomicU64::new(1),
            closed: Mutex::new(false),
        })
    }

    /// The namespace's name (for `ip netns exec`).
    pub fn netns(&self) -> &str {
        &self.name
    }

    /// A tap for a new VM: from the pool (a clone does not wait for device creation) or
    /// created now when the pool is empty.
    pub fn tap(&self) -> Result<Tap, NetError> {
        self.pool.take()
    }

    /// Pool hits and misses so far.
    pub fn pool_stats(&self) -> PoolStats {
        self.pool.stats()
    }

    /// The identity of the next booted VM (`10.0.255.x`).
    pub fn boot_identity(&self, name: &str) -> Identity {
        let k = self.next_boot_host.fetch_add(1, Ordering::Relaxed) % 253 + 1;
        let mut id = Identity {
            mac: [0x52, 0x54, 0x00, 0xff, 0x00, k as u8, 0, 0],
            ipv4: [10, 0, 255, k as u8],
            prefix_len: PREFIX_LEN as u32,
            hostname: [0; 32],
        };
        let n = name.len().min(31);
        id.hostname[..n].copy_from_slice(&name.as_bytes()[..n]);
        id
    }

    /// Run `f` on a thread inside the namespace.
    pub fn run_in<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T, NetError> {
        run_in_netns(&self.name, f)
    }

    /// A TCP connection from inside the namespace to `addr` (a VM).
    pub fn connect(&self, addr: SocketAddr, timeout: Duration) -> std::io::Result<TcpStream> {
        self.run_in(|| TcpStream::connect_timeout(&addr, timeout))
            .map_err(std::io::Error::other)?
    }

    /// Delete the namespace (idempotent). VMs still running lose their network.
    pub fn shutdown(&self) {
        let mut c = self.closed.lock().unwrap_or_else(|p| p.into_inner());
        if !*c {
            *c = true;
            self.pool.clear();
            delete_netns(&self.name);
        }
    }
}

/// Run `f` on a new thread whose network namespace is `/run/netns/<name>`.
pub fn run_in_netns<T: Send>(name: &str, f: impl FnOnce() -> T + Send) -> Result<T, NetError> {
    let path = netns_path(name);
    std::thread::scope(|s| {
        s.spawn(|| {
            let file = std::fs::File::open(&path).map_err(|err| NetError::Sys {
                what: "open namespace",
                name: path.display().to_string(),
                err,
            })?;
            // SAFETY: setns on a namespace file descriptor we hold; it changes only the
            // network namespace of this (short-lived, scoped) thread.
            let rc =
                unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET) };
            if rc < 0 {
                return Err(NetError::Sys {
                    what: "setns",
                    name: path.display().to_string(),
                    err: std::io::Error::last_os_error(),
                });
            }
            Ok(f())
        })
        .join()
        .unwrap_or_else(|_| {
            Err(NetError::Sys {
                what: "namespace thread panicked",
                name: path.display().to_string(),
                err: std::io::Error::other("panic"),
            })
        })
    })
}

fn create_tap_in(ns: &str) -> Result<Tap, NetError> {
    run_in_netns(ns, || {
        let tap = Tap::create(TAP_PATTERN)?;
        tap::link_up(tap.name(), Some(BRIDGE))?;
        Ok(tap)
    })?
}

/// Everything a VM's virtio-net device needs: its tap and its address.
#[derive(Clone, Debug)]
pub struct NetAttach {
    /// The tap (shared by nothing else).
    pub tap: Arc<Tap>,
    /// MAC address.
    pub mac: [u8; 6],
    /// IPv4 address.
    pub ip: Ipv4Addr,
    /// Prefix length.
    pub prefix_len: u8,
    /// The network (to get taps for clones).
    pub network: Arc<Network>,
}

impl NetAttach {
    /// A tap from `network` with address `id`.
    pub fn new(network: Arc<Network>, id: &Identity) -> Result<NetAttach, NetError> {
        let tap = Arc::new(network.tap()?);
        let mut mac = [0u8; 6];
        mac.copy_from_slice(&id.mac[..6]);
        Ok(NetAttach {
            tap,
            mac,
            ip: Ipv4Addr::from(id.ipv4),
            prefix_len: id.prefix_len as u8,
            network,
        })
    }
}
