//! Files whose contents go into the image, because restore may not find
//! them: files deleted while the tree has them open or mapped (a
//! `sem_open` semaphore, a temporary file unlinked at once), and files on
//! tmpfs mounts (`/dev/shm` of a container dies with it: POSIX shm,
//! PostgreSQL's dynamic shared memory). Each file is saved once, however
//! many fds and mappings of the tree use it, its data extents (holes stay
//! holes) appended to the page store.
//!
//! The limit: a file larger than `limit` bytes is not saved. A deleted one
//! is then refused (restore could not bring it back); one on tmpfs is
//! refused when the tree has a mount namespace of its own (a container,
//! whose tmpfs is gone at restore) and otherwise left to be reused by path
//! at restore, as any other file is. A deleted memfd fd is refused: its
//! mappings are restored as memfds of their own, so the fd would not be the
//! same object as the mapping.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::image::pagestore::PageStoreWriter;
use crate::image::types::{Fd, FdKind, SavedFile, VmaKind};
use crate::image::ImageError;
use crate::sys::procfs::MapsEntry;

/// Default for `--saved-file-limit`.
pub const DEFAULT_LIMIT: u64 = 64 << 20;

/// statfs(2) f_type of tmpfs and shmem.
const TMPFS_MAGIC: i64 = 0x0102_1994;

/// Bytes read and appended at a time.
const CHUNK: u64 = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub enum SavedFileError {
    #[error("pid {pid}: {what} {path:?}: {op} {source_path}: {source}")]
    Io {
        pid: i32,
        what: String,
        path: String,
        op: &'static str,
        source_path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("saving the contents of {path:?}: {source}")]
    Store {
        path: String,
        #[source]
        source: ImageError,
    },
}

/// One file to save and where to read it while the tree is stopped.
struct Pending {
    image: SavedFile,
    source: PathBuf,
    pid: i32,
    what: String,
}

/// The saved files of one dump, by (dev, inode).
pub struct SavedFiles {
    limit: u64,
    /// The tree lives in a mount namespace other than the dumper's.
    foreign_mounts: bool,
    files: Vec<Pending>,
    by_key: BTreeMap<(u64, u64), u32>,
}

/// What a path of the tree is backed by, read through a /proc link.
struct Backing {
    dev: u64,
    inode: u64,
    size: u64,
    mode: u32,
    uid: u32,
    gid: u32,
    tmpfs: bool,
}

fn backing(link: &Path) -> std::io::Result<Backing> {
    let meta = std::fs::metadata(link)?;
    let fs = nix::sys::statfs::statfs(link).map_err(std::io::Error::from)?;
    Ok(Backing {
        dev: meta.dev(),
        inode: meta.ino(),
        size: meta.size(),
        mode: meta.mode() & 0o7777,
        uid: meta.uid(),
        gid: meta.gid(),
        tmpfs: fs.filesystem_type().0 as i64 == TMPFS_MAGIC,
    })
}

impl SavedFiles {
    /// `root_pid`: the tree's root, whose mount namespace is compared with
    /// the dumper's.
    pub fn new(limit: u64, root_pid: i32) -> SavedFiles {
        let ns = |pid: &str| std::fs::read_link(format!("/proc/{pid}/ns/mnt")).ok();
        SavedFiles {
            limit,
            foreign_mounts: ns(&root_pid.to_string()) != ns("self"),
            files: Vec::new(),
            by_key: BTreeMap::new(),
        }
    }

    /// Decides for one process: every regular-file fd that is deleted or
    /// on tmpfs gets its `saved` id, every file mapping of such a file is
    /// saved (mappings find theirs by dev and inode); what cannot be saved
    /// is listed in `refusals`, naming pid, fd or address, and path.
    pub fn collect(
        &mut self,
        pid: i32,
        fds: &mut [Fd],
        maps: &[MapsEntry],
        refusals: &mut Vec<String>,
    ) -> Result<(), SavedFileError> {
        for fd in fds.iter_mut() {
            let FdKind::File {
                path,
                deleted,
                saved,
                ..
            } = &mut fd.kind
            else {
                continue;
            };
            let what = format!("fd {}", fd.fd);
            if *deleted && path.starts_with("/memfd:") {
                refusals.push(format!(
                    "pid {pid} {what} is memfd {path:?}: memfd fds are not supported yet"
                ));
                continue;
            }
            let link = PathBuf::from(format!("/proc/{pid}/fd/{}", fd.fd));
            *saved = self.consider(pid, &what, path, *deleted, link, refusals)?;
        }
        for m in maps {
            if !matches!(
                super::memory::classify(m),
                VmaKind::PrivateFile | VmaKind::SharedFile
            ) {
                continue;
            }
            let what = format!("mapping at {:#x}", m.start);
            let link = PathBuf::from(format!("/proc/{pid}/map_files/{:x}-{:x}", m.start, m.end));
            if self.by_key.contains_key(&(m.dev(), m.inode)) {
                continue;
            }
            if let Some(id) = self.consider(pid, &what, &m.path, m.deleted, link, refusals)? {
                // The maps line's dev:inode is what restore looks up.
                let file = &mut self.files[id as usize].image;
                self.by_key.insert((m.dev(), m.inode), id);
                file.dev = m.dev();
                file.inode = m.inode;
            }
        }
        Ok(())
    }

    /// Saves `path` (reached through `link`) if it must be and can be;
    /// returns its id.
    fn consider(
        &mut self,
        pid: i32,
        what: &str,
        path: &str,
        deleted: bool,
        link: PathBuf,
        refusals: &mut Vec<String>,
    ) -> Result<Option<u32>, SavedFileError> {
        let b = backing(&link).map_err(|source| SavedFileError::Io {
            pid,
            what: what.to_string(),
            path: path.to_string(),
            op: "stat",
            source_path: link.clone(),
            source,
        })?;
        if !deleted && !b.tmpfs {
            return Ok(None);
        }
        if let Some(&id) = self.by_key.get(&(b.dev, b.inode)) {
            return Ok(Some(id));
        }
        if b.size > self.limit {
            if deleted {
                refusals.push(format!(
                    "pid {pid} {what} is deleted file {path:?} of {} bytes, over the saved-file limit of {} bytes (--saved-file-limit)",
                    b.size, self.limit
                ));
            } else if self.foreign_mounts {
                refusals.push(format!(
                    "pid {pid} {what} is {path:?} on tmpfs, {} bytes, over the saved-file limit of {} bytes (--saved-file-limit); the tmpfs dies with the container",
                    b.size, self.limit
                ));
            }
            return Ok(None);
        }
        let id = self.files.len() as u32;
        self.by_key.insert((b.dev, b.inode), id);
        self.files.push(Pending {
            image: SavedFile {
                id,
                path: path.to_string(),
                deleted,
                dev: b.dev,
                inode: b.inode,
                size: b.size,
                mode: b.mode,
                uid: b.uid,
                gid: b.gid,
                pages: Vec::new(),
            },
            source: link,
            pid,
            what: what.to_string(),
        });
        Ok(Some(id))
    }

    /// Reads every saved file's data (the tree must still be stopped) into
    /// the page store, and returns their descriptions.
    pub fn write(self, pages: &mut PageStoreWriter) -> Result<Vec<SavedFile>, SavedFileError> {
        let mut out = Vec::with_capacity(self.files.len());
        for mut f in self.files {
            f.image.pages = store_contents(&f, pages)?;
            out.push(f.image);
        }
        Ok(out)
    }
}

/// The data extents of `f` (SEEK_DATA/SEEK_HOLE), page-aligned, appended
/// to the store as [file page, first id, pages] runs.
fn store_contents(
    f: &Pending,
    pages: &mut PageStoreWriter,
) -> Result<Vec<[u64; 3]>, SavedFileError> {
    use nix::unistd::{lseek, Whence};
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileExt;
    let io = |op: &'static str| {
        move |source: std::io::Error| SavedFileError::Io {
            pid: f.pid,
            what: f.what.clone(),
            path: f.image.path.clone(),
            op,
            source_path: f.source.clone(),
            source,
        }
    };
    let file = std::fs::File::open(&f.source).map_err(io("open"))?;
    let ps = pages.page_size();
    let size = f.image.size;
    let mut runs: Vec<[u64; 3]> = Vec::new();
    let mut buf = Vec::new();
    let mut at = 0u64;
    while at < size {
        let start = match lseek(file.as_raw_fd(), at as i64, Whence::SeekData) {
            Ok(s) => s as u64,
            Err(nix::errno::Errno::ENXIO) => break,
            Err(e) => return Err(io("lseek(SEEK_DATA)")(e.into())),
        };
        if start >= size {
            break;
        }
        let end = lseek(file.as_raw_fd(), start as i64, Whence::SeekHole)
            .map_or(size, |e| (e as u64).min(size));
        let mut page = start / ps;
        let last = end.div_ceil(ps);
        while page < last {
            let n = (last - page).min(CHUNK / ps);
            buf.clear();
            buf.resize((n * ps) as usize, 0);
            let mut filled = 0usize;
            let want = ((size - page * ps).min(n * ps)) as usize;
            while filled < want {
                match file.read_at(&mut buf[filled..want], page * ps + filled as u64) {
                    Ok(0) => break, // shrank meanwhile: the rest reads as zeros
                    Ok(k) => filled += k,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(io("read")(e)),
                }
            }
            let first = pages.append(&buf).map_err(|source| SavedFileError::Store {
                path: f.image.path.clone(),
                source,
            })?;
            match runs.last_mut() {
                Some(r) if r[0] + r[2] == page && r[1] + r[2] == first => r[2] += n,
                _ => runs.push([page, first, n]),
            }
            page += n;
        }
        at = last * ps;
    }
    Ok(runs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::pagestore::PageStoreOptions;

    fn fd_of(file: &std::fs::File, path: &str, deleted: bool) -> Fd {
        use std::os::fd::AsRawFd;
        Fd {
            fd: file.as_raw_fd(),
            flags: 0,
            kind: FdKind::File {
                path: path.into(),
                pos: 0,
                size: 0,
                deleted,
                description: None,
                saved: None,
            },
        }
    }

    #[test]
    fn a_deleted_sparse_file_is_saved_once_with_its_data_runs_and_holes() {
        use std::io::{Seek, SeekFrom, Write};
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("ghost");
        let mut file = std::fs::File::create(&path).expect("create");
        file.write_all(b"head").expect("write");
        file.seek(SeekFrom::Start(3 << 20)).expect("seek");
        file.write_all(b"tail").expect("write");
        std::fs::remove_file(&path).expect("unlink");
        let p = path.to_string_lossy().into_owned();
        let pid = std::process::id() as i32;
        let mut saved = SavedFiles::new(DEFAULT_LIMIT, pid);
        let mut fds = vec![fd_of(&file, &p, true), fd_of(&file, &p, true)];
        let mut refusals = Vec::new();
        saved
            .collect(pid, &mut fds, &[], &mut refusals)
            .expect("collect");
        assert!(refusals.is_empty(), "{refusals:?}");
        for fd in &fds {
            assert!(
                matches!(fd.kind, FdKind::File { saved: Some(0), .. }),
                "{fd:?}"
            );
        }
        let store_dir = tempfile::tempdir().expect("tempdir");
        let mut store =
            PageStoreWriter::create(store_dir.path(), 4096, PageStoreOptions::default())
                .expect("store");
        let files = saved.write(&mut store).expect("write");
        assert_eq!(files.len(), 1);
        let f = &files[0];
        assert!(f.deleted);
        assert_eq!(f.size, (3 << 20) + 4);
        // Two data extents (the hole between is not stored).
        assert_eq!(f.pages.len(), 2, "{:?}", f.pages);
        assert_eq!(f.pages[0][0], 0);
        assert_eq!(f.pages[1][0], (3 << 20) / 4096);
        assert!(store.pages_written() <= 4);
    }

    #[test]
    fn a_deleted_file_over_the_limit_is_refused_naming_pid_fd_path_and_sizes() {
        use std::io::Write;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("big");
        let mut file = std::fs::File::create(&path).expect("create");
        file.write_all(&[7u8; 10000]).expect("write");
        std::fs::remove_file(&path).expect("unlink");
        let p = path.to_string_lossy().into_owned();
        let pid = std::process::id() as i32;
        let mut saved = SavedFiles::new(4096, pid);
        let mut fds = vec![fd_of(&file, &p, true)];
        let mut refusals = Vec::new();
        saved
            .collect(pid, &mut fds, &[], &mut refusals)
            .expect("collect");
        assert_eq!(refusals.len(), 1);
        let want = format!("pid {pid} fd {} is deleted file {p:?} of 10000 bytes, over the saved-file limit of 4096 bytes", fds[0].fd);
        assert!(refusals[0].starts_with(&want), "{}", refusals[0]);
        assert!(matches!(fds[0].kind, FdKind::File { saved: None, .. }));
    }

    #[test]
    fn a_file_on_another_file_system_that_exists_is_not_saved() {
        let file = std::fs::File::open("/proc/self/exe").expect("open exe");
        let pid = std::process::id() as i32;
        let exe = std::fs::read_link("/proc/self/exe").expect("exe");
        let mut saved = SavedFiles::new(DEFAULT_LIMIT, pid);
        let mut fds = vec![fd_of(&file, &exe.to_string_lossy(), false)];
        let mut refusals = Vec::new();
        saved
            .collect(pid, &mut fds, &[], &mut refusals)
            .expect("collect");
        let on_tmpfs = backing(Path::new("/proc/self/exe")).expect("stat").tmpfs;
        assert_eq!(
            matches!(fds[0].kind, FdKind::File { saved: Some(_), .. }),
            on_tmpfs
        );
    }
}
