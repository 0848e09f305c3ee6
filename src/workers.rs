//! The serving threads: one single-threaded tokio runtime per core.
//!
//! The accept loop (see `listen`) hands each new connection to the next worker, and from then
//! on the connection, every request on it, the task that runs its pipeline and its upstream
//! call (each worker thread has its own pool of connections to Bedrock, see `upstream`) all
//! run on that one thread. A request thus wakes no other thread of the proxy except the ledger
//! writer's, where a work-stealing runtime would wake an idle worker at almost every step (the
//! accept, the request, the upstream response, the answer) to look for work and find none: at
//! the few requests a second developers make, those wake-ups were most of the proxy's CPU and
//! latency.
//!
//! What this module must never do: run anything but tasks (no blocking call on a worker: use
//! `spawn_blocking`, which each worker has), or move a task once it runs. Dropping [`Workers`]
//! (or [`Workers::stop`]) ends every task still on them, which records its row on the way
//! (see `observe`), and waits for that.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::runtime::Handle;

/// How long a stopping worker waits for its `spawn_blocking` work before it lets go.
const STOP_WAIT: Duration = Duration::from_secs(2);

/// The worker threads and a handle to spawn on each.
pub struct Workers {
    handles: Vec<Handle>,
    threads: Vec<(tokio::sync::oneshot::Sender<()>, JoinHandle<()>)>,
    next: AtomicUsize,
}

impl std::fmt::Debug for Workers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Workers")
            .field("threads", &self.handles.len())
            .finish_non_exhaustive()
    }
}

impl Workers {
    /// One worker per core this process may use (`available_parallelism`, which reads a
    /// container's CPU quota), at least one.
    pub fn per_core() -> std::io::Result<Workers> {
        Workers::start(std::thread::available_parallelism().map_or(1, usize::from))
    }

    /// Starts `n` (at least one) worker threads, each running a current-thread runtime until
    /// it is stopped.
    pub fn start(n: usize) -> std::io::Result<Workers> {
        let mut workers = Workers {
            handles: Vec::new(),
            threads: Vec::new(),
            next: AtomicUsize::new(0),
        };
        for i in 0..n.max(1) {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .thread_name(format!("worker-{i}-blocking"))
                .build()?;
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            workers.handles.push(runtime.handle().clone());
            let thread = std::thread::Builder::new()
                .name(format!("worker-{i}"))
                .spawn(move || {
                    runtime.block_on(async {
                        let _ = stopped.await;
                    });
                    runtime.shutdown_timeout(STOP_WAIT);
                })?;
            workers.threads.push((stop, thread));
        }
        Ok(workers)
    }

    /// The worker the next connection goes to, in turn.
    pub fn next(&self) -> &Handle {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.handles.len();
        &self.handles[i]
    }

    /// How many worker threads there are (at least one).
    pub fn threads(&self) -> usize {
        self.handles.len()
    }

    /// Stops every worker: the tasks still on them are dropped (each request records its row
    /// as it goes), and this returns once every worker thread has ended.
    pub fn stop(mut self) {
        self.stop_all();
    }

    fn stop_all(&mut self) {
        let threads: Vec<JoinHandle<()>> = std::mem::take(&mut self.threads)
            .into_iter()
            .map(|(stop, thread)| {
                let _ = stop.send(());
                thread
            })
            .collect();
        for thread in threads {
            let _ = thread.join();
        }
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.stop_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_go_to_each_worker_in_turn_and_stay_on_its_thread() {
        let workers = Workers::start(2).unwrap();
        let names: Vec<String> = (0..4)
            .map(|_| {
                let handle = workers.next().clone();
                let (tx, rx) = std::sync::mpsc::channel();
                handle.spawn(async move {
                    let before = std::thread::current().name().map(str::to_string);
                    tokio::task::yield_now().await;
                    // A task it spawns runs on the same thread too.
                    let inner =
                        tokio::spawn(async { std::thread::current().name().map(str::to_string) })
                            .await
                            .unwrap();
                    let after = std::thread::current().name().map(str::to_string);
                    assert_eq!(before, after);
                    assert_eq!(before, inner);
                    tx.send(before.unwrap_or_default()).unwrap();
                });
                rx.recv_timeout(Duration::from_secs(5)).unwrap()
            })
            .collect();
        assert_eq!(names, ["worker-0", "worker-1", "worker-0", "worker-1"]);
        workers.stop();
    }

    #[test]
    fn stopping_drops_the_tasks_still_running() {
        struct Dropped(std::sync::mpsc::Sender<()>);
        impl Drop for Dropped {
            fn drop(&mut self) {
                let _ = self.0.send(());
            }
        }
        let workers = Workers::start(1).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let guard = Dropped(tx);
        workers.next().spawn(async move {
            let _guard = guard;
            std::future::pending::<()>().await;
        });
        workers.stop();
        rx.recv_timeout(Duration::from_secs(1))
            .expect("the pending task was dropped by the time stop returned");
    }
}
