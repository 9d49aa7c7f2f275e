//! Restore: rebuild a process tree from an image with its original
//! copy-on-write sharing. [`plan`] decides who holds which shared page and
//! what every process moves, writes and drops; [`exec`] carries it out;
//! [`blob`] is the last step of every process.

pub mod attrs;
pub mod blob;
pub mod checks;
pub mod cleanup;
pub mod exec;
pub mod fds;
pub mod limits;
pub mod mount_ns;
pub mod plan;
pub mod plan_store;
pub mod posix_timers;
pub mod saved_files;
pub mod seccomp;
pub mod seccomp_bpf;
pub mod signals;
pub mod sockets;
pub mod sysv;

pub use exec::{
    restore, restore_as_init, ContainerRestore, HostPids, PidNs, RestoreError, RestoreOptions,
    RestoreSummary,
};
