//! Seizing a tree: PTRACE_SEIZE + PTRACE_INTERRUPT on every thread, until
//! the set of tasks is stable. ptrace binds a tracee to the tracer *thread*:
//! every method here must be called from the thread that seized.
//! Dropping a `SeizedTree` detaches every task, which resumes untouched.

/// One seized process: its pid and the tids of all its threads (leader first).
#[derive(Debug, Clone)]
pub struct SeizedProcess {
    pub pid: i32,
    /// Parent pid at seize time.
    pub ppid: i32,
    pub tids: Vec<i32>,
}

#[derive(Debug, thiserror::Error)]
pub enum SeizeError {
    #[error("not supported yet: {0}")]
    NotSupported(String),
}

/// Every thread of a set of processes, stopped in a ptrace stop.
pub struct SeizedTree {
    _private: (),
}

/// Tasks seized while a cgroup freezer holds them; they reach their ptrace
/// stop only once the cgroup is thawed.
pub struct PendingSeize {
    _private: (),
}

impl SeizedTree {
    /// Seizes `root` and all its descendants and their threads, re-scanning
    /// children and threads until no new task appears.
    pub fn seize_tree(root: i32) -> Result<SeizedTree, SeizeError> {
        let _ = root;
        Err(SeizeError::NotSupported("seize".into()))
    }

    /// Seizes exactly these processes (e.g. the members of a frozen cgroup)
    /// and all their threads, and interrupts them, without waiting for stops.
    pub fn seize_frozen(pids: &[i32]) -> Result<PendingSeize, SeizeError> {
        let _ = pids;
        Err(SeizeError::NotSupported("seize".into()))
    }

    /// Processes, parents before children.
    pub fn processes(&self) -> &[SeizedProcess] {
        &[]
    }

    /// Detaches every task; each resumes exactly where it was.
    pub fn detach(self) -> Result<(), SeizeError> {
        Err(SeizeError::NotSupported("seize".into()))
    }

    /// SIGKILLs every process, then detaches (for `--exit`).
    pub fn kill(self) -> Result<(), SeizeError> {
        Err(SeizeError::NotSupported("seize".into()))
    }
}

impl PendingSeize {
    /// Waits until every seized task sits in its ptrace stop (call after thawing).
    pub fn wait_stopped(self) -> Result<SeizedTree, SeizeError> {
        Err(SeizeError::NotSupported("seize".into()))
    }
}
