//! After the tree is released: remove the restorer blob's region from every
//! restored process. The blob cannot unmap the code it runs, so, as CRIU
//! does, the restore command seizes the process once no thread executes in
//! the region any more and runs `munmap` in it through ptrace.

use std::time::Duration;

use crate::dump::seize::{SeizeError, SeizedTree};
use crate::sys::inject::{self, InjectError, Injector};
use crate::sys::ptrace::{self, PtraceError};

#[derive(Debug, thiserror::Error)]
pub enum CleanupError {
    #[error("pid {pid}: seizing to unmap the restorer: {source}")]
    Seize {
        pid: i32,
        #[source]
        source: SeizeError,
    },
    #[error("pid {pid}: {source}")]
    Ptrace {
        pid: i32,
        #[source]
        source: PtraceError,
    },
    #[error("pid {pid}: injecting munmap of the restorer: {source}")]
    Inject {
        pid: i32,
        #[source]
        source: InjectError,
    },
    #[error("pid {pid}: munmap({start:#x}, {len:#x}) of the restorer failed: errno {errno}")]
    Munmap {
        pid: i32,
        start: u64,
        len: u64,
        errno: i64,
    },
    #[error("pid {pid}: a thread stayed inside the restorer at {start:#x}+{len:#x}")]
    StillInside { pid: i32, start: u64, len: u64 },
}

/// Unmaps `[start, start + len)` in process `pid` (outer pid), waiting until
/// none of its threads executes there. Must run on one OS thread (ptrace).
/// A process that exited since the release (a restored `sleep` ends at
/// once) has nothing left to unmap: that is not a failure.
pub fn unmap_restorer(pid: i32, start: u64, len: u64) -> Result<(), CleanupError> {
    unmap_in_live(pid, start, len).or_else(|e| {
        if crate::sys::procfs::is_alive(pid) {
            Err(e)
        } else {
            Ok(())
        }
    })
}

fn unmap_in_live(pid: i32, start: u64, len: u64) -> Result<(), CleanupError> {
    for _ in 0..500 {
        let tree = SeizedTree::seize_frozen(&[pid])
            .and_then(|pending| pending.wait_stopped())
            .map_err(|source| CleanupError::Seize { pid, source })?;
        let tids: Vec<i32> = tree
            .processes()
            .iter()
            .flat_map(|p| p.tids.iter().copied())
            .collect();
        let mut inside = false;
        for &tid in &tids {
            let regs =
                ptrace::get_regs(tid).map_err(|source| CleanupError::Ptrace { pid, source })?;
            inside |= regs.rip >= start && regs.rip < start + len;
        }
        if inside {
            let _ = tree.detach();
            std::thread::sleep(Duration::from_millis(1));
            continue;
        }
        let result = inject_munmap(pid, tids[0], start, len);
        tree.detach()
            .map_err(|source| CleanupError::Seize { pid, source })?;
        return result;
    }
    Err(CleanupError::StillInside { pid, start, len })
}

fn inject_munmap(pid: i32, tid: i32, start: u64, len: u64) -> Result<(), CleanupError> {
    let ip = inject::find_syscall_instruction(pid)
        .map_err(|source| CleanupError::Inject { pid, source })?;
    let mut injector =
        Injector::new(pid, tid, ip).map_err(|source| CleanupError::Inject { pid, source })?;
    let r = injector
        .syscall(libc::SYS_munmap, &[start, len])
        .map_err(|source| CleanupError::Inject { pid, source })?;
    injector
        .finish()
        .map_err(|source| CleanupError::Inject { pid, source })?;
    if r < 0 {
        return Err(CleanupError::Munmap {
            pid,
            start,
            len,
            errno: -r,
        });
    }
    Ok(())
}
