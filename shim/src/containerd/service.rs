//! The shim v2 Task service: one container (its init and exec processes)
//! driven through `runc`, with every life change checked against
//! [`state`](super::state) and published to containerd as an event.
//!
//! One lock guards the containers; runc calls that create or start a process
//! hold it, so the exit dispatcher (which also takes it) always finds the pid
//! of a process that has already exited recorded.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use containerd_shim::monitor::{monitor_subscribe, Subject, Subscription, Topic};
use containerd_shim::{api, publisher::RemotePublisher, ExitSignal, TtrpcContext, TtrpcResult};
use containerd_shim_protos::events::task::{
    TaskCheckpointed, TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskIO,
    TaskPaused, TaskResumed, TaskStart,
};
use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim_protos::protobuf::{Message, MessageDyn, MessageField};
use containerd_shim_protos::shim::oci::ProcessDetails;
use containerd_shim_protos::topics;
use containerd_shim_protos::ttrpc::{self, context::Context, Code};
use containerd_shim_protos::types::task::ProcessInfo;

use super::cr::{self, CrError};
use super::io::{check_stdio_path, IoError, PendingIo, ProcessIo, StdioPaths};
use super::options::{self, OptionsError};
use super::runc::{read_pid_file, CreateArgs, Runc, RuncError};
use super::state::{Op, ProcessKind, ProcessState, StateError};
use super::stats;
use crate::engine_error::{Classify, ErrorKind};

/// File in the bundle where runc writes the init's pid.
pub const INIT_PID_FILE: &str = "init.pid";
/// File in the bundle recording how runc was called, for `shim delete`.
pub const RUNC_CONFIG_FILE: &str = "cowsnap-runc.json";
/// How long Delete waits for a process's output to drain into the fifos.
const OUTPUT_DRAIN: Duration = Duration::from_secs(5);
/// A Checkpoint arriving this soon after the Pause that stopped the running
/// task is taken to be that Pause's client's: containerd's client library
/// pauses a task around every task checkpoint (and fails on one already
/// paused), so such a pause is undone if containerd dies during the dump.
const CLIENT_PAUSE_WINDOW: Duration = Duration::from_secs(5);
/// Exit status reported for an exec whose `runc exec` failed (runc's own).
const EXEC_START_FAILED: u32 = 255;
/// Exit status reported for an init deleted before it ever exited: runc
/// delete --force kills it with SIGKILL.
const KILLED_BY_DELETE: u32 = 128 + 9;

#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error("task {0}: not found")]
    NotFound(String),
    #[error("task {0}: already exists")]
    Exists(String),
    #[error("task {id}: exec {exec_id}: not found")]
    ExecNotFound { id: String, exec_id: String },
    #[error("task {id}: exec {exec_id}: already exists")]
    ExecExists { id: String, exec_id: String },
    #[error("task {id}: process already finished")]
    Finished { id: String },
    #[error("task {id}: {source}")]
    Runc {
        id: String,
        #[source]
        source: RuncError,
    },
    #[error("task {id}: stdio: {source}")]
    Io {
        id: String,
        #[source]
        source: IoError,
    },
    #[error("task {id}: {source}")]
    Options {
        id: String,
        #[source]
        source: OptionsError,
    },
    #[error("task {id}: checkpoint: {source}")]
    Checkpoint {
        id: String,
        #[source]
        source: CrError,
    },
    #[error("task {id}: restore: {source}")]
    Restore {
        id: String,
        #[source]
        source: CrError,
    },
    #[error("task {id}: {what}: {detail}")]
    Other {
        id: String,
        what: &'static str,
        detail: String,
    },
    /// The shim runs a checkpoint of the task: it holds no lock meanwhile
    /// (State and Connect must answer, or a containerd that restarts
    /// during a dump takes the shim for dead and deletes the container),
    /// so what would change the task under the dump is refused.
    #[error("task {id}: cannot {op}: a checkpoint of the task is in progress")]
    Checkpointing { id: String, op: Op },
    #[error("task {id}: {what}: task is {state}")]
    NotRunning {
        id: String,
        what: &'static str,
        state: ProcessState,
    },
}

impl TaskError {
    fn code(&self) -> Code {
        match self {
            TaskError::State(e) => e.code(),
            TaskError::NotFound(_)
            | TaskError::ExecNotFound { .. }
            | TaskError::Finished { .. } => Code::NOT_FOUND,
            TaskError::Exists(_) | TaskError::ExecExists { .. } => Code::ALREADY_EXISTS,
            TaskError::Options { .. } => Code::INVALID_ARGUMENT,
            TaskError::NotRunning { .. } | TaskError::Checkpointing { .. } => {
                Code::FAILED_PRECONDITION
            }
            TaskError::Checkpoint { source, .. } | TaskError::Restore { source, .. } => {
                kind_code(source.kind())
            }
            _ => Code::UNKNOWN,
        }
    }
}

/// The ttrpc code of an engine failure; containerd passes it on to its
/// own clients (`ctr`, cowsnapd) as the gRPC code of the same name.
fn kind_code(kind: ErrorKind) -> Code {
    match kind {
        ErrorKind::NotFound => Code::NOT_FOUND,
        ErrorKind::InvalidArgument => Code::INVALID_ARGUMENT,
        ErrorKind::Unsupported => Code::UNIMPLEMENTED,
        ErrorKind::FailedPrecondition => Code::FAILED_PRECONDITION,
        ErrorKind::Unavailable => Code::UNAVAILABLE,
        ErrorKind::ResourceExhausted => Code::RESOURCE_EXHAUSTED,
        ErrorKind::Internal => Code::INTERNAL,
    }
}

impl From<TaskError> for ttrpc::Error {
    fn from(e: TaskError) -> Self {
        log::warn!("{e}");
        ttrpc::Error::RpcStatus(ttrpc::get_status(e.code(), e.to_string()))
    }
}

/// An exit status, once known; Wait blocks on it.
#[derive(Default)]
struct ExitCell {
    exit: Mutex<Option<(u32, Timestamp)>>,
    cond: Condvar,
}

impl ExitCell {
    fn set(&self, status: u32) {
        let mut g = self.exit.lock().unwrap_or_else(|p| p.into_inner());
        if g.is_none() {
            *g = Some((status, now()));
        }
        self.cond.notify_all();
    }
    fn get(&self) -> Option<(u32, Timestamp)> {
        self.exit.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
    fn wait(&self) -> (u32, Timestamp) {
        let mut g = self.exit.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(e) = g.as_ref() {
                return e.clone();
            }
            g = self.cond.wait(g).unwrap_or_else(|p| p.into_inner());
        }
    }
}

fn now() -> Timestamp {
    containerd_shim::util::timestamp().unwrap_or_default()
}

struct Process {
    /// Empty for the init.
    exec_id: String,
    kind: ProcessKind,
    pid: i32,
    state: ProcessState,
    paths: StdioPaths,
    io: Option<ProcessIo>,
    exit: Arc<ExitCell>,
    /// Exec only: the OCI process JSON for `runc exec --process`.
    spec: Vec<u8>,
}

impl Process {
    fn new(exec_id: &str, kind: ProcessKind, state: ProcessState, paths: StdioPaths) -> Process {
        Process {
            exec_id: exec_id.to_string(),
            kind,
            pid: 0,
            state,
            paths,
            io: None,
            exit: Arc::new(ExitCell::default()),
            spec: Vec::new(),
        }
    }

    /// `container` or `container/exec` for messages.
    fn name(&self, container: &str) -> String {
        if self.exec_id.is_empty() {
            container.to_string()
        } else {
            format!("{container}/{}", self.exec_id)
        }
    }

    fn transition(&mut self, container: &str, op: Op) -> Result<ProcessState, StateError> {
        self.state.transition(self.kind, &self.name(container), op)
    }
}

struct Container {
    id: String,
    bundle: PathBuf,
    runc: Runc,
    no_pivot: bool,
    rootfs_mounted: bool,
    /// Create carried a checkpoint: Start restores from it.
    checkpoint: Option<PathBuf>,
    /// A Checkpoint runs its dump (see [`TaskError::Checkpointing`]).
    checkpointing: bool,
    /// When a Pause last took the running task to paused; cleared by
    /// Resume. See [`CLIENT_PAUSE_WINDOW`].
    paused_at: Option<Instant>,
    init: Process,
    execs: HashMap<String, Process>,
}

impl Container {
    fn process_mut(&mut self, exec_id: &str) -> Result<&mut Process, TaskError> {
        if exec_id.is_empty() {
            return Ok(&mut self.init);
        }
        self.execs
            .get_mut(exec_id)
            .ok_or_else(|| TaskError::ExecNotFound {
                id: self.id.clone(),
                exec_id: exec_id.to_string(),
            })
    }

    /// Refuses `op` while a checkpoint of the task runs.
    fn not_checkpointing(&self, op: Op) -> Result<(), TaskError> {
        if self.checkpointing {
            return Err(TaskError::Checkpointing {
                id: self.id.clone(),
                op,
            });
        }
        Ok(())
    }

    fn pid_file(&self) -> PathBuf {
        self.bundle.join(INIT_PID_FILE)
    }

    fn runc_err(&self) -> impl Fn(RuncError) -> TaskError + '_ {
        move |source| TaskError::Runc {
            id: self.id.clone(),
            source,
        }
    }
}

type Event = (&'static str, Box<dyn MessageDyn>);

struct Inner {
    namespace: String,
    containers: Mutex<HashMap<String, Container>>,
    events: Mutex<Sender<Event>>,
    exit: Arc<ExitSignal>,
}

impl Inner {
    fn containers(&self) -> MutexGuard<'_, HashMap<String, Container>> {
        self.containers.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn publish(&self, topic: &'static str, event: Box<dyn MessageDyn>) {
        let tx = self.events.lock().unwrap_or_else(|p| p.into_inner());
        if tx.send((topic, event)).is_err() {
            log::warn!("event {topic}: publisher thread is gone");
        }
    }
}

/// The Task service containerd talks to.
#[derive(Clone)]
pub struct TaskService {
    inner: Arc<Inner>,
}

impl TaskService {
    pub fn new(namespace: &str, exit: Arc<ExitSignal>, publisher: RemotePublisher) -> TaskService {
        let (tx, rx) = channel::<Event>();
        let inner = Arc::new(Inner {
            namespace: namespace.to_string(),
            containers: Mutex::new(HashMap::new()),
            events: Mutex::new(tx),
            exit,
        });
        spawn_publisher(publisher, namespace.to_string(), rx);
        match monitor_subscribe(Topic::Pid) {
            Ok(sub) => spawn_exit_dispatcher(inner.clone(), sub),
            Err(e) => log::error!("subscribing to process exits: {e}"),
        }
        TaskService { inner }
    }

    /// Thaws paused task `id` and tells containerd.
    fn resume_task(&self, id: &str) -> Result<(), TaskError> {
        self.with_container(id, |c| {
            let next = c.init.transition(id, Op::Resume)?;
            c.runc.resume(&c.id).map_err(c.runc_err())?;
            c.init.state = next;
            c.paused_at = None;
            Ok(())
        })?;
        self.inner.publish(
            topics::TASK_RESUMED_EVENT_TOPIC,
            Box::new(TaskResumed {
                container_id: id.to_string(),
                ..Default::default()
            }),
        );
        Ok(())
    }

    /// A checkpoint whose containerd went away ended: the client that
    /// paused the task for it cannot resume it through that containerd,
    /// so the shim does, leaving the task as it was before the client's
    /// checkpoint began.
    fn resume_abandoned(&self, id: &str) {
        match self.resume_task(id) {
            Ok(()) => log::info!(
                "task {id}: resumed: its checkpoint's client paused it and lost containerd"
            ),
            Err(e) => log::warn!("task {id}: resuming after the abandoned checkpoint: {e}"),
        }
    }

    fn with_container<T>(
        &self,
        id: &str,
        f: impl FnOnce(&mut Container) -> Result<T, TaskError>,
    ) -> Result<T, TaskError> {
        let mut cs = self.inner.containers();
        let c = cs
            .get_mut(id)
            .ok_or_else(|| TaskError::NotFound(id.to_string()))?;
        f(c)
    }
}

fn spawn_publisher(publisher: RemotePublisher, namespace: String, rx: Receiver<Event>) {
    std::thread::spawn(move || {
        for (topic, event) in rx {
            if let Err(e) = publisher.publish(Context::default(), topic, &namespace, event) {
                log::error!("publishing {topic}: {e}");
            }
        }
    });
}

/// Turns reaped exits into process state: the pid of an init or exec moves
/// it to Stopped, wakes its waiters and publishes TaskExit. Exits of other
/// children (runc itself) are ignored here; their callers take them.
fn spawn_exit_dispatcher(inner: Arc<Inner>, sub: Subscription) {
    std::thread::spawn(move || {
        for ev in sub.rx.iter() {
            let Subject::Pid(pid) = ev.subject else {
                continue;
            };
            let status = ev.exit_code as u32;
            let mut cs = inner.containers();
            for c in cs.values_mut() {
                let id = c.id.clone();
                let live = |p: &Process| {
                    p.pid == pid
                        && p.pid > 0
                        && !matches!(p.state, ProcessState::Stopped | ProcessState::Deleted)
                };
                let proc = if live(&c.init) {
                    Some(&mut c.init)
                } else {
                    c.execs.values_mut().find(|p| live(p))
                };
                let Some(p) = proc else { continue };
                match p.transition(&id, Op::Exit) {
                    Ok(s) => p.state = s,
                    Err(e) => log::warn!("pid {pid} exited: {e}"),
                }
                p.exit.set(status);
                let (exit_status, exited_at) = p.exit.get().unwrap_or((status, now()));
                inner.publish(
                    topics::TASK_EXIT_EVENT_TOPIC,
                    Box::new(TaskExit {
                        container_id: id.clone(),
                        id: if p.exec_id.is_empty() {
                            id.clone()
                        } else {
                            p.exec_id.clone()
                        },
                        pid: pid as u32,
                        exit_status,
                        exited_at: MessageField::some(exited_at),
                        ..Default::default()
                    }),
                );
            }
        }
    });
}

/// How runc is called for a container, saved in the bundle so that `shim
/// delete` (a separate process) calls it the same way.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct RuncConfig {
    pub binary: String,
    pub root: PathBuf,
    pub systemd_cgroup: bool,
}

impl RuncConfig {
    pub fn runc(&self, bundle: &Path) -> Runc {
        Runc {
            binary: self.binary.clone(),
            root: self.root.clone(),
            systemd_cgroup: self.systemd_cgroup,
            log: bundle.join("log.json"),
        }
    }

    /// containerd's runc shim default: `/run/containerd/runc/<namespace>`.
    pub fn default_for(namespace: &str) -> RuncConfig {
        RuncConfig {
            binary: "runc".into(),
            root: Path::new("/run/containerd/runc").join(namespace),
            systemd_cgroup: false,
        }
    }
}

fn mount_rootfs(
    id: &str,
    bundle: &Path,
    mounts: &[containerd_shim_protos::types::mount::Mount],
) -> Result<bool, TaskError> {
    if mounts.is_empty() {
        return Ok(false);
    }
    let target = bundle.join("rootfs");
    let other = |what, detail: String| TaskError::Other {
        id: id.to_string(),
        what,
        detail,
    };
    std::fs::create_dir_all(&target)
        .map_err(|e| other("create rootfs", format!("{}: {e}", target.display())))?;
    for m in mounts {
        let opt = |s: &str| (!s.is_empty()).then_some(s.to_string());
        let (ty, src) = (opt(&m.type_), opt(&m.source));
        containerd_shim::mount::mount_rootfs(ty.as_deref(), src.as_deref(), &m.options, &target)
            .map_err(|e| {
                other(
                    "mount rootfs",
                    format!("{} on {}: {e}", m.source, target.display()),
                )
            })?;
    }
    Ok(true)
}

pub fn unmount_rootfs(bundle: &Path) {
    let target = bundle.join("rootfs");
    if let Err(e) = containerd_shim::mount::umount_recursive(target.to_str(), 0) {
        log::warn!("unmount {}: {e}", target.display());
    }
}

/// Create the runc container for `c` (on `bundle`, normally c.bundle) with
/// fresh stdio, returning the init's pid and its io. On failure nothing of
/// the runc container is left.
fn runc_create(
    c: &Container,
    bundle: &Path,
    extra_fds: Vec<std::os::fd::OwnedFd>,
) -> Result<(i32, ProcessIo), TaskError> {
    let io_err = |source| TaskError::Io {
        id: c.id.clone(),
        source,
    };
    let mut pending = PendingIo::new(&c.init.paths).map_err(io_err)?;
    let (stdio, console) = pending.for_runc();
    let pid_file = c.pid_file();
    let _ = std::fs::remove_file(&pid_file);
    let args = CreateArgs {
        bundle,
        pid_file: &pid_file,
        console_socket: console.as_deref(),
        no_pivot: c.no_pivot,
        extra_fds,
    };
    c.runc.create(&c.id, args, stdio).map_err(c.runc_err())?;
    let done = pending.finish().map_err(io_err).and_then(|io| {
        let pid = read_pid_file(&pid_file).map_err(|e| TaskError::Other {
            id: c.id.clone(),
            what: "reading runc's pid file",
            detail: e.to_string(),
        })?;
        Ok((pid, io))
    });
    if done.is_err() {
        let _ = c.runc.delete(&c.id, true);
    }
    done
}

impl TaskService {
    fn create(&self, req: &api::CreateTaskRequest) -> Result<u32, TaskError> {
        let id = req.id.clone();
        let opt_err = |source| TaskError::Options {
            id: id.clone(),
            source,
        };
        let ro = options::create_options(req.options.as_ref()).map_err(opt_err)?;
        for p in [&req.stdin, &req.stdout, &req.stderr] {
            check_stdio_path(p).map_err(|detail| TaskError::Other {
                id: id.clone(),
                what: "stdio",
                detail,
            })?;
        }
        let mut cs = self.inner.containers();
        if cs.contains_key(&id) {
            return Err(TaskError::Exists(id));
        }
        let bundle = PathBuf::from(&req.bundle);
        let mut config = RuncConfig::default_for(&self.inner.namespace);
        if let Some(b) = ro.binary_name {
            config.binary = b;
        }
        if let Some(r) = ro.root {
            config.root = r.join(&self.inner.namespace);
        }
        config.systemd_cgroup = ro.systemd_cgroup;
        if let Ok(json) = serde_json::to_vec(&config) {
            let _ = std::fs::write(bundle.join(RUNC_CONFIG_FILE), json);
        }
        let paths = StdioPaths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        let from_checkpoint = !req.checkpoint.is_empty();
        let rootfs_mounted = mount_rootfs(&id, &bundle, &req.rootfs)?;
        let mut c = Container {
            id: id.clone(),
            runc: config.runc(&bundle),
            bundle: bundle.clone(),
            no_pivot: ro.no_pivot_root,
            rootfs_mounted,
            checkpoint: from_checkpoint.then(|| PathBuf::from(&req.checkpoint)),
            checkpointing: false,
            paused_at: None,
            init: Process::new(
                "",
                ProcessKind::Init,
                if from_checkpoint {
                    ProcessState::CreatedFromCheckpoint
                } else {
                    ProcessState::Created
                },
                paths.clone(),
            ),
            execs: HashMap::new(),
        };
        if !from_checkpoint {
            match runc_create(&c, &bundle, Vec::new()) {
                Ok((pid, io)) => {
                    c.init.pid = pid;
                    c.init.io = Some(io);
                }
                Err(e) => {
                    if rootfs_mounted {
                        unmount_rootfs(&bundle);
                    }
                    return Err(e);
                }
            }
        }
        let pid = c.init.pid as u32;
        cs.insert(id.clone(), c);
        self.inner.publish(
            topics::TASK_CREATE_EVENT_TOPIC,
            Box::new(TaskCreate {
                container_id: id,
                bundle: req.bundle.clone(),
                rootfs: req.rootfs.clone(),
                io: MessageField::some(TaskIO {
                    stdin: paths.stdin,
                    stdout: paths.stdout,
                    stderr: paths.stderr,
                    terminal: paths.terminal,
                    ..Default::default()
                }),
                checkpoint: req.checkpoint.clone(),
                pid,
                ..Default::default()
            }),
        );
        Ok(pid)
    }

    fn start(&self, req: &api::StartRequest) -> Result<u32, TaskError> {
        let topic = if req.exec_id.is_empty() {
            topics::TASK_START_EVENT_TOPIC
        } else {
            topics::TASK_EXEC_STARTED_EVENT_TOPIC
        };
        // The event is queued before the lock is released, so that it always
        // precedes the TaskExit the dispatcher may publish right after.
        self.with_container(&req.id, |c| {
            let (pid, event) = self.start_locked(c, req)?;
            self.inner.publish(topic, event);
            Ok(pid)
        })
    }

    fn start_locked(
        &self,
        c: &mut Container,
        req: &api::StartRequest,
    ) -> Result<(u32, Box<dyn MessageDyn>), TaskError> {
        {
            let id = c.id.clone();
            if !req.exec_id.is_empty() {
                return start_exec(c, &req.exec_id).map(|pid| {
                    let ev: Box<dyn MessageDyn> = Box::new(TaskExecStarted {
                        container_id: id,
                        exec_id: req.exec_id.clone(),
                        pid,
                        ..Default::default()
                    });
                    (pid, ev)
                });
            }
            let next = c.init.transition(&id, Op::Start)?;
            if c.init.state == ProcessState::CreatedFromCheckpoint {
                restore(c)?;
            } else {
                c.runc.start(&id).map_err(c.runc_err())?;
            }
            c.init.state = next;
            let pid = c.init.pid as u32;
            Ok((
                pid,
                Box::new(TaskStart {
                    container_id: id,
                    pid,
                    ..Default::default()
                }) as Box<dyn MessageDyn>,
            ))
        }
    }
}

/// Start of a task created from a checkpoint: the engine derives a bundle,
/// runc creates and starts it with the new stdio, the engine finishes the
/// restore into the new init. Any failure removes the runc container.
fn restore(c: &mut Container) -> Result<(), TaskError> {
    let id = c.id.clone();
    let checkpoint = c.checkpoint.clone().ok_or_else(|| TaskError::Other {
        id: id.clone(),
        what: "restore",
        detail: "no checkpoint recorded at create".into(),
    })?;
    let restore_err = |source| TaskError::Restore {
        id: id.clone(),
        source,
    };
    let terminal = c.init.paths.terminal;
    let mut prepared =
        cr::prepare_restore(&id, &c.bundle, &checkpoint, terminal).map_err(restore_err)?;
    let extra_fds = std::mem::take(&mut prepared.extra_fds);
    let derived = prepared.bundle.clone();
    let (pid, io) = runc_create(c, &derived, extra_fds).inspect_err(|_| {
        // runc normally cleans up a failed create itself; make sure.
        let _ = c.runc.delete(&id, true);
    })?;
    c.init.io = Some(io);
    let started = c
        .runc
        .start(&id)
        .map_err(c.runc_err())
        .and_then(|()| cr::finish_restore(prepared, pid).map_err(restore_err));
    if let Err(e) = started {
        if let Err(d) = c.runc.delete(&id, true) {
            log::warn!("cleaning up the failed restore of {id}: {d}");
        }
        if let Some(mut io) = c.init.io.take() {
            io.wait_output(Duration::from_millis(100));
        }
        return Err(e);
    }
    c.init.pid = pid;
    Ok(())
}

fn start_exec(c: &mut Container, exec_id: &str) -> Result<u32, TaskError> {
    let id = c.id.clone();
    // The dump would find a process whose parent is outside the tree.
    c.not_checkpointing(Op::Start)?;
    if matches!(
        c.init.state,
        ProcessState::Paused | ProcessState::Stopped | ProcessState::Deleted
    ) {
        return Err(TaskError::State(StateError {
            id: format!("{id}/{exec_id}"),
            what: "task",
            op: Op::Start,
            state: c.init.state,
        }));
    }
    let runc = c.runc.clone();
    let bundle = c.bundle.clone();
    let p = c.process_mut(exec_id)?;
    let next = p.transition(&id, Op::Start)?;
    let io_err = |source| TaskError::Io {
        id: id.clone(),
        source,
    };
    let spec_file = bundle.join(format!("exec-{exec_id}.json"));
    let pid_file = bundle.join(format!("exec-{exec_id}.pid"));
    std::fs::write(&spec_file, &p.spec).map_err(|e| TaskError::Other {
        id: id.clone(),
        what: "writing the exec process spec",
        detail: format!("{}: {e}", spec_file.display()),
    })?;
    let mut pending = PendingIo::new(&p.paths).map_err(io_err)?;
    let (stdio, console) = pending.for_runc();
    let result = runc
        .exec(&id, &spec_file, &pid_file, console.as_deref(), stdio)
        .map_err(|source| TaskError::Runc {
            id: id.clone(),
            source,
        });
    let _ = std::fs::remove_file(&spec_file);
    if let Err(e) = result {
        // Like containerd's runc shim: an exec that failed to start is over;
        // its waiters get runc's failure status instead of waiting forever.
        if let Ok(s) = p.transition(&id, Op::Exit) {
            p.state = s;
        }
        p.exit.set(EXEC_START_FAILED);
        return Err(e);
    }
    p.io = Some(pending.finish().map_err(io_err)?);
    p.pid = read_pid_file(&pid_file).map_err(|e| TaskError::Other {
        id: id.clone(),
        what: "reading runc's exec pid file",
        detail: e.to_string(),
    })?;
    let _ = std::fs::remove_file(&pid_file);
    p.state = next;
    Ok(p.pid as u32)
}

impl containerd_shim::Task for TaskService {
    fn state(
        &self,
        _ctx: &TtrpcContext,
        req: api::StateRequest,
    ) -> TtrpcResult<api::StateResponse> {
        Ok(self.with_container(&req.id, |c| {
            let bundle = c.bundle.to_string_lossy().into_owned();
            let p = c.process_mut(&req.exec_id)?;
            let mut resp = api::StateResponse {
                id: if req.exec_id.is_empty() {
                    req.id.clone()
                } else {
                    req.exec_id.clone()
                },
                exec_id: req.exec_id.clone(),
                bundle,
                pid: p.pid as u32,
                status: p.state.status().into(),
                stdin: p.paths.stdin.clone(),
                stdout: p.paths.stdout.clone(),
                stderr: p.paths.stderr.clone(),
                terminal: p.paths.terminal,
                ..Default::default()
            };
            if let Some((status, at)) = p.exit.get() {
                resp.exit_status = status;
                resp.exited_at = MessageField::some(at);
            }
            Ok(resp)
        })?)
    }

    fn create(
        &self,
        _ctx: &TtrpcContext,
        req: api::CreateTaskRequest,
    ) -> TtrpcResult<api::CreateTaskResponse> {
        let pid = TaskService::create(self, &req)?;
        Ok(api::CreateTaskResponse {
            pid,
            ..Default::default()
        })
    }

    fn start(
        &self,
        _ctx: &TtrpcContext,
        req: api::StartRequest,
    ) -> TtrpcResult<api::StartResponse> {
        let pid = TaskService::start(self, &req)?;
        Ok(api::StartResponse {
            pid,
            ..Default::default()
        })
    }

    fn delete(
        &self,
        _ctx: &TtrpcContext,
        req: api::DeleteRequest,
    ) -> TtrpcResult<api::DeleteResponse> {
        let mut cs = self.inner.containers();
        let c = cs
            .get_mut(&req.id)
            .ok_or_else(|| TaskError::NotFound(req.id.clone()))?;
        let id = c.id.clone();
        if !req.exec_id.is_empty() {
            let p = c.process_mut(&req.exec_id)?;
            p.transition(&id, Op::Delete).map_err(TaskError::from)?;
            let mut p = c
                .execs
                .remove(&req.exec_id)
                .ok_or_else(|| TaskError::ExecNotFound {
                    id: id.clone(),
                    exec_id: req.exec_id.clone(),
                })?;
            drop(cs);
            // a never-started exec: nobody may wait for it forever
            p.exit.set(0);
            if let Some(io) = p.io.as_mut() {
                io.wait_output(OUTPUT_DRAIN);
            }
            let (status, at) = p.exit.get().unwrap_or((0, now()));
            return Ok(api::DeleteResponse {
                pid: p.pid as u32,
                exit_status: status,
                exited_at: MessageField::some(at),
                ..Default::default()
            });
        }
        c.not_checkpointing(Op::Delete)?;
        let was = c.init.state;
        let next = c
            .init
            .transition(&id, Op::Delete)
            .map_err(TaskError::from)?;
        if was != ProcessState::CreatedFromCheckpoint {
            // --force: a created (never started) init is killed by runc.
            if let Err(e) = c.runc.delete(&id, true) {
                return Err(TaskError::Runc { id, source: e }.into());
            }
        }
        c.init.state = next;
        let mut c = cs
            .remove(&id)
            .ok_or_else(|| TaskError::NotFound(id.clone()))?;
        drop(cs);
        // Waiters of a process that never exited by itself (created, or
        // created from a checkpoint) are released here.
        c.init.exit.set(if was == ProcessState::Created {
            KILLED_BY_DELETE
        } else {
            0
        });
        for p in c.execs.values() {
            p.exit.set(KILLED_BY_DELETE);
        }
        if let Some(io) = c.init.io.as_mut() {
            io.wait_output(OUTPUT_DRAIN);
        }
        for p in c.execs.values_mut() {
            if let Some(io) = p.io.as_mut() {
                io.wait_output(Duration::from_millis(100));
            }
        }
        if c.rootfs_mounted {
            unmount_rootfs(&c.bundle);
        }
        let (status, at) = c.init.exit.get().unwrap_or((0, now()));
        self.inner.publish(
            topics::TASK_DELETE_EVENT_TOPIC,
            Box::new(TaskDelete {
                container_id: id.clone(),
                id: id.clone(),
                pid: c.init.pid as u32,
                exit_status: status,
                exited_at: MessageField::some(at.clone()),
                ..Default::default()
            }),
        );
        Ok(api::DeleteResponse {
            pid: c.init.pid as u32,
            exit_status: status,
            exited_at: MessageField::some(at),
            ..Default::default()
        })
    }

    fn pids(&self, _ctx: &TtrpcContext, req: api::PidsRequest) -> TtrpcResult<api::PidsResponse> {
        Ok(self.with_container(&req.id, |c| {
            if c.init.state == ProcessState::CreatedFromCheckpoint {
                return Ok(api::PidsResponse::default());
            }
            let pids = c.runc.ps(&c.id).map_err(c.runc_err())?;
            let processes = pids
                .into_iter()
                .map(|pid| {
                    let mut info = ProcessInfo {
                        pid,
                        ..Default::default()
                    };
                    if let Some(p) = c.execs.values().find(|p| p.pid as u32 == pid) {
                        let details = ProcessDetails {
                            exec_id: p.exec_id.clone(),
                            ..Default::default()
                        };
                        if let Ok(value) = details.write_to_bytes() {
                            info.info = MessageField::some(Any {
                                type_url: "containerd.runc.v1.ProcessDetails".into(),
                                value,
                                ..Default::default()
                            });
                        }
                    }
                    info
                })
                .collect();
            Ok(api::PidsResponse {
                processes,
                ..Default::default()
            })
        })?)
    }

    fn pause(&self, _ctx: &TtrpcContext, req: api::PauseRequest) -> TtrpcResult<api::Empty> {
        self.with_container(&req.id, |c| {
            c.not_checkpointing(Op::Pause)?;
            let next = c.init.transition(&req.id, Op::Pause)?;
            c.runc.pause(&c.id).map_err(c.runc_err())?;
            c.init.state = next;
            c.paused_at = Some(Instant::now());
            Ok(())
        })?;
        self.inner.publish(
            topics::TASK_PAUSED_EVENT_TOPIC,
            Box::new(TaskPaused {
                container_id: req.id,
                ..Default::default()
            }),
        );
        Ok(api::Empty::default())
    }

    fn resume(&self, _ctx: &TtrpcContext, req: api::ResumeRequest) -> TtrpcResult<api::Empty> {
        self.with_container(&req.id, |c| c.not_checkpointing(Op::Resume))?;
        self.resume_task(&req.id)?;
        Ok(api::Empty::default())
    }

    fn checkpoint(
        &self,
        ctx: &TtrpcContext,
        req: api::CheckpointTaskRequest,
    ) -> TtrpcResult<api::Empty> {
        let (paused_by_client, request) = self.with_container(&req.id, |c| {
            let id = c.id.clone();
            c.not_checkpointing(Op::Checkpoint)?;
            c.init.transition(&id, Op::Checkpoint)?;
            let opts = options::checkpoint_options(req.options.as_ref()).map_err(|source| {
                TaskError::Options {
                    id: id.clone(),
                    source,
                }
            })?;
            c.checkpointing = true;
            let paused_by_client = c.init.state == ProcessState::Paused
                && c.paused_at
                    .is_some_and(|at| at.elapsed() < CLIENT_PAUSE_WINDOW);
            Ok((
                paused_by_client,
                cr::CheckpointRequest {
                    id,
                    init_pid: c.init.pid,
                    bundle: c.bundle.clone(),
                    path: PathBuf::from(&req.path),
                    exit: opts.exit,
                    image_path: opts.image_path,
                    work_path: opts.work_path,
                    progress_log: crate::dump::progress::container_log_path(
                        Path::new(crate::dump::progress::CONTAINER_LOG_DIR),
                        &self.inner.namespace,
                        &req.id,
                    ),
                },
            ))
        })?;
        // The dump runs without the lock. The engine kills the tree when
        // `exit` is set; the exit then reaches the dispatcher like any other.
        let result = cr::checkpoint(&request);
        if let Some(c) = self.inner.containers().get_mut(&req.id) {
            c.checkpointing = false;
        }
        // containerd's connection closed during the dump (containerd died):
        // nobody will store this checkpoint nor remove the directory
        // containerd made for it, so the shim does. A client's image_path
        // is the client's to keep.
        if ctx.cancel_rx.try_recv().is_err_and(|e| e.is_disconnected()) {
            if request.image_path.is_none() {
                if let Err(e) = std::fs::remove_dir_all(&request.path) {
                    log::warn!("removing {}: {e}", request.path.display());
                }
            }
            if paused_by_client && !request.exit {
                self.resume_abandoned(&req.id);
            }
            return Err(TaskError::Checkpoint {
                id: request.id.clone(),
                source: cr::CrError::Failed(
                    "containerd went away during the checkpoint; the image was removed".into(),
                ),
            }
            .into());
        }
        result.map_err(|source| TaskError::Checkpoint {
            id: request.id.clone(),
            source,
        })?;
        self.inner.publish(
            topics::TASK_CHECKPOINTED_EVENT_TOPIC,
            Box::new(TaskCheckpointed {
                container_id: req.id,
                checkpoint: req.path,
                ..Default::default()
            }),
        );
        Ok(api::Empty::default())
    }

    fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> TtrpcResult<api::Empty> {
        Ok(self.with_container(&req.id, |c| {
            let id = c.id.clone();
            let runc = c.runc.clone();
            let p = c.process_mut(&req.exec_id)?;
            let next = p.transition(&id, Op::Kill)?;
            if p.state == ProcessState::CreatedFromCheckpoint {
                // Nothing runs yet to take the signal: the task ends here, as
                // if killed by it, so `ctr task rm -f` and waiters complete.
                p.state = next;
                p.exit.set(128 + req.signal);
                if let Some((exit_status, at)) = p.exit.get() {
                    self.inner.publish(
                        topics::TASK_EXIT_EVENT_TOPIC,
                        Box::new(TaskExit {
                            container_id: id.clone(),
                            id: id.clone(),
                            pid: 0,
                            exit_status,
                            exited_at: MessageField::some(at),
                            ..Default::default()
                        }),
                    );
                }
                return Ok(());
            }
            if p.kind == ProcessKind::Exec {
                let sig = nix::sys::signal::Signal::try_from(req.signal as i32).map_err(|e| {
                    TaskError::Other {
                        id: id.clone(),
                        what: "kill",
                        detail: format!("signal {}: {e}", req.signal),
                    }
                })?;
                return match nix::sys::signal::kill(nix::unistd::Pid::from_raw(p.pid), sig) {
                    Ok(()) => Ok(()),
                    Err(nix::errno::Errno::ESRCH) => Err(TaskError::Finished { id: p.name(&id) }),
                    Err(e) => Err(TaskError::Other {
                        id: p.name(&id),
                        what: "kill",
                        detail: e.to_string(),
                    }),
                };
            }
            runc.kill(&id, req.signal, req.all)
                .map_err(|source| match &source {
                    // the init exited but its exit is not processed yet
                    RuncError::Failed { message, .. }
                        if message.contains("not running")
                            || message.contains("does not exist") =>
                    {
                        TaskError::Finished { id: id.clone() }
                    }
                    _ => TaskError::Runc {
                        id: id.clone(),
                        source,
                    },
                })
        })?)
        .map(|()| api::Empty::default())
    }

    fn exec(&self, _ctx: &TtrpcContext, req: api::ExecProcessRequest) -> TtrpcResult<api::Empty> {
        self.with_container(&req.id, |c| {
            let id = c.id.clone();
            c.init.transition(&id, Op::Exec)?;
            if c.execs.contains_key(&req.exec_id) || req.exec_id.is_empty() {
                return Err(TaskError::ExecExists {
                    id,
                    exec_id: req.exec_id.clone(),
                });
            }
            let spec = options::json_payload("ExecProcessRequest.spec", req.spec.as_ref())
                .map_err(|source| TaskError::Options {
                    id: id.clone(),
                    source,
                })?
                .to_vec();
            for p in [&req.stdin, &req.stdout, &req.stderr] {
                check_stdio_path(p).map_err(|detail| TaskError::Other {
                    id: id.clone(),
                    what: "stdio",
                    detail,
                })?;
            }
            let mut p = Process::new(
                &req.exec_id,
                ProcessKind::Exec,
                ProcessState::Created,
                StdioPaths {
                    stdin: req.stdin.clone(),
                    stdout: req.stdout.clone(),
                    stderr: req.stderr.clone(),
                    terminal: req.terminal,
                },
            );
            p.spec = spec;
            c.execs.insert(req.exec_id.clone(), p);
            Ok(())
        })?;
        self.inner.publish(
            topics::TASK_EXEC_ADDED_EVENT_TOPIC,
            Box::new(TaskExecAdded {
                container_id: req.id,
                exec_id: req.exec_id,
                ..Default::default()
            }),
        );
        Ok(api::Empty::default())
    }

    fn resize_pty(
        &self,
        _ctx: &TtrpcContext,
        req: api::ResizePtyRequest,
    ) -> TtrpcResult<api::Empty> {
        Ok(self.with_container(&req.id, |c| {
            let id = c.id.clone();
            let p = c.process_mut(&req.exec_id)?;
            let clamp = |v: u32| v.min(u16::MAX as u32) as u16;
            match p.io.as_ref() {
                Some(io) => io
                    .resize(clamp(req.width), clamp(req.height))
                    .map_err(|source| TaskError::Io { id, source }),
                None => Ok(()),
            }
        })?)
        .map(|()| api::Empty::default())
    }

    fn close_io(&self, _ctx: &TtrpcContext, req: api::CloseIORequest) -> TtrpcResult<api::Empty> {
        Ok(self.with_container(&req.id, |c| {
            let p = c.process_mut(&req.exec_id)?;
            if req.stdin {
                if let Some(io) = p.io.as_ref() {
                    io.close_stdin();
                }
            }
            Ok(())
        })?)
        .map(|()| api::Empty::default())
    }

    fn update(&self, _ctx: &TtrpcContext, req: api::UpdateTaskRequest) -> TtrpcResult<api::Empty> {
        Ok(self.with_container(&req.id, |c| {
            let id = c.id.clone();
            c.not_checkpointing(Op::Update)?;
            c.init.transition(&id, Op::Update)?;
            let json = options::json_payload("UpdateTaskRequest.resources", req.resources.as_ref())
                .map_err(|source| TaskError::Options {
                    id: id.clone(),
                    source,
                })?;
            let file = c.bundle.join("update-resources.json");
            std::fs::write(&file, json).map_err(|e| TaskError::Other {
                id: id.clone(),
                what: "writing resources",
                detail: format!("{}: {e}", file.display()),
            })?;
            let r = c.runc.update(&id, &file).map_err(c.runc_err());
            let _ = std::fs::remove_file(&file);
            r
        })?)
        .map(|()| api::Empty::default())
    }

    fn wait(&self, _ctx: &TtrpcContext, req: api::WaitRequest) -> TtrpcResult<api::WaitResponse> {
        let cell =
            self.with_container(&req.id, |c| Ok(c.process_mut(&req.exec_id)?.exit.clone()))?;
        let (exit_status, at) = cell.wait();
        Ok(api::WaitResponse {
            exit_status,
            exited_at: MessageField::some(at),
            ..Default::default()
        })
    }

    fn stats(
        &self,
        _ctx: &TtrpcContext,
        req: api::StatsRequest,
    ) -> TtrpcResult<api::StatsResponse> {
        Ok(self.with_container(&req.id, |c| {
            let id = c.id.clone();
            if !matches!(
                c.init.state,
                ProcessState::Running | ProcessState::Paused | ProcessState::Created
            ) {
                return Err(TaskError::NotRunning {
                    id,
                    what: "stats",
                    state: c.init.state,
                });
            }
            let raw = c.runc.stats(&id).map_err(c.runc_err())?;
            let metrics = stats::metrics_from_runc(&raw);
            let value = metrics.write_to_bytes().map_err(|e| TaskError::Other {
                id: id.clone(),
                what: "encoding metrics",
                detail: e.to_string(),
            })?;
            Ok(api::StatsResponse {
                stats: MessageField::some(Any {
                    type_url: stats::METRICS_TYPE_URL.into(),
                    value,
                    ..Default::default()
                }),
                ..Default::default()
            })
        })?)
    }

    fn connect(
        &self,
        _ctx: &TtrpcContext,
        req: api::ConnectRequest,
    ) -> TtrpcResult<api::ConnectResponse> {
        let task_pid = self
            .inner
            .containers()
            .get(&req.id)
            .map(|c| c.init.pid as u32)
            .unwrap_or_default();
        Ok(api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid,
            version: env!("CARGO_PKG_VERSION").to_string(),
            ..Default::default()
        })
    }

    fn shutdown(&self, _ctx: &TtrpcContext, req: api::ShutdownRequest) -> TtrpcResult<api::Empty> {
        // containerd asks after every Delete; only the last one ends the shim.
        if !req.now && !self.inner.containers().is_empty() {
            return Ok(api::Empty::default());
        }
        self.inner.exit.signal();
        Ok(api::Empty::default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine_error::EngineError;

    #[test]
    fn errors_map_to_ttrpc_codes() {
        let gone = TaskError::Finished { id: "c".into() };
        assert_eq!(gone.code(), Code::NOT_FOUND);
        let ns = TaskError::Checkpoint {
            id: "c".into(),
            source: CrError::NotSupported("x".into()),
        };
        assert_eq!(ns.code(), Code::UNIMPLEMENTED);
        let failed = TaskError::Checkpoint {
            id: "c".into(),
            source: CrError::Failed("no freezer cgroup".into()),
        };
        assert_eq!(failed.code(), Code::INTERNAL);
        assert_eq!(failed.to_string(), "task c: checkpoint: no freezer cgroup");
        // The engine's typed errors keep their kind through the shim.
        for (kind, code) in [
            (ErrorKind::NotFound, Code::NOT_FOUND),
            (ErrorKind::InvalidArgument, Code::INVALID_ARGUMENT),
            (ErrorKind::Unsupported, Code::UNIMPLEMENTED),
            (ErrorKind::FailedPrecondition, Code::FAILED_PRECONDITION),
            (ErrorKind::Unavailable, Code::UNAVAILABLE),
            (ErrorKind::ResourceExhausted, Code::RESOURCE_EXHAUSTED),
            (ErrorKind::Internal, Code::INTERNAL),
        ] {
            let e = TaskError::Restore {
                id: "c".into(),
                source: CrError::Engine(EngineError::new(kind, "pid 7: x")),
            };
            assert_eq!(e.code(), code, "{kind:?}");
        }
        let full = TaskError::Checkpoint {
            id: "c".into(),
            source: CrError::Engine(EngineError::new(
                ErrorKind::ResourceExhausted,
                "/run/x/pages: No space left on device (os error 28)",
            )),
        };
        assert_eq!(
            full.to_string(),
            "task c: checkpoint: /run/x/pages: No space left on device (os error 28)"
        );
        let st: ttrpc::Error = TaskError::State(
            ProcessState::Stopped
                .transition(ProcessKind::Init, "c", Op::Pause)
                .unwrap_err(),
        )
        .into();
        match st {
            ttrpc::Error::RpcStatus(s) => {
                assert_eq!(s.code(), Code::FAILED_PRECONDITION);
                assert_eq!(s.message(), "task c: cannot pause: task is stopped");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_running_checkpoint_refuses_what_would_change_the_task() {
        let busy: ttrpc::Error = TaskError::Checkpointing {
            id: "c".into(),
            op: Op::Resume,
        }
        .into();
        match busy {
            ttrpc::Error::RpcStatus(s) => {
                assert_eq!(s.code(), Code::FAILED_PRECONDITION);
                assert_eq!(
                    s.message(),
                    "task c: cannot resume: a checkpoint of the task is in progress"
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn exit_cell_wakes_waiters_with_the_first_status() {
        let cell = Arc::new(ExitCell::default());
        let c2 = cell.clone();
        let waiter = std::thread::spawn(move || c2.wait().0);
        cell.set(137);
        cell.set(0);
        assert_eq!(waiter.join().unwrap(), 137);
        assert_eq!(cell.get().map(|e| e.0), Some(137));
    }
}
