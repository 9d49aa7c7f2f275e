//! The dump's guard against its own death: a forked watchdog (see
//! [`crate::sys::watchdog`]) that thaws the cgroup and removes the partial
//! image if the dumper is killed. ptrace tracees need nothing: the kernel
//! detaches them when their tracer dies.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use crate::sys::cgroup::Freezer;
use crate::sys::watchdog::{Watchdog, WatchdogPlan, MSG_COMMITTED, MSG_FROZEN, MSG_THAWED};

/// Starts the watchdog for a dump writing into `work_dir` (removed entirely
/// if it is not `final_dir`, else only emptied) and freezing `freezer`.
pub fn start(
    freezer: Option<&Freezer>,
    work_dir: &Path,
    final_dir: &Path,
) -> std::io::Result<DumpWatchdog> {
    let cstr = |p: &Path| {
        CString::new(p.as_os_str().as_bytes())
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))
    };
    let thaw = match freezer {
        Some(f) => {
            let (file, _, thawed) = f.control();
            Some((cstr(&file)?, thawed.as_bytes().to_vec()))
        }
        None => None,
    };
    let plan = WatchdogPlan {
        thaw,
        work_dir: Some(cstr(work_dir)?),
        remove_dir: work_dir != final_dir,
    };
    Ok(DumpWatchdog {
        inner: Watchdog::spawn(&plan)?,
    })
}

pub struct DumpWatchdog {
    inner: Watchdog,
}

impl DumpWatchdog {
    // Send failures are ignored: a dead watchdog only loses the crash cleanup.
    pub fn frozen(&self) {
        let _ = self.inner.send(MSG_FROZEN);
    }
    pub fn thawed(&self) {
        let _ = self.inner.send(MSG_THAWED);
    }
    pub fn committed(&self) {
        let _ = self.inner.send(MSG_COMMITTED);
    }
    /// The dump is settled (succeeded, or failed and cleaned up itself).
    pub fn finish(self) {
        self.inner.finish();
    }
}
