//! `kscope serve`: the clone service's HTTP API (spec: `clone-server/openapi.yaml`).
//!
//! - [`serve`] runs the service until SIGTERM/SIGINT, then stops every VM;
//! - [`start`] starts it in-process and returns a [`Server`] handle (tests, benchmarks);
//! - VM operations block (KVM, vCPU threads) and run on tokio's blocking pool; the
//!   [`registry::Registry`] holds parents and clones with their limits and statistics.

pub mod auth;
pub mod clones;
pub mod error;
pub mod limits;
pub mod metrics;
pub mod registry;
pub mod routes;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::Context;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub use registry::Limits;

/// Default listen address (loopback only).
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8470";
/// Largest request body the API accepts.
pub const MAX_BODY: usize = 1 << 20;

/// Options of `kscope serve`.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Address to listen on (default [`DEFAULT_LISTEN`]).
    pub listen: SocketAddr,
    /// The bearer token; when `None` it is read from (or created in) `token_file`.
    pub token: Option<String>,
    /// Token file (default `<state_dir>/token`).
    pub token_file: Option<PathBuf>,
    /// State directory: token, snapshots (default `$XDG_STATE_HOME/kscope` or
    /// `~/.local/state/kscope`).
    pub state_dir: Option<PathBuf>,
    /// Limits on VMs, clones and guest memory.
    pub limits: Limits,
    /// Guest RAM of a VM created without `memory`.
    pub default_mem: u64,
    /// A request without a response for this long fails its VM.
    pub request_timeout: Duration,
    /// A VM not ready for this long fails to create.
    pub boot_timeout: Duration,
    /// Pre-created VM shells kept for lazy clones ([`kscope_vmm::pool::ShellPool`]), for the
    /// memory size of the most recently created parent or cloned VM; 0: no pool (the
    /// library default; `kscope serve --pool` defaults to 8).
    pub pool: usize,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            listen: DEFAULT_LISTEN.parse().expect("valid default address"),
            token: None,
            token_file: None,
            state_dir: None,
            limits: Limits::default(),
            default_mem: 64 << 20,
            request_timeout: Duration::from_secs(30),
            boot_timeout: Duration::from_secs(60),
            pool: 0,
        }
    }
}

/// The default state directory: `$XDG_STATE_HOME/kscope` or `~/.local/state/kscope`.
pub fn default_state_dir() -> anyhow::Result<PathBuf> {
    if let Some(x) = std::env::var_os("XDG_STATE_HOME").filter(|x| !x.is_empty()) {
        return Ok(PathBuf::from(x).join("kscope"));
    }
    let home = std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .context("neither XDG_STATE_HOME nor HOME is set: pass --state-dir")?;
    Ok(PathBuf::from(home).join(".local/state/kscope"))
}

/// What every handler shares.
pub struct AppState {
    /// The VMs.
    pub registry: Arc<registry::Registry>,
    /// Counters and histograms.
    pub metrics: metrics::Metrics,
    /// The options the service runs with.
    pub opts: ServeOptions,
    /// State directory.
    pub state_dir: PathBuf,
    /// The open-file budget (soft RLIMIT_NOFILE, raised at start).
    pub fds: limits::FdBudget,
    /// Pre-created VM shells for lazy clones (`None` when [`ServeOptions::pool`] is 0).
    pub pool: Option<Arc<kscope_vmm::pool::ShellPool>>,
    kernel: OnceLock<Arc<[u8]>>,
    disk: OnceLock<Arc<[u8]>>,
}

impl AppState {
    /// The guest kernel (shared by every VM).
    pub fn kernel(&self) -> Arc<[u8]> {
        self.kernel
            .get_or_init(|| Arc::from(kscope_guest::KERNEL_ELF))
            .clone()
    }

    /// The workload image (built on first use; blocking).
    pub fn disk(&self) -> Arc<[u8]> {
        self.disk
            .get_or_init(|| Arc::from(kscope_workloads::default_image()))
            .clone()
    }
}

/// A running service.
pub struct Server {
    addr: SocketAddr,
    token: String,
    state: Arc<AppState>,
    routes: routes::RouteTable,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<std::io::Result<()>>,
}

impl Server {
    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The bearer token.
    pub fn token(&self) -> &str {
        &self.token
    }

    /// Every route the router serves, with its methods.
    pub fn routes(&self) -> &routes::RouteTable {
        &self.routes
    }

    /// The shared state (registry, metrics).
    pub fn state(&self) -> &Arc<AppState> {
        &self.state
    }

    /// Stop accepting requests, finish the ones in progress, then stop every VM.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        (&mut self.task)
            .await
            .context("the server task panicked")?
            .context("the server failed")?;
        stop_all(&self.state).await;
        Ok(())
    }
}

/// Stop and remove every VM.
pub async fn stop_all(state: &Arc<AppState>) {
    let vms = state.registry.drain();
    if vms.is_empty() {
        return;
    }
    let n = vms.len();
    let res = tokio::task::spawn_blocking(move || {
        for e in vms {
            if let Err(err) = e.vm.stop() {
                tracing::warn!(vm = %e.id, "stopping failed: {err}");
            }
        }
    })
    .await;
    if res.is_err() {
        tracing::error!("stopping the VMs panicked");
    }
    tracing::info!("stopped {n} VMs");
}

/// Start the service in the background (listening once this returns).
pub async fn start(opts: ServeOptions) -> anyhow::Result<Server> {
    let state_dir = match &opts.state_dir {
        Some(d) => d.clone(),
        None => default_state_dir()?,
    };
    let token = match &opts.token {
        Some(t) => {
            auth::validate(t)?;
            t.clone()
        }
        None => {
            let path = opts
                .token_file
                .clone()
                .unwrap_or_else(|| state_dir.join("token"));
            auth::load_or_create(&path)?
        }
    };
    let listener = tokio::net::TcpListener::bind(opts.listen)
        .await
        .with_context(|| {
            format!(
                "cannot listen on {}: pick a free address with --listen",
                opts.listen
            )
        })?;
    let addr = listener.local_addr()?;
    if !addr.ip().is_loopback() {
        tracing::warn!(%addr, "listening on a non-loopback address: anyone who can reach it and has the token controls VMs");
    }
    let nofile = limits::raise_nofile(1 << 20);
    clean_snapshot_leftovers(&state_dir);
    let pool = match opts.pool {
        0 => None,
        n => Some(Arc::new(kscope_vmm::pool::ShellPool::new(n).context(
            "starting the pool of pre-created VMs (--pool 0 runs without it)",
        )?)),
    };
    let state = Arc::new(AppState {
        pool,
        registry: registry::Registry::new(opts.limits),
        metrics: metrics::Metrics::default(),
        fds: limits::FdBudget::new(nofile),
        opts,
        state_dir,
        kernel: OnceLock::new(),
        disk: OnceLock::new(),
    });
    let (app, table) = routes::router(state.clone(), Arc::from(token.as_str()));
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = rx.await;
            })
            .await
    });
    tracing::info!(%addr, "kscope API listening");
    Ok(Server {
        addr,
        token,
        state,
        routes: table,
        stop: Some(tx),
        task,
    })
}

/// Removes what snapshot writers killed mid-write left in the snapshot directories.
fn clean_snapshot_leftovers(state_dir: &std::path::Path) {
    let Ok(dirs) = std::fs::read_dir(state_dir.join("snapshots")) else {
        return;
    };
    for d in dirs.flatten() {
        for p in kscope_vmm::snapfile::clean_leftovers(&d.path()) {
            tracing::info!(file = %p.display(), "removed the leftover of an interrupted snapshot write");
        }
    }
}

async fn signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::warn!("cannot watch SIGTERM: {e}");
                std::future::pending::<()>().await
            }
        }
    };
    tokio::select! {
        _ = term => {},
        _ = tokio::signal::ctrl_c() => {},
    }
}

/// Run the service until SIGTERM or SIGINT, then stop every VM.
pub async fn serve(opts: ServeOptions) -> anyhow::Result<()> {
    let server = start(opts).await?;
    eprintln!(
        "kscope API on http://{} (token file or --token; try: curl -H 'Authorization: Bearer <token>' http://{}/v1/vms)",
        server.addr(),
        server.addr()
    );
    signal().await;
    tracing::info!("shutting down: stopping every VM");
    server.shutdown().await
}
