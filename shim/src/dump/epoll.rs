//! Epoll instances of a dumped tree: which epoll fds are one instance
//! (kcmp: anon inodes share one inode number), numbered as
//! [`FdKind::Epoll`] ids, and every registration read from the first
//! holder's fdinfo with its watched file found among the tree's fds
//! (`kcmp(KCMP_EPOLL_TFD)` against the candidates with the same inode).
//! Reads only; never changes an epoll set.

use crate::image::sockets::{EpollImage, EpollObject, EpollTarget};
use crate::image::types::{Fd, FdKind};
use crate::sys::kcmp;
use crate::sys::procfs::{read_epoll_fdinfo, ProcfsError};

use super::fds::{group_descriptions, same_file, FdError, FileFd};

#[derive(Debug, thiserror::Error)]
pub enum EpollError {
    #[error(transparent)]
    Procfs(#[from] ProcfsError),
    #[error(transparent)]
    Fds(#[from] FdError),
    #[error("kcmp of pid {pid1} fd {fd1} and pid {pid2} fd {fd2}: {source}")]
    Kcmp {
        pid1: i32,
        fd1: i32,
        pid2: i32,
        fd2: i32,
        #[source]
        source: std::io::Error,
    },
}

/// Numbers every epoll fd of `tables` (their `FdKind::Epoll { id }`, set
/// here) and describes each instance. Registrations that cannot be restored
/// go to `refusals`, naming pid, fd and the watched fd.
pub fn collect(
    tables: &mut [(i32, Vec<Fd>)],
    refusals: &mut Vec<String>,
) -> Result<Vec<EpollImage>, EpollError> {
    let first = number_by_file(
        tables,
        |k| matches!(k, FdKind::Epoll { .. }),
        |id| FdKind::Epoll { id },
    )?;
    let mut out = Vec::new();
    for (id, (pid, epfd)) in first {
        let mut targets = Vec::new();
        for entry in read_epoll_fdinfo(pid, epfd)? {
            match find_target(tables, pid, epfd, entry.tfd, entry.ino)? {
                Ok(object) => targets.push(EpollTarget {
                    tfd: entry.tfd,
                    events: entry.events,
                    data: entry.data,
                    object,
                }),
                Err(why) => refusals.push(format!(
                    "pid {pid} fd {epfd} is an epoll watching fd {} (inode {}): {why}",
                    entry.tfd, entry.ino
                )),
            }
        }
        out.push(EpollImage { id, targets });
    }
    Ok(out)
}

/// Numbers the files of one anon-inode kind (`is_kind`) across `tables`:
/// fds on one file (inherited, dup'ed) get one id, set with `with_id`;
/// files are told apart by kcmp, anon inodes sharing one inode number.
/// Returns each id's first holder (pid, fd).
pub fn number_by_file(
    tables: &mut [(i32, Vec<Fd>)],
    is_kind: impl Fn(&FdKind) -> bool,
    with_id: impl Fn(u32) -> FdKind,
) -> Result<std::collections::BTreeMap<u32, (i32, i32)>, EpollError> {
    let mut at: Vec<(usize, usize)> = Vec::new();
    let mut fds: Vec<FileFd> = Vec::new();
    for (t, (pid, table)) in tables.iter().enumerate() {
        for (j, fd) in table.iter().enumerate() {
            if is_kind(&fd.kind) {
                at.push((t, j));
                fds.push(FileFd {
                    pid: *pid,
                    fd: fd.fd,
                    path: "anon_inode",
                    pos: 0,
                    flags: 0,
                });
            }
        }
    }
    let groups = group_descriptions(&fds, same_file)?;
    // group_descriptions numbers shared groups only; singles get ids after them.
    let mut next = groups.iter().flatten().max().map_or(0, |m| m + 1);
    let mut first = std::collections::BTreeMap::new();
    for (&(t, j), g) in at.iter().zip(groups) {
        let id = g.unwrap_or_else(|| {
            next += 1;
            next - 1
        });
        let pid = tables[t].0;
        let fd = &mut tables[t].1[j];
        fd.kind = with_id(id);
        first.entry(id).or_insert((pid, fd.fd));
    }
    Ok(first)
}

/// The object of the tree that registration `tfd` of epoll `epfd` (of
/// `pid`) watches: a socket or pipe end some process holds, identified by
/// kcmp among the fds whose inode is `ino`.
fn find_target(
    tables: &[(i32, Vec<Fd>)],
    pid: i32,
    epfd: i32,
    tfd: i32,
    ino: u64,
) -> Result<Result<EpollObject, String>, EpollError> {
    let mut other_kind = None;
    for (cand_pid, table) in tables {
        for fd in table {
            let object = match fd.kind {
                FdKind::Socket { inode } if inode == ino => EpollObject::Socket { inode },
                FdKind::Pipe { inode } if inode == ino => EpollObject::Pipe {
                    inode,
                    write_end: fd.flags as i32 & libc::O_ACCMODE == libc::O_WRONLY,
                },
                FdKind::Eventfd { .. }
                | FdKind::Signalfd { .. }
                | FdKind::Timerfd { .. }
                | FdKind::Inotify { .. } => {
                    if kcmp::is_epoll_target(*cand_pid, fd.fd, pid, epfd, tfd).unwrap_or(false) {
                        return Ok(Ok(match fd.kind {
                            FdKind::Eventfd { id } => EpollObject::Eventfd { id },
                            FdKind::Signalfd { id } => EpollObject::Signalfd { id },
                            FdKind::Timerfd { id } => EpollObject::Timerfd { id },
                            FdKind::Inotify { id } => EpollObject::Inotify { id },
                            _ => continue,
                        }));
                    }
                    continue;
                }
                FdKind::Epoll { .. }
                | FdKind::Unsupported { .. }
                | FdKind::Tty { .. }
                | FdKind::Device { .. } => {
                    // Inode numbers of these may collide with the target's:
                    // only a kcmp match says it is this one.
                    if other_kind.is_none()
                        && kcmp::is_epoll_target(*cand_pid, fd.fd, pid, epfd, tfd).unwrap_or(false)
                    {
                        other_kind = Some(describe(&fd.kind));
                    }
                    continue;
                }
                _ => continue,
            };
            let same =
                kcmp::is_epoll_target(*cand_pid, fd.fd, pid, epfd, tfd).map_err(|source| {
                    EpollError::Kcmp {
                        pid1: *cand_pid,
                        fd1: fd.fd,
                        pid2: pid,
                        fd2: epfd,
                        source,
                    }
                })?;
            if same {
                return Ok(Ok(object));
            }
        }
    }
    Ok(Err(match other_kind {
        Some(kind) => format!("the watched file is {kind}, which epoll restore does not support"),
        None => "no process of the tree holds the watched file".into(),
    }))
}

fn describe(kind: &FdKind) -> String {
    match kind {
        FdKind::Epoll { .. } => "another epoll (nested epoll)".into(),
        FdKind::Unsupported { link } => link.clone(),
        FdKind::Tty { path, .. } => format!("terminal {path}"),
        FdKind::Device { path, .. } => format!("device {path}"),
        _ => "an fd of another kind".into(),
    }
}
