//! File descriptors of a dumped process, from /proc/PID/fd and fdinfo:
//! regular files, directories, devices, ttys, pipes (with their buffered
//! data, read without consuming it, once per pipe), and everything else
//! recorded as unsupported by its link text. Never changes a target's fds.

use std::collections::BTreeMap;
use std::os::unix::fs::{FileTypeExt, MetadataExt};

use crate::image::types::{Fd, FdKind, PipeImage};
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
}

/// Pipes seen so far in this dump, by inode, with their buffered data.
#[derive(Debug, Default)]
pub struct PipeCollector {
    pipes: BTreeMap<u64, PipeImage>,
}

impl PipeCollector {
    pub fn into_images(self) -> Vec<PipeImage> {
        self.pipes.into_values().collect()
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
        } else if !link.starts_with('/') {
            // socket:[N], anon_inode:[eventfd], anon_inode:inotify, ...
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
                }
            } else if ft.is_dir() {
                FdKind::Directory { path }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, SeekFrom, Write};
    use std::os::fd::AsRawFd;

    use crate::sys::testing::TestChild;

    #[test]
    fn file_devnull_pipe_and_socket_of_a_child() {
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
        assert!(
            matches!(&by_fd(fds[4]).kind, FdKind::Unsupported { link } if link.starts_with("socket:["))
        );
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
}
