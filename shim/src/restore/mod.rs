//! Restore: rebuild a process tree from an image with its original
//! copy-on-write sharing.
pub mod plan;

pub mod blob;
pub mod attrs;
pub mod checks;
pub mod fds;
pub mod signals;
