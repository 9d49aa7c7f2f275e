//! Errors of reading and writing images. Every variant names the file (and
//! field, where there is one) it concerns.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("not supported yet: {0}")]
    NotSupported(String),
}
