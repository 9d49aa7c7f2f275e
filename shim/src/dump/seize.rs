//! Seizing a tree: PTRACE_SEIZE + PTRACE_INTERRUPT on every thread, until
//! the set of tasks is stable. Dropping a `SeizedTree` detaches every task,
//! which resumes untouched.
//!
//! **Thread rule.** ptrace binds a tracee to the tracer *thread*: every
//! method here must be called from the thread that seized (the kernel would
//! answer ESRCH to any other). `SeizedTree` and `PendingSeize` are `!Send`
//! for that reason, and every method checks the calling thread and fails with
//! [`SeizeError::WrongThread`] otherwise. If the seizing thread exits, the
//! kernel detaches its tracees, which then run on.
//!
//! **Plain trees** ([`SeizedTree::seize_tree`]): scan the root, its threads
//! (/proc/PID/task) and, through every thread's
//! /proc/PID/task/TID/children, all descendants; seize and interrupt every
//! task not yet seized, wait for their stops, and scan again until a scan
//! finds nothing new. A stopped task cannot create tasks, so the final scan
//! is the whole tree. No PTRACE_O_TRACECLONE: tasks created meanwhile are
//! found by the next scan instead. Tasks seized earlier but absent from the
//! final scan (reparented out of the tree) are detached.
//!
//! **Signals met while seizing.** After PTRACE_INTERRUPT a task may first
//! report a signal-delivery-stop (a signal it dequeued before the trap). The
//! signal is not lost and not postponed: it is re-issued with PTRACE_CONT and
//! the task, whose interrupt trap is still pending, stops right after the
//! kernel has delivered it (entered the handler, or applied the default
//! action). This is what CRIU does; the dump then sees the state just after
//! delivery, which is one the task would have reached anyway, and detach
//! needs no signal passed back. A stop signal makes the task group-stop; it
//! stays stopped after detach, as it would have.
//!
//! **Zombies.** A descendant that has exited but is not reaped yet (found
//! in its parent's /proc/PID/task/TID/children; with a cgroup, under a
//! member: the kernel lists no zombie in cgroup.procs) is recorded as a
//! [`ZombieChild`], never seized: nothing of it is left but its identity
//! and exit status, and its parent, stopped, cannot reap it meanwhile. A
//! process whose last threads are still exiting is looked at again until
//! it is a plain zombie. A live process that dies while being seized is
//! found as a zombie by the next scan.
//!
//! **Refused** (nothing stays seized): a pid that does not exist, a zombie
//! as the root of the dump (there is nothing to restore it under), a
//! process whose thread-group leader exited before its other threads, a
//! kernel thread, a task another tracer holds (named), and the dumper itself.
//!
//! **Frozen cgroups** ([`SeizedTree::seize_frozen`] then, after the caller
//! thaws, [`PendingSeize::wait_stopped`]). Checked on this machine (kernel
//! 6.18, tests `seize_frozen_v1_freezer` / `seize_frozen_v2_cgroup_freeze`
//! below):
//! - v1 freezer (`freezer.state` = FROZEN): PTRACE_SEIZE and PTRACE_INTERRUPT
//!   succeed on frozen tasks, but they do not stop while frozen (a `waitpid`
//!   with WNOHANG reports nothing); after `THAWED` every task enters its
//!   PTRACE_EVENT_STOP without running user code.
//! - v2 (`cgroup.freeze` = 1): PTRACE_SEIZE and PTRACE_INTERRUPT succeed; a
//!   v2-frozen task sits in the signal-delivery path, so the interrupt trap
//!   is taken at once and the task reports its PTRACE_EVENT_STOP *while the
//!   cgroup stays frozen* (a ptrace stop counts as frozen). Thawing leaves
//!   the tasks in their ptrace stops.
//!
//! So seize → thaw → wait works for both, which is how the caller uses it.
//! A `PendingSeize` dropped without `wait_stopped` detaches the tasks that
//! have stopped; tasks still frozen cannot be detached (PTRACE_DETACH needs a
//! stopped tracee) and are released by the kernel when the seizing thread
//! exits.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::io::ErrorKind;
use std::marker::PhantomData;
use std::path::PathBuf;

use nix::errno::Errno;

use crate::sys::ptrace::{self, PtraceError, SeizeOptions, WaitStatus};

/// How many signal-delivery-stops one task may report before its interrupt
/// trap before we give up on it.
const MAX_SIGNALS_BEFORE_STOP: u32 = 1000;
/// How many scan rounds before declaring the tree unstable (a fork bomb).
const MAX_SCAN_ROUNDS: u32 = 1000;
/// PF_KTHREAD in the flags field of /proc/PID/stat.
const PF_KTHREAD: u64 = 0x0020_0000;

/// One seized process: its pid and the tids of all its threads (leader first).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeizedProcess {
    pub pid: i32,
    /// Parent pid at seize time.
    pub ppid: i32,
    pub tids: Vec<i32>,
}

/// A zombie of the tree: recorded, not seized.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ZombieChild {
    pub pid: i32,
    /// Its parent, a seized process of the tree (which has not reaped it).
    pub ppid: i32,
}

/// What a scanned process is, seen before it is seized.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Liveness {
    Live,
    /// Every thread has exited; the leader waits to be reaped.
    Zombie,
    /// The leader has exited and its other threads are exiting too.
    Exiting,
    /// Gone, or being reaped right now (state X).
    Gone,
}

#[derive(Debug, thiserror::Error)]
pub enum SeizeError {
    #[error("no such process: pid {pid}")]
    NoSuchProcess { pid: i32 },
    #[error("pid {pid} is a zombie: cannot dump it as the root of a tree (dump its parent)")]
    Zombie { pid: i32 },
    #[error("pid {pid}: its thread-group leader has exited while other threads run: cannot dump")]
    LeaderExited { pid: i32 },
    #[error("pid {pid} is a kernel thread: cannot dump")]
    KernelThread { pid: i32 },
    #[error("tid {tid} is not a process but a thread of pid {pid}")]
    NotAProcess { tid: i32, pid: i32 },
    #[error(
        "tid {tid} (pid {pid}) is already traced by pid {tracer} ({tracer_comm}): cannot seize"
    )]
    AlreadyTraced {
        tid: i32,
        pid: i32,
        tracer: i32,
        tracer_comm: String,
    },
    #[error("killed tasks {tids:?} were not collected after {waited_ms} ms")]
    NotCollected { tids: Vec<i32>, waited_ms: u128 },
    #[error("pid {pid} is this cowsnap dump's own engine process (the tree to dump holds the dumper): cannot seize it")]
    Dumper { pid: i32 },
    #[error(transparent)]
    Ptrace(#[from] PtraceError),
    #[error("{path}: {source}")]
    Proc {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: cannot parse {field}")]
    ProcParse { path: PathBuf, field: &'static str },
    #[error("tid {tid}: unexpected {status:?} while waiting for its ptrace stop")]
    UnexpectedStop { tid: i32, status: WaitStatus },
    #[error("tid {tid}: more than {MAX_SIGNALS_BEFORE_STOP} signals before its ptrace stop")]
    SignalStorm { tid: i32 },
    #[error("the tree under pid {root} kept changing for {MAX_SCAN_ROUNDS} scans")]
    Unstable { root: i32 },
    #[error("ptrace calls for these tasks must come from thread {tracer}, not {current}")]
    WrongThread { tracer: i32, current: i32 },
}

// ---------------------------------------------------------------------------
// /proc reading (only the few fields seizing needs)

fn proc_err(path: PathBuf) -> impl FnOnce(std::io::Error) -> SeizeError {
    move |source| SeizeError::Proc { path, source }
}

/// Reads a /proc file; `Ok(None)` if the task is gone.
fn read_proc(path: PathBuf) -> Result<Option<String>, SeizeError> {
    match std::fs::read_to_string(&path) {
        Ok(s) => Ok(Some(s)),
        // ESRCH shows up for a task that died between open and read.
        Err(e) if e.kind() == ErrorKind::NotFound || e.raw_os_error() == Some(libc::ESRCH) => {
            Ok(None)
        }
        Err(e) => Err(proc_err(path)(e)),
    }
}

/// What seizing needs to know about one task.
#[derive(Debug, Clone)]
struct TaskInfo {
    /// Single-letter state (R, S, D, T, t, Z, X, ...).
    state: char,
    tgid: i32,
    ppid: i32,
    tracer: i32,
    seccomp: bool,
    kthread: bool,
}

fn status_field<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines().find_map(|l| {
        l.strip_prefix(key)
            .and_then(|rest| rest.strip_prefix(':'))
            .map(str::trim)
    })
}

fn parse_int(
    path: &std::path::Path,
    field: &'static str,
    v: Option<&str>,
) -> Result<i64, SeizeError> {
    v.and_then(|s| s.parse().ok())
        .ok_or_else(|| SeizeError::ProcParse {
            path: path.to_path_buf(),
            field,
        })
}

fn task_info(pid: i32, tid: i32) -> Result<Option<TaskInfo>, SeizeError> {
    let status_path = PathBuf::from(format!("/proc/{pid}/task/{tid}/status"));
    let Some(status) = read_proc(status_path.clone())? else {
        return Ok(None);
    };
    let stat_path = PathBuf::from(format!("/proc/{pid}/task/{tid}/stat"));
    let Some(stat) = read_proc(stat_path.clone())? else {
        return Ok(None);
    };
    // comm may hold anything: fields start after the last ')'.
    let after_comm = stat.rfind(')').map(|i| &stat[i + 1..]).unwrap_or("");
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    // fields[0] is field 3 (state); flags is field 9.
    let flags = parse_int(&stat_path, "flags", fields.get(6).copied())? as u64;
    let state = fields
        .first()
        .and_then(|s| s.chars().next())
        .ok_or_else(|| SeizeError::ProcParse {
            path: stat_path.clone(),
            field: "state",
        })?;
    Ok(Some(TaskInfo {
        state,
        tgid: parse_int(&status_path, "Tgid", status_field(&status, "Tgid"))? as i32,
        ppid: parse_int(&status_path, "PPid", status_field(&status, "PPid"))? as i32,
        tracer: parse_int(
            &status_path,
            "TracerPid",
            status_field(&status, "TracerPid"),
        )? as i32,
        seccomp: status_field(&status, "Seccomp").is_some_and(|v| v != "0"),
        kthread: flags & PF_KTHREAD != 0,
    }))
}

/// Tids in /proc/PID/task, the leader first; `None` if the process is gone.
fn list_tids(pid: i32) -> Result<Option<Vec<i32>>, SeizeError> {
    let path = PathBuf::from(format!("/proc/{pid}/task"));
    let rd = match std::fs::read_dir(&path) {
        Ok(rd) => rd,
        Err(e) if e.kind() == ErrorKind::NotFound || e.raw_os_error() == Some(libc::ESRCH) => {
            return Ok(None)
        }
        Err(e) => return Err(proc_err(path)(e)),
    };
    let mut tids = Vec::new();
    for entry in rd {
        let entry = entry.map_err(proc_err(path.clone()))?;
        if let Some(tid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        {
            tids.push(tid);
        }
    }
    tids.sort_unstable_by_key(|&t| (t != pid, t));
    Ok(Some(tids))
}

/// Children of every thread of `pid`.
fn list_children(pid: i32, tids: &[i32]) -> Result<Vec<i32>, SeizeError> {
    let mut out = Vec::new();
    for &tid in tids {
        let path = PathBuf::from(format!("/proc/{pid}/task/{tid}/children"));
        if let Some(text) = read_proc(path.clone())? {
            for word in text.split_whitespace() {
                out.push(word.parse().map_err(|_| SeizeError::ProcParse {
                    path: path.clone(),
                    field: "child pid",
                })?);
            }
        }
    }
    Ok(out)
}

fn comm(pid: i32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|s| s.trim_end().to_string())
        .unwrap_or_else(|_| "?".into())
}

/// Whether `pid` runs, is a plain zombie, or is still on its way there.
fn liveness(pid: i32) -> Result<Liveness, SeizeError> {
    let Some(info) = task_info(pid, pid)? else {
        return Ok(Liveness::Gone);
    };
    match info.state {
        'X' => return Ok(Liveness::Gone),
        'Z' => {}
        _ => return Ok(Liveness::Live),
    }
    let Some(tids) = list_tids(pid)? else {
        return Ok(Liveness::Gone);
    };
    let mut exiting = false;
    for &tid in tids.iter().filter(|&&t| t != pid) {
        match task_info(pid, tid)? {
            None => {}
            Some(t) if matches!(t.state, 'Z' | 'X') => exiting = true,
            // A live thread under an exited leader: refused by check_process.
            Some(_) => return Ok(Liveness::Live),
        }
    }
    Ok(if exiting {
        Liveness::Exiting
    } else {
        Liveness::Zombie
    })
}

// ---------------------------------------------------------------------------
// The seizing machinery shared by both entry points

#[derive(Debug, Clone, Copy)]
struct Tracee {
    stopped: bool,
}

/// Which tasks a scan covers.
enum Scope {
    /// The root and all its descendants.
    Tree(i32),
    /// Exactly these processes (all their threads).
    Exact(Vec<i32>),
}

struct Seizer {
    tracer: i32,
    self_pid: i32,
    tracees: BTreeMap<i32, Tracee>,
}

impl Seizer {
    fn new() -> Seizer {
        Seizer {
            tracer: ptrace::gettid(),
            self_pid: std::process::id() as i32,
            tracees: BTreeMap::new(),
        }
    }

    fn check_thread(&self) -> Result<(), SeizeError> {
        let current = ptrace::gettid();
        if current != self.tracer {
            return Err(SeizeError::WrongThread {
                tracer: self.tracer,
                current,
            });
        }
        Ok(())
    }

    /// Checks a process before anything of it is seized.
    fn check_process(&self, pid: i32) -> Result<TaskInfo, SeizeError> {
        if pid == self.self_pid {
            return Err(SeizeError::Dumper { pid });
        }
        let info = task_info(pid, pid)?.ok_or(SeizeError::NoSuchProcess { pid })?;
        if info.tgid != pid {
            return Err(SeizeError::NotAProcess {
                tid: pid,
                pid: info.tgid,
            });
        }
        if info.kthread {
            return Err(SeizeError::KernelThread { pid });
        }
        if matches!(info.state, 'Z' | 'X') {
            let threads = list_tids(pid)?.map_or(0, |t| t.len());
            return Err(if threads > 1 {
                SeizeError::LeaderExited { pid }
            } else {
                SeizeError::Zombie { pid }
            });
        }
        Ok(info)
    }

    fn already_traced(&self, pid: i32, tid: i32, tracer: i32) -> SeizeError {
        SeizeError::AlreadyTraced {
            tid,
            pid,
            tracer,
            tracer_comm: comm(tracer),
        }
    }

    /// Seizes and interrupts one task. A task that vanished meanwhile is
    /// skipped (the next scan decides whether that matters).
    fn seize_task(&mut self, pid: i32, tid: i32) -> Result<(), SeizeError> {
        let Some(info) = task_info(pid, tid)? else {
            return Ok(());
        };
        if matches!(info.state, 'Z' | 'X') {
            // An exiting thread will be gone at the next scan; a process
            // that exited meanwhile is found there as a zombie.
            return Ok(());
        }
        if info.tracer != 0 {
            return Err(self.already_traced(pid, tid, info.tracer));
        }
        let options = SeizeOptions {
            suspend_seccomp: info.seccomp,
        };
        match ptrace::seize(tid, options) {
            Ok(()) => {}
            Err(e) if e.errno() == Some(Errno::ESRCH) => return Ok(()),
            Err(e) if e.errno() == Some(Errno::EPERM) => {
                // Explain EPERM if we can: another tracer, or an exiting task.
                return match task_info(pid, tid)? {
                    None => Ok(()),
                    Some(now) if now.tracer != 0 => Err(self.already_traced(pid, tid, now.tracer)),
                    // Exited meanwhile: the next scan sees what became of it.
                    Some(now) if matches!(now.state, 'Z' | 'X') => Ok(()),
                    Some(_) => Err(e.into()),
                };
            }
            Err(e) => return Err(e.into()),
        }
        self.tracees.insert(tid, Tracee { stopped: false });
        match ptrace::interrupt(tid) {
            Ok(()) => Ok(()),
            // Died right after the seize: wait_stop collects it.
            Err(e) if e.errno() == Some(Errno::ESRCH) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Waits for one interrupted task's PTRACE_EVENT_STOP (see the module doc
    /// for signal-delivery-stops met on the way). A task that died is dropped.
    fn wait_stop(&mut self, tid: i32) -> Result<(), SeizeError> {
        let mut signals = 0;
        loop {
            let status = match ptrace::wait(tid) {
                Ok(s) => s,
                Err(e) if e.errno() == Some(Errno::ECHILD) => {
                    self.tracees.remove(&tid);
                    return Ok(());
                }
                Err(e) => return Err(e.into()),
            };
            match status {
                WaitStatus::EventStop { .. } => {
                    if let Some(t) = self.tracees.get_mut(&tid) {
                        t.stopped = true;
                    }
                    return Ok(());
                }
                WaitStatus::Exited(_) | WaitStatus::Signaled(_) => {
                    self.tracees.remove(&tid);
                    return Ok(());
                }
                WaitStatus::Signal(sig) => {
                    signals += 1;
                    if signals > MAX_SIGNALS_BEFORE_STOP {
                        return Err(SeizeError::SignalStorm { tid });
                    }
                    // Keep a trap pending (it normally still is), then let the
                    // kernel deliver the signal; the task stops right after.
                    ptrace::interrupt(tid)?;
                    ptrace::cont(tid, sig)?;
                }
                other => return Err(SeizeError::UnexpectedStop { tid, status: other }),
            }
        }
    }

    fn wait_all(&mut self) -> Result<(), SeizeError> {
        let pending: Vec<i32> = self
            .tracees
            .iter()
            .filter(|(_, t)| !t.stopped)
            .map(|(&tid, _)| tid)
            .collect();
        for tid in pending {
            self.wait_stop(tid)?;
        }
        Ok(())
    }

    /// One scan of the scope: processes parents first, leader-first tids.
    fn scan(&self, scope: &Scope) -> Result<Vec<SeizedProcess>, SeizeError> {
        let mut out = Vec::new();
        match scope {
            Scope::Tree(root) => {
                let mut seen = BTreeSet::new();
                let mut queue = VecDeque::from([*root]);
                while let Some(pid) = queue.pop_front() {
                    if !seen.insert(pid) {
                        continue;
                    }
                    let Some(tids) = list_tids(pid)? else {
                        if pid == *root {
                            return Err(SeizeError::NoSuchProcess { pid });
                        }
                        continue;
                    };
                    let Some(info) = task_info(pid, pid)? else {
                        if pid == *root {
                            return Err(SeizeError::NoSuchProcess { pid });
                        }
                        continue;
                    };
                    queue.extend(list_children(pid, &tids)?);
                    out.push(SeizedProcess {
                        pid,
                        ppid: info.ppid,
                        tids,
                    });
                }
            }
            Scope::Exact(pids) => {
                let mut children = Vec::new();
                for &pid in pids {
                    let tids = list_tids(pid)?.ok_or(SeizeError::NoSuchProcess { pid })?;
                    let info = task_info(pid, pid)?.ok_or(SeizeError::NoSuchProcess { pid })?;
                    children.extend(list_children(pid, &tids)?);
                    out.push(SeizedProcess {
                        pid,
                        ppid: info.ppid,
                        tids,
                    });
                }
                // cgroup.procs lists no zombie: those of the members are
                // found under them (a live child outside the set is not ours).
                for child in children {
                    if pids.contains(&child) || liveness(child)? != Liveness::Zombie {
                        continue;
                    }
                    if let Some(info) = task_info(child, child)? {
                        out.push(SeizedProcess {
                            pid: child,
                            ppid: info.ppid,
                            tids: vec![child],
                        });
                    }
                }
                out = parents_first(out);
            }
        }
        Ok(out)
    }

    /// Seizes everything in `scope` until a scan finds nothing new; returns
    /// the final scan and the zombies in it. Assumes every task seized so
    /// far has stopped.
    fn stabilize(
        &mut self,
        scope: &Scope,
    ) -> Result<(Vec<SeizedProcess>, Vec<ZombieChild>), SeizeError> {
        let root = match scope {
            Scope::Tree(r) => *r,
            Scope::Exact(p) => p.first().copied().unwrap_or(0),
        };
        for _ in 0..MAX_SCAN_ROUNDS {
            let scan = self.scan(scope)?;
            let mut fresh = false;
            let mut zombies = Vec::new();
            let mut exiting = false;
            for p in &scan {
                if !self.tracees.contains_key(&p.pid) {
                    // First time we see this process: record a zombie,
                    // refuse what cannot be dumped.
                    match liveness(p.pid)? {
                        Liveness::Zombie if p.pid != root => {
                            zombies.push(ZombieChild {
                                pid: p.pid,
                                ppid: p.ppid,
                            });
                            continue;
                        }
                        Liveness::Exiting if p.pid != root => {
                            exiting = true;
                            continue;
                        }
                        Liveness::Gone if p.pid != root => continue,
                        _ => {
                            self.check_process(p.pid)?;
                        }
                    }
                }
                for &tid in &p.tids {
                    if !self.tracees.contains_key(&tid) {
                        self.seize_task(p.pid, tid)?;
                        // Seized, or a leader that exited meanwhile: either
                        // way the tree changed and is scanned again.
                        fresh = fresh || self.tracees.contains_key(&tid) || tid == p.pid;
                    }
                }
            }
            let before = self.tracees.len();
            self.wait_all()?;
            // A task that died while stopping leaves a zombie to record.
            fresh = fresh || exiting || self.tracees.len() != before;
            if exiting {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            if !fresh {
                // Nothing new was seized: the scan is complete, but a task
                // that vanished must not be listed.
                let mut scan = scan;
                for p in &mut scan {
                    p.tids.retain(|t| self.tracees.contains_key(t));
                }
                scan.retain(|p| self.tracees.contains_key(&p.pid));
                // Detach what left the tree (e.g. reparented away).
                let keep: BTreeSet<i32> =
                    scan.iter().flat_map(|p| p.tids.iter().copied()).collect();
                let strays: Vec<i32> = self
                    .tracees
                    .keys()
                    .copied()
                    .filter(|t| !keep.contains(t))
                    .collect();
                for tid in strays {
                    self.tracees.remove(&tid);
                    let _ = ptrace::detach(tid, 0);
                }
                // A zombie belongs to the dump only under a seized parent.
                zombies.retain(|z| scan.iter().any(|p| p.pid == z.ppid));
                return Ok((scan, zombies));
            }
        }
        Err(SeizeError::Unstable { root })
    }

    /// Detaches every stopped tracee and, for `wait_pending`, first waits for
    /// the stop of the others. Returns the first error; tries everything.
    fn release(&mut self, wait_pending: bool) -> Result<(), SeizeError> {
        let mut first: Option<SeizeError> = None;
        let tids: Vec<i32> = self.tracees.keys().copied().collect();
        for tid in tids {
            let Some(t) = self.tracees.get(&tid).copied() else {
                continue;
            };
            if !t.stopped {
                let r = if wait_pending {
                    self.wait_stop(tid)
                } else {
                    self.poll_stop(tid)
                };
                if let Err(e) = r {
                    first.get_or_insert(e);
                }
            }
            let Some(t) = self.tracees.remove(&tid) else {
                continue; // died meanwhile
            };
            if !t.stopped {
                continue; // still frozen: released when this thread exits
            }
            match ptrace::detach(tid, 0) {
                Ok(()) => {}
                // Killed meanwhile (SIGKILL wakes traced tasks): reap our part.
                Err(e) if e.errno() == Some(Errno::ESRCH) => {
                    let _ = ptrace::try_wait(tid);
                }
                Err(e) => {
                    first.get_or_insert(e.into());
                }
            }
        }
        first.map_or(Ok(()), Err)
    }

    /// Non-blocking [`Seizer::wait_stop`].
    fn poll_stop(&mut self, tid: i32) -> Result<(), SeizeError> {
        match ptrace::try_wait(tid) {
            Ok(None) => Ok(()),
            Ok(Some(WaitStatus::EventStop { .. })) => {
                if let Some(t) = self.tracees.get_mut(&tid) {
                    t.stopped = true;
                }
                Ok(())
            }
            Ok(Some(WaitStatus::Exited(_) | WaitStatus::Signaled(_))) => {
                self.tracees.remove(&tid);
                Ok(())
            }
            Ok(Some(WaitStatus::Signal(sig))) => {
                ptrace::interrupt(tid)?;
                ptrace::cont(tid, sig)?;
                self.wait_stop(tid)
            }
            Ok(Some(other)) => Err(SeizeError::UnexpectedStop { tid, status: other }),
            Err(e) if e.errno() == Some(Errno::ECHILD) => {
                self.tracees.remove(&tid);
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }

    /// SIGKILLs every process and collects every task's death. A process
    /// that is our own child is left as a zombie for us, its parent, to reap
    /// (waiting as its tracer would consume its exit status).
    ///
    /// No task is waited for alone: every one is polled until all are
    /// collected. Tasks end in an order only the kernel knows: the last
    /// thread of a dying pid-namespace init (any of its threads, not
    /// necessarily the leader) waits in `zap_pid_ns_processes` until every
    /// process of its namespace is reaped, a traced zombie is reaped only
    /// after its tracer (we) collected it, and a leader is reported only
    /// once its group is empty. Bounded by [`KILL_TIMEOUT`]: past it the
    /// tasks left are named, and our exit lets the kernel release them.
    fn kill_all(&mut self, processes: &[SeizedProcess]) -> Result<(), SeizeError> {
        let own_children: BTreeSet<i32> = processes
            .iter()
            .filter(|p| p.ppid == self.self_pid)
            .map(|p| p.pid)
            .collect();
        for p in processes {
            // ESRCH: already dead; its death is collected below.
            let _ = ptrace::kill(p.pid, libc::SIGKILL);
        }
        let mut left: BTreeSet<i32> = std::mem::take(&mut self.tracees).into_keys().collect();
        let mut first: Option<SeizeError> = None;
        let started = std::time::Instant::now();
        let mut pause = std::time::Duration::from_micros(50);
        while !left.is_empty() {
            let before = left.len();
            left.retain(|&tid| {
                let collected = if own_children.contains(&tid) {
                    ptrace::try_exited_nowait(tid).map(|exited| exited.then_some(()))
                } else {
                    match ptrace::try_wait(tid) {
                        Ok(Some(WaitStatus::Exited(_) | WaitStatus::Signaled(_))) => Ok(Some(())),
                        // A stop on the way out (SIGKILL ends it): poll again.
                        Ok(_) => Ok(None),
                        Err(e) => Err(e),
                    }
                };
                match collected {
                    Ok(Some(())) => false,
                    Ok(None) => true,
                    // Already collected (a leader whose group went with it).
                    Err(e) if e.errno() == Some(Errno::ECHILD) => false,
                    Err(e) => {
                        first.get_or_insert(e.into());
                        false
                    }
                }
            });
            if left.is_empty() {
                break;
            }
            if started.elapsed() > KILL_TIMEOUT {
                first.get_or_insert(SeizeError::NotCollected {
                    tids: left.iter().copied().collect(),
                    waited_ms: started.elapsed().as_millis(),
                });
                break;
            }
            pause = if left.len() < before {
                std::time::Duration::from_micros(50)
            } else {
                (pause * 2).min(std::time::Duration::from_millis(5))
            };
            std::thread::sleep(pause);
        }
        first.map_or(Ok(()), Err)
    }
}

/// How long [`SeizedTree::kill`] waits for the deaths of the killed tasks.
const KILL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Orders processes so that a parent in the set comes before its children.
fn parents_first(procs: Vec<SeizedProcess>) -> Vec<SeizedProcess> {
    let pids: BTreeSet<i32> = procs.iter().map(|p| p.pid).collect();
    let mut children: BTreeMap<i32, Vec<usize>> = BTreeMap::new();
    let mut roots = Vec::new();
    for (i, p) in procs.iter().enumerate() {
        if pids.contains(&p.ppid) && p.ppid != p.pid {
            children.entry(p.ppid).or_default().push(i);
        } else {
            roots.push(i);
        }
    }
    let mut order = Vec::with_capacity(procs.len());
    let mut queue: VecDeque<usize> = roots.into();
    while let Some(i) = queue.pop_front() {
        order.push(i);
        if let Some(c) = children.get(&procs[i].pid) {
            queue.extend(c.iter().copied());
        }
    }
    // A parent cycle cannot happen in the kernel; keep anything missed anyway.
    for i in 0..procs.len() {
        if !order.contains(&i) {
            order.push(i);
        }
    }
    order.into_iter().map(|i| procs[i].clone()).collect()
}

// ---------------------------------------------------------------------------
// Public API

/// Every thread of a set of processes, stopped in a ptrace stop.
pub struct SeizedTree {
    seizer: Seizer,
    processes: Vec<SeizedProcess>,
    zombies: Vec<ZombieChild>,
    /// Set once detach/kill ran, so Drop does nothing more.
    released: bool,
    /// ptrace calls must come from the seizing thread.
    _not_send: PhantomData<*const ()>,
}

/// Tasks seized while a cgroup freezer holds them; they reach their ptrace
/// stop only once the cgroup is thawed.
pub struct PendingSeize {
    seizer: Seizer,
    pids: Vec<i32>,
    released: bool,
    _not_send: PhantomData<*const ()>,
}

impl SeizedTree {
    /// Seizes `root` and all its descendants and their threads, re-scanning
    /// children and threads until no new task appears.
    pub fn seize_tree(root: i32) -> Result<SeizedTree, SeizeError> {
        let mut seizer = Seizer::new();
        seizer.check_process(root)?;
        match seizer.stabilize(&Scope::Tree(root)) {
            Ok((processes, zombies)) => Ok(SeizedTree {
                seizer,
                processes,
                zombies,
                released: false,
                _not_send: PhantomData,
            }),
            Err(e) => {
                // Nothing may stay seized; the original error is the one to report.
                let _ = seizer.release(true);
                Err(e)
            }
        }
    }

    /// Seizes exactly these processes (e.g. the members of a frozen cgroup)
    /// and all their threads, and interrupts them, without waiting for stops.
    pub fn seize_frozen(pids: &[i32]) -> Result<PendingSeize, SeizeError> {
        let mut seizer = Seizer::new();
        let result = (|| {
            for &pid in pids {
                seizer.check_process(pid)?;
            }
            for &pid in pids {
                let tids = list_tids(pid)?.ok_or(SeizeError::NoSuchProcess { pid })?;
                for tid in tids {
                    seizer.seize_task(pid, tid)?;
                }
            }
            Ok(())
        })();
        match result {
            Ok(()) => Ok(PendingSeize {
                seizer,
                pids: pids.to_vec(),
                released: false,
                _not_send: PhantomData,
            }),
            Err(e) => {
                // Frozen tasks cannot be waited for here; see the module doc.
                let _ = seizer.release(false);
                Err(e)
            }
        }
    }

    /// Processes, parents before children.
    pub fn processes(&self) -> &[SeizedProcess] {
        &self.processes
    }

    /// Zombies of the tree (children of seized processes), by pid.
    pub fn zombies(&self) -> &[ZombieChild] {
        &self.zombies
    }

    /// The seized process `pid`, if it is part of the tree.
    pub fn process(&self, pid: i32) -> Option<&SeizedProcess> {
        self.processes.iter().find(|p| p.pid == pid)
    }

    /// Fails unless called from the thread that seized (the one thread that
    /// may make ptrace calls for these tasks).
    pub fn check_thread(&self) -> Result<(), SeizeError> {
        self.seizer.check_thread()
    }

    /// Detaches every task; each resumes exactly where it was.
    pub fn detach(mut self) -> Result<(), SeizeError> {
        self.seizer.check_thread()?;
        self.released = true;
        self.seizer.release(true)
    }

    /// SIGKILLs every process, then detaches (for `--exit`).
    pub fn kill(mut self) -> Result<(), SeizeError> {
        self.seizer.check_thread()?;
        self.released = true;
        self.seizer.kill_all(&self.processes)
    }
}

impl Drop for SeizedTree {
    fn drop(&mut self) {
        if !self.released && self.seizer.check_thread().is_ok() {
            let _ = self.seizer.release(true);
        }
    }
}

impl PendingSeize {
    /// Waits until every seized task sits in its ptrace stop (call after
    /// thawing), then re-scans the processes' threads until no new one appears.
    pub fn wait_stopped(mut self) -> Result<SeizedTree, SeizeError> {
        self.seizer.check_thread()?;
        self.released = true;
        let scope = Scope::Exact(std::mem::take(&mut self.pids));
        let result = self
            .seizer
            .wait_all()
            .and_then(|()| self.seizer.stabilize(&scope));
        let seizer = std::mem::replace(&mut self.seizer, Seizer::new());
        match result {
            Ok((processes, zombies)) => Ok(SeizedTree {
                seizer,
                processes,
                zombies,
                released: false,
                _not_send: PhantomData,
            }),
            Err(e) => {
                let mut seizer = seizer;
                let _ = seizer.release(true);
                Err(e)
            }
        }
    }
}

impl Drop for PendingSeize {
    fn drop(&mut self) {
        if !self.released && self.seizer.check_thread().is_ok() {
            let _ = self.seizer.release(false);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::ptrace::test_children::{
        echo_body, rich_body, task_state, tracer_body, tracer_pid, tree_body, wait_state,
        zombie_parent_body, Child, RICH_FIELDS,
    };

    fn threads_of(pid: i32) -> Vec<i32> {
        list_tids(pid).expect("tids").expect("alive")
    }

    #[test]
    fn seize_tree_finds_every_descendant_and_detach_resumes_them() {
        let child = Child::spawn(tree_body);
        assert_eq!(child.recv(1), b"T");
        let kids = child.recv_u64s(3);
        let (a, b, c) = (kids[0] as i32, kids[1] as i32, kids[2] as i32);
        assert_eq!(child.recv(1), b"r");

        let tree = SeizedTree::seize_tree(child.pid).expect("seize");
        let got: Vec<(i32, i32)> = tree.processes().iter().map(|p| (p.pid, p.ppid)).collect();
        assert_eq!(
            got,
            vec![
                (child.pid, std::process::id() as i32),
                (a, child.pid),
                (b, child.pid),
                (c, b)
            ]
        );
        let me = ptrace::gettid();
        for p in tree.processes() {
            assert_eq!(p.tids, vec![p.pid]);
            assert_eq!(tracer_pid(p.pid), me);
            assert_eq!(task_state(p.pid), 't');
        }
        assert_eq!(tree.process(c).map(|p| p.ppid), Some(b));
        tree.detach().expect("detach");
        for pid in [child.pid, a, b, c] {
            assert_eq!(tracer_pid(pid), 0);
        }
        child.send(b"e");
        assert_eq!(child.recv(3), [b'R', 1, b'e']);
    }

    #[test]
    fn multithreaded_process_is_seized_whole_and_dropping_detaches() {
        let child = Child::spawn(rich_body);
        assert_eq!(child.recv(1), b"T");
        child.recv_u64s(RICH_FIELDS);
        assert_eq!(child.recv_skipping(b"S"), b'r');
        {
            let tree = SeizedTree::seize_tree(child.pid).expect("seize");
            assert_eq!(tree.processes().len(), 1);
            let tids = &tree.processes()[0].tids;
            assert_eq!(tids, &threads_of(child.pid));
            assert_eq!(tids.len(), 2);
            assert_eq!(tids[0], child.pid);
            for &t in tids {
                assert_eq!(tracer_pid(t), ptrace::gettid());
            }
        } // dropped: detaches
        for t in threads_of(child.pid) {
            assert_eq!(tracer_pid(t), 0);
        }
        // Both threads run on: the sleeper reports, the main thread echoes.
        assert_eq!(child.recv(1), b"S");
        child.send(b"d");
        assert_eq!(child.recv_skipping(b"S"), b'R');
        assert_eq!(child.recv(2), [1, b'd']);
    }

    #[test]
    fn nonexistent_pid_is_refused() {
        let mut gone = Child::spawn(|_| 0);
        gone.wait_exit();
        let err = SeizedTree::seize_tree(gone.pid).err().expect("must fail");
        assert_eq!(
            err.to_string(),
            format!("no such process: pid {}", gone.pid)
        );
    }

    #[test]
    fn zombie_is_refused() {
        let zombie = Child::spawn(|_| 0);
        wait_state(zombie.pid, 'Z');
        let err = SeizedTree::seize_tree(zombie.pid).err().expect("must fail");
        assert!(
            matches!(err, SeizeError::Zombie { pid } if pid == zombie.pid),
            "{err}"
        );
        assert!(err.to_string().contains("zombie"), "{err}");
    }

    #[test]
    fn zombie_descendant_is_recorded_not_seized() {
        let child = Child::spawn(zombie_parent_body);
        assert_eq!(child.recv(1), b"Z");
        let kids = child.recv_u64s(2);
        let (live, zombie) = (kids[0] as i32, kids[1] as i32);
        assert_eq!(child.recv(1), b"r");
        wait_state(zombie, 'Z');
        let tree = SeizedTree::seize_tree(child.pid).expect("seize");
        let pids: Vec<i32> = tree.processes().iter().map(|p| p.pid).collect();
        assert_eq!(pids, vec![child.pid, live]);
        assert_eq!(
            tree.zombies(),
            &[ZombieChild {
                pid: zombie,
                ppid: child.pid
            }]
        );
        // The parent is stopped: the zombie stays one, untraced.
        assert_eq!(task_state(zombie), 'Z');
        assert_eq!(tracer_pid(child.pid), ptrace::gettid());
        tree.detach().expect("detach");
        assert_eq!(tracer_pid(child.pid), 0);
        assert_eq!(tracer_pid(live), 0);
        child.send(b"w");
        assert_eq!(child.recv(3), [b'R', 1, b'w']);
    }

    #[test]
    fn zombie_children_of_frozen_members_are_found() {
        let cg = TestCgroup::create(true, "zombie");
        let child = Child::spawn(zombie_parent_body);
        assert_eq!(child.recv(1), b"Z");
        let kids = child.recv_u64s(2);
        let (live, zombie) = (kids[0] as i32, kids[1] as i32);
        assert_eq!(child.recv(1), b"r");
        wait_state(zombie, 'Z');
        for pid in [child.pid, live] {
            cg.write("cgroup.procs", &pid.to_string());
        }
        cg.write("cgroup.freeze", "1");
        cg.wait_for("cgroup.events", "frozen 1");
        let members: Vec<i32> = cg
            .read("cgroup.procs")
            .split_whitespace()
            .filter_map(|w| w.parse().ok())
            .collect();
        assert!(!members.contains(&zombie), "cgroup.procs lists the zombie");
        let pending = SeizedTree::seize_frozen(&members).expect("seize frozen");
        cg.write("cgroup.freeze", "0");
        let tree = pending.wait_stopped().expect("wait stopped");
        assert_eq!(tree.processes().len(), 2);
        assert_eq!(
            tree.zombies(),
            &[ZombieChild {
                pid: zombie,
                ppid: child.pid
            }]
        );
        tree.detach().expect("detach");
        child.send(b"w");
        assert_eq!(child.recv(3), [b'R', 1, b'w']);
        // The cgroup can only go once its members have left it.
        drop(child);
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(live),
            nix::sys::signal::Signal::SIGKILL,
        );
    }

    #[test]
    fn task_traced_by_another_tracer_is_refused_naming_it() {
        let victim = Child::spawn(echo_body);
        assert_eq!(victim.recv(1), b"r");
        let tracer = Child::spawn(tracer_body);
        tracer.send(&victim.pid.to_ne_bytes());
        assert_eq!(tracer.recv(2), [b'A', 0]);
        let err = SeizedTree::seize_tree(victim.pid).err().expect("must fail");
        match &err {
            SeizeError::AlreadyTraced { tid, tracer: t, .. } => {
                assert_eq!((*tid, *t), (victim.pid, tracer.pid));
            }
            other => panic!("wrong error: {other}"),
        }
        assert!(err
            .to_string()
            .contains(&format!("traced by pid {}", tracer.pid)));
    }

    #[test]
    fn kernel_thread_and_self_are_refused() {
        // pid 2 is kthreadd when we run in the initial pid namespace.
        if std::fs::read_to_string("/proc/2/comm").is_ok_and(|c| c.trim() == "kthreadd") {
            let err = SeizedTree::seize_tree(2).err().expect("must fail");
            assert_eq!(err.to_string(), "pid 2 is a kernel thread: cannot dump");
        }
        let me = std::process::id() as i32;
        let err = SeizedTree::seize_tree(me).err().expect("must fail");
        assert!(
            matches!(err, SeizeError::Dumper { pid } if pid == me),
            "{err}"
        );
    }

    #[test]
    fn signal_arriving_while_seizing_is_delivered_once() {
        for _ in 0..10 {
            let child = Child::spawn(rich_body);
            assert_eq!(child.recv(1), b"T");
            child.recv_u64s(RICH_FIELDS);
            assert_eq!(child.recv_skipping(b"S"), b'r');
            // Race the signal against the interrupt trap; either order must
            // leave the handler run exactly once.
            ptrace::tgkill(child.pid, child.pid, libc::SIGUSR1).expect("tgkill");
            let tree = SeizedTree::seize_tree(child.pid).expect("seize");
            tree.detach().expect("detach");
            assert_eq!(child.recv_skipping(b"S"), b'H');
            child.send(b"s");
            assert_eq!(child.recv_skipping(b"S"), b'R');
            assert_eq!(child.recv(2), [1, b's']);
        }
    }

    #[test]
    fn group_stopped_process_stays_stopped_after_detach() {
        let child = Child::spawn(echo_body);
        assert_eq!(child.recv(1), b"r");
        ptrace::kill(child.pid, libc::SIGSTOP).expect("SIGSTOP");
        wait_state(child.pid, 'T');
        let tree = SeizedTree::seize_tree(child.pid).expect("seize");
        tree.detach().expect("detach");
        wait_state(child.pid, 'T');
        ptrace::kill(child.pid, libc::SIGCONT).expect("SIGCONT");
        child.send(b"c");
        assert_eq!(child.recv(3), [b'R', 1, b'c']);
    }

    #[test]
    fn kill_ends_every_process() {
        let child = Child::spawn(tree_body);
        assert_eq!(child.recv(1), b"T");
        let kids: Vec<i32> = child.recv_u64s(3).into_iter().map(|p| p as i32).collect();
        let mut child = child;
        let tree = SeizedTree::seize_tree(child.pid).expect("seize");
        tree.kill().expect("kill");
        // Our own child's exit status is still ours to collect.
        let status = child.wait_exit();
        assert!(
            libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGKILL,
            "{status:#x}"
        );
        for pid in kids {
            // Dead: gone, or a zombie waiting for its (new) parent.
            for _ in 0..10_000 {
                if matches!(task_state(pid), '?' | 'Z' | 'X') {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            assert!(
                matches!(task_state(pid), '?' | 'Z' | 'X'),
                "pid {pid} alive"
            );
        }
    }

    /// A cgroup directory made for one test and removed at the end.
    struct TestCgroup {
        dir: PathBuf,
    }

    impl TestCgroup {
        fn create(v2: bool, tag: &str) -> TestCgroup {
            let hierarchy = crate::sys::cgroup::tests::test_hierarchy(v2);
            let dir = hierarchy.join(format!(
                "cowsnap-seize-{tag}-{}-{}",
                std::process::id(),
                ptrace::gettid()
            ));
            std::fs::create_dir(&dir).expect("create cgroup");
            TestCgroup { dir }
        }
        fn write(&self, file: &str, value: &str) {
            std::fs::write(self.dir.join(file), value)
                .unwrap_or_else(|e| panic!("{}/{file}: {e}", self.dir.display()));
        }
        fn read(&self, file: &str) -> String {
            std::fs::read_to_string(self.dir.join(file)).expect("read cgroup file")
        }
        fn wait_for(&self, file: &str, needle: &str) {
            for _ in 0..10_000 {
                if self.read(file).contains(needle) {
                    return;
                }
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            panic!("{}/{file} never showed {needle:?}", self.dir.display());
        }
    }

    impl Drop for TestCgroup {
        fn drop(&mut self) {
            // The test's child is dead by now; its cgroup empties shortly.
            for _ in 0..1000 {
                if std::fs::remove_dir(&self.dir).is_ok() {
                    return;
                }
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
        }
    }

    /// Freezes a rich child in `cg`, seizes it frozen, observes whether the
    /// tasks reach their ptrace stop while frozen, thaws, waits, checks, detaches.
    fn seize_frozen_round_trip(
        cg: &TestCgroup,
        freeze: (&str, &str),
        thaw: (&str, &str),
        frozen: (&str, &str),
        stops_while_frozen: bool,
    ) {
        let child = Child::spawn(rich_body);
        assert_eq!(child.recv(1), b"T");
        child.recv_u64s(RICH_FIELDS);
        assert_eq!(child.recv_skipping(b"S"), b'r');
        cg.write("cgroup.procs", &child.pid.to_string());
        cg.write(freeze.0, freeze.1);
        cg.wait_for(frozen.0, frozen.1);
        let tids = threads_of(child.pid);
        assert_eq!(tids.len(), 2);

        let pending = SeizedTree::seize_frozen(&[child.pid]).expect("seize frozen");
        for &t in &tids {
            assert_eq!(tracer_pid(t), ptrace::gettid());
        }
        if stops_while_frozen {
            for &t in &tids {
                wait_state(t, 't');
            }
        } else {
            std::thread::sleep(std::time::Duration::from_millis(200));
            for &t in &tids {
                assert_ne!(task_state(t), 't', "tid {t} stopped while frozen");
            }
        }
        // Still frozen either way.
        assert!(cg.read(frozen.0).contains(frozen.1));

        cg.write(thaw.0, thaw.1);
        let tree = pending.wait_stopped().expect("wait stopped");
        assert_eq!(tree.processes().len(), 1);
        assert_eq!(tree.processes()[0].tids, tids);
        for &t in &tids {
            assert_eq!(task_state(t), 't');
        }
        tree.detach().expect("detach");
        for &t in &tids {
            assert_eq!(tracer_pid(t), 0);
        }
        assert_eq!(child.recv_skipping(b""), b'S');
        child.send(b"f");
        assert_eq!(child.recv_skipping(b"S"), b'R');
        assert_eq!(child.recv(2), [1, b'f']);
    }

    #[test]
    fn seize_frozen_v1_freezer() {
        let cg = TestCgroup::create(false, "v1");
        seize_frozen_round_trip(
            &cg,
            ("freezer.state", "FROZEN"),
            ("freezer.state", "THAWED"),
            ("freezer.state", "FROZEN"),
            false,
        );
    }

    #[test]
    fn seize_frozen_v2_cgroup_freeze() {
        let cg = TestCgroup::create(true, "v2");
        seize_frozen_round_trip(
            &cg,
            ("cgroup.freeze", "1"),
            ("cgroup.freeze", "0"),
            ("cgroup.events", "frozen 1"),
            true,
        );
    }

    #[test]
    fn parents_first_orders_by_parentage() {
        let p = |pid, ppid| SeizedProcess {
            pid,
            ppid,
            tids: vec![pid],
        };
        let got = parents_first(vec![p(30, 20), p(20, 10), p(40, 1), p(10, 1)]);
        let pids: Vec<i32> = got.iter().map(|p| p.pid).collect();
        assert_eq!(pids, vec![40, 10, 20, 30]);
    }
}
