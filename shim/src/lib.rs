//! cowsnap: checkpoint/restore of Linux process trees and containers that
//! stores every physical page once and restores the original copy-on-write
//! sharing.
//!
//! Map of the crate (one concern per module):
//! - [`sys`]: thin, safe wrappers over kernel interfaces (procfs parsing,
//!   pagemap, ptrace, syscall injection, cgroup freezers). All `unsafe` for
//!   syscalls lives here.
//! - [`image`]: the on-disk image format v1 (types, writer, reader, page store,
//!   inspect/verify).
//! - [`dump`]: freeze, seize, collect, deduplicate pages, write an image.
//! - [`engine_error`]: the typed error the engine binary reports to the
//!   shim and cowsnapd (kind + message, as JSON).
//! - [`restore`]: plan and rebuild a process tree from an image, including the
//!   position-independent restorer blob and its loader.

pub mod containerd;
pub mod dump;
pub mod engine_error;
pub mod image;
pub mod restore;
pub mod sys;
