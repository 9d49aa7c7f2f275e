//! Pre-flight checks of a restore, run before any process is created, so
//! that a restore that would fail on the filesystem or on a pid fails with
//! nothing to undo: every file the image reopens or maps is there and looks
//! like what was dumped, no fd is of an unsupported kind, and the pids to
//! recreate are free.
//!
//! Files are compared by kind and size, not by (dev, inode): a container's
//! rootfs restored on another node holds the same files under other inodes.
//! A file may have grown only when the tree merely appends to it (a log
//! the original kept writing after a dump without `--exit`, see
//! [`Growth`]); a container's rootfs is held to the dumped sizes.
//! Paths are resolved in the restorer's view (see `restore::attrs` for how
//! the dumper's paths relate to it). This module only reads.

use std::collections::HashMap;
use std::fs::Metadata;
use std::os::unix::fs::FileTypeExt;

use crate::image::types::{Fd, FdKind, ProcessEntry, ProcessImage, SavedFile, VmaKind};
use crate::image::Image;

const DELETED_SUFFIX: &str = " (deleted)";

#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error("pid {pid}: {what} {path:?} is missing")]
    Missing {
        pid: i32,
        what: String,
        path: String,
    },
    #[error("pid {pid}: {what} {path:?}: {source}")]
    Stat {
        pid: i32,
        what: String,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("pid {pid}: {what} {path:?} is not a {expected}")]
    WrongType {
        pid: i32,
        what: String,
        path: String,
        expected: &'static str,
    },
    #[error("pid {pid}: {what} {path:?} size changed: image {image}, now {now}")]
    SizeChanged {
        pid: i32,
        what: String,
        path: String,
        image: u64,
        now: u64,
    },
    #[error(
        "pid {pid}: {what} {path:?} size changed: image {image}, now {now} \
         (only a file open write-only with O_APPEND may grow)"
    )]
    GrewNotAppendOnly {
        pid: i32,
        what: String,
        path: String,
        image: u64,
        now: u64,
    },
    #[error(
        "pid {pid}: mapped file {path:?} is too short: {size} bytes, mapped from offset {offset}"
    )]
    MappingPastEnd {
        pid: i32,
        path: String,
        size: u64,
        offset: u64,
    },
    #[error("not supported: pid {pid} maps deleted file {path:?}")]
    DeletedMapping { pid: i32, path: String },
    #[error("not supported: pid {pid} {what} {path:?} is deleted")]
    Deleted {
        pid: i32,
        what: String,
        path: String,
    },
    #[error("not supported: pid {pid} fd {fd}: {link}")]
    UnsupportedFd { pid: i32, fd: i32, link: String },
    #[error("pid {pid} is taken (by {comm})")]
    PidTaken { pid: i32, comm: String },
    #[error("checking whether pid {pid} is free: {source}")]
    PidProbe {
        pid: i32,
        #[source]
        source: std::io::Error,
    },
}

/// Which open regular files may have grown since the dump.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Growth {
    /// None: every file has its dumped size. For a container, whose rootfs
    /// is rebuilt from its image's layers (and the writable layer saved
    /// with the checkpoint): a file of another size there is another file.
    Exact,
    /// A file the tree only appends to (every fd of it write-only with
    /// O_APPEND) may have grown; restore keeps the dumped offset, and the
    /// process's next write goes to the new end. Not a file that shrank,
    /// nor one the tree maps, executes or may read. A write-only fd
    /// without O_APPEND, even one at end of file at the dump, is held to
    /// its size: its next write would land at the dumped offset, over
    /// what was appended since.
    AppendOnlyMayGrow,
}

/// The fd's file description only ever appends: write-only and O_APPEND.
pub fn appends_only(flags: u32) -> bool {
    let flags = flags as i32;
    flags & libc::O_ACCMODE == libc::O_WRONLY && flags & libc::O_APPEND != 0
}

/// What a path must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    Regular,
    Directory,
    Device,
    Fifo,
}

impl Expect {
    fn name(self) -> &'static str {
        match self {
            Expect::Regular => "regular file",
            Expect::Directory => "directory",
            Expect::Device => "device",
            Expect::Fifo => "named FIFO",
        }
    }
    fn matches(self, meta: &Metadata) -> bool {
        let ft = meta.file_type();
        match self {
            Expect::Regular => ft.is_file(),
            Expect::Directory => ft.is_dir(),
            Expect::Device => ft.is_char_device() || ft.is_block_device(),
            Expect::Fifo => ft.is_fifo(),
        }
    }
}

/// stat() results by path, so a library mapped by every process is looked up once.
#[derive(Default)]
struct StatCache {
    seen: HashMap<String, Result<Metadata, std::io::ErrorKind>>,
}

impl StatCache {
    /// Metadata of `path` (following symlinks), which must be an `expect`.
    fn check(
        &mut self,
        pid: i32,
        what: &str,
        path: &str,
        expect: Expect,
    ) -> Result<Metadata, CheckError> {
        let got = self
            .seen
            .entry(path.to_string())
            .or_insert_with(|| std::fs::metadata(path).map_err(|e| e.kind()))
            .clone();
        let meta = match got {
            Ok(meta) => meta,
            Err(std::io::ErrorKind::NotFound) => {
                return Err(CheckError::Missing {
                    pid,
                    what: what.to_string(),
                    path: path.to_string(),
                })
            }
            Err(kind) => {
                return Err(CheckError::Stat {
                    pid,
                    what: what.to_string(),
                    path: path.to_string(),
                    source: kind.into(),
                })
            }
        };
        if !expect.matches(&meta) {
            return Err(CheckError::WrongType {
                pid,
                what: what.to_string(),
                path: path.to_string(),
                expected: expect.name(),
            });
        }
        Ok(meta)
    }
}

/// Checks every file the image needs, in tree order, and returns the first problem:
/// - the executable (`exe` and `mm.exe_file`) of every process: a regular file;
/// - cwd and root: directories;
/// - every private or shared file mapping: a regular file longer than the
///   mapping's offset (a deleted one is not supported);
/// - executables and mapped files: the size the dump recorded, if it did;
/// - every fd: regular files exist with the dumped size, or larger where
///   `growth` allows it (deleted: not supported), directories and devices
///   exist with their kind, and no fd is of an unsupported kind (socket,
///   eventfd, ...). Ttys are not checked: the stdio policy may replace them.
pub fn check_files(image: &Image, growth: Growth) -> Result<(), CheckError> {
    let mut cache = StatCache::default();
    // A zombie needs no file: it has no executable, directories or mappings.
    let live = image.tree.processes.iter().zip(&image.processes);
    let saved = Saved::of(&image.tree.saved_files);
    for (entry, process) in live.filter(|(e, _)| e.zombie.is_none()) {
        check_process(
            &mut cache,
            &image.tree.file_sizes,
            &saved,
            growth,
            entry,
            process,
        )?;
    }
    Ok(())
}

/// What the image's saved files let through: a deleted file that is saved
/// is re-created, a saved tmpfs file that is missing is created.
struct Saved<'a> {
    by_id: std::collections::BTreeMap<u32, &'a SavedFile>,
    by_key: std::collections::BTreeMap<(u64, u64), &'a SavedFile>,
}

impl<'a> Saved<'a> {
    fn of(files: &'a [SavedFile]) -> Saved<'a> {
        Saved {
            by_id: files.iter().map(|f| (f.id, f)).collect(),
            by_key: files.iter().map(|f| ((f.dev, f.inode), f)).collect(),
        }
    }

    /// Whether restore makes the file itself (so nothing is to check at
    /// its path): deleted and saved, or saved and missing now.
    fn made(file: Option<&SavedFile>) -> bool {
        file.is_some_and(|f| f.deleted || std::fs::symlink_metadata(&f.path).is_err())
    }
}

fn check_process(
    cache: &mut StatCache,
    sizes: &std::collections::BTreeMap<String, u64>,
    saved: &Saved,
    growth: Growth,
    entry: &ProcessEntry,
    process: &ProcessImage,
) -> Result<(), CheckError> {
    let pid = entry.pid;
    let deleted = |what: &str, path: &str| CheckError::Deleted {
        pid,
        what: what.to_string(),
        path: path.trim_end_matches(DELETED_SUFFIX).to_string(),
    };
    for exe in [entry.exe.as_str(), process.mm.exe_file.as_str()] {
        if exe.ends_with(DELETED_SUFFIX) {
            return Err(deleted("executable", exe));
        }
        let meta = cache.check(pid, "executable", exe, Expect::Regular)?;
        same_size(pid, "executable", exe, &meta, sizes)?;
    }
    for (what, dir) in [("cwd", &entry.cwd), ("root", &entry.root)] {
        if dir.ends_with(DELETED_SUFFIX) {
            return Err(deleted(what, dir));
        }
        cache.check(pid, what, dir, Expect::Directory)?;
    }
    for vma in &process.vmas {
        if !matches!(vma.kind, VmaKind::PrivateFile | VmaKind::SharedFile) {
            continue;
        }
        let Some(path) = vma.path.as_deref() else {
            continue;
        };
        if Saved::made(saved.by_key.get(&(vma.dev, vma.inode)).copied()) {
            continue;
        }
        if vma.deleted {
            return Err(CheckError::DeletedMapping {
                pid,
                path: path.to_string(),
            });
        }
        let meta = cache.check(pid, "mapped file", path, Expect::Regular)?;
        same_size(pid, "mapped file", path, &meta, sizes)?;
        if meta.len() <= vma.offset {
            return Err(CheckError::MappingPastEnd {
                pid,
                path: path.to_string(),
                size: meta.len(),
                offset: vma.offset,
            });
        }
    }
    for fd in &process.fds {
        let what = |kind: &str| format!("fd {} {kind}", fd.fd);
        match &fd.kind {
            FdKind::File {
                saved: Some(id), ..
            } if Saved::made(saved.by_id.get(id).copied()) => {}
            FdKind::File {
                path,
                deleted: true,
                ..
            } => return Err(deleted(&what("file"), path)),
            FdKind::File { path, size, .. } => {
                let meta = cache.check(pid, &what("file"), path, Expect::Regular)?;
                open_file_size(pid, fd, path, *size, &meta, growth)?;
            }
            FdKind::Directory { path } => {
                cache.check(pid, &what("directory"), path, Expect::Directory)?;
            }
            FdKind::Device { path, .. } => {
                cache.check(pid, &what("device"), path, Expect::Device)?;
            }
            FdKind::Fifo { path, .. } => {
                cache.check(pid, &what("FIFO"), path, Expect::Fifo)?;
            }
            FdKind::Pipe { .. }
            | FdKind::Tty { .. }
            | FdKind::Socket { .. }
            | FdKind::Epoll { .. }
            | FdKind::Eventfd { .. }
            | FdKind::Signalfd { .. }
            | FdKind::Timerfd { .. }
            | FdKind::Inotify { .. } => {}
            FdKind::Unsupported { link } => {
                return Err(CheckError::UnsupportedFd {
                    pid,
                    fd: fd.fd,
                    link: link.clone(),
                })
            }
        }
    }
    Ok(())
}

/// An open regular file has the size the dump recorded, or has grown under
/// an fd that only appends to it where `growth` allows that.
fn open_file_size(
    pid: i32,
    fd: &Fd,
    path: &str,
    image: u64,
    meta: &Metadata,
    growth: Growth,
) -> Result<(), CheckError> {
    let now = meta.len();
    let may_grow = growth == Growth::AppendOnlyMayGrow;
    if now == image || (now > image && may_grow && appends_only(fd.flags)) {
        return Ok(());
    }
    let (what, path) = (format!("fd {} file", fd.fd), path.to_string());
    Err(if now > image && may_grow {
        CheckError::GrewNotAppendOnly {
            pid,
            what,
            path,
            image,
            now,
        }
    } else {
        CheckError::SizeChanged {
            pid,
            what,
            path,
            image,
            now,
        }
    })
}

/// A file whose size the dump recorded must have it still.
fn same_size(
    pid: i32,
    what: &str,
    path: &str,
    meta: &Metadata,
    sizes: &std::collections::BTreeMap<String, u64>,
) -> Result<(), CheckError> {
    match sizes.get(path) {
        Some(&image) if image != meta.len() => Err(CheckError::SizeChanged {
            pid,
            what: what.to_string(),
            path: path.to_string(),
            image,
            now: meta.len(),
        }),
        _ => Ok(()),
    }
}

/// For a restore into the current pid namespace: every pid (and tid) to be
/// recreated with `clone3(set_tid)` must be unused. /proc/N exists for
/// thread ids too (unlisted), so tids are caught as well.
pub fn check_pids_free(pids: &[i32]) -> Result<(), CheckError> {
    for &pid in pids {
        let dir = format!("/proc/{pid}");
        match std::fs::symlink_metadata(&dir) {
            Ok(_) => {
                let comm = crate::sys::procfs::read_comm(pid)
                    .unwrap_or_else(|_| "a process that just exited".to_string());
                return Err(CheckError::PidTaken { pid, comm });
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(CheckError::PidProbe { pid, source }),
        }
    }
    Ok(())
}

#[cfg(test)]
#[path = "checks_tests.rs"]
mod tests;
