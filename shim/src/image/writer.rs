//! Writes an image directory so that it is either complete or absent:
//! `manifest.json` is written last, and an uncommitted writer removes what it wrote.
//!
//! Two ways to create (see [`ImageWriter::create`]): into a fresh sibling
//! `DIR.partial-<pid>` renamed to `DIR` at commit, or in place into an
//! existing empty `DIR` (containerd hands the shim an empty checkpoint
//! directory). Files are hashed while written; only the small JSON files are
//! held in memory, the `pages` file is hashed by the page store's writer thread.

use std::collections::HashSet;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;
use xxhash_rust::xxh3::xxh3_128;

use super::pagestore::{PageStoreOptions, PageStoreWriter};
use super::types::{
    process_file_name, FileEntry, FormatVersion, Manifest, PipeImage, ProcessImage, Tree,
    FORMAT_MAJOR, FORMAT_MINOR, FORMAT_NAME, MANIFEST_FILE, PAGES_FILE, PAGE_INDEX_FILE,
    PIPES_FILE, PLAN_FILE, TREE_FILE,
};
use super::ImageError;

/// Where the image is being built until commit.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Placement {
    /// In `work_dir` (a fresh sibling directory), renamed to `final_dir` at commit.
    Partial,
    /// Directly in `final_dir`, which existed and was empty.
    InPlace,
}

pub struct ImageWriter {
    final_dir: PathBuf,
    work_dir: PathBuf,
    placement: Placement,
    page_size: u64,
    pages: PageStoreWriter,
    /// Files written so far, in order (the manifest lists them in this order).
    files: Vec<FileEntry>,
    names: HashSet<String>,
    tree: Option<Tree>,
    /// Set by [`ImageWriter::finish_pages`].
    store: Option<super::pagestore::PageStoreSummary>,
    committed: bool,
}

/// What a committed image holds.
#[derive(Debug, Clone)]
pub struct CommitSummary {
    pub dir: PathBuf,
    pub pages_stored: u64,
    /// Size of every file of the image together.
    pub bytes_total: u64,
    /// Size of the `pages` file.
    pub bytes_pages: u64,
}

impl ImageWriter {
    /// `dir` must not exist (then the image is built in a sibling
    /// `DIR.partial-<pid>` and renamed into place) or be an empty directory
    /// (then files are written in place with `manifest.json` last).
    pub fn create(dir: &Path, page_size: u64) -> Result<Self, ImageError> {
        Self::create_with(dir, page_size, PageStoreOptions::default())
    }

    /// [`create`](Self::create) with explicit page store options.
    pub fn create_with(
        dir: &Path,
        page_size: u64,
        options: PageStoreOptions,
    ) -> Result<Self, ImageError> {
        // A symlink to a directory is that directory; to anything else, it
        // is refused as what it is.
        let metadata = match std::fs::symlink_metadata(dir) {
            Ok(meta) if meta.file_type().is_symlink() => {
                let refuse = || ImageError::SymlinkNotADirectory {
                    path: dir.into(),
                    target: std::fs::read_link(dir).unwrap_or_default(),
                };
                match std::fs::metadata(dir) {
                    Ok(target) if target.is_dir() => Ok(target),
                    _ => return Err(refuse()),
                }
            }
            other => other,
        };
        let (work_dir, placement) = match metadata {
            Ok(meta) if meta.is_dir() => {
                let mut entries = std::fs::read_dir(dir).map_err(|e| ImageError::io(dir, e))?;
                if entries.next().is_some() {
                    return Err(ImageError::DirNotEmpty { path: dir.into() });
                }
                (dir.to_path_buf(), Placement::InPlace)
            }
            Ok(_) => return Err(ImageError::NotADirectory { path: dir.into() }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let work = partial_dir(dir)?;
                // create_dir (not _all): a leftover partial of a dead dumper
                // with the same pid is refused rather than silently reused.
                // Errors name the directory the user gave, not the partial one.
                std::fs::create_dir(&work).map_err(|e| match parent_of(dir) {
                    Some(parent)
                        if e.kind() == std::io::ErrorKind::NotFound && !parent.exists() =>
                    {
                        ImageError::ParentMissing {
                            path: dir.into(),
                            parent,
                        }
                    }
                    _ => ImageError::CreateDir {
                        path: dir.into(),
                        source: e,
                    },
                })?;
                (work, Placement::Partial)
            }
            Err(e) => return Err(ImageError::io(dir, e)),
        };
        let pages = match PageStoreWriter::create(&work_dir, page_size, options) {
            Ok(pages) => pages,
            Err(e) => {
                match placement {
                    Placement::Partial => {
                        let _ = std::fs::remove_dir_all(&work_dir);
                    }
                    Placement::InPlace => {
                        let _ = std::fs::remove_file(work_dir.join(PAGES_FILE));
                    }
                }
                return Err(e);
            }
        };
        Ok(ImageWriter {
            final_dir: dir.to_path_buf(),
            work_dir,
            placement,
            page_size,
            pages,
            files: Vec::new(),
            names: HashSet::new(),
            tree: None,
            store: None,
            committed: false,
        })
    }

    /// Where files are being written until commit (for a watchdog that must clean up).
    pub fn work_dir(&self) -> &Path {
        &self.work_dir
    }
    pub fn page_size(&self) -> u64 {
        self.page_size
    }
    pub fn pages(&mut self) -> &mut PageStoreWriter {
        &mut self.pages
    }
    /// Writes `proc-<pid>.json` (compact) and its page runs, in binary,
    /// as `proc-<pid>.runs` (they are most of its size).
    pub fn write_process(&mut self, process: &ProcessImage) -> Result<(), ImageError> {
        let json = process_file_name(process.pid);
        if self.names.contains(&json) {
            return Err(ImageError::DuplicateFile { name: json });
        }
        let name = super::runs::runs_file_name(process.pid);
        let runs = super::runs::encode(&process.vmas)
            .map_err(|e| ImageError::io(self.work_dir.join(&name), e))?;
        self.write_file(&name, &runs)?;
        let mut light = process.clone();
        for vma in &mut light.vmas {
            vma.pages = Vec::new();
        }
        light.runs_file = Some(name);
        self.write_json(&json, &light, false)
    }
    pub fn write_tree(&mut self, tree: &Tree) -> Result<(), ImageError> {
        self.write_json(TREE_FILE, tree, true)?;
        self.tree = Some(tree.clone());
        Ok(())
    }
    /// Writes `plan.bin`, bound to the tree and process files written so
    /// far: `encode` gets the binding (`restore::plan_store::binding`).
    pub fn write_plan(
        &mut self,
        encode: impl FnOnce(&[FileEntry], u64) -> std::io::Result<Vec<u8>>,
    ) -> Result<(), ImageError> {
        if self.tree.is_none() {
            return Err(ImageError::NotWritten {
                name: TREE_FILE.into(),
            });
        }
        let bytes = encode(&self.files, self.page_size)
            .map_err(|e| ImageError::io(self.work_dir.join(PLAN_FILE), e))?;
        self.write_file(PLAN_FILE, &bytes)
    }
    pub fn write_pipes(&mut self, pipes: &[PipeImage]) -> Result<(), ImageError> {
        self.write_json(PIPES_FILE, &pipes, true)
    }
    pub fn write_sockets(
        &mut self,
        sockets: &crate::image::sockets::SocketsImage,
    ) -> Result<(), ImageError> {
        self.write_json(crate::image::sockets::SOCKETS_FILE, sockets, true)
    }

    /// Finishes the page store (its last frames compressed, the file
    /// synced) and writes its index; [`commit`](Self::commit) does it when
    /// nobody did before.
    pub fn finish_pages(&mut self) -> Result<(), ImageError> {
        let store = self.pages.finish()?;
        self.files.push(FileEntry {
            name: PAGES_FILE.into(),
            size: store.file_size,
            xxh3_128: format!("{:032x}", store.xxh3_128),
        });
        self.names.insert(PAGES_FILE.into());
        self.write_json(PAGE_INDEX_FILE, &store.index, true)?;
        self.store = Some(store);
        Ok(())
    }

    /// Finishes the page store, writes `manifest.json` last and makes the image visible.
    pub fn commit(mut self, root_pid: i32) -> Result<CommitSummary, ImageError> {
        let tree = self.tree.take().ok_or(ImageError::NotWritten {
            name: TREE_FILE.into(),
        })?;
        for entry in &tree.processes {
            if !self.names.contains(&entry.file) {
                return Err(ImageError::NotWritten {
                    name: entry.file.clone(),
                });
            }
        }
        if !self.names.contains(PIPES_FILE) {
            self.write_pipes(&[])?;
        }
        if !self.names.contains(crate::image::sockets::SOCKETS_FILE) {
            self.write_sockets(&Default::default())?;
        }
        if self.store.is_none() {
            self.finish_pages()?;
        }
        let Some(store) = self.store.take() else {
            return Err(ImageError::PageStoreFinished);
        };

        let manifest = Manifest {
            format: FORMAT_NAME.into(),
            format_version: FormatVersion {
                major: FORMAT_MAJOR,
                minor: FORMAT_MINOR,
            },
            engine_version: env!("CARGO_PKG_VERSION").into(),
            kernel_release: kernel_release()?,
            arch: std::env::consts::ARCH.into(),
            page_size: self.page_size,
            created_unix: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            root_pid,
            files: self.files.clone(),
        };
        let bytes =
            serde_json::to_vec_pretty(&manifest).map_err(|source| ImageError::Serialize {
                file: MANIFEST_FILE.into(),
                source,
            })?;
        // Temp name + rename: a reader sees either no manifest or a whole one.
        let tmp_name = format!(".{MANIFEST_FILE}.tmp-{}", std::process::id());
        self.names.insert(tmp_name.clone());
        let tmp = self.work_dir.join(&tmp_name);
        write_synced(&tmp, &bytes)?;
        let manifest_path = self.work_dir.join(MANIFEST_FILE);
        std::fs::rename(&tmp, &manifest_path).map_err(|e| ImageError::io(&manifest_path, e))?;
        self.names.remove(&tmp_name);
        self.names.insert(MANIFEST_FILE.into());
        sync_dir(&self.work_dir)?;
        if self.placement == Placement::Partial {
            std::fs::rename(&self.work_dir, &self.final_dir)
                .map_err(|e| ImageError::io(&self.final_dir, e))?;
            if let Some(parent) = parent_of(&self.final_dir) {
                sync_dir(&parent)?;
            }
        }
        self.committed = true;

        let bytes_total = self.files.iter().map(|f| f.size).sum::<u64>() + bytes.len() as u64;
        Ok(CommitSummary {
            dir: self.final_dir.clone(),
            pages_stored: store.index.page_count,
            bytes_total,
            bytes_pages: store.file_size,
        })
    }

    fn write_json<T: Serialize + ?Sized>(
        &mut self,
        name: &str,
        value: &T,
        pretty: bool,
    ) -> Result<(), ImageError> {
        let serialized = if pretty {
            serde_json::to_vec_pretty(value)
        } else {
            serde_json::to_vec(value)
        };
        let bytes = serialized.map_err(|source| ImageError::Serialize {
            file: name.into(),
            source,
        })?;
        self.write_file(name, &bytes)
    }

    /// Writes `bytes` as file `name` of the image and lists it.
    fn write_file(&mut self, name: &str, bytes: &[u8]) -> Result<(), ImageError> {
        if self.names.contains(name) || name == MANIFEST_FILE {
            return Err(ImageError::DuplicateFile { name: name.into() });
        }
        let path = self.work_dir.join(name);
        // Record the name before creating so that a failed write is cleaned up too.
        self.names.insert(name.into());
        write_synced(&path, bytes)?;
        self.files.push(FileEntry {
            name: name.into(),
            size: bytes.len() as u64,
            xxh3_128: format!("{:032x}", xxh3_128(bytes)),
        });
        Ok(())
    }
}

impl Drop for ImageWriter {
    fn drop(&mut self) {
        if self.committed {
            return;
        }
        // Stop the page store's threads before removing the file they write.
        self.pages.abort();
        match self.placement {
            Placement::Partial => {
                let _ = std::fs::remove_dir_all(&self.work_dir);
            }
            Placement::InPlace => {
                let _ = std::fs::remove_file(self.work_dir.join(PAGES_FILE));
                for name in &self.names {
                    let _ = std::fs::remove_file(self.work_dir.join(name));
                }
            }
        }
    }
}

/// `DIR.partial-<pid>` next to `dir`.
fn partial_dir(dir: &Path) -> Result<PathBuf, ImageError> {
    let name = dir
        .file_name()
        .ok_or_else(|| ImageError::NotADirectory { path: dir.into() })?;
    let mut partial = name.to_os_string();
    partial.push(format!(".partial-{}", std::process::id()));
    Ok(dir.with_file_name(partial))
}

fn parent_of(dir: &Path) -> Option<PathBuf> {
    match dir.parent() {
        Some(p) if p.as_os_str().is_empty() => Some(PathBuf::from(".")),
        Some(p) => Some(p.to_path_buf()),
        None => None,
    }
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), ImageError> {
    let mut file = File::options()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| ImageError::io(path, e))?;
    file.write_all(bytes).map_err(|e| ImageError::io(path, e))?;
    file.sync_all().map_err(|e| ImageError::io(path, e))
}

fn sync_dir(dir: &Path) -> Result<(), ImageError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| ImageError::io(dir, e))
}

/// `uname -r`, as the kernel publishes it in procfs.
fn kernel_release() -> Result<String, ImageError> {
    let path = Path::new("/proc/sys/kernel/osrelease");
    let release = std::fs::read_to_string(path).map_err(|e| ImageError::io(path, e))?;
    Ok(release.trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::testutil;

    #[test]
    fn errors_name_the_directory_given() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("missing").join("img");
        let text = ImageWriter::create(&dir, 4096)
            .err()
            .expect("parent missing")
            .to_string();
        assert_eq!(
            text,
            format!(
                "{}: cannot create the image directory: its parent directory {:?} does not exist",
                dir.display(),
                tmp.path().join("missing")
            )
        );
        assert!(!text.contains(".partial-"), "{text}");
    }

    #[test]
    fn symlink_to_a_directory_is_that_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let target = tmp.path().join("real");
        std::fs::create_dir(&target).unwrap();
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        testutil::fill(ImageWriter::create(&link, 4096).unwrap())
            .commit(testutil::ROOT)
            .unwrap();
        assert!(target.join(MANIFEST_FILE).exists());

        let file = tmp.path().join("file");
        std::fs::write(&file, b"x").unwrap();
        let to_file = tmp.path().join("to-file");
        std::os::unix::fs::symlink(&file, &to_file).unwrap();
        let dangling = tmp.path().join("dangling");
        std::os::unix::fs::symlink(tmp.path().join("nowhere"), &dangling).unwrap();
        for (link, target) in [(&to_file, &file), (&dangling, &tmp.path().join("nowhere"))] {
            let text = ImageWriter::create(link, 4096)
                .err()
                .expect("not a directory")
                .to_string();
            assert_eq!(
                text,
                format!(
                    "{}: is a symbolic link to {target:?}, which is not a directory",
                    link.display()
                )
            );
        }
    }

    #[test]
    fn commit_absent_dir_renames_partial() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("img");
        let w = ImageWriter::create(&dir, 4096).unwrap();
        let work = w.work_dir().to_path_buf();
        assert_ne!(work, dir);
        assert!(work.exists());
        assert!(!dir.exists());
        let summary = testutil::fill(w).commit(testutil::ROOT).unwrap();
        assert!(dir.join(MANIFEST_FILE).exists());
        assert!(!work.exists());
        assert_eq!(summary.pages_stored, testutil::PAGES);
        let pages_len = std::fs::metadata(dir.join(PAGES_FILE)).unwrap().len();
        assert_eq!(summary.bytes_pages, pages_len);
        let total: u64 = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .sum();
        assert_eq!(summary.bytes_total, total);
    }

    #[test]
    fn commit_in_empty_dir() {
        let tmp = tempfile::tempdir().unwrap();
        let w = ImageWriter::create(tmp.path(), 4096).unwrap();
        assert_eq!(w.work_dir(), tmp.path());
        testutil::fill(w).commit(testutil::ROOT).unwrap();
        let manifest: Manifest =
            serde_json::from_slice(&std::fs::read(tmp.path().join(MANIFEST_FILE)).unwrap())
                .unwrap();
        assert_eq!(manifest.root_pid, testutil::ROOT);
        assert_eq!(manifest.arch, std::env::consts::ARCH);
        assert!(!manifest.kernel_release.is_empty());
        let names: HashSet<&str> = manifest.files.iter().map(|f| f.name.as_str()).collect();
        for name in [
            TREE_FILE,
            PIPES_FILE,
            PAGE_INDEX_FILE,
            PAGES_FILE,
            "proc-100.json",
        ] {
            assert!(names.contains(name), "{name} not in manifest");
        }
        // Nothing but the image: no temp files left behind.
        assert_eq!(
            std::fs::read_dir(tmp.path()).unwrap().count(),
            manifest.files.len() + 1
        );
    }

    #[test]
    fn refuses_non_empty_dir() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("x"), b"x").unwrap();
        assert!(matches!(
            ImageWriter::create(tmp.path(), 4096),
            Err(ImageError::DirNotEmpty { .. })
        ));
        assert!(tmp.path().join("x").exists());
    }

    #[test]
    fn refuses_file_as_dir() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("x");
        std::fs::write(&file, b"x").unwrap();
        assert!(matches!(
            ImageWriter::create(&file, 4096),
            Err(ImageError::NotADirectory { .. })
        ));
    }

    #[test]
    fn dropped_writer_leaves_nothing_absent_dir() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("img");
        let mut w = testutil::fill(ImageWriter::create(&dir, 4096).unwrap());
        w.pages().append(&testutil::page(99)).unwrap();
        drop(w);
        assert!(!dir.exists());
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0);
    }

    #[test]
    fn dropped_writer_leaves_nothing_in_place() {
        let tmp = tempfile::tempdir().unwrap();
        let w = testutil::fill(ImageWriter::create(tmp.path(), 4096).unwrap());
        assert!(std::fs::read_dir(tmp.path()).unwrap().count() > 0);
        drop(w);
        assert!(tmp.path().is_dir());
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0);
    }

    #[test]
    fn commit_needs_tree_and_process_files() {
        let tmp = tempfile::tempdir().unwrap();
        let w = ImageWriter::create(&tmp.path().join("a"), 4096).unwrap();
        assert!(matches!(
            w.commit(1),
            Err(ImageError::NotWritten { name }) if name == TREE_FILE
        ));
        let mut w = ImageWriter::create(&tmp.path().join("b"), 4096).unwrap();
        w.write_tree(&testutil::tree()).unwrap();
        assert!(matches!(
            w.commit(1),
            Err(ImageError::NotWritten { name }) if name == "proc-100.json"
        ));
        // Failed commits clean up like drops.
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0);
    }

    #[test]
    fn refuses_duplicate_file() {
        let tmp = tempfile::tempdir().unwrap();
        let mut w = ImageWriter::create(tmp.path(), 4096).unwrap();
        let p = testutil::process(100);
        w.write_process(&p).unwrap();
        assert!(matches!(
            w.write_process(&p),
            Err(ImageError::DuplicateFile { name }) if name == "proc-100.json"
        ));
    }
}
