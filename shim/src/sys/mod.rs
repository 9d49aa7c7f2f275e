//! Thin, safe wrappers over kernel interfaces. Every raw syscall cowsnap makes
//! outside the restorer blob is wrapped here once, typed, with a `// SAFETY:` line.

pub mod cgroup;
pub mod clone;
pub mod console;
pub mod fhandle;
pub mod inject;
pub mod interrupt;
pub mod kcmp;
pub mod mem;
pub mod netfilter;
pub mod ns;
pub mod pagemap;
pub mod pipe;
pub mod process;
pub mod procfs;
pub mod ptrace;
pub mod restore_sys;
pub mod shm;
pub mod sock_diag;
pub mod socket;
pub mod spawn;
pub mod tcp_repair;
#[cfg(test)]
pub mod testing;
pub mod watchdog;
