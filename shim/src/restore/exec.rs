//! Executing a restore: the restore command (the *controller*) checks the
//! image and plan, forks the tree's root, and waits; every restored process
//! is a forked copy of the runtime that builds its staging memory from the
//! plan, forks its own children with their original pids (`clone3` with
//! `set_tid`), takes back its process state, and jumps into the restorer
//! blob, which parks every thread at a shared barrier.
//!
//! The controller holds the barrier one short of its count: only when every
//! thread of every process is parked does it add the last unit and release
//! the tree, so no restored code runs unless the whole tree is in place. If
//! any process reports a failure (in the runtime, or a blob step with its
//! errno) or dies, the controller kills everything it created and names the
//! process and step.
//!
//! A zombie of the image is forked by its parent like any child, takes its
//! process group and session, marks its slot `STATE_ZOMBIE` and ends the
//! way it ended (`_exit(code)`, or its signal's default action). It has no
//! blob and no thread at the barrier; its parent waits until it is a zombie
//! with the recorded wait status before it goes on, and reaps it only once
//! released (SIGCHLD stays pending until then). Not reproduced: the
//! core-dumped bit of a zombie killed by a core-dumping signal (no core of
//! the restore runtime is ever written).
//!
//! Control region (MAP_SHARED, created before the first fork):
//!
//! ```text
//! 0                barrier word (u32) counted by the blob
//! 8                set by a namespace's cowsnap-init once it stops dying
//!                  with the restore command
//! 2048             SysV shm ids the root created (count u32, then ids),
//!                  removed by the restore command if the restore fails
//! 4096 + 512*i     slot of process i: outer pid (u32), state (u32),
//!                  message length (u32) + bytes, blob Status at +384
//! ```

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::image::pagestore::PageStoreReader;
use crate::image::types::{
    PageId, ProcessEntry, ProcessImage, ThreadImage, UserRegs, VmaKind, ZombieExit,
};
use crate::image::{Image, ImageError};
use crate::sys::clone::{self, CloneError, Forked};
use crate::sys::mem::{self, Backing, MemError, SharedRegion, Staging};
use crate::sys::procfs;

use super::blob::{
    self, BlobArgs, BlobFailure, CredsSpec, FpuState, MapFd, Placement, PrctlMmMap, ThreadSpec,
};
use super::plan::{self, PageFill, PlanError, RestorePlan, SegmentBacking};
use super::seccomp::{self, SeccompProgram};
use super::{attrs, checks, cleanup, fds, posix_timers, saved_files, signals};

/// Which pid namespace the tree comes back in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PidNs {
    /// A fresh pid namespace (pids as they were inside the dumped tree's own namespace).
    New,
    /// The restore command's namespace; every pid must be free.
    Current,
    /// The caller is pid 1 of a container's fresh pid namespace (the
    /// container restore helper) and becomes the restored root itself.
    Container,
}

impl PidNs {
    /// The id a task gets back, from its ids outermost namespace first: the
    /// innermost in a new namespace, the outermost in the current one.
    fn pick(self, ns_ids: &[i32], id: i32) -> i32 {
        match self {
            PidNs::New | PidNs::Container => ns_ids.last().copied().unwrap_or(id),
            PidNs::Current => ns_ids.first().copied().unwrap_or(id),
        }
    }

    fn name(self) -> &'static str {
        match self {
            PidNs::New => "new",
            PidNs::Current => "current",
            PidNs::Container => "container's",
        }
    }
}

#[derive(Debug, Clone)]
pub struct RestoreOptions {
    pub images: PathBuf,
    pub pidfile: Option<PathBuf>,
    /// None: new when the dumped root was a namespace init, else current.
    pub pid_ns: Option<PidNs>,
    pub progress: bool,
    /// An OCI seccomp profile (JSON: a runtime spec's `linux.seccomp`)
    /// every restored process is put under, on top of its own filters.
    pub seccomp_profile: Option<PathBuf>,
}

#[derive(Debug, Clone)]
pub struct RestoreSummary {
    /// The restored root's pid in the caller's namespace.
    pub root_pid: i32,
    pub pid_ns: PidNs,
    pub processes: usize,
    pub threads: usize,
    pub plan: plan::PlanStats,
    /// The plan came from the image (`plan.bin`), not planned at restore.
    pub plan_stored: bool,
    pub seconds: f64,
}

impl std::fmt::Display for RestoreSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "restored {} processes, {} threads, root pid {} ({} pid namespace): {} pages inherited, {} private, {} copied, {} moves ({}) in {:.3}s",
            self.processes,
            self.threads,
            self.root_pid,
            self.pid_ns.name(),
            self.plan.pages_inherited,
            self.plan.pages_private,
            self.plan.pages_copied,
            self.plan.moves,
            if self.plan_stored {
                "plan from the image"
            } else {
                "planned at restore"
            },
            self.seconds
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("image {dir}: {source}")]
    Image {
        dir: PathBuf,
        #[source]
        source: ImageError,
    },
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error("image {dir}: {source}")]
    StoredPlan {
        dir: PathBuf,
        #[source]
        source: super::plan_store::StoredPlanError,
    },
    #[error(transparent)]
    Check(#[from] checks::CheckError),
    #[error(transparent)]
    Clone(#[from] CloneError),
    #[error(transparent)]
    Mem(#[from] MemError),
    #[error("not supported: {0}")]
    NotSupported(String),
    #[error("seccomp profile {path}: {message}")]
    SeccompProfile { path: PathBuf, message: String },
    #[error("pid {pid}: {message}")]
    Process { pid: i32, message: String },
    /// A restored process (or the container restore helper) failed and
    /// recorded its typed error in its slot.
    #[error("pid {pid}: {message}")]
    Reported {
        pid: i32,
        kind: crate::engine_error::ErrorKind,
        message: String,
    },
    #[error("pid {pid}: {failure}")]
    Blob { pid: i32, failure: BlobFailure },
    #[error("pid {pid} died during restore ({how})")]
    Died { pid: i32, how: String },
    #[error("writing pid file {path}: {source}")]
    Pidfile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Control word set by a namespace's `cowsnap-init` once it no longer dies
/// with the restore command.
const CONTROL_INIT_DISARMED: u64 = 8;
const SLOT_BASE: u64 = 4096;
const SLOT_SIZE: u64 = 512;
const SLOT_MSG_MAX: usize = 360;
/// The failure's kind (`ErrorKind::wire`, 0: not told), after the message.
const SLOT_KIND: u64 = 376;
const SLOT_STATUS: u64 = 384;
/// Start and length (u64 each) of the process's restorer region.
const SLOT_BLOB: u64 = 448;
const STATE_STARTED: u32 = 1;
const STATE_JUMPING: u32 = 2;
const STATE_FAILED: u32 = 3;
/// A zombie of the image, about to end as it ended: no blob, no barrier.
const STATE_ZOMBIE: u32 = 4;
const PAGE: u64 = 4096;

/// Everything a restored process needs, copied into it by fork.
struct Ctx {
    image: Image,
    /// The image's pages, every frame checked (by [`open_and_plan`]).
    pages: PageStoreReader,
    plan: RestorePlan,
    control: SharedRegion,
    mode: PidNs,
    /// Pid (and tids) each process gets, per tree index.
    target_pid: Vec<i32>,
    total_threads: u32,
    fd_base: i32,
    stdio: fds::Stdio,
    /// Installed by the restorer after each process's own filters.
    spec_seccomp: Option<SeccompProgram>,
}

/// Whether the files an image depends on are checked where this runs
/// (not by the shim, whose root is not the container's), and which open
/// files may have grown since the dump.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Files {
    Check(checks::Growth),
    ElsewhereLater,
}

/// Opens and checks an image and plans its restore: everything that can
/// be refused is refused here, before anything is created.
/// When the first [`trace`] line was printed (in the restore command; a
/// forked process inherits it).
static TRACE_START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();

/// With `COWSNAP_TRACE` set, one line on stderr per phase of each restore
/// process (seconds since the restore began, pid, phase): where a restore's
/// time goes (README "Against CRIU 4.2").
fn trace(what: std::fmt::Arguments) {
    if std::env::var_os("COWSNAP_TRACE").is_some() {
        let t = TRACE_START
            .get_or_init(Instant::now)
            .elapsed()
            .as_secs_f64();
        eprintln!("trace {t:7.3} pid {}: {what}", std::process::id());
    }
}

fn open_and_plan(
    images: &Path,
    files: Files,
    progress: &dyn Fn(std::fmt::Arguments),
) -> Result<Opened, RestoreError> {
    let image = open_image(images)?;
    // Every frame's contents, before any process exists (README: the image
    // is checked completely first); the manifest's checksum of `pages` alone
    // would miss an image whose manifest was rewritten to match.
    let pages = image
        .page_reader()
        .and_then(|reader| reader.into_verified())
        .map_err(|source| RestoreError::Image {
            dir: images.to_path_buf(),
            source,
        })?;
    trace(format_args!("frames verified"));
    if let Files::Check(growth) = files {
        checks::check_files(&image, growth)?;
    }
    trace(format_args!("files checked"));
    progress(format_args!("image {} checked", images.display()));
    let plan = load_plan(images, &image)?;
    progress(format_args!(
        "planned: {} segments, {} moves, {} pages inherited, {} private, {} copied",
        plan.stats.segments,
        plan.stats.moves,
        plan.stats.pages_inherited,
        plan.stats.pages_private,
        plan.stats.pages_copied
    ));
    Ok(Opened { image, plan, pages })
}

/// Opens the image in `images` and refuses what restore does not support.
fn open_image(images: &Path) -> Result<Image, RestoreError> {
    trace(format_args!("open"));
    let image = Image::open(images).map_err(|source| RestoreError::Image {
        dir: images.to_path_buf(),
        source,
    })?;
    trace(format_args!("opened"));
    refuse_unsupported(&image)?;
    Ok(image)
}

/// The image's stored plan, checked against it, or (an image without
/// one) a plan made now.
fn load_plan(images: &Path, image: &Image) -> Result<RestorePlan, RestoreError> {
    let plan = match &image.plan {
        // Checked against the image (bounds, binding), not planned again.
        Some(bytes) => {
            super::plan_store::decode(bytes, image).map_err(|source| RestoreError::StoredPlan {
                dir: images.to_path_buf(),
                source,
            })?
        }
        None => plan::plan(&image.tree.processes, &image.processes)?,
    };
    trace(format_args!(
        "{}",
        if image.plan.is_some() {
            "plan loaded"
        } else {
            "planned"
        }
    ));
    Ok(plan)
}

/// An image opened, checked and planned ([`open_and_plan`]).
struct Opened {
    image: Image,
    plan: RestorePlan,
    /// Its pages, every frame checked.
    pages: PageStoreReader,
}

/// Every thread of the tree, counted once per live process at least:
/// what the blob's barrier waits for (zombies never reach it).
fn total_threads(image: &Image) -> u32 {
    image
        .tree
        .processes
        .iter()
        .zip(&image.processes)
        .filter(|(e, _)| e.zombie.is_none())
        .map(|(_, p)| p.threads.len().max(1) as u32)
        .sum()
}

/// Bytes of control region a tree of `processes` needs.
fn control_len(processes: usize) -> u64 {
    SLOT_BASE + SLOT_SIZE * processes as u64
}

/// What every restored process needs: pids checked free, stdio taken.
fn context(
    Opened { image, plan, pages }: Opened,
    mode: PidNs,
    control: SharedRegion,
) -> Result<Ctx, RestoreError> {
    let pick = |nspid: &[i32], pid: i32| mode.pick(nspid, pid);
    let target_pid: Vec<i32> = image
        .tree
        .processes
        .iter()
        .map(|e| pick(&e.nspid, e.pid))
        .collect();
    if mode != PidNs::New {
        // A container's helper is pid 1 itself: every other pid must be free.
        let mut all: Vec<i32> = Vec::new();
        for p in &image.processes {
            all.extend(p.threads.iter().map(|t| pick(&t.nstid, t.tid)));
        }
        // A zombie has no thread, but its pid must be free too.
        for (k, e) in image.tree.processes.iter().enumerate() {
            if e.zombie.is_some() {
                all.push(target_pid[k]);
            }
        }
        if mode == PidNs::Container {
            all.retain(|&pid| pid != 1);
        }
        checks::check_pids_free(&all)?;
    }
    let total_threads = total_threads(&image);
    let fd_base = fds::fd_base(&image.processes);
    let stdio = inherit_stdio(fd_base).map_err(|message| RestoreError::Process {
        pid: image.tree.processes[0].pid,
        message,
    })?;
    Ok(Ctx {
        image,
        pages,
        plan,
        control,
        mode,
        target_pid,
        total_threads,
        fd_base,
        stdio,
        spec_seccomp: None,
    })
}

/// Restores the image described by `options`; returns once every process
/// of the tree runs.
pub fn restore(options: &RestoreOptions) -> Result<RestoreSummary, RestoreError> {
    let started = Instant::now();
    let progress = |what: std::fmt::Arguments| {
        if options.progress {
            eprintln!("cowsnap: {:>7.3}s {what}", started.elapsed().as_secs_f64());
        }
    };
    let spec_seccomp = options
        .seccomp_profile
        .as_deref()
        .map(seccomp::compile_file)
        .transpose()?;
    let opened = open_and_plan(
        &options.images,
        Files::Check(checks::Growth::AppendOnlyMayGrow),
        &progress,
    )?;
    let image = &opened.image;
    // The tmpfs files the root will create: removed again on failure.
    let created_files = saved_files::CreatedFiles::before(&image.tree.saved_files);
    // The packets of the tree's established connections were dropped since
    // the dump; on every path out of here they flow again (after the
    // release on success; on failure the connections are lost anyway).
    let lock = image
        .sockets
        .connection_lock
        .as_deref()
        .map(crate::sys::netfilter::ConnectionLock::adopt);
    let root = &image.tree.processes[0];
    let root_is_ns_init = root.nspid.last() == Some(&1);
    let mode = options.pid_ns.unwrap_or(if root_is_ns_init {
        PidNs::New
    } else {
        PidNs::Current
    });
    if mode == PidNs::Container {
        return Err(RestoreError::NotSupported(
            "the container mode is only for the container restore helper (cowsnap restore-init)"
                .into(),
        ));
    }
    let processes = image.processes.len();
    // Before any process exists: a pid file that cannot be written fails
    // the restore while there is nothing to kill.
    let mut pidfile = match &options.pidfile {
        Some(path) => Some(Pidfile::create(path)?),
        None => None,
    };
    let control = SharedRegion::new(control_len(processes))?;
    let mut ctx = context(opened, mode, control)?;
    ctx.spec_seccomp = spec_seccomp;
    progress(format_args!(
        "restoring {} processes ({} threads) into the {} pid namespace",
        processes,
        ctx.total_threads,
        mode.name()
    ));

    if ctx.image.tree.mount_ns == Some(crate::image::types::MountNs::OwnRoot) {
        progress(format_args!(
            "the tree had a root directory of its own (a container's): restored in this mount namespace"
        ));
    }
    let needs_init = mode == PidNs::New && ctx.target_pid[0] != 1;
    let first = if needs_init { 1 } else { ctx.target_pid[0] };
    let child = match clone::clone3(&[first], mode == PidNs::New)? {
        Forked::Child if needs_init => init_helper(ctx),
        Forked::Child => run_process(&ctx, 0, None, Staging::default()),
        Forked::Parent(pid) => pid,
    };

    let watch = Watch::of(&ctx.control, &ctx.image, None);
    // Every process inherits this command's own filters before its own.
    let added = own_seccomp_filters() + ctx.spec_seccomp.is_some() as u32;
    if let Err(e) = wait_in_place(&watch, Some(child))
        .and_then(|()| check_confinement(&watch, &ctx.image, added))
    {
        kill_all(&watch, child);
        return Err(e);
    }
    if let Some(copy) = super::mount_ns::private_copy(ctx.image.tree.mount_ns.as_ref()) {
        let root = watch.pid(0);
        if let Err(message) = super::mount_ns::mount_procfs(root, copy.mounts) {
            kill_all(&watch, child);
            return Err(RestoreError::Process {
                pid: ctx.image.tree.processes[0].pid,
                message: format!("mount namespace: {message}"),
            });
        }
        progress(format_args!(
            "own mount namespace: {} mount(s) made again, {} detached",
            copy.mounts.len(),
            copy.unmounted.len()
        ));
    }
    progress(format_args!("every process in place; releasing the tree"));
    mem::futex_add_and_wake(ctx.control.word(0));
    let root_pid = watch.pid(0);
    if let Err(e) = release_restorer(&watch) {
        kill_all(&watch, child);
        return Err(e);
    }
    progress(format_args!("restorer unmapped from every process"));
    if needs_init {
        let deadline = Instant::now() + Duration::from_secs(10);
        while ctx
            .control
            .word(CONTROL_INIT_DISARMED)
            .load(Ordering::Acquire)
            == 0
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    if let Some(file) = pidfile.as_mut() {
        // The README's promise holds here too: a failure kills the tree.
        if let Err(e) = file.write(root_pid) {
            kill_all(&watch, child);
            return Err(e);
        }
    }
    // The tree runs: what it uses stays, whatever happens next.
    created_files.keep();
    if let Some(lock) = lock {
        let name = lock.name().to_string();
        lock.release().map_err(|e| RestoreError::Process {
            pid: root_pid,
            message: format!("the tree runs, but its connections' packets are still dropped by nftables table inet {name}: {e}"),
        })?;
        progress(format_args!("connection lock {name} released"));
    }
    Ok(RestoreSummary {
        root_pid,
        pid_ns: mode,
        processes,
        threads: ctx.total_threads as usize,
        plan: ctx.plan.stats,
        plan_stored: ctx.image.plan.is_some(),
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// The `--pidfile`, opened before any process of the tree exists, so that
/// one that cannot be written fails the restore while nothing runs. A file
/// that exists is opened as it is; a new one starts as an unnamed file in
/// its directory (`O_TMPFILE`) and gets its name only once the pid is in it,
/// so a restore killed half way leaves no pid file behind.
struct Pidfile {
    path: PathBuf,
    file: std::fs::File,
    /// The file is unnamed yet: link it at `path` after writing.
    unnamed: bool,
}

impl Pidfile {
    fn create(path: &Path) -> Result<Pidfile, RestoreError> {
        use std::os::unix::fs::OpenOptionsExt;
        let error = |source| RestoreError::Pidfile {
            path: path.to_path_buf(),
            source,
        };
        if std::fs::symlink_metadata(path).is_ok() {
            let file = std::fs::OpenOptions::new()
                .write(true)
                .open(path)
                .map_err(error)?;
            return Ok(Pidfile {
                path: path.to_path_buf(),
                file,
                unnamed: false,
            });
        }
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        let file = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_TMPFILE)
            .mode(0o644)
            .open(dir)
            .map_err(error)?;
        Ok(Pidfile {
            path: path.to_path_buf(),
            file,
            unnamed: true,
        })
    }

    fn write(&mut self, pid: i32) -> Result<(), RestoreError> {
        use std::io::Write;
        use std::os::fd::AsRawFd;
        let error = |source| RestoreError::Pidfile {
            path: self.path.clone(),
            source,
        };
        // A device (say /dev/stdout) cannot be truncated; a regular file
        // may still hold an older pid.
        if self.file.metadata().map_err(error)?.is_file() {
            self.file.set_len(0).map_err(error)?;
        }
        self.file
            .write_all(format!("{pid}\n").as_bytes())
            .map_err(error)?;
        if self.unnamed {
            let from = format!("/proc/self/fd/{}", self.file.as_raw_fd());
            nix::unistd::linkat(
                None,
                Path::new(&from),
                None,
                self.path.as_path(),
                nix::fcntl::AtFlags::AT_SYMLINK_FOLLOW,
            )
            .map_err(|e| error(std::io::Error::from(e)))?;
        }
        Ok(())
    }
}

/// Takes the restorer's region out of every process of the released tree.
fn release_restorer(watch: &Watch) -> Result<(), RestoreError> {
    for i in 0..watch.dumped.len() {
        if watch.zombie[i] {
            continue; // no blob: it ended before the barrier
        }
        let raw = watch.control.read_bytes(slot(i) + SLOT_BLOB, 16);
        let start = u64::from_ne_bytes(raw[..8].try_into().unwrap_or_default());
        let len = u64::from_ne_bytes(raw[8..].try_into().unwrap_or_default());
        cleanup::unmap_restorer(watch.pid(i), start, len).map_err(|e| RestoreError::Process {
            pid: watch.dumped[i],
            message: e.to_string(),
        })?;
    }
    Ok(())
}

/// The controller of a container restore. The shim prepares the control
/// region ([`ContainerRestore::prepare`], a memfd the helper gets as an
/// extra fd), the helper ([`restore_as_init`]) rebuilds the tree as the
/// container's pid 1, and `cowsnap restore-control`, a child of the shim,
/// attaches to the region ([`ContainerRestore::attach`]) and releases the
/// tree ([`ContainerRestore::control`]).
pub struct ContainerRestore {
    image: Image,
    plan: RestorePlan,
    control: SharedRegion,
}

impl ContainerRestore {
    /// The shim's side, before the container exists: opens, checks and
    /// plans the image (so what cannot be restored is refused now) and
    /// returns the control region, a memfd for the helper and the controller.
    pub fn prepare(
        images: &Path,
        limits: &super::limits::Limits,
    ) -> Result<std::os::fd::OwnedFd, RestoreError> {
        let image = open_and_plan(images, Files::ElsewhereLater, &|_| {})?.image;
        limits.check(&image)?;
        if image.tree.processes[0].nspid.last() != Some(&1) {
            return Err(RestoreError::NotSupported(format!(
                "image {}: its root (pid {}) was not a pid namespace init, so it was not a container",
                images.display(),
                image.tree.processes[0].pid
            )));
        }
        Ok(mem::memfd(
            "cowsnap-control",
            control_len(image.processes.len()),
        )?)
    }

    /// The controller's side, in another process than [`prepare`]'s: the
    /// image opened again, the control region mapped from `fd`.
    ///
    /// [`prepare`]: ContainerRestore::prepare
    pub fn attach(
        images: &Path,
        fd: std::os::fd::OwnedFd,
    ) -> Result<ContainerRestore, RestoreError> {
        // The helper, which reads the pages, checks them (and the shim's
        // prepare did); checking every frame here too would take cores
        // from the helper, which runs meanwhile.
        let image = open_image(images)?;
        let plan = load_plan(images, &image)?;
        let len = control_len(image.processes.len());
        let control = SharedRegion::from_fd(std::os::fd::AsFd::as_fd(&fd), len)?;
        Ok(ContainerRestore {
            image,
            plan,
            control,
        })
    }

    /// Waits until the helper (host pid `init_pid`) and every process it
    /// created is parked, releases the tree and unmaps the restorer. On
    /// failure kills the container's init (and so its namespace).
    /// `spec_seccomp`: the container's spec has a seccomp profile, which
    /// every thread must have on top of its image's filters (the helper
    /// itself runs under none).
    pub fn control(
        self,
        init_pid: i32,
        spec_seccomp: bool,
    ) -> Result<RestoreSummary, RestoreError> {
        let started = Instant::now();
        let host = HostPids::new(init_pid);
        let watch = Watch::of(&self.control, &self.image, Some(&host));
        if let Err(e) = wait_in_place(&watch, None)
            .and_then(|()| check_confinement(&watch, &self.image, spec_seccomp as u32))
        {
            kill_all(&watch, init_pid);
            return Err(e);
        }
        mem::futex_add_and_wake(self.control.word(0));
        release_restorer(&watch)?;
        Ok(RestoreSummary {
            root_pid: init_pid,
            pid_ns: PidNs::Container,
            processes: self.image.processes.len(),
            threads: total_threads(&self.image) as usize,
            plan: self.plan.stats,
            plan_stored: self.image.plan.is_some(),
            seconds: started.elapsed().as_secs_f64(),
        })
    }
}

/// The container restore helper: this process is pid 1 of the container's
/// fresh pid namespace, with the control region on `control_fd`. It
/// becomes the restored root and does not return; a failure is recorded in
/// the root's slot (the shim reports it) and returned.
pub fn restore_as_init(
    images: &Path,
    control_fd: std::os::fd::OwnedFd,
    limits: &super::limits::Limits,
) -> RestoreError {
    use std::os::fd::{AsFd, AsRawFd};
    let len = match nix::sys::stat::fstat(control_fd.as_raw_fd()) {
        Ok(st) => st.st_size as u64,
        Err(e) => return RestoreError::NotSupported(format!("control fd: {e}")),
    };
    // Two mappings of one region: one goes into the context, the other
    // stays here to report a failure on the way there.
    let mapped = SharedRegion::from_fd(control_fd.as_fd(), len)
        .and_then(|report| Ok((report, SharedRegion::from_fd(control_fd.as_fd(), len)?)));
    drop(control_fd);
    let (report, control) = match mapped {
        Ok(both) => both,
        Err(e) => return e.into(),
    };
    let prepared = (|| {
        if clone::outer_pid().ok() != Some(1) {
            return Err(RestoreError::NotSupported(
                "restore-init must run as pid 1 of the container's pid namespace".into(),
            ));
        }
        // The container's rootfs stays as strict as the image: see `Growth::Exact`.
        let opened = open_and_plan(images, Files::Check(checks::Growth::Exact), &|_| {})?;
        limits.check(&opened.image)?;
        if control_len(opened.image.processes.len()) > control.len() {
            return Err(RestoreError::NotSupported(format!(
                "control region of {} bytes is too small for {} processes",
                control.len(),
                opened.image.processes.len()
            )));
        }
        let mut ctx = context(opened, PidNs::Container, control)?;
        ctx.spec_seccomp = limits.seccomp.clone();
        Ok(ctx)
    })();
    match prepared {
        Ok(ctx) => {
            drop(report);
            run_process(&ctx, 0, None, Staging::default())
        }
        Err(e) => {
            let error = crate::engine_error::EngineError::of(&e);
            record_failure(&report, 0, &error.message, Some(error.kind));
            e
        }
    }
}

/// Refuses, before anything is created, what this version cannot restore.
fn refuse_unsupported(image: &Image) -> Result<(), RestoreError> {
    for (entry, p) in image.tree.processes.iter().zip(&image.processes) {
        if entry.zombie.is_some() {
            continue; // nothing but an exit status (the reader checked)
        }
        for v in &p.vmas {
            let why = match v.kind {
                VmaKind::SysvShm if v.vm_flags.iter().any(|f| f == "ht") => {
                    "SysV shared memory on huge pages is"
                }
                VmaKind::Other => "a mapping of this kind is",
                _ => continue,
            };
            return Err(RestoreError::NotSupported(format!(
                "pid {} VMA {:#x}-{:#x} ({}): {why} not restored yet",
                p.pid,
                v.start,
                v.end,
                v.path.as_deref().unwrap_or("anonymous")
            )));
        }
        if p.threads.is_empty() {
            return Err(RestoreError::NotSupported(format!(
                "pid {}: image has no thread state",
                p.pid
            )));
        }
    }
    posix_timers::refuse_without_kernel_support(image)?;
    Ok(())
}

/// Pid 1 of a new namespace whose dumped root was not an init: forks the
/// root with its own pid, then reaps orphans for as long as the namespace lives.
fn init_helper(mut ctx: Ctx) -> ! {
    let _ = nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL);
    let _ = std::fs::write("/proc/self/comm", "cowsnap-init");
    match clone::clone3(&[ctx.target_pid[0]], false) {
        Ok(Forked::Child) => run_process(&ctx, 0, None, Staging::default()),
        Ok(Forked::Parent(root)) => {
            // The root has its stdio; init keeps none of the caller's fds
            // open (a caller reading our output through a pipe must see EOF),
            // nor the image's pages mapped (which would keep the file for
            // as long as the namespace lives, deleted or not).
            ctx.pages.unmap();
            release_fds();
            reap_forever(&ctx, root)
        }
        Err(e) => fail_slot(&ctx, 0, &e.to_string()),
    }
}

/// Points fds 0-2 at /dev/null and closes every other fd.
fn release_fds() {
    if let Ok(null) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
    {
        use std::os::fd::AsRawFd;
        for fd in 0..3 {
            let _ = nix::unistd::dup2(null.as_raw_fd(), fd);
        }
    }
    let _ = crate::sys::restore_sys::close_range(3, u32::MAX);
}

/// Init of a restore namespace: reaps orphans until the namespace is
/// empty. Until the tree is released it dies with the restore command (and
/// the namespace with it); then it disarms that and tells the restore
/// command, which waits for this before it exits.
fn reap_forever(ctx: &Ctx, root: i32) -> ! {
    use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
    let mut disarmed = false;
    loop {
        if !disarmed && ctx.control.word(0).load(Ordering::Acquire) > ctx.total_threads {
            let _ = nix::sys::prctl::set_pdeathsig(None);
            ctx.control
                .word(CONTROL_INIT_DISARMED)
                .store(1, Ordering::Release);
            disarmed = true;
        }
        let flags = (!disarmed).then_some(WaitPidFlag::WNOHANG);
        match waitpid(None, flags) {
            Ok(WaitStatus::StillAlive) => std::thread::sleep(Duration::from_millis(1)),
            Ok(status)
                if status.pid().map(|p| p.as_raw()) == Some(root) && !slot_jumped(ctx, 0) =>
            {
                clone::exit_now(1)
            }
            Ok(_) => {}
            Err(nix::errno::Errno::ECHILD) => clone::exit_now(0),
            Err(_) => {}
        }
    }
}

fn slot(i: usize) -> u64 {
    SLOT_BASE + SLOT_SIZE * i as u64
}

fn slot_jumped(ctx: &Ctx, i: usize) -> bool {
    ctx.control.word(slot(i) + 4).load(Ordering::Acquire) == STATE_JUMPING
}

/// Records a runtime failure of process `i` and exits.
fn fail_slot(ctx: &Ctx, i: usize, message: &str) -> ! {
    record_failure(&ctx.control, i, message, None);
    clone::exit_now(1)
}

/// Writes a runtime failure of process `i` into its slot, with its kind
/// when it is known (a typed error, not a message).
fn record_failure(
    control: &SharedRegion,
    i: usize,
    message: &str,
    kind: Option<crate::engine_error::ErrorKind>,
) {
    let bytes = message.as_bytes();
    let len = bytes.len().min(SLOT_MSG_MAX);
    control.write_bytes(slot(i) + 12, &bytes[..len]);
    control
        .word(slot(i) + SLOT_KIND)
        .store(kind.map_or(0, |k| k.wire()), Ordering::Release);
    control
        .word(slot(i) + 8)
        .store(len as u32, Ordering::Release);
    control
        .word(slot(i) + 4)
        .store(STATE_FAILED, Ordering::Release);
}

/// The message of a failure process `i` recorded in its slot, if any.
fn slot_failure(control: &SharedRegion, i: usize) -> Option<String> {
    if control.word(slot(i) + 4).load(Ordering::Acquire) != STATE_FAILED {
        return None;
    }
    let len = control.word(slot(i) + 8).load(Ordering::Acquire) as u64;
    Some(String::from_utf8_lossy(&control.read_bytes(slot(i) + 12, len)).into_owned())
}

/// Restored process `i` is a zombie of the image: it takes its process
/// group and session, says so in its slot, and ends as it ended.
fn become_zombie(ctx: &Ctx, i: usize, exit: ZombieExit) -> ! {
    if let Ok(pid) = clone::outer_pid() {
        ctx.control
            .word(slot(i))
            .store(pid as u32, Ordering::Release);
    }
    block_all_signals();
    if let Err(e) = session(ctx, i) {
        fail_slot(ctx, i, &format!("session/process group: {e}"));
    }
    // What `ps` shows of it; a failure only costs the name.
    let _ = crate::sys::restore_sys::set_thread_name(&ctx.image.tree.processes[i].comm);
    ctx.control
        .word(slot(i) + 4)
        .store(STATE_ZOMBIE, Ordering::Release);
    match exit {
        ZombieExit::Exited { code } => clone::exit_now(i32::from(code)),
        ZombieExit::Killed { signal, .. } => die_of_signal(i32::from(signal)),
    }
}

/// Dies of `signal`'s default action, without a core dump (the image
/// checked that the signal ends a process).
fn die_of_signal(signal: i32) -> ! {
    use crate::sys::restore_sys::{rt_sigaction, set_rlimit, set_signal_mask, KernelSigaction};
    // Not dumpable: no core, whatever core_pattern says (a pipe handler
    // ignores RLIMIT_CORE 0); the limit as well, for the file case.
    let _ = nix::sys::prctl::set_dumpable(false);
    let _ = set_rlimit(libc::RLIMIT_CORE, 0, 0);
    if signal != libc::SIGKILL {
        let _ = rt_sigaction(signal, Some(&KernelSigaction::default()));
    }
    let _ = set_signal_mask(!(1u64 << (signal - 1)));
    let _ = crate::sys::ptrace::kill(nix::unistd::getpid().as_raw(), signal);
    // Unreachable unless the signal did not kill: the parent sees the
    // wrong status and fails the restore.
    clone::exit_now(128 + signal)
}

/// In the parent of zombie `child` (pid `pid` here): waits until it is a
/// zombie and checks it ended with the recorded wait status (field 52 of
/// /proc/PID/stat, read without reaping it).
fn await_zombie(ctx: &Ctx, child: usize, pid: i32) -> Result<(), String> {
    let entry = &ctx.image.tree.processes[child];
    let want = entry.zombie.map_or(0, ZombieExit::wait_status);
    let deadline = Instant::now() + Duration::from_secs(30);
    let path = format!("/proc/{pid}/stat");
    loop {
        let stat = std::fs::read_to_string(&path)
            .map_err(|e| format!("zombie pid {}: {path}: {e}", entry.pid))?;
        let state = stat
            .rsplit_once(')')
            .and_then(|(_, r)| r.trim_start().chars().next());
        if state == Some('Z') {
            if let Some(message) = slot_failure(&ctx.control, child) {
                return Err(format!("zombie pid {}: {message}", entry.pid));
            }
            let got = crate::dump::tree::stat_exit_code(&stat).and_then(|f| f.parse::<u32>().ok());
            // The core-dumped bit is not reproduced (see the module doc).
            return match got {
                Some(got) if got == want & !0x80 => Ok(()),
                got => Err(format!(
                    "zombie pid {} ended with wait status {got:?}, the image says {want:#x}",
                    entry.pid
                )),
            };
        }
        if Instant::now() > deadline {
            return Err(format!(
                "zombie pid {} is still in state {state:?} after 30 s",
                entry.pid
            ));
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// The life of restored process `i` until it jumps into the blob. The
/// root creates the pipe set; descendants get the one they inherited, and
/// the staging mappings their ancestors made.
fn run_process(ctx: &Ctx, i: usize, pipes: Option<&fds::PipeSet>, staging: Staging) -> ! {
    if let Some(exit) = ctx.image.tree.processes[i].zombie {
        become_zombie(ctx, i, exit)
    }
    // Until the release, this process dies with its parent: a restore
    // killed half way leaves nothing parked behind (the kill cascades down
    // the tree; the blob disarms it once past the barrier).
    //
    // Not the root of a container: its parent is the shim, whose threads
    // come and go, and a parent-death signal follows the parent *thread*.
    if !(ctx.mode == PidNs::Container && i == 0) {
        let _ = nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL);
    }
    // Before the root forks or creates files: those on a recorded tmpfs
    // belong in the tree's namespace.
    if i == 0 && ctx.mode != PidNs::Container {
        if let Some(copy) = super::mount_ns::private_copy(ctx.image.tree.mount_ns.as_ref()) {
            if let Err(message) = super::mount_ns::enter_new(&copy) {
                fail_slot(ctx, i, &format!("mount namespace: {message}"));
            }
        }
    }
    if i == 0 && ctx.mode != PidNs::Current {
        if let Err(message) = pids_out_of_the_way(ctx) {
            fail_slot(ctx, i, &message);
        }
    }
    if let Ok(pid) = clone::outer_pid() {
        ctx.control
            .word(slot(i))
            .store(pid as u32, Ordering::Release);
    }
    ctx.control
        .word(slot(i) + 4)
        .store(STATE_STARTED, Ordering::Release);
    match build_process(ctx, i, pipes, staging) {
        Ok(prepared) => {
            ctx.control
                .word(slot(i) + 4)
                .store(STATE_JUMPING, Ordering::Release);
            prepared.jump()
        }
        Err(message) => fail_slot(ctx, i, &message),
    }
}

fn build_process(
    ctx: &Ctx,
    i: usize,
    inherited: Option<&fds::PipeSet>,
    mut staging: Staging,
) -> Result<blob::Prepared, String> {
    let entry = &ctx.image.tree.processes[i];
    let image = &ctx.image.processes[i];
    let me = &ctx.plan.processes[i];
    block_all_signals();
    session(ctx, i).map_err(|e| format!("session/process group: {e}"))?;
    if i == 0 {
        restore_sysv_segments(ctx)?;
    }

    // Pipes (and saved files, sockets, ...) are created once, by the
    // root, so every process inherits them.
    let created;
    let pipes = match inherited {
        Some(p) => p,
        None => {
            let saved =
                saved_files::SavedSet::create(&ctx.image.tree.saved_files, &ctx.pages, ctx.fd_base)
                    .map_err(|e| e.to_string())?;
            created = fds::PipeSet::create(
                &ctx.image.pipes,
                &ctx.image.sockets,
                &ctx.image.processes,
                saved,
                ctx.fd_base,
            )
            .map_err(|e| e.to_string())?;
            &created
        }
    };

    // Staging held for descendants, then the children themselves.
    let mut fills: Vec<PageFill> = Vec::new();
    for &s in &me.creates {
        let segment = &ctx.plan.segments[s];
        if segment.before_fork {
            map_segment(
                &mut staging,
                segment,
                &ctx.image.tree.sysv_shm,
                pipes.saved(),
            )?;
            fills.extend(segment.populate.iter().map(|f| PageFill {
                offset: segment.staging + f.offset,
                ..*f
            }));
        }
    }
    // Pages this process holds for its subtree in segments it inherited.
    fills.extend(me.pre_fork_writes.iter().copied());
    trace(format_args!("staging mapped, {} fills", fills.len()));
    populate(&ctx.pages, &staging, &fills, cores())
        .map_err(|e| format!("populating shared pages: {e}"))?;
    trace(format_args!("staging populated"));
    if forks_fan_out(ctx, i) {
        fork_fanned(ctx, &me.children, pipes, &staging, false)?;
    } else {
        for &child in &me.children {
            match clone::clone3(&[ctx.target_pid[child]], false) {
                Ok(Forked::Child) => run_process(ctx, child, Some(pipes), staging.clone()),
                // Before the next sibling, which may join a process group the
                // zombie leads.
                Ok(Forked::Parent(pid)) if ctx.image.tree.processes[child].zombie.is_some() => {
                    await_zombie(ctx, child, pid)?
                }
                Ok(Forked::Parent(_)) => {}
                Err(e) => {
                    return Err(format!(
                        "forking child pid {}: {e}",
                        ctx.image.tree.processes[child].pid
                    ))
                }
            }
        }
    }

    trace(format_args!("children forked"));
    // Own memory: segments only this process uses, its private pages, zaps.
    for &s in &me.creates {
        let segment = &ctx.plan.segments[s];
        if !segment.before_fork {
            map_segment(
                &mut staging,
                segment,
                &ctx.image.tree.sysv_shm,
                pipes.saved(),
            )?;
        }
    }
    trace(format_args!("own mapped, {} writes", me.writes.len()));
    // Siblings write their own pages at the same time, each in its own
    // process: share the cores among them. (Threads of one process breaking
    // copy-on-write pages also cost each other TLB shootdowns.)
    let siblings = me
        .parent
        .map_or(1, |parent| ctx.plan.processes[parent].children.len());
    // Every page written here is written whole: drop what the process
    // inherited there first, so each write fills a new zeroed page instead
    // of breaking copy-on-write (which copies the old page, only for it to
    // be overwritten, and flushes the TLB a page at a time). The ranges go
    // to the kernel 1024 at a time; on the reference tree this is 10% of
    // the whole restore (README "Against CRIU 4.2").
    let ranges: Vec<(u64, u64)> = me
        .writes
        .iter()
        .map(|w| (w.offset, w.pages * PAGE))
        .collect();
    staging
        .advise_ranges(&ranges, libc::MADV_DONTNEED)
        .map_err(|e| format!("dropping inherited pages before writing its own: {e}"))?;
    populate(
        &ctx.pages,
        &staging,
        &me.writes,
        (cores() / siblings).max(1),
    )
    .map_err(|e| format!("writing private pages: {e}"))?;
    trace(format_args!("own written"));
    for z in &me.zero_writes {
        staging.zero(z.staging, z.len).map_err(|e| e.to_string())?;
    }
    for z in &me.zaps {
        staging.zap(z.staging, z.len).map_err(|e| e.to_string())?;
    }

    // The blob's arguments and the fd table (both open files by path),
    // then the blob is placed (it reads /proc/self/maps); only then chroot
    // and rlimits, which could hide those paths or forbid those fds.
    let mut args = BlobArgs::new();
    let mut keep_fds: Vec<i32> = Vec::new();
    blob_memory(ctx, image, pipes.saved(), &mut args, &mut keep_fds)?;
    fds::install(
        entry.pid,
        image,
        pipes,
        &ctx.stdio,
        i == 0,
        ctx.fd_base,
        &keep_fds,
    )
    .map_err(|e| e.to_string())?;
    blob_threads(ctx, entry, image, &mut args)?;
    let barrier = ctx.control.addr();
    posix_timers::push(
        image,
        |t: &ThreadImage| ctx.mode.pick(&t.nstid, t.tid),
        &mut args,
    )?;
    args.set_barrier(barrier, ctx.total_threads + 1);
    args.clear_pdeathsig_after_barrier(true);
    args.set_status(ctx.control.addr() + slot(i) + SLOT_STATUS);
    args.push_post_barrier_unmap(barrier, PAGE);
    args.push_post_barrier_unmap((ctx.control.addr() + slot(i)) & !(PAGE - 1), PAGE);
    trace(format_args!("blob args ready"));
    let prepared =
        blob::prepare(&args, Placement::Auto).map_err(|e| format!("loading the restorer: {e}"))?;
    trace(format_args!("blob prepared"));
    let region = prepared.blob_range();
    let mut bytes = region.start.to_ne_bytes().to_vec();
    bytes.extend_from_slice(&region.len.to_ne_bytes());
    ctx.control.write_bytes(slot(i) + SLOT_BLOB, &bytes);
    attrs::apply(entry).map_err(|e| e.to_string())?;
    // Dispositions before pending signals: installing SIG_IGN would discard them.
    signals::restore_sigactions(entry.pid, image).map_err(|e| e.to_string())?;
    signals::queue_pending(entry.pid, image).map_err(|e| e.to_string())?;
    signals::set_itimers(entry.pid, image).map_err(|e| e.to_string())?;
    Ok(prepared)
}

/// Where a private procfs is mounted for the moment to write a sysctl
/// where /proc/sys is read-only (`sys::ns::write_proc_sys`). /dev: a tmpfs
/// of the container's own (or the host's devtmpfs, where /proc/sys is
/// writable anyway and the scratch is never made).
const PROC_SCRATCH: &str = "/dev/.cowsnap-proc";

/// Moves the namespace's next automatic pid above every pid and tid of
/// the image: the worker threads restored processes start while building
/// (decompression) take automatic pids, which must not be one a process
/// of the tree still has to get with `set_tid`. Only in a namespace of
/// the tree's own (the next pid of the caller's is everybody's).
fn pids_out_of_the_way(ctx: &Ctx) -> Result<(), String> {
    let highest = ctx
        .image
        .processes
        .iter()
        .flat_map(|p| p.threads.iter().map(|t| ctx.mode.pick(&t.nstid, t.tid)))
        .chain(ctx.target_pid.iter().copied())
        .max()
        .unwrap_or(1);
    crate::sys::ns::set_ns_last_pid(highest, Path::new(PROC_SCRATCH))
        .map_err(|e| format!("setting ns_last_pid to {highest}: {e}"))
}

fn block_all_signals() {
    let all = nix::sys::signal::SigSet::all();
    let _ =
        nix::sys::signal::sigprocmask(nix::sys::signal::SigmaskHow::SIG_SETMASK, Some(&all), None);
}

/// setsid / setpgid as the image says, for ids inside the tree; ids that
/// name processes outside the tree are left as inherited.
/// Whether process `i`'s children may be forked in any order, so several
/// at once ([`fork_fanned`]): none is a zombie (each is awaited before the
/// next sibling), and none joins a process group or session another child
/// makes (each stays in its parent's or leads its own).
fn forks_fan_out(ctx: &Ctx, i: usize) -> bool {
    let tree = &ctx.image.tree.processes;
    let parent = &tree[i];
    let children = &ctx.plan.processes[i].children;
    children.len() > 2
        && children.iter().all(|&c| {
            let e = &tree[c];
            e.zombie.is_none()
                && (e.pgid == parent.pgid || e.pgid == e.pid)
                && (e.sid == parent.sid || e.sid == e.pid)
                && e.pid != parent.pgid
                && e.pid != parent.sid
        })
}

/// Forks `children` (siblings, in any order) so that forks run side by
/// side: each fork copies the forker's page tables, which for a holder of
/// the tree's shared memory is most of the time its children take to
/// exist. Every new child first forks, as its own siblings
/// (`CLONE_PARENT`, from its still untouched copy of the memory), half of
/// the children left to it, then becomes itself: 8 children exist after 4
/// rounds of forks instead of 8. `as_sibling`: the caller is itself one
/// of them.
fn fork_fanned(
    ctx: &Ctx,
    children: &[usize],
    pipes: &fds::PipeSet,
    staging: &Staging,
    as_sibling: bool,
) -> Result<(), String> {
    let mut rest = children;
    while let Some((&child, tail)) = rest.split_first() {
        let (mine, delegated) = tail.split_at(tail.len() - tail.len() / 2);
        let pid = [ctx.target_pid[child]];
        let forked = if as_sibling {
            clone::clone3_sibling(&pid)
        } else {
            clone::clone3(&pid, false)
        };
        match forked {
            Ok(Forked::Child) => {
                if let Err(message) = fork_fanned(ctx, delegated, pipes, staging, true) {
                    fail_slot(ctx, child, &message);
                }
                run_process(ctx, child, Some(pipes), staging.clone())
            }
            Ok(Forked::Parent(_)) => {}
            Err(e) => {
                return Err(format!(
                    "forking child pid {}: {e}",
                    ctx.image.tree.processes[child].pid
                ))
            }
        }
        rest = mine;
    }
    Ok(())
}

fn session(ctx: &Ctx, i: usize) -> Result<(), String> {
    let entry = &ctx.image.tree.processes[i];
    let to_target = |pid: i32| -> Option<i32> {
        ctx.image
            .tree
            .processes
            .iter()
            .position(|e| e.pid == pid)
            .map(|k| ctx.target_pid[k])
    };
    let me = ctx.target_pid[i];
    let leads_session = || nix::unistd::getsid(None).ok() == Some(nix::unistd::getpid());
    if to_target(entry.sid) == Some(me) {
        // A container's init (the helper) already leads its session.
        if !leads_session() {
            nix::unistd::setsid().map_err(|e| format!("setsid: {e}"))?;
        }
    } else if let Some(pgid) = to_target(entry.pgid) {
        let pgid = nix::unistd::Pid::from_raw(pgid);
        nix::unistd::setpgid(nix::unistd::Pid::from_raw(0), pgid)
            .map_err(|e| format!("setpgid({pgid}): {e}"))?;
    }
    if to_target(entry.pgid) == Some(me) && to_target(entry.sid) != Some(me) {
        nix::unistd::setpgid(nix::unistd::Pid::from_raw(0), nix::unistd::Pid::from_raw(0))
            .map_err(|e| format!("setpgid(0): {e}"))?;
    }
    Ok(())
}

fn map_segment(
    staging: &mut Staging,
    segment: &plan::Segment,
    sysv: &[crate::image::types::SysvShmSegment],
    saved: &saved_files::SavedSet,
) -> Result<(), String> {
    let mapping = match &segment.backing {
        SegmentBacking::SysvShm { shmid } => {
            super::sysv::attach_staging(*shmid, segment.staging, segment.len, sysv)
                .map_err(|e| e.to_string())?
        }
        _ => map_segment_backing(segment, saved).map_err(|e| e.to_string())?,
    };
    staging.add(mapping);
    Ok(())
}

fn map_segment_backing(
    segment: &plan::Segment,
    saved: &saved_files::SavedSet,
) -> Result<mem::Mapping, RestoreError> {
    Ok(match &segment.backing {
        SegmentBacking::Anon => mem::Mapping::create(segment.staging, segment.len, Backing::Anon)?,
        SegmentBacking::AnonGrowsDown => {
            mem::Mapping::create(segment.staging, segment.len, Backing::AnonGrowsDown)?
        }
        SegmentBacking::PrivateFile { path, file, offset } => {
            let path = saved.mapped_path(path, file.0, file.1);
            let file = std::fs::File::open(&*path).map_err(|e| {
                RestoreError::NotSupported(format!("opening mapped file {path}: {e}"))
            })?;
            let fd: std::os::fd::OwnedFd = file.into();
            mem::Mapping::create(
                segment.staging,
                segment.len,
                Backing::PrivateFile {
                    fd: &fd,
                    offset: *offset,
                },
            )?
        }
        SegmentBacking::SharedAnon => {
            mem::Mapping::create(segment.staging, segment.len, Backing::SharedAnon)?
        }
        SegmentBacking::Memfd { name } => {
            // The mapping keeps the object alive once the fd is closed.
            let fd = mem::memfd(name, segment.len)?;
            mem::Mapping::create(segment.staging, segment.len, Backing::Shared { fd: &fd })?
        }
        SegmentBacking::SysvShm { shmid } => {
            return Err(RestoreError::NotSupported(format!(
                "SysV shm {shmid} is attached through map_segment"
            )))
        }
    })
}

/// Part of a frame to copy: (page index in the frame, destination address, pages).
type FramePart = (u64, u64, u64);

/// Runs of at least this many pages are faulted in as one call before
/// they are written ([`Staging::prefault`]); shorter ones fault page by
/// page, which costs less than a call per run.
const PREFAULT_PAGES: u64 = 16;

/// Writes `fills` (pages at absolute staging addresses) from the page
/// store, decompressing each needed frame once, on up to `threads` threads.
fn populate(
    reader: &PageStoreReader,
    staging: &Staging,
    fills: &[PageFill],
    threads: usize,
) -> Result<(), String> {
    if fills.is_empty() {
        return Ok(());
    }
    let ppf = reader.pages_per_frame();
    let page = reader.page_size();
    let mut by_frame: std::collections::BTreeMap<usize, Vec<FramePart>> = Default::default();
    for f in fills {
        let mut done = 0;
        while done < f.pages {
            let id: PageId = f.first + done;
            let frame = (id / ppf) as usize;
            let in_frame = id % ppf;
            let n = (ppf - in_frame).min(f.pages - done);
            by_frame
                .entry(frame)
                .or_default()
                .push((in_frame, f.offset + done * page, n));
            done += n;
        }
    }
    let work: Vec<(usize, Vec<FramePart>)> = by_frame.into_iter().collect();
    let next = AtomicUsize::new(0);
    let workers = threads.clamp(1, work.len());
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                scope.spawn(|| -> Result<(), String> {
                    let mut buf: Vec<u8> = Vec::new();
                    loop {
                        let k = next.fetch_add(1, Ordering::Relaxed);
                        let Some((frame, parts)) = work.get(k) else {
                            return Ok(());
                        };
                        let len = reader.frame_len(*frame).map_err(|e| e.to_string())?;
                        // A whole frame going to one contiguous destination
                        // (the holder's big regions): decompress in place.
                        if let [(0, dest, n)] = parts[..] {
                            if n * page == len as u64 {
                                staging.prefault(dest, len as u64);
                                staging
                                    .fill_with(dest, len as u64, |out| {
                                        reader.read_frame_into(*frame, out)
                                    })
                                    .map_err(|e| e.to_string())?
                                    .map_err(|e| e.to_string())?;
                                continue;
                            }
                        }
                        buf.resize(len, 0);
                        reader
                            .read_frame_into(*frame, &mut buf)
                            .map_err(|e| e.to_string())?;
                        for &(in_frame, dest, n) in parts {
                            if n >= PREFAULT_PAGES {
                                staging.prefault(dest, n * page);
                            }
                            let from = (in_frame * page) as usize;
                            let to = from + (n * page) as usize;
                            staging
                                .write(dest, &buf[from..to])
                                .map_err(|e| e.to_string())?;
                        }
                    }
                })
            })
            .collect();
        handles.into_iter().try_for_each(|h| {
            h.join()
                .unwrap_or_else(|_| Err("page writer panicked".into()))
        })
    })
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Moves, non-staged mappings, protections, advice and mm fields of one process.
fn blob_memory(
    ctx: &Ctx,
    image: &ProcessImage,
    saved: &saved_files::SavedSet,
    args: &mut BlobArgs,
    keep_fds: &mut Vec<i32>,
) -> Result<(), String> {
    let me = ctx
        .plan
        .processes
        .iter()
        .find(|p| p.pid == image.pid)
        .ok_or("process missing from plan")?;
    for m in &me.moves {
        args.push_move(m.source(&ctx.plan), m.target, m.len);
    }
    let runtime_vdso = runtime_vdso_len();
    for v in &image.vmas {
        let prot = v.prot as i32;
        match v.kind {
            VmaKind::PrivateAnon
            | VmaKind::Heap
            | VmaKind::Stack
            | VmaKind::PrivateFile
            | VmaKind::SharedAnon
            | VmaKind::Memfd
            | VmaKind::SysvShm => {
                args.push_mprotect(v.start, v.len(), prot);
            }
            VmaKind::SharedFile => {
                let path = v
                    .path
                    .as_deref()
                    .ok_or_else(|| format!("shared file VMA {:#x} has no path", v.start))?;
                let write = prot & libc::PROT_WRITE != 0;
                let path = saved.mapped_path(path, v.dev, v.inode);
                let file = std::fs::OpenOptions::new()
                    .read(true)
                    .write(write)
                    .open(&*path)
                    .map_err(|e| format!("opening shared mapped file {path}: {e}"))?;
                let fd = high_fd(file.into(), ctx.fd_base)?;
                keep_fds.push(fd);
                args.push_map_file(
                    v.start,
                    v.len(),
                    prot,
                    libc::MAP_SHARED,
                    MapFd {
                        fd,
                        offset: v.offset,
                        close: true,
                    },
                );
            }
            VmaKind::Vdso => {
                if runtime_vdso != Some(v.len()) {
                    return Err(format!(
                        "vdso of the image is {:#x} bytes, this kernel's is {:?}: restore on the dumping kernel",
                        v.len(),
                        runtime_vdso
                    ));
                }
                args.set_vdso(v.start);
            }
            VmaKind::Vvar | VmaKind::Vsyscall => {}
            other => {
                return Err(format!(
                    "VMA {:#x} of kind {other:?} is not supported",
                    v.start
                ))
            }
        }
        for flag in &v.vm_flags {
            let advice = match flag.as_str() {
                "dd" => libc::MADV_DONTDUMP,
                "wf" => libc::MADV_WIPEONFORK,
                "dc" => libc::MADV_DONTFORK,
                "hg" => libc::MADV_HUGEPAGE,
                "nh" => libc::MADV_NOHUGEPAGE,
                _ => continue,
            };
            args.push_madvise(v.start, v.len(), advice);
        }
        if matches!(v.kind, VmaKind::SharedAnon | VmaKind::Memfd) {
            // Every page of the object this process had mapped is mapped
            // again (fork does not copy the page tables of a shared
            // mapping: only the holder would have them), and the ones it
            // had not are out of its page tables again (they stay in the
            // object): its share of the memory (PSS) is as it was.
            for run in &v.pages {
                if let crate::image::types::PageRun::Stored { start, pages, .. } = *run {
                    args.push_populate(start, pages * ctx.image.page_size());
                }
            }
            for &[start, pages] in &image.unmapped_shmem {
                let end = start.saturating_add(pages.saturating_mul(ctx.image.page_size()));
                let (lo, hi) = (start.max(v.start), end.min(v.end));
                if lo < hi {
                    args.push_unpopulate(lo, hi - lo);
                }
            }
        }
        if matches!(v.kind, VmaKind::PrivateFile | VmaKind::SharedFile) {
            use crate::image::types::PageRun;
            let ps = ctx.image.page_size();
            let populated = v.pages.iter().any(|r| matches!(r, PageRun::Mapped { .. }));
            for run in &v.pages {
                match *run {
                    PageRun::Mapped { start, pages } => {
                        args.push_populate(start, pages * ps);
                    }
                    // What the populates' fault-around maps beyond the
                    // original's pages is dropped again.
                    PageRun::Absent { start, pages } if populated => {
                        args.push_unpopulate(start, pages * ps);
                    }
                    _ => {}
                }
            }
        }
    }
    let mm = &image.mm;
    let exe = std::fs::File::open(&mm.exe_file)
        .map_err(|e| format!("opening exe {}: {e}", mm.exe_file))?;
    let exe_fd = high_fd(exe.into(), ctx.fd_base)?;
    keep_fds.push(exe_fd);
    args.set_mm(
        PrctlMmMap {
            start_code: mm.start_code,
            end_code: mm.end_code,
            start_data: mm.start_data,
            end_data: mm.end_data,
            start_brk: mm.start_brk,
            brk: mm.brk,
            start_stack: mm.start_stack,
            arg_start: mm.arg_start,
            arg_end: mm.arg_end,
            env_start: mm.env_start,
            env_end: mm.env_end,
            auxv: 0,
            auxv_size: 0,
            exe_fd: exe_fd as u32,
        },
        &mm.auxv,
    );
    Ok(())
}

/// Moves an fd to a number >= `base` (above every target fd) and returns it.
fn high_fd(fd: std::os::fd::OwnedFd, base: i32) -> Result<i32, String> {
    use std::os::fd::IntoRawFd;
    let raw = fd.into_raw_fd();
    let moved = nix::fcntl::fcntl(raw, nix::fcntl::FcntlArg::F_DUPFD(base))
        .map_err(|e| format!("F_DUPFD: {e}"))?;
    let _ = nix::unistd::close(raw);
    Ok(moved)
}

fn runtime_vdso_len() -> Option<u64> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines().find(|l| l.ends_with("[vdso]")).and_then(|l| {
        let range = l.split_whitespace().next()?;
        let (a, b) = range.split_once('-')?;
        Some(u64::from_str_radix(b, 16).ok()? - u64::from_str_radix(a, 16).ok()?)
    })
}

/// Undoes the kernel's syscall-restart bookkeeping seen at the ptrace stop,
/// so that after rt_sigreturn an interrupted syscall runs again (or, when
/// its restart state lived in the kernel, returns EINTR).
///
/// A relative `nanosleep`/`clock_nanosleep` interrupted by the dump
/// reports -ERESTART_RESTARTBLOCK: the kernel would go on with the time
/// left, kept in the task's restart_block, which no restore can rebuild.
/// But when the caller passed `rem`, the kernel wrote the time left there
/// at the interruption, and the image's memory holds it: the sleep runs
/// again with `rem` as its request (one argument register changes: the
/// request pointer becomes `rem`), so the remaining time is kept instead
/// of a caller that ignores EINTR's `rem` starting its whole interval
/// again. `writable(addr, len)` says whether the process can write there.
pub fn restart_fixup(regs: &mut UserRegs, writable: impl Fn(u64, u64) -> bool) {
    const ERESTARTSYS: i64 = 512;
    const ERESTARTNOINTR: i64 = 513;
    const ERESTARTNOHAND: i64 = 514;
    const ERESTART_RESTARTBLOCK: i64 = 516;
    const TIMESPEC_LEN: u64 = 16;
    if (regs.orig_rax as i64) < 0 {
        return;
    }
    match -(regs.rax as i64) {
        ERESTARTSYS | ERESTARTNOINTR | ERESTARTNOHAND => {
            regs.rax = regs.orig_rax;
            regs.rip -= 2;
        }
        ERESTART_RESTARTBLOCK => {
            let sleep_again = |rem: u64| rem != 0 && writable(rem, TIMESPEC_LEN);
            match regs.orig_rax as libc::c_long {
                // nanosleep(req, rem)
                libc::SYS_nanosleep if sleep_again(regs.rsi) => {
                    regs.rdi = regs.rsi;
                    regs.rax = regs.orig_rax;
                    regs.rip -= 2;
                }
                // clock_nanosleep(clock, flags, req, rem); TIMER_ABSTIME
                // sleeps report ERESTARTNOHAND and simply run again.
                libc::SYS_clock_nanosleep if regs.rsi == 0 && sleep_again(regs.r10) => {
                    regs.rdx = regs.r10;
                    regs.rax = regs.orig_rax;
                    regs.rip -= 2;
                }
                _ => regs.rax = (-(libc::EINTR as i64)) as u64,
            }
        }
        _ => {}
    }
}

fn blob_threads(
    ctx: &Ctx,
    entry: &ProcessEntry,
    image: &ProcessImage,
    args: &mut BlobArgs,
) -> Result<(), String> {
    // Non-leader threads queue their own pending signals in the blob (only
    // a thread may queue SI_USER/SI_TKILL siginfos onto itself); the
    // leader's are queued by the runtime (`signals::queue_pending`).
    let others = signals::other_thread_pending(entry.pid, image).map_err(|e| e.to_string())?;
    for t in &image.threads {
        let mut spec = thread_spec(ctx, t, image)?;
        if let Some((_, queue)) = others.iter().find(|(tid, _)| *tid == t.tid) {
            spec.pending = queue.iter().map(|s| s.info).collect();
        }
        args.push_thread(spec);
    }
    let c = &entry.creds;
    args.set_creds(CredsSpec {
        uids: c.uids,
        gids: c.gids,
        groups: c.groups.clone(),
        cap_effective: c.cap_effective,
        cap_permitted: c.cap_permitted,
        cap_inheritable: c.cap_inheritable,
        cap_bounding: c.cap_bounding,
        cap_ambient: c.cap_ambient,
        securebits: c.securebits,
    });
    // The dump lists filters oldest first, the order they are installed in;
    // a spec's profile comes last (`restore::seccomp`: filters stack).
    let mut filters = c
        .seccomp_filters
        .iter()
        .map(|h| hex::decode(h).map_err(|e| format!("seccomp filter hex: {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    filters.extend(ctx.spec_seccomp.iter().map(|p| p.bytes().to_vec()));
    args.set_seccomp(c.no_new_privs, filters);
    Ok(())
}

fn thread_spec(ctx: &Ctx, t: &ThreadImage, image: &ProcessImage) -> Result<ThreadSpec, String> {
    let mut regs = t.regs;
    restart_fixup(&mut regs, |addr, len| {
        image.vmas.iter().any(|v| {
            v.start <= addr
                && addr.checked_add(len).is_some_and(|end| end <= v.end)
                && v.prot & libc::PROT_WRITE as u32 != 0
        })
    });
    let mut spec = ThreadSpec::new(regs);
    if !t.xsave.is_empty() {
        spec.fpu = FpuState::Xsave(
            hex::decode(&t.xsave).map_err(|e| format!("tid {} xsave hex: {e}", t.tid))?,
        );
    }
    spec.sigmask = t.sigmask;
    spec.altstack = t.sigaltstack;
    spec.set_tid = vec![ctx.mode.pick(&t.nstid, t.tid)];
    spec.clear_child_tid = t.clear_child_tid;
    spec.rseq = t.rseq;
    Ok(spec)
}

/// What the controller watches: the control region, and who each slot is.
struct Watch<'a> {
    control: &'a SharedRegion,
    /// Dumped pid per tree index, to name processes in errors.
    dumped: Vec<i32>,
    /// Per tree index: a zombie of the image (no blob, never at the barrier).
    zombie: Vec<bool>,
    total_threads: u32,
    /// Set when the slots hold pids of a container's namespace, which the
    /// controller (the shim, outside) cannot use as they are.
    host: Option<&'a HostPids>,
}

impl<'a> Watch<'a> {
    fn of(control: &'a SharedRegion, image: &Image, host: Option<&'a HostPids>) -> Watch<'a> {
        Watch {
            control,
            dumped: image.tree.processes.iter().map(|e| e.pid).collect(),
            zombie: image
                .tree
                .processes
                .iter()
                .map(|e| e.zombie.is_some())
                .collect(),
            total_threads: total_threads(image),
            host,
        }
    }

    /// The pid of process `i` as the controller sees it (0: not started).
    fn pid(&self, i: usize) -> i32 {
        let pid = self.control.word(slot(i)).load(Ordering::Acquire) as i32;
        match self.host {
            Some(host) if pid > 0 => host.host_pid(pid).unwrap_or(0),
            _ => pid,
        }
    }

    /// The failure process `i` recorded in its slot in the runtime, if any.
    fn failure(&self, i: usize) -> Option<RestoreError> {
        if self.control.word(slot(i) + 4).load(Ordering::Acquire) != STATE_FAILED {
            return None;
        }
        let len = self.control.word(slot(i) + 8).load(Ordering::Acquire) as u64;
        let bytes = self.control.read_bytes(slot(i) + 12, len);
        let message = String::from_utf8_lossy(&bytes);
        // Errors that already name the process (checks) are not prefixed twice.
        let prefix = format!("pid {}: ", self.dumped[i]);
        let message = message
            .strip_prefix(&prefix)
            .unwrap_or(&message)
            .to_string();
        let kind = self
            .control
            .word(slot(i) + SLOT_KIND)
            .load(Ordering::Acquire);
        Some(match crate::engine_error::ErrorKind::from_wire(kind) {
            Some(kind) => RestoreError::Reported {
                pid: self.dumped[i],
                kind,
                message,
            },
            None => RestoreError::Process {
                pid: self.dumped[i],
                message,
            },
        })
    }

    /// The blob's Status of process `i`, field by field from the control region.
    fn status(&self, i: usize) -> blob::Status {
        let at = slot(i) + SLOT_STATUS;
        let word = |k: u64| self.control.word(at + 4 * k).load(Ordering::Acquire);
        let wide = |k: u64| word(k) as u64 | (word(k + 1) as u64) << 32;
        blob::Status {
            state: word(0),
            step: word(1),
            errno: word(2),
            thread: word(3),
            index: wide(4),
            addr: wide(6),
        }
    }
}

/// The seccomp filters of the calling thread (0 when none or unknown).
fn own_seccomp_filters() -> u32 {
    procfs::read_status(std::process::id() as i32).map_or(0, |st| st.seccomp_filters)
}

/// Checks, as the kernel reports them, that every thread of the tree has
/// the capabilities and the seccomp filters the restorer was to give it:
/// the image's filters plus `added` (the restore's own and a spec's
/// profile). It runs while every thread waits at the barrier, before any
/// code of the image, because a filter can make a syscall report success
/// without running it (`SECCOMP_RET_ERRNO` with errno 0): an image's filter
/// installed before the spec's could fake the `seccomp` call that adds it,
/// or (without no_new_privs, when filters go in before capset) the capset
/// that drops the runtime's capabilities.
fn check_confinement(watch: &Watch, image: &Image, added: u32) -> Result<(), RestoreError> {
    let known = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|t| t.trim().parse::<u32>().ok())
        .map_or(u64::MAX, |last| u64::MAX >> 63u32.saturating_sub(last));
    // PR_CAPBSET_DROP only drops: a bounding set beyond the restore's own
    // (the runtime's, which is this process's) ends at its intersection.
    let own_bounding =
        procfs::read_status(std::process::id() as i32).map_or(u64::MAX, |st| st.cap_bounding);
    for (i, entry) in image.tree.processes.iter().enumerate() {
        if watch.zombie[i] {
            continue;
        }
        let pid = watch.pid(i);
        let c = &entry.creds;
        let want_filters = c.seccomp_filters.len() as u32 + added;
        let fail = |message: String| RestoreError::Process {
            pid: entry.pid,
            message,
        };
        let tasks = std::fs::read_dir(procfs::proc_path(pid, "task"))
            .map_err(|e| fail(format!("/proc/{pid}/task: {e}")))?;
        for task in tasks.flatten() {
            let path = task.path().join("status");
            let st = std::fs::read_to_string(&path)
                .map_err(|e| e.to_string())
                .and_then(|text| procfs::parse_status(&path, &text).map_err(|e| e.to_string()))
                .map_err(|e| fail(format!("{}: {e}", path.display())))?;
            let tid = task.file_name().to_string_lossy().into_owned();
            if st.seccomp_filters != want_filters {
                return Err(fail(format!(
                    "thread {tid} has {} seccomp filters after the restorer, {want_filters} \
                     expected ({} of the image, {added} added): a filter of the image kept one \
                     from being installed",
                    st.seccomp_filters,
                    c.seccomp_filters.len()
                )));
            }
            for (set, got, want) in [
                ("effective", st.cap_effective, c.cap_effective),
                ("permitted", st.cap_permitted, c.cap_permitted),
                ("inheritable", st.cap_inheritable, c.cap_inheritable),
                ("ambient", st.cap_ambient, c.cap_ambient),
                ("bounding", st.cap_bounding, c.cap_bounding & own_bounding),
            ] {
                if got != want & known {
                    return Err(fail(format!(
                        "thread {tid} has {set} capabilities {:?} after the restorer, the image \
                         gives {:?}: a seccomp filter of the image kept the restorer's capset \
                         from running",
                        super::limits::cap_names(got),
                        super::limits::cap_names(want & known)
                    )));
                }
            }
        }
    }
    Ok(())
}

/// Pids of one container's pid namespace as the host sees them, found
/// through `/proc/*/status` (NSpid) of the processes in that namespace.
pub struct HostPids {
    init: i32,
    ns: Option<std::path::PathBuf>,
    known: std::sync::Mutex<std::collections::HashMap<i32, i32>>,
}

impl HostPids {
    pub fn new(init: i32) -> HostPids {
        HostPids {
            init,
            ns: std::fs::read_link(format!("/proc/{init}/ns/pid")).ok(),
            known: std::sync::Mutex::new(std::collections::HashMap::from([(1, init)])),
        }
    }

    /// The host pid of `inner` (a pid in the container's namespace).
    pub fn host_pid(&self, inner: i32) -> Option<i32> {
        let mut known = self.known.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(&pid) = known.get(&inner) {
            return Some(pid);
        }
        let ns = self.ns.as_ref()?;
        for entry in std::fs::read_dir("/proc").ok()?.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<i32>().ok())
            else {
                continue;
            };
            if pid == self.init
                || std::fs::read_link(format!("/proc/{pid}/ns/pid"))
                    .ok()
                    .as_ref()
                    != Some(ns)
            {
                continue;
            }
            if let Some(&last) = procfs::read_status(pid)
                .ok()
                .as_ref()
                .and_then(|st| st.nspid.last())
            {
                known.insert(last, pid);
            }
        }
        known.get(&inner).copied()
    }
}

/// Waits until every thread of every process is parked at the barrier, or
/// a process fails or dies. `child`: the process the controller forked
/// (waited for), if it forked one.
fn wait_in_place(watch: &Watch, child: Option<i32>) -> Result<(), RestoreError> {
    let barrier = watch.control.word(0);
    loop {
        for i in 0..watch.dumped.len() {
            let pid = watch.dumped[i];
            let state = watch.control.word(slot(i) + 4).load(Ordering::Acquire);
            if let Some(failure) = watch.failure(i) {
                return Err(failure);
            }
            if let Some(failure) = BlobFailure::from_status(&watch.status(i)) {
                return Err(RestoreError::Blob { pid, failure });
            }
            let started = watch.control.word(slot(i)).load(Ordering::Acquire) > 0;
            // A zombie is dead on purpose; its parent checked how it ended.
            if state != 0 && state != STATE_ZOMBIE && started {
                let outer = watch.pid(i);
                if outer <= 0 || !procfs::is_alive(outer) {
                    return Err(RestoreError::Died {
                        pid,
                        how: format!("outer pid {outer} is gone"),
                    });
                }
            }
        }
        if barrier.load(Ordering::Acquire) >= watch.total_threads {
            return Ok(());
        }
        let died = match (child, watch.host) {
            (Some(child), _) => match nix::sys::wait::waitpid(
                nix::unistd::Pid::from_raw(child),
                Some(nix::sys::wait::WaitPidFlag::WNOHANG),
            ) {
                Ok(nix::sys::wait::WaitStatus::StillAlive) | Err(_) => None,
                Ok(status) => Some(format!("{status:?}")),
            },
            // The shim reaps the container's init; look at it instead.
            (None, Some(host)) => {
                (!procfs::is_alive(host.init)).then(|| "the container's init exited".into())
            }
            (None, None) => None,
        };
        if let Some(how) = died {
            // Give a failing process's report a moment to be read.
            std::thread::sleep(Duration::from_millis(20));
            if let Some(failure) = (0..watch.dumped.len()).find_map(|i| watch.failure(i)) {
                return Err(failure);
            }
            return Err(RestoreError::Died {
                pid: watch.dumped[0],
                how,
            });
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// The restore command's stdin, stdout and stderr, duplicated above every
/// target fd number so the root can take them as its stdio.
fn inherit_stdio(fd_base: i32) -> Result<fds::Stdio, String> {
    let mut fds = [0; 3];
    for (k, slot) in fds.iter_mut().enumerate() {
        *slot = nix::fcntl::fcntl(k as i32, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(fd_base))
            .map_err(|e| format!("duplicating stdio fd {k}: {e}"))?;
    }
    Ok(fds::Stdio::Inherit { fds })
}

/// Kills everything this restore created: the namespace's init (which
/// takes the whole namespace with it) or every registered process.
fn kill_all(watch: &Watch, child: i32) {
    let kill = |pid: i32| {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    };
    kill(child);
    for _ in 0..50 {
        let mut any = false;
        for i in 0..watch.dumped.len() {
            let pid = watch.pid(i);
            if pid > 0 && procfs::is_alive(pid) {
                kill(pid);
                any = true;
            }
        }
        if !any {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    if watch.host.is_none() {
        let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(child), None);
    }
    remove_recorded_segments(watch);
}

/// Control-region offset of the SysV shm ids the root created (count, ids).
const CONTROL_SYSV: u64 = 2048;
const CONTROL_SYSV_MAX: usize = ((SLOT_BASE - CONTROL_SYSV - 4) / 4) as usize;

/// The root, first of all: the tree's SysV shm segments (see
/// `restore::sysv`), in a new IPC namespace when the tree comes back in a
/// new pid namespace, and their pages no VMA shows.
fn restore_sysv_segments(ctx: &Ctx) -> Result<(), String> {
    let segments = &ctx.image.tree.sysv_shm;
    if segments.is_empty() {
        return Ok(());
    }
    let private_ns = ctx.mode == PidNs::New;
    if private_ns {
        super::sysv::enter_new_namespace().map_err(|e| e.to_string())?;
    } else if segments.len() > CONTROL_SYSV_MAX {
        return Err(super::sysv::SysvError::TooMany {
            count: segments.len(),
            max: CONTROL_SYSV_MAX,
        }
        .to_string());
    }
    let control = &ctx.control;
    let mut count = 0u32;
    let scratch = Path::new(PROC_SCRATCH);
    super::sysv::create_all(segments, ctx.image.manifest.created_unix, scratch, |id| {
        if !private_ns {
            control.write_bytes(CONTROL_SYSV + 4 + 4 * count as u64, &id.to_ne_bytes());
            count += 1;
            control.word(CONTROL_SYSV).store(count, Ordering::Release);
        }
    })
    .map_err(|e| e.to_string())?;
    let page = ctx.image.page_size();
    for s in segments {
        let vmas = ctx.image.processes.iter().flat_map(|p| &p.vmas);
        let fills = super::sysv::unmapped_fills(s, vmas, page);
        let context =
            |e: String| format!("SysV shm segment key {:#x} shmid {}: {e}", s.key, s.shmid);
        if !fills.is_empty() {
            let a = crate::sys::shm::Attachment::new(s.shmid, s.size, false)
                .map_err(|e| context(e.to_string()))?;
            let mut staging = Staging::default();
            staging.add(mem::Mapping {
                addr: a.addr(),
                len: a.len(),
            });
            let fills: Vec<PageFill> = fills
                .iter()
                .map(|f| PageFill {
                    offset: a.addr() + f.offset,
                    ..*f
                })
                .collect();
            populate(&ctx.pages, &staging, &fills, cores()).map_err(context)?;
        }
        let attached = ctx.image.processes.iter().any(|p| {
            p.vmas
                .iter()
                .any(|v| v.kind == VmaKind::SysvShm && v.inode as i32 == s.shmid)
        });
        if super::sysv::destroyed(s) && !attached {
            crate::sys::shm::remove(s.shmid).map_err(|e| context(e.to_string()))?;
        }
    }
    Ok(())
}

/// After a failed restore: removes the SysV segments the root recorded.
fn remove_recorded_segments(watch: &Watch) {
    let count =
        (watch.control.word(CONTROL_SYSV).load(Ordering::Acquire) as usize).min(CONTROL_SYSV_MAX);
    let root = watch.pid(0);
    if count == 0 || root <= 0 {
        return;
    }
    let bytes = watch.control.read_bytes(CONTROL_SYSV + 4, 4 * count as u64);
    let ids: Vec<i32> = bytes
        .chunks_exact(4)
        .map(|c| i32::from_ne_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    super::sysv::remove_created(&ids, root);
}

#[cfg(test)]
mod restart_tests {
    use super::*;

    const RESTARTBLOCK: u64 = (-516i64) as u64;
    const EINTR: u64 = (-(libc::EINTR as i64)) as u64;

    fn stopped_in(nr: libc::c_long, args: [u64; 4]) -> UserRegs {
        UserRegs {
            orig_rax: nr as u64,
            rax: RESTARTBLOCK,
            rdi: args[0],
            rsi: args[1],
            rdx: args[2],
            r10: args[3],
            rip: 0x1002,
            ..UserRegs::default()
        }
    }

    #[test]
    fn interrupted_relative_sleeps_sleep_the_time_left_in_rem() {
        let anywhere = |_, _| true;
        let mut regs = stopped_in(libc::SYS_nanosleep, [0x5000, 0x6000, 7, 8]);
        restart_fixup(&mut regs, anywhere);
        assert_eq!(
            (regs.rax, regs.rdi, regs.rsi, regs.rip),
            (libc::SYS_nanosleep as u64, 0x6000, 0x6000, 0x1000)
        );
        assert_eq!((regs.rdx, regs.r10), (7, 8), "other arguments kept");

        let mut regs = stopped_in(libc::SYS_clock_nanosleep, [0, 0, 0x5000, 0x6000]);
        restart_fixup(&mut regs, anywhere);
        assert_eq!(
            (regs.rax, regs.rdi, regs.rsi, regs.rdx, regs.r10, regs.rip),
            (
                libc::SYS_clock_nanosleep as u64,
                0,
                0,
                0x6000,
                0x6000,
                0x1000
            )
        );
    }

    #[test]
    fn sleeps_without_a_usable_rem_and_other_restart_blocks_return_eintr() {
        let cases = [
            // no rem
            (stopped_in(libc::SYS_nanosleep, [0x5000, 0, 0, 0]), true),
            (
                stopped_in(libc::SYS_clock_nanosleep, [1, 0, 0x5000, 0]),
                true,
            ),
            // rem not writable in the image
            (
                stopped_in(libc::SYS_nanosleep, [0x5000, 0x6000, 0, 0]),
                false,
            ),
            // TIMER_ABSTIME (never -ERESTART_RESTARTBLOCK, but never rewritten)
            (
                stopped_in(libc::SYS_clock_nanosleep, [1, 1, 0x5000, 0x6000]),
                true,
            ),
            // poll's restart block
            (stopped_in(libc::SYS_poll, [0x5000, 1, 1000, 0]), true),
        ];
        for (regs, writable) in cases {
            let mut fixed = regs;
            restart_fixup(&mut fixed, |_, _| writable);
            assert_eq!(fixed, UserRegs { rax: EINTR, ..regs }, "{regs:?}");
        }
    }

    #[test]
    fn restartable_syscalls_run_again_and_others_are_kept() {
        let mut regs = UserRegs {
            orig_rax: libc::SYS_read as u64,
            rax: (-512i64) as u64,
            rip: 0x1002,
            ..UserRegs::default()
        };
        restart_fixup(&mut regs, |_, _| true);
        assert_eq!((regs.rax, regs.rip), (libc::SYS_read as u64, 0x1000));
        let done = UserRegs {
            orig_rax: libc::SYS_read as u64,
            rax: 5,
            rip: 0x1002,
            ..UserRegs::default()
        };
        let mut regs = done;
        restart_fixup(&mut regs, |_, _| true);
        assert_eq!(regs, done);
    }
}
