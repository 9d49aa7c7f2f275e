//! Reading another process: its memory (`process_vm_readv` in batches, and
//! /proc/PID/mem for ranges that refuse it, e.g. PROT_NONE) and its
//! resource limits (`prlimit` with no new limit). Never writes to the target.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("process_vm_readv of pid {pid}: {source}")]
    VmRead {
        pid: i32,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} at {addr:#x}: {source}")]
    MemRead {
        path: PathBuf,
        addr: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} at {addr:#x}: end of file")]
    MemEof { path: PathBuf, addr: u64 },
    #[error("prlimit(pid {pid}, resource {resource}): {source}")]
    Prlimit {
        pid: i32,
        resource: u32,
        #[source]
        source: std::io::Error,
    },
}

/// Maximum iovecs per process_vm_readv call (IOV_MAX).
pub const MAX_IOVECS: usize = 1024;

/// Reads remote ranges `(addr, len)` of `pid` into `local`, which must be exactly
/// as long as the ranges together. Returns how many bytes were read: the
/// kernel stops at the first remote range it cannot read, so a short count
/// means the range containing byte `n` failed.
pub fn vm_readv(
    pid: i32,
    local: &mut [u8],
    remote: &[(u64, usize)],
) -> Result<usize, ProcessError> {
    let total: usize = remote.iter().map(|r| r.1).sum();
    assert_eq!(
        total,
        local.len(),
        "vm_readv: local and remote lengths differ"
    );
    let mut done = 0usize;
    let mut idx = 0usize;
    while idx < remote.len() {
        let n = (remote.len() - idx).min(MAX_IOVECS);
        let batch = &remote[idx..idx + n];
        let want: usize = batch.iter().map(|r| r.1).sum();
        let riov: Vec<libc::iovec> = batch
            .iter()
            .map(|&(addr, len)| libc::iovec {
                iov_base: addr as *mut libc::c_void,
                iov_len: len,
            })
            .collect();
        let liov = libc::iovec {
            iov_base: local[done..].as_mut_ptr() as *mut libc::c_void,
            iov_len: want,
        };
        // SAFETY: the local iovec covers `want` bytes of `local` starting at
        // `done`, which exist (total == local.len()); the remote iovecs name
        // addresses in another process, which the kernel checks.
        let got = unsafe { libc::process_vm_readv(pid, &liov, 1, riov.as_ptr(), n as _, 0) };
        if got < 0 {
            let source = std::io::Error::last_os_error();
            // EFAULT on the first range is a short read of 0 bytes, not an error.
            if source.raw_os_error() == Some(libc::EFAULT) {
                return Ok(done);
            }
            return Err(ProcessError::VmRead { pid, source });
        }
        done += got as usize;
        if (got as usize) < want {
            return Ok(done);
        }
        idx += n;
    }
    Ok(done)
}

/// /proc/PID/mem opened for reading: works on ranges process_vm_readv refuses
/// (PROT_NONE, VM_IO excluded), because it uses FOLL_FORCE.
pub struct ProcMem {
    file: File,
    path: PathBuf,
}

impl ProcMem {
    pub fn open(pid: i32) -> Result<ProcMem, ProcessError> {
        let path = PathBuf::from(format!("/proc/{pid}/mem"));
        let file = File::open(&path).map_err(|source| ProcessError::MemRead {
            path: path.clone(),
            addr: 0,
            source,
        })?;
        Ok(ProcMem { file, path })
    }

    /// Fills `buf` from remote address `addr`.
    pub fn read_exact_at(&self, buf: &mut [u8], addr: u64) -> Result<(), ProcessError> {
        let mut done = 0usize;
        while done < buf.len() {
            let at = addr + done as u64;
            match self.file.read_at(&mut buf[done..], at) {
                Ok(0) => {
                    return Err(ProcessError::MemEof {
                        path: self.path.clone(),
                        addr: at,
                    })
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(source) => {
                    return Err(ProcessError::MemRead {
                        path: self.path.clone(),
                        addr: at,
                        source,
                    })
                }
            }
        }
        Ok(())
    }
}

/// (soft, hard) limit of `resource` of `pid`; RLIM_INFINITY is `u64::MAX`.
pub fn get_rlimit(pid: i32, resource: u32) -> Result<(u64, u64), ProcessError> {
    let mut old = libc::rlimit64 {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: a NULL new limit only reads; `old` is a valid out-parameter.
    let rc = unsafe { libc::prlimit64(pid, resource as _, std::ptr::null(), &mut old) };
    if rc != 0 {
        return Err(ProcessError::Prlimit {
            pid,
            resource,
            source: std::io::Error::last_os_error(),
        });
    }
    Ok((old.rlim_cur, old.rlim_max))
}

/// Names of RLIMIT_* 0..16, lowercase as in prlimit(1).
pub const RLIMIT_NAMES: [&str; 16] = [
    "cpu",
    "fsize",
    "data",
    "stack",
    "core",
    "rss",
    "nproc",
    "nofile",
    "memlock",
    "as",
    "locks",
    "sigpending",
    "msgqueue",
    "nice",
    "rtprio",
    "rttime",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_memory_both_ways_and_stops_at_hole() {
        let pid = std::process::id() as i32;
        let data: Vec<u8> = (0..10000u32).map(|i| (i * 7) as u8).collect();
        let mut out = vec![0u8; 300];
        let remote = [
            (data.as_ptr() as u64 + 5, 100),
            (data.as_ptr() as u64 + 9000, 200),
        ];
        assert_eq!(vm_readv(pid, &mut out, &remote).expect("readv"), 300);
        assert_eq!(&out[..100], &data[5..105]);
        assert_eq!(&out[100..], &data[9000..9200]);
        // A range at address 0 cannot be read: the count stops before it.
        let remote = [(data.as_ptr() as u64, 100), (0u64, 200)];
        assert_eq!(vm_readv(pid, &mut out, &remote).expect("readv"), 100);
        let mem = ProcMem::open(pid).expect("open");
        let mut buf = vec![0u8; 50];
        mem.read_exact_at(&mut buf, data.as_ptr() as u64 + 1000)
            .expect("pread");
        assert_eq!(&buf[..], &data[1000..1050]);
    }

    #[test]
    fn rlimit_matches_getrlimit() {
        let pid = std::process::id() as i32;
        let (soft, hard) = get_rlimit(pid, libc::RLIMIT_NOFILE).expect("prlimit");
        let mut own = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: valid out-parameter.
        assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut own) }, 0);
        assert_eq!((soft, hard), (own.rlim_cur, own.rlim_max));
        assert!(get_rlimit(i32::MAX, 0).is_err());
    }
}
