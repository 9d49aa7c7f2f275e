//! The files an image carries (`Tree::saved_files`), put back by the
//! restored root before it forks:
//! - a deleted file is re-created unlinked, with its contents, mode and
//!   owner: created at its path and unlinked at once when nothing is there
//!   (so /proc shows the name it had), else an `O_TMPFILE` file in its
//!   directory, else (that directory is gone, or its file system has no
//!   `O_TMPFILE`) a memfd. The root holds it at an fd >= fd_base that every descendant
//!   inherits, so fds reopen it and mappings map it through
//!   `/proc/self/fd/N`: every holder gets the same file, shared mappings
//!   share its pages.
//! - a file on tmpfs is created at its path with its contents, mode and
//!   owner when nothing is there (a container's new `/dev/shm`); a file
//!   that exists is used as it is, as any other path (checked by size).
//!
//! A restore that fails removes the tmpfs files it created
//! ([`CreatedFiles`]).

use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::image::pagestore::PageStoreReader;
use crate::image::types::SavedFile;
use crate::sys::restore_sys;

#[derive(Debug, thiserror::Error)]
pub enum SavedFileError {
    #[error("saved file {path:?}: {op}: {source}")]
    Io {
        path: String,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("saved file {path:?}: reading its pages: {source}")]
    Pages {
        path: String,
        #[source]
        source: crate::image::ImageError,
    },
}

/// The deleted files of the image, re-created, by saved-file id; and every
/// saved file's id by (dev, inode), for mappings.
#[derive(Debug, Default)]
pub struct SavedSet {
    fds: BTreeMap<u32, RawFd>,
    keys: BTreeMap<(u64, u64), u32>,
}

impl SavedSet {
    /// Re-creates every deleted file and creates every missing tmpfs file
    /// of `files`; on error closes what it made.
    pub fn create(
        files: &[SavedFile],
        reader: &PageStoreReader,
        fd_base: RawFd,
    ) -> Result<SavedSet, SavedFileError> {
        let mut set = SavedSet::default();
        for f in files {
            set.keys.insert((f.dev, f.inode), f.id);
            let made = if f.deleted {
                recreate_unlinked(f, reader).and_then(|file| {
                    restore_sys::dup_at_least(file.as_raw_fd(), fd_base).map_err(|source| {
                        SavedFileError::Io {
                            path: f.path.clone(),
                            op: "F_DUPFD_CLOEXEC",
                            source,
                        }
                    })
                })
            } else {
                create_if_missing(f, reader).map(|()| -1)
            };
            match made {
                Ok(-1) => {}
                Ok(fd) => {
                    set.fds.insert(f.id, fd);
                }
                Err(e) => {
                    set.close_all();
                    return Err(e);
                }
            }
        }
        Ok(set)
    }

    /// The path that opens the file of saved-file `saved` (when it was
    /// deleted), else `path`.
    pub fn path_of<'a>(&self, path: &'a str, saved: Option<u32>) -> std::borrow::Cow<'a, str> {
        match saved.and_then(|id| self.fds.get(&id)) {
            Some(fd) => format!("/proc/self/fd/{fd}").into(),
            None => path.into(),
        }
    }

    /// The path and open flags that reopen an fd of `path` (saved file
    /// `saved`) with `flags`: through /proc/self/fd, O_NOFOLLOW (which
    /// only mattered when the file was first opened) would refuse the link.
    pub fn reopen<'a>(
        &self,
        path: &'a str,
        saved: Option<u32>,
        flags: i32,
    ) -> (std::borrow::Cow<'a, str>, i32) {
        let path = self.path_of(path, saved);
        match path {
            std::borrow::Cow::Owned(_) => (path, flags & !libc::O_NOFOLLOW),
            std::borrow::Cow::Borrowed(_) => (path, flags),
        }
    }

    /// [`path_of`](Self::path_of) for a mapping of the file `dev`:`inode`.
    pub fn mapped_path<'a>(
        &self,
        path: &'a str,
        dev: u64,
        inode: u64,
    ) -> std::borrow::Cow<'a, str> {
        self.path_of(path, self.keys.get(&(dev, inode)).copied())
    }

    pub fn fds(&self) -> impl Iterator<Item = RawFd> + '_ {
        self.fds.values().copied()
    }

    pub fn close_all(&self) {
        for fd in self.fds() {
            let _ = restore_sys::close_fd(fd);
        }
    }
}

fn io<'a>(
    f: &'a SavedFile,
    op: &'static str,
) -> impl FnOnce(std::io::Error) -> SavedFileError + 'a {
    move |source| SavedFileError::Io {
        path: f.path.clone(),
        op,
        source,
    }
}

/// An unlinked file with `f`'s contents, mode and owner: created at its
/// path and unlinked at once when the path is free (so /proc shows the
/// name it had), else an `O_TMPFILE` file in its directory, else a memfd.
fn recreate_unlinked(
    f: &SavedFile,
    reader: &PageStoreReader,
) -> Result<std::fs::File, SavedFileError> {
    let path = Path::new(&f.path);
    let dir = path.parent().unwrap_or(Path::new("/"));
    let named = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
        .mode(0o600)
        .open(path);
    let file = match named {
        Ok(file) => {
            std::fs::remove_file(path).map_err(io(f, "unlink"))?;
            file
        }
        Err(_) => match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_TMPFILE | libc::O_CLOEXEC)
            .mode(0o600)
            .open(dir)
        {
            Ok(file) => file,
            // No such directory any more, or a file system without O_TMPFILE.
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(
                        libc::ENOENT
                            | libc::ENOTDIR
                            | libc::EOPNOTSUPP
                            | libc::EISDIR
                            | libc::EINVAL
                    )
                ) =>
            {
                let name = path
                    .file_name()
                    .map_or_else(|| "deleted".into(), |n| n.to_string_lossy().into_owned());
                let fd = crate::sys::mem::memfd(&name, f.size)
                    .map_err(|e| io(f, "memfd_create")(std::io::Error::other(e.to_string())))?;
                std::fs::File::from(fd)
            }
            Err(e) => return Err(io(f, "open(O_TMPFILE) in its directory")(e)),
        },
    };
    fill(f, &file, reader)?;
    Ok(file)
}

/// Creates `f` at its path unless something is there.
fn create_if_missing(f: &SavedFile, reader: &PageStoreReader) -> Result<(), SavedFileError> {
    if std::fs::symlink_metadata(&f.path).is_ok() {
        return Ok(());
    }
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
        .mode(0o600)
        .open(&f.path)
        .map_err(io(f, "create"))?;
    if let Err(e) = fill(f, &file, reader) {
        let _ = std::fs::remove_file(&f.path);
        return Err(e);
    }
    Ok(())
}

/// Writes the contents, then owner and mode (chown clears set-id bits).
fn fill(
    f: &SavedFile,
    file: &std::fs::File,
    reader: &PageStoreReader,
) -> Result<(), SavedFileError> {
    file.set_len(f.size).map_err(io(f, "ftruncate"))?;
    let ps = reader.page_size();
    let mut cached: Option<(usize, Vec<u8>)> = None;
    for &[file_page, first, pages] in &f.pages {
        for k in 0..pages {
            let (frame, offset) =
                reader
                    .locate(first + k)
                    .map_err(|source| SavedFileError::Pages {
                        path: f.path.clone(),
                        source,
                    })?;
            if cached.as_ref().map(|c| c.0) != Some(frame) {
                let data = reader
                    .read_frame(frame)
                    .map_err(|source| SavedFileError::Pages {
                        path: f.path.clone(),
                        source,
                    })?;
                cached = Some((frame, data));
            }
            let data = &cached.as_ref().expect("frame just read").1;
            let at = (file_page + k) * ps;
            let len = ps.min(f.size.saturating_sub(at)) as usize;
            file.write_all_at(&data[offset..offset + len], at)
                .map_err(io(f, "write"))?;
        }
    }
    std::os::unix::fs::fchown(file, Some(f.uid), Some(f.gid)).map_err(io(f, "fchown"))?;
    use std::os::unix::fs::PermissionsExt;
    file.set_permissions(std::fs::Permissions::from_mode(f.mode))
        .map_err(io(f, "fchmod"))?;
    Ok(())
}

/// The tmpfs files of an image that do not exist before a restore: removed
/// again if the restore fails, unless [`keep`](Self::keep) is called.
pub struct CreatedFiles {
    paths: Vec<PathBuf>,
}

impl CreatedFiles {
    pub fn before(files: &[SavedFile]) -> CreatedFiles {
        CreatedFiles {
            paths: files
                .iter()
                .filter(|f| !f.deleted && std::fs::symlink_metadata(&f.path).is_err())
                .map(|f| PathBuf::from(&f.path))
                .collect(),
        }
    }

    /// The restore succeeded: the files stay.
    pub fn keep(mut self) {
        self.paths.clear();
    }
}

impl Drop for CreatedFiles {
    fn drop(&mut self) {
        for p in &self.paths {
            let _ = std::fs::remove_file(p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::pagestore::{PageStoreOptions, PageStoreWriter};

    /// A page store holding `pages` pages filled with `1, 2, ...`.
    fn store(dir: &Path, pages: u64) -> PageStoreReader {
        let mut w = PageStoreWriter::create(dir, 4096, PageStoreOptions::default()).expect("store");
        for i in 0..pages {
            w.append(&vec![i as u8 + 1; 4096]).expect("append");
        }
        let summary = w.finish().expect("finish");
        PageStoreReader::open(dir, &summary.index).expect("reader")
    }

    fn saved(path: &Path, deleted: bool, size: u64, pages: Vec<[u64; 3]>) -> SavedFile {
        SavedFile {
            id: 0,
            path: path.to_string_lossy().into_owned(),
            deleted,
            dev: 1,
            inode: 2,
            size,
            mode: 0o640,
            uid: 0,
            gid: 0,
            pages,
        }
    }

    #[test]
    fn a_deleted_file_comes_back_unlinked_with_contents_holes_and_mode() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let reader = store(dir.path(), 2);
        let path = dir.path().join("ghost");
        // Page 0 from id 1 (bytes 2), a hole, page 2 from id 0 (bytes 1), 100 bytes of it.
        let f = saved(&path, true, 2 * 4096 + 100, vec![[0, 1, 1], [2, 0, 1]]);
        let set = SavedSet::create(std::slice::from_ref(&f), &reader, 100).expect("create");
        assert!(!path.exists(), "a deleted file stays unlinked");
        let p = set.path_of(&f.path, Some(0));
        assert!(p.starts_with("/proc/self/fd/"), "{p}");
        let data = std::fs::read(&*p).expect("read back");
        assert_eq!(data.len(), 2 * 4096 + 100);
        assert!(data[..4096].iter().all(|&b| b == 2));
        assert!(data[4096..8192].iter().all(|&b| b == 0));
        assert!(data[8192..].iter().all(|&b| b == 1));
        let meta = std::fs::metadata(&*p).expect("stat");
        assert_eq!(meta.mode() & 0o7777, 0o640);
        assert_eq!(meta.nlink(), 0);
        assert_eq!(set.mapped_path("x", 1, 2), p);
        assert_eq!(set.mapped_path("x", 1, 3), "x");
        set.close_all();
    }

    #[test]
    fn a_missing_tmpfs_file_is_created_and_an_existing_one_left_alone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let reader = store(dir.path(), 1);
        let missing = dir.path().join("shm.1");
        let present = dir.path().join("shm.2");
        std::fs::write(&present, b"mine").expect("write");
        let mut a = saved(&missing, false, 10, vec![[0, 0, 1]]);
        let mut b = saved(&present, false, 10, vec![[0, 0, 1]]);
        a.id = 0;
        b.id = 1;
        b.inode = 3;
        let files = [a, b];
        let created = CreatedFiles::before(&files);
        let set = SavedSet::create(&files, &reader, 100).expect("create");
        assert_eq!(std::fs::read(&missing).expect("created"), vec![1u8; 10]);
        assert_eq!(std::fs::read(&present).expect("kept"), b"mine");
        assert_eq!(set.path_of(&files[0].path, Some(0)), files[0].path);
        drop(created);
        assert!(
            !missing.exists(),
            "a failed restore removes what it created"
        );
        assert!(present.exists());
    }
}
