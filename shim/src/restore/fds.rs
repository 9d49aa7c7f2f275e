//! The fd table of a restored process: pipes and shared file descriptions
//! created once for the whole tree ([`PipeSet`]), then per process
//! ([`install`]) every image fd placed at its number, the stdio policy
//! applied, and every other fd closed.
//!
//! Fd numbers are split in two bands by `fd_base` (above every fd of the
//! image, see [`fd_base`]):
//!
//! ```text
//!   0 .. fd_base        the image's fds, at their exact numbers, after install
//!   fd_base .. ∞        the runtime's: PipeSet ends and shared files,
//!                       inherited stdio, the caller's `keep` fds, and fds
//!                       staged during install
//! ```
//!
//! [`install`] never clobbers a source it still needs: every fd it installs
//! is first opened or duplicated into the upper band (phase 1), only then
//! `dup3`'ed down to its target number (phase 2), so runtime fds that sit at
//! target numbers are simply replaced. Finally every fd outside the image
//! and `keep` is closed (phase 3).
//!
//! Regular files whose open file description the dump found shared (the
//! `description` id of [`FdKind::File`]) are opened once by the root, before
//! it forks, and every holder dups that one description: the offset stays
//! shared. What is not restored: sharing of an open file description for
//! directories and devices (each process reopens by path); sharing with
//! processes outside the tree; pipe ends held outside the tree (the pipe is recreated
//! with its data, the outside end is gone, unless the stdio policy applies);
//! O_ASYNC owners; packet boundaries of pipe data in O_DIRECT mode.
//! This module never changes the flags of the inherited stdio fds (they are
//! the user's terminal or the shim's pipes).

use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::RawFd;
use std::path::Path;

use crate::image::sockets::SocketsImage;
use crate::image::types::{Fd, FdKind, PipeImage, ProcessImage};
use crate::sys::restore_sys;

/// Smallest `fd_base` [`fd_base`] returns: room for the runtime's own fds
/// below it is not needed, but a fixed floor keeps small images predictable.
pub const MIN_FD_BASE: RawFd = 64;

/// Open flags kept when reopening a file by path; O_CREAT, O_TRUNC, O_EXCL
/// and the kernel-internal bits (FMODE_EXEC, ...) are dropped on purpose.
const REOPEN_FLAGS: i32 = libc::O_ACCMODE
    | libc::O_APPEND
    | libc::O_NONBLOCK
    | libc::O_SYNC
    | libc::O_DSYNC
    | libc::O_DIRECT
    | libc::O_LARGEFILE
    | libc::O_DIRECTORY
    | libc::O_NOFOLLOW
    | libc::O_NOATIME
    | libc::O_PATH;

/// Status flags of a pipe end that F_SETFL can set (O_DIRECT: packet mode).
const PIPE_STATUS_FLAGS: i32 = libc::O_NONBLOCK | libc::O_DIRECT;

#[derive(Debug, thiserror::Error)]
pub enum FdError {
    #[error("not supported: pid {pid} fd {fd}: {link}")]
    NotSupported { pid: i32, fd: RawFd, link: String },
    #[error("not supported: pid {pid} fd {fd}: pipe {inode} opened read-write (flags {flags:#o})")]
    PipeReadWrite {
        pid: i32,
        fd: RawFd,
        inode: u64,
        flags: u32,
    },
    #[error("not supported: pid {pid} fd {fd}: deleted file {path}")]
    DeletedFile { pid: i32, fd: RawFd, path: String },
    #[error("pid {pid} fd {fd}: pipe {inode} is not in the PipeSet (created from other images?)")]
    PipeMissing { pid: i32, fd: RawFd, inode: u64 },
    #[error("pid {pid} fd {fd}: shared file description {id} was not opened (created from other images?)")]
    FileMissing { pid: i32, fd: RawFd, id: u32 },
    #[error("pid {pid}: fd {fd} appears twice in the image")]
    DuplicateFd { pid: i32, fd: RawFd },
    #[error("pid {pid}: image fd {fd} is not below fd_base {fd_base}")]
    FdAboveBase { pid: i32, fd: RawFd, fd_base: RawFd },
    #[error(
        "pid {pid}: keep fd {fd} is below fd_base {fd_base} (install would close or clobber it)"
    )]
    KeepBelowBase { pid: i32, fd: RawFd, fd_base: RawFd },
    #[error("pid {pid} fd {fd}: inherited stdio fd {stdio_fd} must be >= fd_base {fd_base}")]
    StdioBelowBase {
        pid: i32,
        fd: RawFd,
        stdio_fd: RawFd,
        fd_base: RawFd,
    },
    #[error("pid {pid} fd {fd}: open {path} (flags {flags:#o}): {source}")]
    Open {
        pid: i32,
        fd: RawFd,
        path: String,
        flags: i32,
        #[source]
        source: std::io::Error,
    },
    #[error("pid {pid} fd {fd}: seek {path} to {pos}: {source}")]
    Seek {
        pid: i32,
        fd: RawFd,
        path: String,
        pos: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("pid {pid} fd {fd}: {op}: {source}")]
    Place {
        pid: i32,
        fd: RawFd,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("pid {pid}: closing fds {first}..={last}: {source}")]
    Close {
        pid: i32,
        first: u32,
        last: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("pipe {inode}: {op}: {source}")]
    Pipe {
        inode: u64,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Socket(#[from] super::sockets::SocketError),
    #[error("pid {pid} fd {fd}: {what} was not created (created from other images?)")]
    ObjectMissing { pid: i32, fd: RawFd, what: String },
    #[error("pipes.json: pipe {inode}: buffered data is not hex: {detail}")]
    PipeData { inode: u64, detail: String },
    #[error("pipe {inode}: {len} buffered bytes do not fit its capacity {capacity}")]
    PipeOverfull {
        inode: u64,
        len: usize,
        capacity: u64,
    },
}

/// Highest fd number of any process in the image, -1 when none has fds.
pub fn max_fd(processes: &[ProcessImage]) -> RawFd {
    processes
        .iter()
        .flat_map(|p| p.fds.iter().map(|f| f.fd))
        .max()
        .unwrap_or(-1)
}

/// The `fd_base` to use for `processes`: above every image fd, at least
/// [`MIN_FD_BASE`]. It is only the lower bound of the upper band: the
/// PipeSet's pipe ends and shared files go to the lowest free numbers above
/// it, however many there are. (The runtime's RLIMIT_NOFILE soft limit must
/// exceed it by the number of fds held in the upper band.)
pub fn fd_base(processes: &[ProcessImage]) -> RawFd {
    (max_fd(processes) + 1).max(MIN_FD_BASE)
}

/// Which end of a pipe an image fd holds, from its access mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PipeEnd {
    Read,
    Write,
}

fn pipe_end(pid: i32, fd: &Fd, inode: u64) -> Result<PipeEnd, FdError> {
    match fd.flags as i32 & libc::O_ACCMODE {
        libc::O_RDONLY => Ok(PipeEnd::Read),
        libc::O_WRONLY => Ok(PipeEnd::Write),
        _ => Err(FdError::PipeReadWrite {
            pid,
            fd: fd.fd,
            inode,
            flags: fd.flags,
        }),
    }
}

/// How the tree uses one pipe: the flags of the first fd seen on each end.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct PipeUsage {
    read_flags: Option<u32>,
    write_flags: Option<u32>,
}

impl PipeUsage {
    /// Only one end is held in the tree: the other is outside it.
    fn external(&self) -> bool {
        self.read_flags.is_none() || self.write_flags.is_none()
    }
}

fn pipe_usage(processes: &[ProcessImage]) -> Result<BTreeMap<u64, PipeUsage>, FdError> {
    let mut usage: BTreeMap<u64, PipeUsage> = BTreeMap::new();
    for p in processes {
        for fd in &p.fds {
            if let FdKind::Pipe { inode } = fd.kind {
                let u = usage.entry(inode).or_default();
                match pipe_end(p.pid, fd, inode)? {
                    PipeEnd::Read => {
                        u.read_flags.get_or_insert(fd.flags);
                    }
                    PipeEnd::Write => {
                        u.write_flags.get_or_insert(fd.flags);
                    }
                }
            }
        }
    }
    Ok(usage)
}

/// Every regular file whose description is shared, by description id: the
/// pid and fd of its first holder in image order (whose path, flags and pos
/// open it). Deleted files not saved are left out: restore refuses them.
fn shared_files(processes: &[ProcessImage]) -> BTreeMap<u32, (i32, &Fd)> {
    let mut out = BTreeMap::new();
    for p in processes {
        for fd in &p.fds {
            if let FdKind::File {
                description: Some(id),
                deleted,
                saved,
                ..
            } = fd.kind
            {
                if deleted && saved.is_none() {
                    continue;
                }
                out.entry(id).or_insert((p.pid, fd));
            }
        }
    }
    out
}

/// Both ends of a recreated pipe, at numbers >= fd_base, close-on-exec.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PipeEnds {
    pub read: RawFd,
    pub write: RawFd,
}

/// Every pipe and every shared regular-file description of the tree,
/// recreated once in the tree's root before it forks so that all
/// descendants inherit the same objects. It holds raw fd numbers and closes
/// nothing on drop: [`install`] closes them in each restored process; on a
/// failed restore call [`PipeSet::close_all`].
#[derive(Debug)]
pub struct PipeSet {
    ends: BTreeMap<u64, PipeEnds>,
    /// Pipes with only one end held in the tree (the other end was outside it).
    external: BTreeSet<u64>,
    /// Shared file descriptions by description id, each at an fd >= fd_base.
    files: BTreeMap<u32, RawFd>,
    /// Every socket and epoll instance.
    sockets: super::sockets::SocketSet,
    /// The first holder (pid) of each epoll set with signalfd registrations.
    signalfd_registrants: BTreeMap<u32, i32>,
    /// The image's saved files (deleted ones re-created unlinked).
    saved: super::saved_files::SavedSet,
}

impl PipeSet {
    /// Creates one kernel pipe per pipe inode any Fd of kind Pipe uses:
    /// capacity set, buffered data written back, status flags (O_NONBLOCK,
    /// O_DIRECT) set from the first fd holding each end, both ends moved to
    /// numbers >= `fd_base`; then one open file description per shared
    /// regular file (opened by path with its flags, seeked to its pos).
    pub fn create(
        pipes: &[PipeImage],
        sockets: &SocketsImage,
        processes: &[ProcessImage],
        saved: super::saved_files::SavedSet,
        fd_base: RawFd,
    ) -> Result<PipeSet, FdError> {
        let usage = pipe_usage(processes)?;
        let mut set = PipeSet {
            ends: BTreeMap::new(),
            external: usage
                .iter()
                .filter(|(_, u)| u.external())
                .map(|(inode, _)| *inode)
                .collect(),
            files: BTreeMap::new(),
            sockets: Default::default(),
            signalfd_registrants: BTreeMap::new(),
            saved,
        };
        for (&inode, u) in &usage {
            let image = pipes.iter().find(|p| p.inode == inode);
            match create_pipe(inode, image, u, fd_base) {
                Ok(ends) => {
                    set.ends.insert(inode, ends);
                }
                Err(e) => {
                    set.close_all();
                    return Err(e);
                }
            }
        }
        for (id, (pid, fd)) in shared_files(processes) {
            let FdKind::File {
                path, pos, saved, ..
            } = &fd.kind
            else {
                continue;
            };
            let (path, flags) = set.saved.reopen(path, *saved, reopen_flags(fd));
            match open_staged(pid, fd.fd, &path, flags, *pos, fd_base) {
                Ok(staged) => {
                    set.files.insert(id, staged);
                }
                Err(e) => {
                    set.close_all();
                    return Err(e);
                }
            }
        }
        let ends = set.ends.clone();
        let pipe_end = |inode: u64, write_end: bool| {
            ends.get(&inode)
                .map(|e| if write_end { e.write } else { e.read })
        };
        match super::sockets::create(sockets, pipe_end, fd_base) {
            Ok(created) => {
                for p in processes {
                    for fd in &p.fds {
                        if let FdKind::Epoll { id } = fd.kind {
                            if created.deferred.contains_key(&id) {
                                set.signalfd_registrants.entry(id).or_insert(p.pid);
                            }
                        }
                    }
                }
                set.sockets = created;
            }
            Err(e) => {
                set.close_all();
                return Err(e.into());
            }
        }
        Ok(set)
    }

    /// The fd holding socket `inode`.
    pub fn socket(&self, inode: u64) -> Option<RawFd> {
        self.sockets.sockets.get(&inode).copied()
    }

    /// The fd holding eventfd `id`.
    pub fn eventfd(&self, id: u64) -> Option<RawFd> {
        self.sockets.eventfds.get(&id).copied()
    }

    /// Which process registers epoll `id`'s signalfds.
    fn signalfd_registrant(&self, id: u32) -> Option<i32> {
        self.signalfd_registrants.get(&id).copied()
    }

    /// The fd holding signalfd `id`.
    pub fn signalfd(&self, id: u32) -> Option<RawFd> {
        self.sockets.signalfds.get(&id).copied()
    }

    /// The fd holding inotify instance `id`.
    pub fn inotify(&self, id: u32) -> Option<RawFd> {
        self.sockets.inotifies.get(&id).copied()
    }

    /// The fd holding timerfd `id`.
    pub fn timerfd(&self, id: u32) -> Option<RawFd> {
        self.sockets.timerfds.get(&id).copied()
    }

    /// The fd holding epoll instance `id`.
    pub fn epoll(&self, id: u32) -> Option<RawFd> {
        self.sockets.epolls.get(&id).copied()
    }

    /// The image's saved files, for paths of deleted files.
    pub fn saved(&self) -> &super::saved_files::SavedSet {
        &self.saved
    }

    /// The fd holding shared file description `id`.
    pub fn file(&self, id: u32) -> Option<RawFd> {
        self.files.get(&id).copied()
    }

    /// The ends of pipe `inode`.
    pub fn ends(&self, inode: u64) -> Option<PipeEnds> {
        self.ends.get(&inode).copied()
    }

    /// Every fd number the set holds (for a caller that must keep them).
    pub fn fds(&self) -> Vec<RawFd> {
        self.ends
            .values()
            .flat_map(|e| [e.read, e.write])
            .chain(self.files.values().copied())
            .chain(self.sockets.fds())
            .chain(self.saved.fds())
            .collect()
    }

    /// Whether only one end of pipe `inode` is held in the tree.
    pub fn is_external(&self, inode: u64) -> bool {
        self.external.contains(&inode)
    }

    /// Closes every fd of the set (error paths; a process that ran
    /// [`install`] has already closed them unless it kept them).
    pub fn close_all(self) {
        for fd in self.fds() {
            let _ = restore_sys::close_fd(fd);
        }
    }
}

fn create_pipe(
    inode: u64,
    image: Option<&PipeImage>,
    usage: &PipeUsage,
    fd_base: RawFd,
) -> Result<PipeEnds, FdError> {
    let err = |op: &'static str| move |source: std::io::Error| FdError::Pipe { inode, op, source };
    let (r, w) = restore_sys::pipe_pair().map_err(err("pipe2"))?;
    let result = fill_and_move(inode, image, usage, fd_base, r, w);
    let _ = restore_sys::close_fd(r);
    let _ = restore_sys::close_fd(w);
    result
}

fn fill_and_move(
    inode: u64,
    image: Option<&PipeImage>,
    usage: &PipeUsage,
    fd_base: RawFd,
    r: RawFd,
    w: RawFd,
) -> Result<PipeEnds, FdError> {
    let err = |op: &'static str| move |source: std::io::Error| FdError::Pipe { inode, op, source };
    let data = match image {
        Some(p) => hex::decode(&p.data).map_err(|e| FdError::PipeData {
            inode,
            detail: e.to_string(),
        })?,
        None => Vec::new(),
    };
    let mut capacity = restore_sys::get_pipe_size(w).map_err(err("F_GETPIPE_SZ"))?;
    if let Some(p) = image.filter(|p| p.capacity > 0) {
        capacity = restore_sys::set_pipe_size(w, p.capacity).map_err(err("F_SETPIPE_SZ"))?;
    }
    if data.len() as u64 > capacity {
        return Err(FdError::PipeOverfull {
            inode,
            len: data.len(),
            capacity,
        });
    }
    if !data.is_empty() {
        // Non-blocking while filling: if the data did not fit after all,
        // fail with EAGAIN instead of hanging the restore.
        restore_sys::set_status_flags(w, libc::O_NONBLOCK).map_err(err("F_SETFL"))?;
        restore_sys::write_all(w, &data).map_err(err("write buffered data"))?;
    }
    let status = |flags: Option<u32>| flags.map_or(0, |f| f as i32 & PIPE_STATUS_FLAGS);
    restore_sys::set_status_flags(r, status(usage.read_flags)).map_err(err("F_SETFL"))?;
    restore_sys::set_status_flags(w, status(usage.write_flags)).map_err(err("F_SETFL"))?;
    let read = restore_sys::dup_at_least(r, fd_base).map_err(err("F_DUPFD_CLOEXEC"))?;
    let write = match restore_sys::dup_at_least(w, fd_base) {
        Ok(fd) => fd,
        Err(e) => {
            let _ = restore_sys::close_fd(read);
            return Err(err("F_DUPFD_CLOEXEC")(e));
        }
    };
    Ok(PipeEnds { read, write })
}

/// Where fds 0, 1 and 2 come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stdio {
    /// The restoring command's stdin, stdout, stderr, already duplicated by
    /// the caller to numbers >= fd_base. Used for each of fds 0-2 whose
    /// image fd is a tty or a pipe with one end outside the tree.
    Inherit { fds: [RawFd; 3] },
    /// Everything as the image says: ttys reopened by path, pipes recreated.
    FromImage,
}

/// Where one target fd comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Source<'a> {
    /// Opened by path with these flags, then seeked to `pos` when it is not 0.
    Open {
        path: std::borrow::Cow<'a, str>,
        flags: i32,
        pos: u64,
    },
    /// Duplicated from an fd >= fd_base (a pipe end or an inherited stdio fd).
    Dup(RawFd),
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Placement<'a> {
    fd: RawFd,
    cloexec: bool,
    source: Source<'a>,
}

/// True when the stdio policy replaces image fd `fd` with the inherited stdio.
fn takes_inherited_stdio(fd: &Fd, pipes: &PipeSet) -> bool {
    (0..=2).contains(&fd.fd)
        && match fd.kind {
            FdKind::Tty { .. } => true,
            FdKind::Pipe { inode } => pipes.is_external(inode),
            _ => false,
        }
}

fn reopen_flags(fd: &Fd) -> i32 {
    // O_NOCTTY: the kernel drops it from f_flags, so the image cannot say;
    // a session leader must not pick up a controlling tty by accident.
    let flags = (fd.flags as i32 & REOPEN_FLAGS) | libc::O_CLOEXEC | libc::O_NOCTTY;
    match fd.kind {
        // A regular file showing O_DIRECTORY was made with O_TMPFILE
        // (__O_TMPFILE | O_DIRECTORY): it is reopened as the file it is.
        FdKind::File { .. } => flags & !libc::O_DIRECTORY,
        _ => flags,
    }
}

/// Pure: where each of `image`'s fds comes from. Checks the numbers against `fd_base`.
fn plan<'a>(
    pid: i32,
    image: &'a ProcessImage,
    pipes: &PipeSet,
    stdio: &Stdio,
    fd_base: RawFd,
    keep: &[RawFd],
) -> Result<Vec<Placement<'a>>, FdError> {
    if let Some(&fd) = keep.iter().find(|&&k| k < fd_base) {
        return Err(FdError::KeepBelowBase { pid, fd, fd_base });
    }
    let mut seen = BTreeSet::new();
    let mut out = Vec::with_capacity(image.fds.len());
    for fd in &image.fds {
        if !seen.insert(fd.fd) {
            return Err(FdError::DuplicateFd { pid, fd: fd.fd });
        }
        if fd.fd < 0 || fd.fd >= fd_base {
            return Err(FdError::FdAboveBase {
                pid,
                fd: fd.fd,
                fd_base,
            });
        }
        let cloexec = fd.flags as i32 & libc::O_CLOEXEC != 0;
        let source = match (stdio, &fd.kind) {
            (Stdio::Inherit { fds }, _) if takes_inherited_stdio(fd, pipes) => {
                let stdio_fd = fds[fd.fd as usize];
                if stdio_fd < fd_base {
                    return Err(FdError::StdioBelowBase {
                        pid,
                        fd: fd.fd,
                        stdio_fd,
                        fd_base,
                    });
                }
                Source::Dup(stdio_fd)
            }
            (
                _,
                FdKind::File {
                    path,
                    deleted: true,
                    saved: None,
                    ..
                },
            ) => {
                return Err(FdError::DeletedFile {
                    pid,
                    fd: fd.fd,
                    path: path.clone(),
                })
            }
            (
                _,
                FdKind::File {
                    description: Some(id),
                    ..
                },
            ) => Source::Dup(pipes.file(*id).ok_or(FdError::FileMissing {
                pid,
                fd: fd.fd,
                id: *id,
            })?),
            (
                _,
                FdKind::File {
                    path, pos, saved, ..
                },
            ) => {
                let (path, flags) = pipes.saved.reopen(path, *saved, reopen_flags(fd));
                Source::Open {
                    path,
                    flags,
                    pos: *pos,
                }
            }
            (_, FdKind::Directory { path }) => Source::Open {
                path: path.as_str().into(),
                flags: reopen_flags(fd) | libc::O_DIRECTORY,
                pos: 0,
            },
            (_, FdKind::Device { path, pos, .. }) => Source::Open {
                path: path.as_str().into(),
                flags: reopen_flags(fd),
                pos: *pos,
            },
            (_, FdKind::Tty { path, .. }) => Source::Open {
                path: path.as_str().into(),
                flags: reopen_flags(fd),
                pos: 0,
            },
            (_, FdKind::Pipe { inode }) => {
                let ends = pipes.ends(*inode).ok_or(FdError::PipeMissing {
                    pid,
                    fd: fd.fd,
                    inode: *inode,
                })?;
                match pipe_end(pid, fd, *inode)? {
                    PipeEnd::Read => Source::Dup(ends.read),
                    PipeEnd::Write => Source::Dup(ends.write),
                }
            }
            (_, FdKind::Fifo { path, .. }) => Source::Open {
                path: path.as_str().into(),
                flags: reopen_flags(fd),
                pos: 0,
            },
            (_, FdKind::Socket { inode }) => {
                Source::Dup(pipes.socket(*inode).ok_or_else(|| FdError::ObjectMissing {
                    pid,
                    fd: fd.fd,
                    what: format!("socket {inode}"),
                })?)
            }
            (_, FdKind::Eventfd { id }) => {
                Source::Dup(pipes.eventfd(*id).ok_or_else(|| FdError::ObjectMissing {
                    pid,
                    fd: fd.fd,
                    what: format!("eventfd {id}"),
                })?)
            }
            (_, FdKind::Signalfd { id }) => {
                Source::Dup(pipes.signalfd(*id).ok_or_else(|| FdError::ObjectMissing {
                    pid,
                    fd: fd.fd,
                    what: format!("signalfd {id}"),
                })?)
            }
            (_, FdKind::Inotify { id }) => {
                Source::Dup(pipes.inotify(*id).ok_or_else(|| FdError::ObjectMissing {
                    pid,
                    fd: fd.fd,
                    what: format!("inotify {id}"),
                })?)
            }
            (_, FdKind::Timerfd { id }) => {
                Source::Dup(pipes.timerfd(*id).ok_or_else(|| FdError::ObjectMissing {
                    pid,
                    fd: fd.fd,
                    what: format!("timerfd {id}"),
                })?)
            }
            (_, FdKind::Epoll { id }) => {
                Source::Dup(pipes.epoll(*id).ok_or_else(|| FdError::ObjectMissing {
                    pid,
                    fd: fd.fd,
                    what: format!("epoll {id}"),
                })?)
            }
            (_, FdKind::Unsupported { link }) => {
                return Err(FdError::NotSupported {
                    pid,
                    fd: fd.fd,
                    link: link.clone(),
                })
            }
        };
        out.push(Placement {
            fd: fd.fd,
            cloexec,
            source,
        });
    }
    Ok(out)
}

/// Opens or duplicates `p`'s source into a fresh fd >= fd_base.
fn stage(pid: i32, p: &Placement, fd_base: RawFd) -> Result<RawFd, FdError> {
    let place = |op: &'static str| {
        move |source: std::io::Error| FdError::Place {
            pid,
            fd: p.fd,
            op,
            source,
        }
    };
    match p.source {
        Source::Dup(src) => {
            restore_sys::dup_at_least(src, fd_base).map_err(place("F_DUPFD_CLOEXEC"))
        }
        Source::Open {
            ref path,
            flags,
            pos,
        } => open_staged(pid, p.fd, path, flags, pos, fd_base),
    }
}

/// Opens `path` with `flags` into a fresh fd >= fd_base, seeked to `pos`
/// when it is not 0; `pid` and `fd` name the image fd in errors.
fn open_staged(
    pid: i32,
    fd: RawFd,
    path: &str,
    flags: i32,
    pos: u64,
    fd_base: RawFd,
) -> Result<RawFd, FdError> {
    let opened = restore_sys::open_raw(Path::new(path), flags).map_err(|source| FdError::Open {
        pid,
        fd,
        path: path.to_string(),
        flags,
        source,
    })?;
    let staged = restore_sys::dup_at_least(opened, fd_base);
    let _ = restore_sys::close_fd(opened);
    let staged = staged.map_err(|source| FdError::Place {
        pid,
        fd,
        op: "F_DUPFD_CLOEXEC",
        source,
    })?;
    if pos != 0 {
        if let Err(source) = restore_sys::seek_to(staged, pos) {
            let _ = restore_sys::close_fd(staged);
            return Err(FdError::Seek {
                pid,
                fd,
                path: path.to_string(),
                pos,
                source,
            });
        }
    }
    Ok(staged)
}

/// Closes every fd not in `wanted` (sorted, unique, non-negative).
fn close_all_but(pid: i32, wanted: &[RawFd]) -> Result<(), FdError> {
    let close = |first: u32, last: u32| {
        restore_sys::close_range(first, last).map_err(|source| FdError::Close {
            pid,
            first,
            last,
            source,
        })
    };
    let mut next: u32 = 0;
    for &fd in wanted {
        let fd = fd as u32;
        if fd > next {
            close(next, fd - 1)?;
        }
        next = fd + 1;
    }
    close(next, u32::MAX)
}

/// Makes the calling process's fd table exactly `image`'s fds, plus `keep`
/// (fds >= fd_base the caller still needs, such as a status pipe).
///
/// Runs in the restored process after it forked all its children (they
/// inherited the PipeSet and stdio fds); afterwards the PipeSet fds and the
/// inherited stdio fds are closed unless listed in `keep`. Any `OwnedFd`
/// the caller still holds is dangling afterwards: forget it, never drop it.
///
/// `is_root` is accepted for the tree's root; the stdio policy is the same
/// for every process (each process passes the `stdio` it wants), so it is
/// currently not used to decide anything.
pub fn install(
    pid: i32,
    image: &ProcessImage,
    pipes: &PipeSet,
    stdio: &Stdio,
    is_root: bool,
    fd_base: RawFd,
    keep: &[RawFd],
) -> Result<(), FdError> {
    let _ = is_root;
    let placements = plan(pid, image, pipes, stdio, fd_base, keep)?;

    // Phase 1: everything the table needs moves to >= fd_base first, so the
    // dup3 calls below can never clobber a source still needed.
    let mut staged: Vec<RawFd> = Vec::with_capacity(placements.len());
    for p in &placements {
        match stage(pid, p, fd_base) {
            Ok(fd) => staged.push(fd),
            Err(e) => {
                for fd in staged {
                    let _ = restore_sys::close_fd(fd);
                }
                return Err(e);
            }
        }
    }
    // Phase 2: down to the exact numbers, close-on-exec as the image says.
    for (p, &from) in placements.iter().zip(&staged) {
        restore_sys::dup_to(from, p.fd, p.cloexec).map_err(|source| FdError::Place {
            pid,
            fd: p.fd,
            op: "dup3",
            source,
        })?;
        let _ = restore_sys::close_fd(from);
    }
    // Signalfd registrations of this process's epoll sets, made here by
    // the first holder of each (the upper band is still open).
    let mut done = BTreeSet::new();
    for fd in &image.fds {
        if let FdKind::Epoll { id } = fd.kind {
            if pipes.signalfd_registrant(id) == Some(pid) && done.insert(id) {
                pipes.sockets.register_signalfds(id, fd.fd)?;
            }
        }
    }
    // Phase 3: nothing else stays open.
    let mut wanted: Vec<RawFd> = placements
        .iter()
        .map(|p| p.fd)
        .chain(keep.iter().copied())
        .collect();
    wanted.sort_unstable();
    wanted.dedup();
    close_all_but(pid, &wanted)
}

#[cfg(test)]
#[path = "fds_tests.rs"]
pub(crate) mod tests;
