//! Threads started ahead of time: a [`Parked`] thread waits for one job, so that a VM made from a
//! pooled shell ([`crate::pool`]) does not pay for `clone(2)`, a stack mapping and the thread's
//! start while its clone call waits. A [`Worker`] is the handle of a thread running a job,
//! started either way; joining it gives the job's result.

use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The operating system refused a thread.
    #[error("cannot start thread {name}: {source}; raise the process's thread limit (ulimit -u, systemd TasksMax) or run fewer VMs")]
    Spawn {
        /// The thread's name.
        name: String,
        /// Why.
        source: std::io::Error,
    },
}

type Job = Box<dyn FnOnce() + Send>;

/// A started thread waiting for one job ([`Parked::run`]). Dropping it without a job ends and
/// joins the thread.
#[derive(Debug)]
pub struct Parked {
    tx: Option<mpsc::Sender<Job>>,
    handle: Option<JoinHandle<()>>,
}

impl Parked {
    /// Start a thread that waits for a job.
    pub fn start() -> Result<Parked, WorkerError> {
        let (tx, rx) = mpsc::channel::<Job>();
        let name = "kscope-parked";
        let handle = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                if let Ok(job) = rx.recv() {
                    job();
                }
            })
            .map_err(|source| WorkerError::Spawn {
                name: name.into(),
                source,
            })?;
        Ok(Parked {
            tx: Some(tx),
            handle: Some(handle),
        })
    }

    /// Run `f` on this thread, named `name` (as the kernel shows it: at most 15 bytes).
    pub fn run<T, F>(mut self, name: &str, f: F) -> Worker<T>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let slot = Arc::new(Mutex::new(None));
        let put = slot.clone();
        let cname =
            std::ffi::CString::new(name.as_bytes().iter().copied().take(15).collect::<Vec<_>>())
                .unwrap_or_default();
        let job: Job = Box::new(move || {
            // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes from a
            // live CString and renames the calling thread only.
            unsafe { libc::prctl(libc::PR_SET_NAME, cname.as_ptr()) };
            let r = f();
            *put.lock().unwrap_or_else(|p| p.into_inner()) = Some(r);
        });
        let tx = self.tx.take().expect("a parked thread runs one job");
        let handle = self.handle.take().expect("a parked thread runs one job");
        match tx.send(job) {
            Ok(()) => Worker::Parked {
                handle,
                result: slot,
            },
            // The thread is gone (it cannot be: it only ends after a job or when its sender
            // drops); run the job on a thread of its own.
            Err(mpsc::SendError(job)) => {
                let _ = handle.join();
                match std::thread::Builder::new().name(name.into()).spawn(job) {
                    Ok(handle) => Worker::Parked {
                        handle,
                        result: slot,
                    },
                    Err(e) => {
                        tracing::error!("cannot start thread {name}: {e}");
                        Worker::Failed
                    }
                }
            }
        }
    }
}

impl Drop for Parked {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// A thread running a job.
#[derive(Debug)]
pub enum Worker<T> {
    /// Started for the job.
    Own(JoinHandle<T>),
    /// A [`Parked`] thread running it.
    Parked {
        /// The thread.
        handle: JoinHandle<()>,
        /// The job's result, set when it returns.
        result: Arc<Mutex<Option<T>>>,
    },
    /// No thread could run it (logged).
    Failed,
}

impl<T: Send + 'static> Worker<T> {
    /// Start a thread named `name` for `f`, or take `parked` when given.
    pub fn start<F>(name: &str, parked: Option<Parked>, f: F) -> Result<Worker<T>, WorkerError>
    where
        F: FnOnce() -> T + Send + 'static,
    {
        match parked {
            Some(p) => Ok(p.run(name, f)),
            None => std::thread::Builder::new()
                .name(name.into())
                .spawn(f)
                .map(Worker::Own)
                .map_err(|source| WorkerError::Spawn {
                    name: name.into(),
                    source,
                }),
        }
    }

    /// Wait for the job; `Err` if it panicked (or never ran).
    pub fn join(self) -> std::thread::Result<T> {
        match self {
            Worker::Own(h) => h.join(),
            Worker::Parked { handle, result } => {
                handle.join()?;
                let r = result.lock().unwrap_or_else(|p| p.into_inner()).take();
                r.ok_or_else(|| Box::new("the job did not return") as Box<dyn std::any::Any + Send>)
            }
            Worker::Failed => Err(Box::new("no thread ran the job")),
        }
    }

    /// True once the job has returned.
    pub fn is_finished(&self) -> bool {
        match self {
            Worker::Own(h) => h.is_finished(),
            Worker::Parked { handle, .. } => handle.is_finished(),
            Worker::Failed => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parked_thread_runs_one_job_with_its_name() {
        let p = Parked::start().unwrap();
        let w = p.run("kscope-test-named-thread", || {
            std::fs::read_to_string("/proc/thread-self/comm").unwrap()
        });
        assert_eq!(w.join().unwrap().trim(), "kscope-test-nam");
    }

    #[test]
    fn own_thread_and_panics_are_reported() {
        let w = Worker::start("t", None, || 7).unwrap();
        assert_eq!(w.join().unwrap(), 7);
        let w: Worker<()> =
            Worker::start("t", Some(Parked::start().unwrap()), || panic!("x")).unwrap();
        assert!(w.join().is_err());
    }
}
