//! Restore: rebuild a process tree from an image with its original
//! copy-on-write sharing.
pub mod plan;

pub mod blob;
