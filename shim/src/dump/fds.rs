//! File descriptors of a dumped process, from /proc/PID/fd and fdinfo:
//! regular files, directories, devices, ttys, pipes (with their buffered
//! data, read without consuming it, once per pipe), and everything else
//! recorded as unsupported by its link text; which regular-file fds of the
//! tree share one open file description ([`assign_descriptions`], by kcmp).
//! Never changes a target's fds.

use std::collections::BTreeMap;
use std::os::unix::fs::{FileTypeExt, MetadataExt};

use crate::image::sockets::FifoImage;
use crate::image::types::{Fd, FdKind, PipeImage};
use crate::sys::kcmp;
use crate::sys::pipe::{peek_pipe, PipeError};
use crate::sys::procfs::{list_fds, proc_path, read_fdinfo, read_link, ProcfsError};

#[derive(Debug, thiserror::Error)]
pub enum FdError {
    #[error(transparent)]
    Procfs(#[from] ProcfsError),
    #[error("pid {pid} fd {fd}: stat {path}: {source}")]
    Stat {
        pid: i32,
        fd: i32,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("pid {pid} fd {fd}: reading pipe {inode}: {source}")]
    Pipe {
        pid: i32,
        fd: i32,
        inode: u64,
        #[source]
        source: PipeError,
    },
    #[error("kcmp(KCMP_FILE) of pid {pid1} fd {fd1} and pid {pid2} fd {fd2}: {source}")]
    Kcmp {
        pid1: i32,
        fd1: i32,
        pid2: i32,
        fd2: i32,
        #[source]
        source: std::io::Error,
    },
}

/// Pipes seen so far in this dump, by inode, with their buffered data.
#[derive(Debug, Default)]
pub struct PipeCollector {
    pipes: BTreeMap<u64, PipeImage>,
    /// Named FIFOs by (dev, inode).
    fifos: BTreeMap<(u64, u64), FifoImage>,
}

impl PipeCollector {
    pub fn into_images(self) -> Vec<PipeImage> {
        self.pipes.into_values().collect()
    }

    /// The named FIFOs seen, with their data; the pipes stay.
    pub fn take_fifos(&mut self) -> Vec<FifoImage> {
        std::mem::take(&mut self.fifos).into_values().collect()
    }
}

const DELETED_SUFFIX: &str = " (deleted)";

fn is_tty_path(path: &str) -> bool {
    path.starts_with("/dev/pts/")
        || path.starts_with("/dev/tty")
        || path == "/dev/console"
        || path == "/dev/ptmx"
}

/// Parses `pipe:[12345]`.
fn pipe_inode(link: &str) -> Option<u64> {
    link.strip_prefix("pipe:[")?.strip_suffix(']')?.parse().ok()
}

/// Parses `socket:[12345]`.
fn socket_inode(link: &str) -> Option<u64> {
    link.strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// Every open fd of `pid`, ascending; pipes' data goes into `pipes`.
pub fn collect_fds(pid: i32, pipes: &mut PipeCollector) -> Result<Vec<Fd>, FdError> {
    let mut out = Vec::new();
    for fd in list_fds(pid)? {
        let link_path = proc_path(pid, &format!("fd/{fd}"));
        let link = read_link(&link_path)?;
        let info = read_fdinfo(pid, fd)?;
        let kind = if let Some(inode) = pipe_inode(&link) {
            if let std::collections::btree_map::Entry::Vacant(slot) = pipes.pipes.entry(inode) {
                let (data, capacity) = peek_pipe(&link_path).map_err(|source| FdError::Pipe {
                    pid,
                    fd,
                    inode,
                    source,
                })?;
                slot.insert(PipeImage {
                    inode,
                    data: hex::encode(data),
                    capacity,
                });
            }
            FdKind::Pipe { inode }
        } else if let Some(inode) = socket_inode(&link) {
            FdKind::Socket { inode }
        } else if link == "anon_inode:[eventfd]" {
            FdKind::Eventfd {
                id: crate::sys::procfs::read_eventfd_fdinfo(pid, fd)?.id,
            }
        } else if link == "anon_inode:[signalfd]" {
            FdKind::Signalfd { id: 0 }
        } else if link == "anon_inode:[timerfd]" {
            FdKind::Timerfd { id: 0 }
        } else if link == "anon_inode:inotify" {
            FdKind::Inotify { id: 0 }
        } else if link == "anon_inode:[eventpoll]" {
            // Numbered by `dump::epoll` (every anon inode has one number).
            FdKind::Epoll { id: 0 }
        } else if !link.starts_with('/') {
            // anon_inode:[eventfd], anon_inode:inotify, ...
            FdKind::Unsupported { link }
        } else {
            let meta = std::fs::metadata(&link_path).map_err(|source| FdError::Stat {
                pid,
                fd,
                path: link.clone(),
                source,
            })?;
            let ft = meta.file_type();
            let (path, deleted) = match link.strip_suffix(DELETED_SUFFIX) {
                Some(p) => (p.to_string(), true),
                None => (link.clone(), false),
            };
            if ft.is_file() {
                FdKind::File {
                    path,
                    pos: info.pos,
                    size: meta.size(),
                    deleted,
                    description: None,
                    saved: None,
                }
            } else if ft.is_dir() {
                FdKind::Directory { path }
            } else if ft.is_fifo() && !deleted {
                let key = (meta.dev(), meta.ino());
                if let std::collections::btree_map::Entry::Vacant(slot) = pipes.fifos.entry(key) {
                    let (data, capacity) =
                        peek_pipe(&link_path).map_err(|source| FdError::Pipe {
                            pid,
                            fd,
                            inode: meta.ino(),
                            source,
                        })?;
                    slot.insert(FifoImage {
                        path: path.clone(),
                        dev: key.0,
                        inode: key.1,
                        data: hex::encode(data),
                        capacity,
                    });
                }
                FdKind::Fifo {
                    path,
                    dev: key.0,
                    inode: key.1,
                }
            } else if ft.is_char_device() && is_tty_path(&path) {
                FdKind::Tty {
                    path,
                    rdev: meta.rdev(),
                }
            } else if ft.is_char_device() || ft.is_block_device() {
                FdKind::Device {
                    path,
                    rdev: meta.rdev(),
                    pos: info.pos,
                }
            } else {
                // Named FIFOs, sockets bound in the filesystem, ...
                FdKind::Unsupported { link }
            }
        };
        out.push(Fd {
            fd,
            flags: info.flags,
            kind,
        });
    }
    Ok(out)
}

/// A named FIFO of the tree that a process outside it holds open cannot be
/// carried over (its other end would be gone): each is listed in
/// `refusals` with the outside pid. Looks at every process's fds.
pub fn refuse_fifos_held_outside(tables: &[(i32, Vec<Fd>)], refusals: &mut Vec<String>) {
    let mut ours: BTreeMap<(u64, u64), (i32, i32, String)> = BTreeMap::new();
    for (pid, fds) in tables {
        for fd in fds {
            if let FdKind::Fifo { path, dev, inode } = &fd.kind {
                ours.entry((*dev, *inode))
                    .or_insert((*pid, fd.fd, path.clone()));
            }
        }
    }
    if ours.is_empty() {
        return;
    }
    let in_tree: std::collections::BTreeSet<i32> = tables.iter().map(|(p, _)| *p).collect();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return;
    };
    let mut reported = std::collections::BTreeSet::new();
    for entry in procs.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        if in_tree.contains(&pid) {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let Ok(meta) = std::fs::metadata(fd.path()) else {
                continue;
            };
            let key = (meta.dev(), meta.ino());
            if let Some((tp, tfd, path)) = ours.get(&key) {
                if meta.file_type().is_fifo() && reported.insert(key) {
                    refusals.push(format!(
                        "pid {tp} fd {tfd} is FIFO {path}, which pid {pid} outside the tree holds open too"
                    ));
                }
            }
        }
    }
}

/// A regular-file fd as description grouping sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileFd<'a> {
    pub pid: i32,
    pub fd: i32,
    pub path: &'a str,
    pub pos: u64,
    /// fdinfo flags; O_CLOEXEC is per fd, not per description, and ignored.
    pub flags: u32,
}

impl FileFd<'_> {
    /// Fds of one description necessarily agree on this: only fds with the
    /// same key are compared by `same`.
    fn key(&self) -> (&str, u64, u32) {
        (self.path, self.pos, self.flags & !(libc::O_CLOEXEC as u32))
    }
}

/// Pure: which of `fds` are one open file description, as decided by
/// `same(a, b)` (kcmp in a dump), asked only between fds with the same path,
/// pos and flags and only against the first member of each group. Returns,
/// for each fd in order, its description id when the description has at
/// least two fds; ids count from 0 in order of each group's first fd.
pub fn group_descriptions<E>(
    fds: &[FileFd],
    mut same: impl FnMut(&FileFd, &FileFd) -> Result<bool, E>,
) -> Result<Vec<Option<u32>>, E> {
    // Groups as indices into `fds`; first member is the representative.
    let mut buckets: BTreeMap<(&str, u64, u32), Vec<Vec<usize>>> = BTreeMap::new();
    for (i, f) in fds.iter().enumerate() {
        let groups = buckets.entry(f.key()).or_default();
        let mut joined = false;
        for g in groups.iter_mut() {
            if same(&fds[g[0]], f)? {
                g.push(i);
                joined = true;
                break;
            }
        }
        if !joined {
            groups.push(vec![i]);
        }
    }
    let mut shared: Vec<&Vec<usize>> = buckets
        .values()
        .flatten()
        .filter(|g| g.len() >= 2)
        .collect();
    shared.sort_by_key(|g| g[0]);
    let mut out = vec![None; fds.len()];
    for (id, g) in shared.into_iter().enumerate() {
        for &i in g {
            out[i] = Some(id as u32);
        }
    }
    Ok(out)
}

/// kcmp(KCMP_FILE) of two fds, for [`group_descriptions`].
pub fn same_file(a: &FileFd, b: &FileFd) -> Result<bool, FdError> {
    kcmp::same_file(a.pid, a.fd, b.pid, b.fd).map_err(|source| FdError::Kcmp {
        pid1: a.pid,
        fd1: a.fd,
        pid2: b.pid,
        fd2: b.fd,
        source,
    })
}

/// Sets `description` on every regular-file fd of `tables` (pid, fds) whose
/// open file description another fd of the tree shares, comparing with
/// kcmp. The processes must be stopped (their fd tables must not change).
pub fn assign_descriptions(tables: &mut [(i32, Vec<Fd>)]) -> Result<(), FdError> {
    let mut at: Vec<(usize, usize)> = Vec::new();
    let mut files: Vec<FileFd> = Vec::new();
    for (t, (pid, fds)) in tables.iter().enumerate() {
        for (j, fd) in fds.iter().enumerate() {
            if let FdKind::File { path, pos, .. } = &fd.kind {
                at.push((t, j));
                files.push(FileFd {
                    pid: *pid,
                    fd: fd.fd,
                    path,
                    pos: *pos,
                    flags: fd.flags,
                });
            }
        }
    }
    let ids = group_descriptions(&files, same_file)?;
    for ((t, j), id) in at.into_iter().zip(ids) {
        if let FdKind::File { description, .. } = &mut tables[t].1[j].kind {
            *description = id;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, SeekFrom, Write};
    use std::os::fd::AsRawFd;

    use crate::sys::testing::TestChild;

    #[test]
    fn file_devnull_pipe_and_socket_of_a_child_are_told_apart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fpath = dir.path().join("data.bin");
        let mut file = std::fs::File::create(&fpath).expect("create");
        file.write_all(&[7u8; 1000]).expect("write");
        file.seek(SeekFrom::Start(123)).expect("seek");
        let null = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/null")
            .expect("null");
        let (mut rd, mut wr) = std::io::pipe().expect("pipe");
        wr.write_all(b"12345").expect("fill pipe");
        let sock = std::os::unix::net::UnixDatagram::unbound().expect("socket");
        let fds = [
            file.as_raw_fd(),
            null.as_raw_fd(),
            rd.as_raw_fd(),
            wr.as_raw_fd(),
            sock.as_raw_fd(),
        ];
        // The child inherits every fd above; these are not O_CLOEXEC-relevant since no exec.
        let child = TestChild::fork(|| 0);
        let mut pipes = PipeCollector::default();
        let got = collect_fds(child.pid, &mut pipes).expect("collect");
        let by_fd = |fd: i32| {
            got.iter()
                .find(|f| f.fd == fd)
                .unwrap_or_else(|| panic!("fd {fd} missing in {got:?}"))
        };
        match &by_fd(fds[0]).kind {
            FdKind::File {
                path,
                pos,
                size,
                deleted,
                ..
            } => {
                assert_eq!(path, &fpath.to_string_lossy());
                assert_eq!((*pos, *size, *deleted), (123, 1000, false));
            }
            other => panic!("file: {other:?}"),
        }
        match &by_fd(fds[1]).kind {
            FdKind::Device { path, rdev, .. } => {
                assert_eq!(path, "/dev/null");
                assert_eq!(*rdev, libc::makedev(1, 3));
            }
            other => panic!("null: {other:?}"),
        }
        assert_eq!(
            by_fd(fds[1]).flags & libc::O_ACCMODE as u32,
            libc::O_WRONLY as u32
        );
        let inode = match by_fd(fds[2]).kind {
            FdKind::Pipe { inode } => inode,
            ref other => panic!("pipe: {other:?}"),
        };
        assert_eq!(by_fd(fds[3]).kind, FdKind::Pipe { inode });
        let sock_ino = std::fs::metadata(format!("/proc/self/fd/{}", fds[4]))
            .expect("stat socket")
            .ino();
        assert_eq!(by_fd(fds[4]).kind, FdKind::Socket { inode: sock_ino });
        // The child also inherits the harness's pipes: look at ours only.
        let images: Vec<PipeImage> = pipes
            .into_images()
            .into_iter()
            .filter(|p| p.inode == inode)
            .collect();
        assert_eq!(images.len(), 1, "one image per pipe");
        assert_eq!(images[0].data, hex::encode(b"12345"));
        assert!(images[0].capacity >= 4096);
        // The data is still in the pipe.
        drop(wr);
        drop(child);
        let mut rest = Vec::new();
        rd.read_to_end(&mut rest).expect("read");
        assert_eq!(rest, b"12345");
    }

    #[test]
    fn deleted_file_is_marked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fpath = dir.path().join("gone");
        let file = std::fs::File::create(&fpath).expect("create");
        std::fs::remove_file(&fpath).expect("unlink");
        let child = TestChild::fork(|| 0);
        let mut pipes = PipeCollector::default();
        let got = collect_fds(child.pid, &mut pipes).expect("collect");
        let f = got
            .iter()
            .find(|f| f.fd == file.as_raw_fd())
            .expect("fd listed");
        assert!(
            matches!(&f.kind, FdKind::File { path, deleted: true, .. } if path == &fpath.to_string_lossy()),
            "{f:?}"
        );
    }

    fn ff(pid: i32, fd: i32, path: &'static str, pos: u64, flags: i32) -> FileFd<'static> {
        FileFd {
            pid,
            fd,
            path,
            pos,
            flags: flags as u32,
        }
    }

    #[test]
    fn grouping_asks_only_same_key_and_numbers_shared_groups() {
        let fds = [
            ff(1, 3, "/log", 10, libc::O_WRONLY),
            ff(1, 4, "/data", 0, libc::O_RDWR),
            ff(2, 3, "/log", 10, libc::O_WRONLY | libc::O_CLOEXEC),
            ff(2, 4, "/data", 0, libc::O_RDWR),
            ff(3, 4, "/data", 0, libc::O_RDWR),
            ff(3, 5, "/log", 10, libc::O_RDONLY),
            ff(3, 6, "/alone", 0, libc::O_RDONLY),
        ];
        // The "kernel": which object each (pid, fd) refers to. /data of pid 2
        // is its own open; pids 1 and 3 share theirs.
        let object = |f: &FileFd| match (f.pid, f.fd) {
            (1, 3) | (2, 3) | (3, 5) => 100,
            (1, 4) | (3, 4) => 200,
            _ => 300 + f.pid,
        };
        let mut asked = Vec::new();
        let got = group_descriptions(&fds, |a, b| {
            asked.push(((a.pid, a.fd), (b.pid, b.fd)));
            Ok::<_, ()>(object(a) == object(b))
        })
        .expect("group");
        assert_eq!(
            got,
            vec![Some(0), Some(1), Some(0), None, Some(1), None, None]
        );
        // (3, 5) differs in flags from the /log group: never compared to it.
        assert_eq!(
            asked,
            vec![((1, 3), (2, 3)), ((1, 4), (2, 4)), ((1, 4), (3, 4))]
        );

        let err = group_descriptions(&fds, |_, _| Err::<bool, _>("kcmp failed"));
        assert_eq!(err, Err("kcmp failed"));
    }

    #[test]
    fn inherited_and_dup_share_a_description_separate_opens_do_not() {
        use std::os::fd::IntoRawFd;
        let dir = tempfile::tempdir().expect("tempdir");
        let fpath = dir.path().join("shared.log");
        let mut inherited = std::fs::File::create(&fpath).expect("create");
        inherited.write_all(b"abc").expect("write");
        let dup = inherited.try_clone().expect("dup");
        // Each child also opens the file itself: same path, pos and flags
        // in both, but two descriptions.
        let open_own = || {
            std::fs::OpenOptions::new()
                .write(true)
                .open(&fpath)
                .map_or(-1, |f| i64::from(f.into_raw_fd()))
        };
        let a = TestChild::fork(open_own);
        let b = TestChild::fork(open_own);
        let (own_a, own_b) = (a.value as i32, b.value as i32);
        assert!(own_a >= 0 && own_b >= 0, "children could not open");
        let mut pipes = PipeCollector::default();
        let mut tables = vec![
            (a.pid, collect_fds(a.pid, &mut pipes).expect("collect a")),
            (b.pid, collect_fds(b.pid, &mut pipes).expect("collect b")),
        ];
        assign_descriptions(&mut tables).expect("assign");
        let description = |t: usize, fd: i32| {
            let f = tables[t].1.iter().find(|f| f.fd == fd).expect("fd listed");
            match &f.kind {
                FdKind::File { description, .. } => *description,
                other => panic!("{other:?}"),
            }
        };
        let id = description(0, inherited.as_raw_fd());
        assert!(id.is_some(), "inherited fd not marked shared");
        assert_eq!(description(0, dup.as_raw_fd()), id);
        assert_eq!(description(1, inherited.as_raw_fd()), id);
        assert_eq!(description(1, dup.as_raw_fd()), id);
        assert_eq!(description(0, own_a), None, "own open marked shared");
        assert_eq!(description(1, own_b), None, "own open marked shared");
    }
}
