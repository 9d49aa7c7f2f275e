//! Reading another process: its memory through /proc/PID/mem and its
//! resource limits (`prlimit` with no new limit). Never writes to the target.
//!
//! There is deliberately no `process_vm_readv` here: it pins pages
//! (FOLL_PIN), and since Linux 5.19 a read-only pin of a copy-on-write
//! shared anonymous page makes the kernel unshare it in the target, which
//! silently breaks the sharing a dump must record and preserve.
//! /proc/PID/mem takes plain page references and leaves page tables alone.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
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
        let source = std::io::Error::last_os_error();
        // prlimit on a process of another uid needs CAP_SYS_RESOURCE, which
        // a shim may lack; /proc/PID/limits tells the same to anyone.
        if source.raw_os_error() == Some(libc::EPERM) {
            let limits = std::fs::read_to_string(format!("/proc/{pid}/limits"));
            if let Some(found) = limits.ok().and_then(|t| parse_limits(&t, resource)) {
                return Ok(found);
            }
        }
        return Err(ProcessError::Prlimit {
            pid,
            resource,
            source,
        });
    }
    Ok((old.rlim_cur, old.rlim_max))
}

/// (soft, hard) of `resource` from the text of /proc/PID/limits: a header,
/// then one row per resource in RLIMIT order, soft and hard limits in the
/// columns starting at 26 and 47 ("unlimited" is RLIM_INFINITY).
fn parse_limits(text: &str, resource: u32) -> Option<(u64, u64)> {
    let row = text.lines().nth(resource as usize + 1)?;
    let column = |from: usize| -> Option<u64> {
        let field = row.get(from..)?.split_whitespace().next()?;
        match field {
            "unlimited" => Some(u64::MAX),
            n => n.parse().ok(),
        }
    };
    Some((column(26)?, column(47)?))
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

/// `clock_gettime(clock)` as (seconds, nanoseconds); None for a clock this
/// process cannot read.
pub fn clock_now(clock: i32) -> Option<(i64, i64)> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid timespec for the kernel to fill.
    let rc = unsafe { libc::clock_gettime(clock, &mut ts) };
    (rc == 0).then_some((ts.tv_sec, ts.tv_nsec))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_memory_and_refuses_a_hole() {
        let pid = std::process::id() as i32;
        let data: Vec<u8> = (0..10000u32).map(|i| (i * 7) as u8).collect();
        let remote = [
            (data.as_ptr() as u64 + 5, 100),
            (data.as_ptr() as u64 + 9000, 200),
        ];
        let mem = ProcMem::open(pid).expect("open");
        for &(addr, len) in &remote {
            let mut part = vec![0u8; len];
            mem.read_exact_at(&mut part, addr).expect("pread");
            let from = (addr - data.as_ptr() as u64) as usize;
            assert_eq!(&part[..], &data[from..from + len]);
        }
        // Address 0 is not mapped: the read fails instead of returning zeros.
        let mut part = vec![0u8; 16];
        assert!(mem.read_exact_at(&mut part, 0).is_err());
        let mut buf = vec![0u8; 50];
        mem.read_exact_at(&mut buf, data.as_ptr() as u64 + 1000)
            .expect("pread");
        assert_eq!(&buf[..], &data[1000..1050]);
    }

    #[test]
    fn limits_file_parses_by_column() {
        let text = "Limit                     Soft Limit           Hard Limit           Units     \n\
                    Max cpu time              unlimited            unlimited            seconds   \n\
                    Max file size             unlimited            unlimited            bytes     \n\
                    Max data size             unlimited            unlimited            bytes     \n\
                    Max stack size            8388608              unlimited            bytes     \n";
        assert_eq!(parse_limits(text, 0), Some((u64::MAX, u64::MAX)));
        assert_eq!(parse_limits(text, 3), Some((8388608, u64::MAX)));
        assert_eq!(parse_limits(text, 4), None);
        let own = std::fs::read_to_string("/proc/self/limits").expect("read /proc/self/limits");
        let pid = std::process::id() as i32;
        for resource in 0..RLIMIT_NAMES.len() as u32 {
            assert_eq!(
                parse_limits(&own, resource),
                get_rlimit(pid, resource).ok(),
                "resource {resource}"
            );
        }
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
