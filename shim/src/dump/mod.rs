//! Dump: freeze a process tree (or a cgroup), seize every thread, collect its
//! state and memory with each physical page stored once, write an image.
//! A failed dump must leave every task running untouched and no image behind.

pub mod epoll;
pub mod event_fds;
pub mod fds;
pub mod files;
pub mod memory;
pub mod mount_ns;
pub mod posix_timers;
pub mod progress;
pub mod saved_files;
pub mod seize;
pub mod sockets;
pub mod supervise;
pub mod sysv;
pub mod task_state;
pub mod tree;
pub mod watchdog;

use std::fmt;
use std::path::PathBuf;
use std::time::Instant;

use crate::image::types::{PipeImage, ProcessEntry, ProcessImage, Tree};
use crate::image::ImageWriter;
use crate::sys::cgroup::{CgroupError, Freezer, FREEZE_TIMEOUT};
use crate::sys::interrupt::{interrupted, InterruptGuard};
use crate::sys::pagemap::{page_size, zero_page_pfn, PagemapError};
use crate::sys::procfs::{read_smaps, read_stat, MapsEntry, ProcfsError};

use fds::{collect_fds, FdError, PipeCollector};
use memory::{MemoryError, MemoryScanner};
use seize::SeizedTree;
use tree::TreeError;

/// What `cowsnap dump` was asked to do.
#[derive(Debug, Clone)]
pub struct DumpOptions {
    /// Root of the tree to dump.
    pub pid: i32,
    pub images: PathBuf,
    /// Kill the tree once the image is complete.
    pub exit: bool,
    /// Cgroup whose freezer stops the tree while it is seized (v1 freezer or v2 dir).
    pub cgroup: Option<PathBuf>,
    /// Print progress lines to stderr.
    pub progress: bool,
    /// Also write typed progress events, one JSON line each, to this file
    /// (see [`progress`]).
    pub progress_json: Option<PathBuf>,
    /// What to do with established TCP connections and in-flight connections.
    pub sockets: sockets::SocketPolicy,
    /// Largest file whose contents are saved (deleted files, files on tmpfs).
    pub saved_file_limit: u64,
}

/// Figures of a finished dump.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct DumpSummary {
    /// Every process of the image, zombies included.
    pub processes: usize,
    /// Zombies recorded (exit status only).
    #[serde(default)]
    pub zombies: usize,
    pub threads: usize,
    pub pages_scanned: u64,
    pub pages_stored: u64,
    pub zero_pages: u64,
    pub bytes_written: u64,
    pub seconds_total: f64,
    /// How long the tree was stopped (frozen or in ptrace stops).
    pub seconds_frozen: f64,
    /// Image directory written.
    pub dir: PathBuf,
    pub page_size: u64,
    /// Page references resolved to an already stored (or zero) page by PFN.
    pub dedup_hits: u64,
    /// Size of the `pages` file.
    pub bytes_pages: u64,
}

impl fmt::Display for DumpSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let unique = self.pages_stored * self.page_size;
        let ratio = if self.bytes_pages > 0 {
            unique as f64 / self.bytes_pages as f64
        } else {
            0.0
        };
        write!(
            f,
            "dumped {} processes{}, {} threads into {}: {} pages scanned, {} stored, {} zero, \
             {} deduplicated; {:.1} MiB written (pages compressed {:.2}x); {:.3} s total, {:.3} s frozen",
            self.processes,
            if self.zombies > 0 {
                format!(" ({} zombies)", self.zombies)
            } else {
                String::new()
            },
            self.threads,
            self.dir.display(),
            self.pages_scanned,
            self.pages_stored,
            self.zero_pages,
            self.dedup_hits,
            self.bytes_written as f64 / (1 << 20) as f64,
            ratio,
            self.seconds_total,
            self.seconds_frozen
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DumpError {
    #[error(transparent)]
    Seize(#[from] seize::SeizeError),
    #[error(transparent)]
    TaskState(#[from] task_state::TaskStateError),
    #[error(transparent)]
    Image(#[from] crate::image::ImageError),
    #[error("not supported yet: {0}")]
    NotSupported(String),
    #[error("pid {pid}: no such process")]
    NoSuchProcess { pid: i32 },
    #[error(transparent)]
    Procfs(#[from] ProcfsError),
    #[error(transparent)]
    Tree(#[from] TreeError),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Fds(#[from] FdError),
    #[error(transparent)]
    Sockets(#[from] sockets::SocketError),
    #[error(transparent)]
    Epoll(#[from] epoll::EpollError),
    #[error(transparent)]
    Sysv(#[from] sysv::SysvError),
    #[error(transparent)]
    SavedFile(#[from] saved_files::SavedFileError),
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error(transparent)]
    MountNs(#[from] mount_ns::MountNsError),
    #[error(transparent)]
    Pagemap(#[from] PagemapError),
    #[error("pid {pid} is not a member of cgroup {cgroup}")]
    RootNotInCgroup { pid: i32, cgroup: PathBuf },
    #[error("starting the dump watchdog: {0}")]
    Watchdog(std::io::Error),
    #[error("installing SIGINT/SIGTERM handlers: {0}")]
    Signals(std::io::Error),
    #[error("interrupted by a signal; every task was resumed and no image was written")]
    Interrupted,
    #[error("dump supervisor: {0}")]
    Supervisor(#[source] std::io::Error),
    /// The engine child's error, as it described and classified it.
    #[error("{0}")]
    Engine(crate::engine_error::EngineError),
}

/// The freezer of a `--cgroup` dump and whether this dump froze it.
struct CgroupHold {
    freezer: Freezer,
    /// The cgroup was frozen before the dump (e.g. a paused container): leave it frozen.
    was_frozen: bool,
    /// Currently frozen by us.
    frozen_by_us: bool,
}

impl CgroupHold {
    /// Thaws if this dump froze it; errors are reported, not propagated,
    /// because this runs on paths that are already failing.
    fn release(&mut self, watchdog: &watchdog::DumpWatchdog) {
        if self.frozen_by_us {
            if let Err(e) = self.freezer.thaw() {
                eprintln!("cowsnap: thawing {}: {e}", self.freezer.dir().display());
            }
            self.frozen_by_us = false;
        }
        watchdog.thawed();
    }
}

/// Dumps the tree described by `options` into an image.
pub fn dump(options: &DumpOptions) -> Result<DumpSummary, DumpError> {
    let t0 = Instant::now();
    let _signals = InterruptGuard::install().map_err(DumpError::Signals)?;
    if !std::path::Path::new(&format!("/proc/{}", options.pid)).exists() || options.pid <= 0 {
        return Err(DumpError::NoSuchProcess { pid: options.pid });
    }
    tree::refuse_own_tree(options.pid)?;
    let freezer = options.cgroup.as_deref().map(Freezer::detect).transpose()?;
    let ps = page_size();
    let zero_pfn = zero_page_pfn()?;
    let mut writer = ImageWriter::create(&options.images, ps)?;
    let watchdog = watchdog::start(freezer.as_ref(), writer.work_dir(), &options.images)
        .map_err(DumpError::Watchdog)?;
    // Best effort: a progress log that cannot be created never fails a dump.
    let log = match &options.progress_json {
        Some(path) => progress::ProgressLog::create(path).unwrap_or_else(|e| {
            eprintln!("cowsnap: progress log {}: {e}", path.display());
            progress::ProgressLog::none()
        }),
        None => progress::ProgressLog::none(),
    };

    // Freeze and seize. From here on every exit path resumes the tasks.
    let t_stop = Instant::now();
    let mut hold = None;
    let seized = match freezer {
        Some(freezer) => {
            let was_frozen = freezer.is_frozen();
            let h = hold.insert(CgroupHold {
                freezer,
                was_frozen: false,
                frozen_by_us: false,
            });
            was_frozen.map_err(DumpError::from).and_then(|was| {
                h.was_frozen = was;
                seize_cgroup(options, h, &watchdog)
            })
        }
        None => SeizedTree::seize_tree(options.pid).map_err(DumpError::from),
    };
    let tree = match seized {
        Ok(tree) => tree,
        Err(e) => {
            if let Some(h) = hold.as_mut() {
                // A cgroup that was paused before the dump is paused again.
                resume_cgroup(h, &watchdog, false);
            }
            drop(writer);
            watchdog.finish();
            return Err(e);
        }
    };
    let threads: usize = tree.processes().iter().map(|p| p.tids.len()).sum();
    if options.progress {
        eprintln!(
            "cowsnap: seized {} processes ({threads} threads) in {:.3} s",
            tree.processes().len(),
            t_stop.elapsed().as_secs_f64()
        );
    }
    log.emit(&progress::DumpEvent::Seized {
        processes: tree.processes().len() as u64,
        threads: threads as u64,
        frozen_ms: t_stop.elapsed().as_millis() as u64,
    });

    let mut collected = match collect(options, &tree, &mut writer, zero_pfn, &log, t_stop) {
        Ok(c) => c,
        Err(e) => {
            drop(writer); // removes what it wrote
            if let Err(de) = tree.detach() {
                eprintln!("cowsnap: detaching after failure: {de}");
            }
            if let Some(h) = hold.as_mut() {
                // A cgroup that was paused before the dump is paused again.
                resume_cgroup(h, &watchdog, false);
            }
            watchdog.finish();
            return Err(e);
        }
    };
    // Every page and all state are captured (pages sit in the page store's
    // buffers). Without --exit the tree resumes now, while the last frames
    // are compressed and the image is committed; with --exit it stays
    // stopped until the image is complete, and only then is killed.
    let mut stopped = Some(tree);
    let mut resumed: Result<(), seize::SeizeError> = Ok(());
    let mut seconds_frozen = 0.0;
    // Dropped on a failure below: connections leave repair mode, packets flow.
    let socket_dump = std::mem::replace(&mut collected.sockets, sockets::SocketsDump::none());
    let mut socket_dump = Some(socket_dump);
    if !options.exit {
        // Before the tree runs: a socket in repair mode would take its writes wrongly.
        if let Some(s) = socket_dump.take() {
            s.resume();
        }
        if let Some(tree) = stopped.take() {
            resumed = tree.detach();
        }
        seconds_frozen = t_stop.elapsed().as_secs_f64();
        if let Some(h) = hold.as_mut() {
            resume_cgroup(h, &watchdog, false);
        }
    }
    let (entries, images) = std::mem::take(&mut collected.plan_input);
    let stored = store_plan(&mut writer, &entries, &images, options.progress);
    drop(images);
    let commit = match stored.and_then(|()| writer.commit(options.pid)) {
        Ok(commit) => commit,
        Err(e) => {
            // The writer has removed its files. Connections leave repair
            // mode before the tree runs again.
            if let Some(s) = socket_dump.take() {
                s.resume();
            }
            if let Some(tree) = stopped.take() {
                if let Err(de) = tree.detach() {
                    eprintln!("cowsnap: detaching after failure: {de}");
                }
            }
            if let Some(h) = hold.as_mut() {
                // A cgroup that was paused before the dump is paused again.
                resume_cgroup(h, &watchdog, false);
            }
            watchdog.finish();
            return Err(e.into());
        }
    };
    watchdog.committed();
    if let Some(tree) = stopped.take() {
        resumed = tree.kill();
        // Killed in repair mode: the connections closed silently; their
        // packets stay dropped until restore removes the table.
        if let Some(s) = socket_dump.take() {
            s.hand_over();
        }
        seconds_frozen = t_stop.elapsed().as_secs_f64();
        if let Some(h) = hold.as_mut() {
            resume_cgroup(h, &watchdog, true);
        }
    }
    watchdog.finish();
    resumed?;
    let stats = collected.stats;
    log.emit(&progress::DumpEvent::Done {
        counts: progress::PageCounts {
            pages_scanned: stats.pages_scanned,
            pages_stored: commit.pages_stored,
            bytes_written: commit.bytes_total,
            frozen_ms: (seconds_frozen * 1000.0) as u64,
        },
        processes: collected.processes as u64,
        threads: collected.threads as u64,
        total_ms: t0.elapsed().as_millis() as u64,
    });
    Ok(DumpSummary {
        processes: collected.processes,
        zombies: collected.zombies,
        threads: collected.threads,
        pages_scanned: stats.pages_scanned,
        pages_stored: commit.pages_stored,
        zero_pages: stats.zero_pages,
        bytes_written: commit.bytes_total,
        seconds_total: t0.elapsed().as_secs_f64(),
        seconds_frozen,
        dir: commit.dir,
        page_size: ps,
        dedup_hits: stats.dedup_hits,
        bytes_pages: commit.bytes_pages,
    })
}

/// Plans the restore of the image (`restore::plan`) and stores the plan in
/// it, so a restore need not plan again. The planner runs while the page
/// store writes and syncs its last frames (with `--exit` the tree is still
/// stopped: planning after that would lengthen its downtime). A tree the
/// planner refuses gets no plan: restore plans it again and refuses it
/// with the same reason.
fn store_plan(
    writer: &mut ImageWriter,
    entries: &[ProcessEntry],
    images: &[ProcessImage],
    progress: bool,
) -> Result<(), crate::image::ImageError> {
    let t = Instant::now();
    let (planned, finished) = std::thread::scope(|s| {
        let planner = s.spawn(|| crate::restore::plan::plan(entries, images));
        let finished = writer.finish_pages();
        (planner.join(), finished)
    });
    finished?;
    let planned = planned.unwrap_or_else(|panic| std::panic::resume_unwind(panic));
    match planned {
        Ok(plan) => {
            writer.write_plan(|files, page_size| {
                let binding = crate::restore::plan_store::binding(files, page_size);
                crate::restore::plan_store::encode(&plan, binding)
            })?;
            if progress {
                eprintln!(
                    "cowsnap: planned the restore in {:.3} s: {} segments, {} moves",
                    t.elapsed().as_secs_f64(),
                    plan.stats.segments,
                    plan.stats.moves
                );
            }
        }
        Err(e) => {
            if progress {
                eprintln!("cowsnap: no restore plan stored: {e}");
            }
        }
    }
    Ok(())
}

/// Lets the cgroup go after the dump; a cgroup that was paused before the
/// dump is paused again (unless its tasks were killed).
fn resume_cgroup(h: &mut CgroupHold, watchdog: &watchdog::DumpWatchdog, killed: bool) {
    h.release(watchdog);
    if h.was_frozen && !killed {
        if let Err(e) = h.freezer.freeze(FREEZE_TIMEOUT) {
            eprintln!("cowsnap: re-freezing {}: {e}", h.freezer.dir().display());
        }
    }
}

/// Freezes the cgroup, checks and seizes its members, thaws, and waits until
/// every task sits in its ptrace stop. On error the caller thaws.
fn seize_cgroup(
    options: &DumpOptions,
    hold: &mut CgroupHold,
    watchdog: &watchdog::DumpWatchdog,
) -> Result<SeizedTree, DumpError> {
    if !hold.was_frozen {
        // Tell the watchdog first: if we die right after freezing, it thaws.
        watchdog.frozen();
        hold.frozen_by_us = true;
        hold.freezer.freeze(FREEZE_TIMEOUT)?;
    }
    let members = hold.freezer.members()?;
    if !members.contains(&options.pid) {
        return Err(DumpError::RootNotInCgroup {
            pid: options.pid,
            cgroup: hold.freezer.dir().to_path_buf(),
        });
    }
    let mut pairs = Vec::with_capacity(members.len());
    for &pid in &members {
        pairs.push((pid, read_stat(pid)?.ppid));
    }
    if let Err(TreeError::OutsideParent { pid, ppid }) = tree::preorder(options.pid, &pairs) {
        return Err(DumpError::NotSupported(format!(
            "cgroup member {pid} has parent {ppid} outside the dumped tree (e.g. an exec'd process)"
        )));
    }
    let pending = SeizedTree::seize_frozen(&members)?;
    // The tasks reach their ptrace stops only once thawed; ptrace holds them then.
    hold.freezer.thaw()?;
    hold.frozen_by_us = false;
    watchdog.thawed();
    Ok(pending.wait_stopped()?)
}

struct Collected {
    /// Established connections in repair mode and their packet lock.
    sockets: sockets::SocketsDump,
    processes: usize,
    zombies: usize,
    threads: usize,
    stats: memory::ScanStats,
    /// What the restore plan is made from: the tree's entries and the
    /// process images, in tree order.
    plan_input: (Vec<ProcessEntry>, Vec<ProcessImage>),
}

/// Collects every seized process into the writer (tree, processes, pipes);
/// does not commit.
fn collect(
    options: &DumpOptions,
    seized: &SeizedTree,
    writer: &mut ImageWriter,
    zero_pfn: Option<u64>,
    log: &progress::ProgressLog,
    stopped_at: Instant,
) -> Result<Collected, DumpError> {
    let ps = writer.page_size();
    let mut scanner = MemoryScanner::new(ps, zero_pfn);
    scanner.set_interrupt_check(interrupted);
    if options.progress || log.is_on() {
        scanner.enable_progress(options.progress, log.clone(), stopped_at);
    }
    let mut pipes = PipeCollector::default();
    let mut entries: Vec<ProcessEntry> = Vec::new();
    let mut images: Vec<ProcessImage> = Vec::new();
    let mut threads = 0;
    // SysV shm VMAs of every process: their segments are collected last.
    let mut sysv_vmas: Vec<(i32, crate::image::types::Vma)> = Vec::new();
    let mut file_sizes = std::collections::BTreeMap::new();
    // Fds of every process first: one restore cannot reopen fails the dump
    // before the (long) memory scan, and no image that cannot be restored
    // is written; finding shared file descriptions needs every fd table.
    let mut fd_tables: Vec<(i32, Vec<crate::image::types::Fd>)> = Vec::new();
    let mut refusals = Vec::new();
    let mut saved_files = saved_files::SavedFiles::new(options.saved_file_limit, options.pid);
    let mut proc_timers = std::collections::BTreeMap::new();
    for p in seized.processes() {
        let mut fds = collect_fds(p.pid, &mut pipes)?;
        let maps = read_smaps(p.pid)?;
        refuse_unsupported_fds(p.pid, &fds, &mut refusals);
        let timers = crate::sys::procfs::read_posix_timers(p.pid)?;
        posix_timers::refuse_unsupported(p.pid, &timers, &mut refusals);
        proc_timers.insert(p.pid, timers);
        refuse_what_restore_refuses(p.pid, &maps, &mut refusals);
        saved_files.collect(p.pid, &mut fds, &maps, &mut refusals)?;
        fd_tables.push((p.pid, fds));
    }
    fds::assign_descriptions(&mut fd_tables)?;
    fds::refuse_fifos_held_outside(&fd_tables, &mut refusals);
    // Numbered before epoll, which names them as targets.
    let signalfds = event_fds::collect_signalfds(&mut fd_tables)?;
    let timerfds = event_fds::collect_timerfds(&mut fd_tables)?;
    let inotifies = event_fds::collect_inotifies(&mut fd_tables, &mut refusals)?;
    let epolls = epoll::collect(&mut fd_tables, &mut refusals)?;
    let lock_name = format!(
        "cowsnap_{}_{}",
        options.pid,
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis())
    );
    let mount_ns = mount_ns::collect(options.pid, &mut refusals)?;
    let mut socket_dump = sockets::collect(
        options.pid,
        &fd_tables,
        options.sockets,
        &lock_name,
        &mut refusals,
    )?;
    if !refusals.is_empty() {
        return Err(DumpError::NotSupported(format!(
            "{} fd(s) or other state cannot be restored: {}",
            refusals.len(),
            refusals.join("; ")
        )));
    }
    socket_dump.image.epolls = epolls;
    socket_dump.image.eventfds = event_fds::collect(&fd_tables)?;
    socket_dump.image.signalfds = signalfds;
    socket_dump.image.fifos = pipes.take_fifos();
    socket_dump.image.timerfds = timerfds;
    socket_dump.image.inotifies = inotifies;
    writer.write_sockets(&socket_dump.image)?;
    let saved_files = saved_files.write(writer.pages())?;
    let mut fd_tables: std::collections::BTreeMap<i32, Vec<crate::image::types::Fd>> =
        fd_tables.into_iter().collect();
    for p in seized.processes() {
        if interrupted() {
            return Err(DumpError::Interrupted);
        }
        let pid = p.pid;
        let facts = tree::read_facts(pid)?;
        let fds = fd_tables.remove(&pid).unwrap_or_default();
        // Before the memory scan: collect maps and unmaps a scratch page.
        let timers = proc_timers.remove(&pid).unwrap_or_default();
        let timer_ids: Vec<i32> = timers.iter().map(|t| t.id).collect();
        let state = task_state::collect(seized, pid, &timer_ids)?;
        let maps = read_smaps(pid)?;
        let vmas = scanner
            .scan_process(pid, &maps, writer.pages())
            .map_err(|e| match e {
                MemoryError::Interrupted => DumpError::Interrupted,
                other => other.into(),
            })?;
        threads += p.tids.len();
        let ppid = if pid == options.pid { 0 } else { p.ppid };
        entries.push(tree::process_entry(pid, ppid, &p.tids, &facts, &state));
        if let Some(entry) = entries.last() {
            files::record(pid, &entry.exe, &vmas, &mut file_sizes);
        }
        let image = ProcessImage {
            pid,
            mm: tree::mm_fields(&facts, state.brk),
            vmas,
            fds,
            signals: state.signals,
            itimers: state.itimers,
            threads: state.threads,
            unmapped_shmem: scanner.take_unmapped_shmem(),
            posix_timers: posix_timers::records(&timers, &state.posix_timers),
            // The writer names its runs file.
            runs_file: None,
        };
        // What restore checks about the timers, checked before writing.
        crate::image::reader::check_posix_timers(
            &crate::image::types::process_file_name(pid),
            &image,
        )
        .map_err(|e| DumpError::NotSupported(e.to_string()))?;
        sysv_vmas.extend(
            image
                .vmas
                .iter()
                .filter(|v| v.kind == crate::image::types::VmaKind::SysvShm)
                .map(|v| (pid, v.clone())),
        );
        writer.write_process(&image)?;
        images.push(image);
    }
    // Zombies: identity and exit status, read while their parents are
    // stopped (so not reaped meanwhile); an empty process file each.
    for z in seized.zombies() {
        entries.push(tree::zombie_entry(z.pid, z.ppid)?);
        let image = tree::zombie_image(z.pid);
        writer.write_process(&image)?;
        images.push(image);
    }
    let order = tree::preorder(
        options.pid,
        &entries.iter().map(|e| (e.pid, e.ppid)).collect::<Vec<_>>(),
    )?;
    let mut processes = Vec::with_capacity(entries.len());
    let mut ordered_images = Vec::with_capacity(entries.len());
    for pid in order {
        if let Some(i) = entries.iter().position(|e| e.pid == pid) {
            processes.push(entries.swap_remove(i));
        }
        if let Some(i) = images.iter().position(|p| p.pid == pid) {
            ordered_images.push(images.swap_remove(i));
        }
    }
    let count = processes.len();
    let pids: Vec<i32> = processes.iter().map(|e| e.pid).collect();
    let sysv_shm = sysv::collect_segments(
        options.pid,
        &pids,
        &sysv_vmas,
        &mut scanner,
        writer.pages(),
        ps,
    )
    .map_err(|e| match e {
        sysv::SysvError::Memory {
            source: MemoryError::Interrupted,
            ..
        } => DumpError::Interrupted,
        other => other.into(),
    })?;
    log.emit(&progress::DumpEvent::Scanned(
        scanner.counts(writer.pages(), stopped_at),
    ));
    let plan_entries = processes.clone();
    writer.write_tree(&Tree {
        processes,
        sysv_shm,
        file_sizes,
        saved_files,
        mount_ns,
    })?;
    let pipe_images: Vec<PipeImage> = pipes.into_images();
    writer.write_pipes(&pipe_images)?;
    if interrupted() {
        return Err(DumpError::Interrupted);
    }
    Ok(Collected {
        sockets: socket_dump,
        processes: count,
        zombies: seized.zombies().len(),
        threads,
        stats: scanner.stats(),
        plan_input: (plan_entries, ordered_images),
    })
}

/// The dump-time half of restore's checks on the image's own content
/// (`restore::checks`): a deleted executable, cwd or root, and a mapping of
/// a kind restore cannot rebuild, are listed in `refusals` now, so that no
/// image restore would refuse is written. (Deleted files that are open or
/// mapped are saved, or refused, by `saved_files`.)
fn refuse_what_restore_refuses(pid: i32, maps: &[MapsEntry], refusals: &mut Vec<String>) {
    use crate::image::types::VmaKind;
    const DELETED: &str = " (deleted)";
    for (what, link) in [("executable", "exe"), ("cwd", "cwd"), ("root", "root")] {
        let target = std::fs::read_link(format!("/proc/{pid}/{link}"))
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default();
        if let Some(path) = target.strip_suffix(DELETED) {
            refusals.push(format!(
                "pid {pid} {what} {path:?} is deleted: not supported"
            ));
        }
    }
    for m in maps {
        if memory::classify(m) == VmaKind::Other {
            refusals.push(format!(
                "pid {pid} has a mapping restore cannot rebuild at {:#x}-{:#x} ({}): not supported",
                m.start,
                m.end,
                if m.path.is_empty() {
                    "device or special mapping"
                } else {
                    &m.path
                }
            ))
        }
    }
}

/// Lists every fd of a kind restore cannot reopen (eventfds, inotify,
/// named FIFOs, ...), naming pid, fd and what it is.
fn refuse_unsupported_fds(pid: i32, fds: &[crate::image::types::Fd], refusals: &mut Vec<String>) {
    for fd in fds {
        if let crate::image::types::FdKind::Unsupported { link } = &fd.kind {
            refusals.push(format!(
                "pid {pid} fd {} is {link}: fds of this kind cannot be restored yet",
                fd.fd
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::path::Path;

    use crate::image::types::PageRun;
    use crate::image::Image;
    use crate::sys::cgroup::tests::TestCgroup;
    use crate::sys::interrupt::TEST_LOCK;
    use crate::sys::pagemap::page_size;
    use crate::sys::testing::{map_anon, poke, TestChild};

    const PAGES: usize = 2048;

    fn checksum(addr: usize, len: usize) -> u64 {
        let mut h = 0u64;
        for off in (0..len).step_by(512) {
            h = h.rotate_left(5) ^ crate::sys::testing::touch(addr + off) as u64;
        }
        h
    }

    /// A parent with 8 MiB of patterned memory and a child that dirtied 10
    /// pages. The parent answers every byte on `cmd` with its memory checksum.
    struct Fixture {
        parent: TestChild,
        child: TestChild,
        region: usize,
        cmd: std::io::PipeWriter,
        answer: std::io::PipeReader,
        expected: u64,
    }

    impl Fixture {
        fn new() -> Fixture {
            let ps = page_size() as usize;
            let region = map_anon(PAGES * ps, false);
            let (cmd_rd, cmd) = std::io::pipe().expect("pipe");
            let (answer, ans_wr) = std::io::pipe().expect("pipe");
            let parent = TestChild::fork(move || {
                for p in 0..PAGES {
                    poke(region + p * ps, &[(p % 251) as u8 + 1; 64]);
                }
                let child = TestChild::fork(move || {
                    for p in 0..10 {
                        poke(region + p * ps, &[0xee; 64]);
                    }
                    0
                });
                let grandchild = child.leak();
                let (mut cmd_rd, mut ans_wr) = (cmd_rd, ans_wr);
                // Report the child's pid first, then serve checksums forever.
                std::thread::spawn(move || {
                    let mut b = [0u8; 1];
                    while cmd_rd.read_exact(&mut b).is_ok() {
                        let sum = checksum(region, PAGES * ps);
                        if ans_wr.write_all(&sum.to_ne_bytes()).is_err() {
                            break;
                        }
                    }
                });
                grandchild as i64
            });
            let child = TestChild::adopt(parent.value as i32);
            let mut f = Fixture {
                parent,
                child,
                region,
                cmd,
                answer,
                expected: 0,
            };
            f.expected = f.ask();
            f
        }

        fn ask(&mut self) -> u64 {
            self.cmd.write_all(b"?").expect("ask");
            let mut buf = [0u8; 8];
            self.answer.read_exact(&mut buf).expect("answer");
            u64::from_ne_bytes(buf)
        }
    }

    fn tracer_of(pid: i32) -> i32 {
        crate::sys::procfs::read_status(pid)
            .map(|s| s.tracer_pid)
            .unwrap_or(-1)
    }

    fn options(pid: i32, images: &Path) -> DumpOptions {
        DumpOptions {
            pid,
            images: images.to_path_buf(),
            exit: false,
            cgroup: None,
            progress: false,
            progress_json: None,
            sockets: sockets::SocketPolicy::default(),
            saved_file_limit: saved_files::DEFAULT_LIMIT,
        }
    }

    #[test]
    fn dump_tree_end_to_end() {
        let _lock = TEST_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let mut fx = Fixture::new();
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = tmp.path().join("img");
        let log = tmp.path().join("progress.jsonl");
        let summary = dump(&DumpOptions {
            progress_json: Some(log.clone()),
            ..options(fx.parent.pid, &dir)
        })
        .expect("dump");
        assert_eq!(summary.processes, 2);
        assert!(summary.pages_stored >= PAGES as u64 + 10);
        // The progress log: seized, pages (maybe), scanned, then done with
        // the summary's own figures.
        let text = std::fs::read(&log).expect("progress log");
        let events: Vec<progress::DumpEvent> = progress::ProgressReader::new()
            .push(&text)
            .into_iter()
            .map(|e| e.expect("a typed line"))
            .collect();
        assert!(
            matches!(
                events.first(),
                Some(progress::DumpEvent::Seized { processes: 2, .. })
            ),
            "{events:?}"
        );
        let Some(progress::DumpEvent::Done {
            counts, processes, ..
        }) = events.last()
        else {
            panic!("the log does not end with done: {events:?}");
        };
        assert_eq!(*processes, 2);
        assert_eq!(counts.pages_scanned, summary.pages_scanned);
        assert_eq!(counts.pages_stored, summary.pages_stored);
        assert_eq!(counts.bytes_written, summary.bytes_written);
        let scanned = events
            .iter()
            .find_map(|e| match e {
                progress::DumpEvent::Scanned(c) => Some(*c),
                _ => None,
            })
            .expect("a scanned event");
        assert_eq!(scanned.pages_scanned, summary.pages_scanned);
        assert!(scanned.bytes_written <= summary.bytes_written);
        let image = Image::open(&dir).expect("image opens");
        let pids: Vec<(i32, i32)> = image
            .tree
            .processes
            .iter()
            .map(|p| (p.pid, p.ppid))
            .collect();
        assert_eq!(
            pids,
            vec![(fx.parent.pid, 0), (fx.child.pid, fx.parent.pid)]
        );
        // Undirtied pages of the child are the parent's page ids.
        let ids = |pid: i32| -> Vec<Option<u64>> {
            let (_, proc_image) = image.process(pid).expect("process");
            let ps = page_size();
            let vma = proc_image
                .vmas
                .iter()
                .find(|v| v.start <= fx.region as u64 && v.end > fx.region as u64)
                .expect("region vma");
            let mut out = Vec::new();
            for r in &vma.pages {
                for i in 0..r.pages() {
                    let a = r.start() + i * ps;
                    if a >= fx.region as u64 && a < (fx.region + PAGES * ps as usize) as u64 {
                        out.push(match *r {
                            PageRun::Stored { first, .. } => Some(first + i),
                            _ => None,
                        });
                    }
                }
            }
            out
        };
        let (p, c) = (ids(fx.parent.pid), ids(fx.child.pid));
        assert_eq!(p.len(), PAGES);
        assert!(p.iter().all(|i| i.is_some()));
        assert!((0..10).all(|i| c[i].is_some() && c[i] != p[i]));
        assert_eq!(&c[10..], &p[10..]);
        // The tree runs on, untraced, with its memory intact.
        assert_eq!(tracer_of(fx.parent.pid), 0);
        assert_eq!(tracer_of(fx.child.pid), 0);
        let expected = fx.expected;
        assert_eq!(fx.ask(), expected);
    }

    #[test]
    fn dump_exit_kills_tree() {
        let _lock = TEST_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let fx = Fixture::new();
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = tmp.path().join("img");
        let mut opts = options(fx.parent.pid, &dir);
        opts.exit = true;
        dump(&opts).expect("dump");
        assert!(dir.join("manifest.json").exists());
        let ws = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(fx.parent.pid), None)
            .expect("waitpid");
        assert!(
            matches!(
                ws,
                nix::sys::wait::WaitStatus::Signaled(_, nix::sys::signal::Signal::SIGKILL, _)
            ),
            "{ws:?}"
        );
    }

    #[test]
    fn nonexistent_pid_and_unwritable_dir_leave_nothing() {
        let _lock = TEST_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = tmp.path().join("img");
        let err = dump(&options(i32::MAX - 1, &dir)).expect_err("no such pid");
        assert!(matches!(err, DumpError::NoSuchProcess { .. }), "{err}");
        assert!(!dir.exists());

        let mut fx = Fixture::new();
        let err =
            dump(&options(fx.parent.pid, Path::new("/proc/cowsnap-img"))).expect_err("unwritable");
        assert!(matches!(err, DumpError::Image(_)), "{err}");
        assert!(err.to_string().contains("/proc/cowsnap-img"), "{err}");
        assert_eq!(tracer_of(fx.parent.pid), 0);
        let expected = fx.expected;
        assert_eq!(fx.ask(), expected);
    }

    #[test]
    fn cgroup_member_with_outside_parent_is_refused_and_thawed() {
        let _lock = TEST_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let cg = TestCgroup::new(true, "refuse");
        let fx = Fixture::new();
        // Root = the fixture's parent; the `sleep` member's parent is this test.
        std::fs::write(cg.dir.join("cgroup.procs"), fx.parent.pid.to_string()).expect("join");
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = tmp.path().join("img");
        let mut opts = options(fx.parent.pid, &dir);
        opts.cgroup = Some(cg.dir.clone());
        let err = dump(&opts).expect_err("refused");
        assert!(
            matches!(err, DumpError::NotSupported(ref m) if m.contains(&cg.child.id().to_string())),
            "{err}"
        );
        assert!(!Freezer::detect(&cg.dir)
            .expect("freezer")
            .is_frozen()
            .expect("state"));
        assert!(!dir.exists());
        assert!(
            std::fs::read_dir(tmp.path()).expect("ls").next().is_none(),
            "no partial dir"
        );
    }

    fn dump_cgroup(v2: bool, tag: &str) {
        let _lock = TEST_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let cg = TestCgroup::new(v2, tag);
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = tmp.path().join("img");
        let mut opts = options(cg.child.id() as i32, &dir);
        opts.cgroup = Some(cg.dir.clone());
        let summary = dump(&opts).expect("dump");
        assert_eq!(summary.processes, 1);
        assert!(Image::open(&dir).is_ok());
        assert!(!Freezer::detect(&cg.dir)
            .expect("freezer")
            .is_frozen()
            .expect("state"));
        assert_eq!(tracer_of(cg.child.id() as i32), 0);
    }

    #[test]
    fn dump_cgroup_v2() {
        dump_cgroup(true, "dump2");
    }

    #[test]
    fn dump_cgroup_v1() {
        dump_cgroup(false, "dump1");
    }
}
