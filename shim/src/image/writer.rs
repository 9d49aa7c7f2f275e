//! Writes an image directory so that it is either complete or absent:
//! `manifest.json` is written last, and an uncommitted writer removes what it wrote.

use std::path::{Path, PathBuf};

use super::pagestore::PageStoreWriter;
use super::types::{PipeImage, ProcessImage, Tree};
use super::ImageError;

pub struct ImageWriter {
    _private: (),
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
        let _ = (dir, page_size);
        Err(ImageError::NotSupported("image writer".into()))
    }
    /// Where files are being written until commit (for a watchdog that must clean up).
    pub fn work_dir(&self) -> &Path {
        Path::new("")
    }
    pub fn pages(&mut self) -> &mut PageStoreWriter {
        unimplemented!()
    }
    pub fn write_process(&mut self, process: &ProcessImage) -> Result<(), ImageError> {
        let _ = process;
        Err(ImageError::NotSupported("image writer".into()))
    }
    pub fn write_tree(&mut self, tree: &Tree) -> Result<(), ImageError> {
        let _ = tree;
        Err(ImageError::NotSupported("image writer".into()))
    }
    pub fn write_pipes(&mut self, pipes: &[PipeImage]) -> Result<(), ImageError> {
        let _ = pipes;
        Err(ImageError::NotSupported("image writer".into()))
    }
    /// Finishes the page store, writes `manifest.json` last and makes the image visible.
    pub fn commit(self, root_pid: i32) -> Result<CommitSummary, ImageError> {
        let _ = root_pid;
        Err(ImageError::NotSupported("image writer".into()))
    }
}
