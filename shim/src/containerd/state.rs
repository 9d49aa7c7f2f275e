//! The life of a task's process as an explicit state machine, after
//! containerd's runc shim (`pkg/process/init_state.go`, `exec_state.go`).
//!
//! Every RPC that changes or depends on a process's life asks
//! [`ProcessState::transition`] first; the table there is the one place that
//! says which operation is legal in which state and what state follows. An
//! illegal operation yields a [`StateError`] whose message names the task,
//! the operation and the state, and whose [`StateError::code`] is the ttrpc
//! code containerd maps to its own error kinds.

use std::fmt;

use containerd_shim_protos::ttrpc::Code;

/// Where a process (the container's init or an exec) is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProcessState {
    /// `runc create` done (init) or Exec RPC recorded (exec); not started.
    Created,
    /// Create RPC carried a checkpoint: nothing runs until Start restores it.
    CreatedFromCheckpoint,
    Running,
    Paused,
    /// The process exited and was reaped; its exit status is known.
    Stopped,
    /// Delete RPC done; the shim forgets the process.
    Deleted,
}

impl fmt::Display for ProcessState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ProcessState::Created => "created",
            ProcessState::CreatedFromCheckpoint => "created from a checkpoint",
            ProcessState::Running => "running",
            ProcessState::Paused => "paused",
            ProcessState::Stopped => "stopped",
            ProcessState::Deleted => "deleted",
        })
    }
}

/// Which kind of process the table is asked about: execs never pause (the
/// container does) and cannot be signalled before they exist.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProcessKind {
    Init,
    Exec,
}

/// An operation on a process: an RPC, or the reaper reporting its exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Start,
    Pause,
    Resume,
    Kill,
    Checkpoint,
    /// Adding an exec process to the container (asked of the init).
    Exec,
    Update,
    Delete,
    /// The reaper collected the process's exit status.
    Exit,
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Op::Start => "start",
            Op::Pause => "pause",
            Op::Resume => "resume",
            Op::Kill => "kill",
            Op::Checkpoint => "checkpoint",
            Op::Exec => "exec",
            Op::Update => "update",
            Op::Delete => "delete",
            Op::Exit => "record exit",
        })
    }
}

/// An operation that is not legal in the process's current state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("task {id}: cannot {op}: {what} is {state}")]
pub struct StateError {
    /// `<container id>` for the init, `<container id>/<exec id>` for an exec.
    pub id: String,
    pub what: &'static str,
    pub op: Op,
    pub state: ProcessState,
}

impl StateError {
    /// The ttrpc code containerd turns into its error kinds: signalling or
    /// touching a process that is gone is NotFound (containerd's runc shim
    /// says "process already finished"; `ctr task rm -f` relies on it),
    /// anything else is FailedPrecondition.
    pub fn code(&self) -> Code {
        match (self.state, self.op) {
            (ProcessState::Deleted, _) => Code::NOT_FOUND,
            (ProcessState::Stopped, Op::Kill) => Code::NOT_FOUND,
            _ => Code::FAILED_PRECONDITION,
        }
    }
}

impl ProcessState {
    /// The state after `op`, or why `op` is illegal now. `id` only names the
    /// process in the error.
    pub fn transition(
        self,
        kind: ProcessKind,
        id: &str,
        op: Op,
    ) -> Result<ProcessState, StateError> {
        use Op as O;
        use ProcessKind as K;
        use ProcessState as S;
        let next = match (self, kind, op) {
            // created: runc has the container (or the exec is recorded)
            (S::Created, _, O::Start) => Some(S::Running),
            (S::Created, K::Init, O::Kill) => Some(S::Created),
            (S::Created, K::Init, O::Exec) => Some(S::Created),
            (S::Created, K::Init, O::Update) => Some(S::Created),
            (S::Created, _, O::Delete) => Some(S::Deleted),
            (S::Created, _, O::Exit) => Some(S::Stopped),

            // created from a checkpoint: nothing exists until Start restores
            (S::CreatedFromCheckpoint, K::Init, O::Start) => Some(S::Running),
            // nothing runs to take the signal: the task ends unrestored
            (S::CreatedFromCheckpoint, K::Init, O::Kill) => Some(S::Stopped),
            (S::CreatedFromCheckpoint, K::Init, O::Delete) => Some(S::Deleted),

            (S::Running, K::Init, O::Pause) => Some(S::Paused),
            (S::Running, _, O::Kill) => Some(S::Running),
            (S::Running, K::Init, O::Checkpoint) => Some(S::Running),
            (S::Running, K::Init, O::Exec) => Some(S::Running),
            (S::Running, K::Init, O::Update) => Some(S::Running),
            (S::Running, _, O::Exit) => Some(S::Stopped),

            // paused: runc exec into a frozen cgroup would hang
            (S::Paused, K::Init, O::Resume) => Some(S::Running),
            (S::Paused, K::Init, O::Kill) => Some(S::Paused),
            (S::Paused, K::Init, O::Checkpoint) => Some(S::Paused),
            (S::Paused, K::Init, O::Update) => Some(S::Paused),
            (S::Paused, K::Init, O::Exit) => Some(S::Stopped),

            (S::Stopped, _, O::Delete) => Some(S::Deleted),
            _ => None,
        };
        next.ok_or_else(|| StateError {
            id: id.to_string(),
            what: match kind {
                K::Init => "task",
                K::Exec => "exec process",
            },
            op,
            state: self,
        })
    }

    /// The containerd status this state reports.
    pub fn status(self) -> containerd_shim_protos::types::task::Status {
        use containerd_shim_protos::types::task::Status;
        match self {
            ProcessState::Created | ProcessState::CreatedFromCheckpoint => Status::CREATED,
            ProcessState::Running => Status::RUNNING,
            ProcessState::Paused => Status::PAUSED,
            ProcessState::Stopped | ProcessState::Deleted => Status::STOPPED,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATES: [ProcessState; 6] = [
        ProcessState::Created,
        ProcessState::CreatedFromCheckpoint,
        ProcessState::Running,
        ProcessState::Paused,
        ProcessState::Stopped,
        ProcessState::Deleted,
    ];
    const OPS: [Op; 9] = [
        Op::Start,
        Op::Pause,
        Op::Resume,
        Op::Kill,
        Op::Checkpoint,
        Op::Exec,
        Op::Update,
        Op::Delete,
        Op::Exit,
    ];

    fn legal(state: ProcessState, kind: ProcessKind) -> Vec<(Op, ProcessState)> {
        OPS.iter()
            .filter_map(|&op| state.transition(kind, "c1", op).ok().map(|s| (op, s)))
            .collect()
    }

    #[test]
    fn init_table() {
        use Op as O;
        use ProcessState as S;
        let k = ProcessKind::Init;
        assert_eq!(
            legal(S::Created, k),
            vec![
                (O::Start, S::Running),
                (O::Kill, S::Created),
                (O::Exec, S::Created),
                (O::Update, S::Created),
                (O::Delete, S::Deleted),
                (O::Exit, S::Stopped),
            ]
        );
        assert_eq!(
            legal(S::CreatedFromCheckpoint, k),
            vec![
                (O::Start, S::Running),
                (O::Kill, S::Stopped),
                (O::Delete, S::Deleted)
            ]
        );
        assert_eq!(
            legal(S::Running, k),
            vec![
                (O::Pause, S::Paused),
                (O::Kill, S::Running),
                (O::Checkpoint, S::Running),
                (O::Exec, S::Running),
                (O::Update, S::Running),
                (O::Exit, S::Stopped),
            ]
        );
        assert_eq!(
            legal(S::Paused, k),
            vec![
                (O::Resume, S::Running),
                (O::Kill, S::Paused),
                (O::Checkpoint, S::Paused),
                (O::Update, S::Paused),
                (O::Exit, S::Stopped),
            ]
        );
        assert_eq!(legal(S::Stopped, k), vec![(O::Delete, S::Deleted)]);
        assert_eq!(legal(S::Deleted, k), vec![]);
    }

    #[test]
    fn exec_table() {
        use Op as O;
        use ProcessState as S;
        let k = ProcessKind::Exec;
        assert_eq!(
            legal(S::Created, k),
            vec![
                (O::Start, S::Running),
                (O::Delete, S::Deleted),
                (O::Exit, S::Stopped)
            ]
        );
        assert_eq!(
            legal(S::Running, k),
            vec![(O::Kill, S::Running), (O::Exit, S::Stopped)]
        );
        assert_eq!(legal(S::Stopped, k), vec![(O::Delete, S::Deleted)]);
        // an exec is never paused or checkpoint-created itself
        assert_eq!(legal(S::Paused, k), vec![]);
        assert_eq!(legal(S::CreatedFromCheckpoint, k), vec![]);
    }

    #[test]
    fn error_names_task_op_and_state() {
        let e = ProcessState::Stopped
            .transition(ProcessKind::Init, "web", Op::Pause)
            .unwrap_err();
        assert_eq!(e.to_string(), "task web: cannot pause: task is stopped");
        assert_eq!(e.code(), Code::FAILED_PRECONDITION);

        let e = ProcessState::Paused
            .transition(ProcessKind::Exec, "web/sh", Op::Start)
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "task web/sh: cannot start: exec process is paused"
        );
    }

    #[test]
    fn gone_processes_are_not_found() {
        for state in STATES {
            for op in OPS {
                if let Err(e) = state.transition(ProcessKind::Init, "c", op) {
                    let gone = state == ProcessState::Deleted
                        || (state == ProcessState::Stopped && op == Op::Kill);
                    let want = if gone {
                        Code::NOT_FOUND
                    } else {
                        Code::FAILED_PRECONDITION
                    };
                    assert_eq!(e.code(), want, "{state} {op}");
                }
            }
        }
    }

    #[test]
    fn every_state_reports_a_containerd_status() {
        use containerd_shim_protos::types::task::Status;
        assert_eq!(
            ProcessState::CreatedFromCheckpoint.status(),
            Status::CREATED
        );
        assert_eq!(ProcessState::Paused.status(), Status::PAUSED);
        assert_eq!(ProcessState::Stopped.status(), Status::STOPPED);
    }
}
