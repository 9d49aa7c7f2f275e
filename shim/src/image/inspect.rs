//! `cowsnap inspect` and `cowsnap verify`: summaries and full integrity checks of an image.

use std::path::Path;

use super::ImageError;

/// Text (or, with `json`, JSON) report of the image at `dir`.
pub fn inspect(dir: &Path, json: bool) -> Result<String, ImageError> {
    let _ = (dir, json);
    Err(ImageError::NotSupported("inspect".into()))
}

/// Full integrity check: every file, checksum, frame and page reference.
/// Returns a one-line summary on success.
pub fn verify(dir: &Path) -> Result<String, ImageError> {
    let _ = dir;
    Err(ImageError::NotSupported("verify".into()))
}
