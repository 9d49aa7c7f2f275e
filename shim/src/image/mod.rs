//! The cowsnap image, format v1: see [`types`] for the layout and data model.
//! This module owns reading, writing and validating images; it never touches
//! a live process.

pub mod error;
pub mod fuzz;
pub mod inspect;
pub mod pagestore;
pub mod reader;
pub mod runs;
pub mod sockets;
#[cfg(test)]
pub(crate) mod testutil;
pub mod types;
pub mod writer;

pub use error::ImageError;
pub use reader::Image;
pub use writer::ImageWriter;
