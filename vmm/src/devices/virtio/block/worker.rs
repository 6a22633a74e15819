//! The block device's I/O threads.
//!
//! The event loop validates a chain's layout and hands the request to this pool; a worker thread
//! executes it against the backing file (`pread`/`pwrite`/`fdatasync` straight into guest
//! memory), writes the status byte and queues a [`Completion`]; the event loop, woken by
//! [`IoPool::done_event`], returns completions to the used ring. So a guest at queue depth 16 gets
//! up to [`MAX_WORKERS`] host I/Os in flight instead of one at a time, and it already handles the
//! first completions while later ones still run. Threads start on demand, up to [`MAX_WORKERS`]
//! per disk (QEMU's `aio=threads` pool works the same way), and live until the device is dropped.
//!
//! Workers never take the device lock: they share only this pool's queue with the event loop and
//! the vCPU threads, so a reset (on a vCPU thread, under the device lock) can wait for them.

use std::collections::VecDeque;
use std::io;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tracing::warn;
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

use super::super::health::{warn_limited, LogLimit};
use super::super::GuestMemory;
use super::request::{self, Disk, Done, RequestChain, RequestError};

/// Worker threads per disk, at most.
pub const MAX_WORKERS: usize = 8;
/// A worker only runs `pread`/`pwrite` and formats the odd log line.
const WORKER_STACK: usize = 256 * 1024;

/// A validated request waiting for a worker.
pub struct Job {
    /// The driver instance it belongs to (see [`Completion::epoch`]).
    pub epoch: u64,
    pub head: u16,
    pub chain: RequestChain,
    pub status: GuestAddress,
    pub mem: Arc<GuestMemory>,
}

/// An executed request, ready for the used ring.
#[derive(Debug)]
pub struct Completion {
    /// Completions of an earlier driver instance (before a reset) are dropped.
    pub epoch: u64,
    pub head: u16,
    pub result: Result<Done, RequestError>,
    /// Data bytes written to the guest plus the status byte; 0 if the status byte could not be
    /// written.
    pub used_len: u32,
}

#[derive(Default)]
struct State {
    queue: VecDeque<Job>,
    /// Jobs a worker has taken and not yet completed.
    running: usize,
    workers: usize,
    idle: usize,
    done: Vec<Completion>,
    shutdown: bool,
    /// Failed thread starts (one per request at worst).
    spawn_log: LogLimit,
}

struct Shared {
    disk: Disk,
    state: Mutex<State>,
    /// Wakes idle workers.
    work: Condvar,
    /// Signalled when nothing is queued or running any more.
    settled: Condvar,
    done_evt: EventFd,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A worker never panics while holding the lock (it only moves jobs and completions), but
        // if one did, the queue is still consistent.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The workers are detached: they hold their own `Arc<Shared>` and end once the pool is dropped
/// and their current request is done.
pub struct IoPool {
    shared: Arc<Shared>,
}

impl IoPool {
    pub fn new(disk: Disk) -> io::Result<Self> {
        Ok(Self {
            shared: Arc::new(Shared {
                disk,
                state: Mutex::new(State::default()),
                work: Condvar::new(),
                settled: Condvar::new(),
                done_evt: EventFd::new(libc::EFD_NONBLOCK)?,
            }),
        })
    }

    pub fn disk(&self) -> &Disk {
        &self.shared.disk
    }

    /// Readable when completions are waiting in [`Self::take_done`].
    pub fn done_event(&self) -> &EventFd {
        &self.shared.done_evt
    }

    /// Worker threads started so far.
    pub fn workers(&self) -> usize {
        self.shared.lock().workers
    }

    /// Queues `job`, starting a worker if none is idle and the pool is not full. If no worker
    /// exists and none can be started, the job runs here, on the caller's thread: a request is
    /// never lost.
    pub fn submit(&mut self, job: Job) {
        let shared = &self.shared;
        let mut st = shared.lock();
        st.queue.push_back(job);
        // Woken workers are still counted idle until they take a job, so compare with the jobs
        // nobody has taken yet.
        if st.queue.len() > st.idle && st.workers < MAX_WORKERS {
            match spawn_worker(shared) {
                Ok(()) => st.workers += 1,
                Err(e) if st.workers == 0 => {
                    warn_limited!(
                        st.spawn_log,
                        "virtio-blk: cannot start an I/O thread, executing inline: {e}"
                    );
                    let jobs: Vec<Job> = st.queue.drain(..).collect();
                    drop(st);
                    let done: Vec<Completion> =
                        jobs.into_iter().map(|j| execute(&shared.disk, j)).collect();
                    shared.lock().done.extend(done);
                    signal(&shared.done_evt);
                    return;
                }
                Err(e) => warn_limited!(
                    st.spawn_log,
                    "virtio-blk: cannot start another I/O thread: {e}"
                ),
            }
        }
        drop(st);
        shared.work.notify_one();
    }

    /// Completions so far, in the order they finished.
    pub fn take_done(&self) -> Vec<Completion> {
        let _ = self.shared.done_evt.read();
        std::mem::take(&mut self.shared.lock().done)
    }

    /// Drops the queued jobs and waits up to `timeout` for the running ones; returns whether
    /// none is still running. Their completions are left in [`Self::take_done`].
    pub fn cancel(&self, timeout: Duration) -> bool {
        self.shared.lock().queue.clear();
        self.wait_idle(timeout)
    }

    /// Waits up to `timeout` until no job is queued or running; returns whether that happened.
    pub fn wait_idle(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut st = self.shared.lock();
        while st.running > 0 || !st.queue.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            st = self
                .shared
                .settled
                .wait_timeout(st, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        true
    }
}

impl Drop for IoPool {
    /// Drops the queued jobs and stops the workers without waiting for them: a request stuck on
    /// the host (a hung network file system) must not hang the VMM's exit. A worker still running
    /// holds its own references to the disk and guest memory, and ends after its request.
    fn drop(&mut self) {
        let mut st = self.shared.lock();
        st.shutdown = true;
        st.queue.clear();
        drop(st);
        self.shared.work.notify_all();
    }
}

/// Starts a detached worker (see [`IoPool`]).
fn spawn_worker(shared: &Arc<Shared>) -> io::Result<()> {
    let shared = shared.clone();
    std::thread::Builder::new()
        .name("blk-io".into())
        .stack_size(WORKER_STACK)
        .spawn(move || worker(&shared))
        .map(drop)
}

fn worker(shared: &Shared) {
    loop {
        let job = {
            let mut st = shared.lock();
            loop {
                if let Some(job) = st.queue.pop_front() {
                    st.running += 1;
                    break job;
                }
                if st.shutdown {
                    return;
                }
                st.idle += 1;
                st = shared.work.wait(st).unwrap_or_else(|e| e.into_inner());
                st.idle -= 1;
            }
        };
        let (epoch, head) = (job.epoch, job.head);
        // A panic would leave `running` counted forever (a reset would then always time out):
        // turn it into a failed request.
        let c =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| execute(&shared.disk, job)))
                .unwrap_or_else(|_| Completion {
                    epoch,
                    head,
                    result: Err(RequestError::Io("the I/O thread panicked".into())),
                    used_len: 0,
                });
        let mut st = shared.lock();
        st.running -= 1;
        // One wake-up per batch: the event loop takes all completions at once.
        let first = st.done.is_empty();
        st.done.push(c);
        if st.running == 0 && st.queue.is_empty() {
            shared.settled.notify_all();
        }
        drop(st);
        if first {
            signal(&shared.done_evt);
        }
    }
}

fn signal(evt: &EventFd) {
    if let Err(e) = evt.write(1) {
        warn!("virtio-blk: cannot signal an I/O completion: {e}");
    }
}

/// Runs one request and writes its status byte.
fn execute(disk: &Disk, job: Job) -> Completion {
    let result = disk.execute(&job.mem, &job.chain);
    let (status, data_len) = match &result {
        Ok(done) => (request::status_ok(), done.to_guest),
        Err(e) => (e.status(), 0),
    };
    // Cannot fail for a validated chain (its memory was checked), but never trust it.
    let used_len = if request::write_status(&job.mem, job.status, status) {
        data_len.saturating_add(1)
    } else {
        0
    };
    Completion {
        epoch: job.epoch,
        head: job.head,
        result,
        used_len,
    }
}
