//! The page store: unique pages in independently decompressible zstd frames
//! (`pages`) plus their index (`pages.index.json`).

use std::path::Path;

use super::types::{PageId, PageIndex};
use super::ImageError;

/// Appends unique pages; compresses full frames on worker threads.
pub struct PageStoreWriter {
    _private: (),
}

impl PageStoreWriter {
    /// Appends whole pages (`pages.len()` a multiple of the page size) and
    /// returns the id of the first; ids are dense, in call order.
    pub fn append(&mut self, pages: &[u8]) -> Result<PageId, ImageError> {
        let _ = pages;
        Err(ImageError::NotSupported("page store".into()))
    }
    /// Unique pages appended so far.
    pub fn pages_written(&self) -> u64 {
        0
    }
    /// Compressed bytes produced so far (frames finished).
    pub fn bytes_compressed(&self) -> u64 {
        0
    }
}

/// Reads and decompresses frames of a page store.
pub struct PageStoreReader {
    _private: (),
}

impl PageStoreReader {
    pub fn open(dir: &Path, index: &PageIndex) -> Result<Self, ImageError> {
        let _ = (dir, index);
        Err(ImageError::NotSupported("page store".into()))
    }
    /// Decompresses frame `frame` and checks its length and checksum.
    pub fn read_frame(&self, frame: usize) -> Result<Vec<u8>, ImageError> {
        let _ = frame;
        Err(ImageError::NotSupported("page store".into()))
    }
}
