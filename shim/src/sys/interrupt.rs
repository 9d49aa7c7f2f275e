//! SIGINT/SIGTERM during a dump: a handler that only sets a flag, which the
//! dump checks between batches so it can resume every task and clean up
//! instead of dying with the tree frozen. The guard restores the previous
//! dispositions.

use std::sync::atomic::{AtomicBool, Ordering};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_sig: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Whether SIGINT or SIGTERM arrived since the guard was installed.
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// While alive, SIGINT and SIGTERM set the flag instead of killing the process.
pub struct InterruptGuard {
    old: Vec<(libc::c_int, libc::sigaction)>,
}

impl InterruptGuard {
    pub fn install() -> std::io::Result<InterruptGuard> {
        INTERRUPTED.store(false, Ordering::SeqCst);
        let mut guard = InterruptGuard { old: Vec::new() };
        for sig in [libc::SIGINT, libc::SIGTERM] {
            // SAFETY: zeroed sigaction is a valid "default" value to fill in.
            let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
            act.sa_sigaction = on_signal as *const () as usize;
            act.sa_flags = libc::SA_RESTART;
            // SAFETY: sa_mask is a valid sigset_t inside `act`.
            unsafe { libc::sigemptyset(&mut act.sa_mask) };
            // SAFETY: zeroed sigaction is valid storage for the old action.
            let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
            // SAFETY: both pointers are valid; the handler only does an atomic store,
            // which is async-signal-safe.
            if unsafe { libc::sigaction(sig, &act, &mut old) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            guard.old.push((sig, old));
        }
        Ok(guard)
    }
}

impl Drop for InterruptGuard {
    fn drop(&mut self) {
        for (sig, old) in self.old.drain(..) {
            // SAFETY: restoring an action previously returned by sigaction.
            unsafe { libc::sigaction(sig, &old, std::ptr::null_mut()) };
        }
    }
}

/// Tests that install the guard or raise signals hold this, so a raised
/// SIGTERM never interrupts another test's dump.
#[cfg(test)]
pub(crate) static TEST_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sigterm_sets_flag_instead_of_killing() {
        let _lock = TEST_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let guard = InterruptGuard::install().expect("install");
        assert!(!interrupted());
        // SAFETY: raising a signal whose handler we installed.
        unsafe { libc::raise(libc::SIGTERM) };
        assert!(interrupted());
        drop(guard);
    }
}
