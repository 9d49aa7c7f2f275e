//! Namespaces from outside: taking an inherited fd by number, removing
//! mounts from another process's mount namespace (the container restore
//! helper's bind mounts, once the restored tree runs), and making fresh
//! mounts in another process's mount and pid namespaces.

use std::ffi::CString;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd};

/// Takes ownership of inherited fd `raw` after checking that it is open.
pub fn owned_fd(raw: i32) -> io::Result<OwnedFd> {
    if raw < 0 {
        return Err(io::Error::from_raw_os_error(libc::EBADF));
    }
    // SAFETY: F_GETFD only reads the fd's flags.
    if unsafe { libc::fcntl(raw, libc::F_GETFD) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the fd is open, and the caller hands it over (nothing else owns it).
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// In the mount namespace of `pid`: lazily unmounts each of `unmount`,
/// then removes each of `remove` (files, then empty directories, in the
/// order given). Works from a multi-threaded process: a forked child
/// enters the namespace and does only raw syscalls.
pub fn detach_mounts(pid: i32, unmount: &[&str], remove: &[&str]) -> io::Result<()> {
    let ns_path = format!("/proc/{pid}/ns/mnt");
    let ns = std::fs::File::open(&ns_path)
        .map_err(|e| io::Error::new(e.kind(), format!("{ns_path}: {e}")))?;
    let cstr = |s: &&str| CString::new(*s).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL));
    let unmount: Vec<CString> = unmount.iter().map(cstr).collect::<io::Result<_>>()?;
    let remove: Vec<CString> = remove.iter().map(cstr).collect::<io::Result<_>>()?;
    use std::os::fd::AsRawFd;
    let ns_fd = ns.as_raw_fd();
    // SAFETY: the child only makes raw syscalls on data prepared before the
    // fork and leaves with _exit, so the parent's other threads (and their
    // locks) do not matter.
    let child = unsafe { libc::fork() };
    if child < 0 {
        return Err(io::Error::last_os_error());
    }
    if child == 0 {
        // SAFETY: raw syscalls on valid fds and NUL-terminated strings.
        unsafe {
            if libc::setns(ns_fd, libc::CLONE_NEWNS) != 0 {
                libc::_exit(100);
            }
            for (k, path) in unmount.iter().enumerate() {
                if libc::umount2(path.as_ptr(), libc::MNT_DETACH) != 0 {
                    libc::_exit(101 + k as i32);
                }
            }
            for path in &remove {
                if libc::unlink(path.as_ptr()) != 0 {
                    libc::rmdir(path.as_ptr());
                }
            }
            libc::_exit(0);
        }
    }
    let status = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(child), None)
        .map_err(io::Error::from)?;
    match status {
        nix::sys::wait::WaitStatus::Exited(_, 0) => Ok(()),
        nix::sys::wait::WaitStatus::Exited(_, 100) => Err(io::Error::other(format!(
            "entering the mount namespace of pid {pid} failed"
        ))),
        nix::sys::wait::WaitStatus::Exited(_, code) if code > 100 => {
            let path = unmount
                .get((code - 101) as usize)
                .map(|p| p.to_string_lossy().into_owned())
                .unwrap_or_default();
            Err(io::Error::other(format!(
                "unmounting {path} in the mount namespace of pid {pid} failed"
            )))
        }
        other => Err(io::Error::other(format!(
            "unmounting in the mount namespace of pid {pid}: helper ended with {other:?}"
        ))),
    }
}

/// One `mount(2)` of a filesystem made from nothing (no source device).
#[derive(Debug, Clone)]
pub struct FreshMount {
    pub source: CString,
    pub fstype: CString,
    pub target: CString,
    pub flags: libc::c_ulong,
    pub data: CString,
}

/// Makes `mounts`, in order, in the mount namespace of `pid` by a process
/// of its pid namespace (a procfs shows the pid namespace of the process
/// that mounts it). Works from a multi-threaded process: a forked child
/// enters both namespaces and forks the mounter, and both make only raw
/// syscalls. The mounter is a process of `pid`'s pid namespace for the
/// moment, with an automatic pid; its parent, outside, reaps it.
pub fn mount_in(pid: i32, mounts: &[FreshMount]) -> io::Result<()> {
    let open = |kind: &str| {
        let path = format!("/proc/{pid}/ns/{kind}");
        std::fs::File::open(&path).map_err(|e| io::Error::new(e.kind(), format!("{path}: {e}")))
    };
    let (mnt_ns, pid_ns) = (open("mnt")?, open("pid")?);
    use std::os::fd::AsRawFd;
    let (mnt_fd, pid_fd) = (mnt_ns.as_raw_fd(), pid_ns.as_raw_fd());
    // SAFETY: the child only makes raw syscalls on data prepared before the
    // fork and leaves with _exit, so the parent's other threads (and their
    // locks) do not matter.
    let child = unsafe { libc::fork() };
    if child < 0 {
        return Err(io::Error::last_os_error());
    }
    if child == 0 {
        // SAFETY: raw syscalls on valid fds, NUL-terminated strings and a
        // local status word.
        unsafe {
            if libc::setns(pid_fd, libc::CLONE_NEWPID) != 0
                || libc::setns(mnt_fd, libc::CLONE_NEWNS) != 0
            {
                libc::_exit(100);
            }
            let mounter = libc::fork();
            if mounter < 0 {
                libc::_exit(99);
            }
            if mounter == 0 {
                for (k, m) in mounts.iter().enumerate() {
                    if libc::mount(
                        m.source.as_ptr(),
                        m.target.as_ptr(),
                        m.fstype.as_ptr(),
                        m.flags,
                        m.data.as_ptr().cast(),
                    ) != 0
                    {
                        libc::_exit(101 + k as i32);
                    }
                }
                libc::_exit(0);
            }
            let mut status = 0;
            if libc::waitpid(mounter, &mut status, 0) != mounter || !libc::WIFEXITED(status) {
                libc::_exit(99);
            }
            libc::_exit(libc::WEXITSTATUS(status));
        }
    }
    let status = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(child), None)
        .map_err(io::Error::from)?;
    match status {
        nix::sys::wait::WaitStatus::Exited(_, 0) => Ok(()),
        nix::sys::wait::WaitStatus::Exited(_, 100) => Err(io::Error::other(format!(
            "entering the pid and mount namespaces of pid {pid} failed"
        ))),
        nix::sys::wait::WaitStatus::Exited(_, code) if code > 100 => {
            let what = mounts
                .get((code - 101) as usize)
                .map(|m| {
                    format!(
                        "{} on {}",
                        m.fstype.to_string_lossy(),
                        m.target.to_string_lossy()
                    )
                })
                .unwrap_or_default();
            Err(io::Error::other(format!(
                "mounting {what} in the mount namespace of pid {pid} failed"
            )))
        }
        other => Err(io::Error::other(format!(
            "mounting in the mount namespace of pid {pid}: helper ended with {other:?}"
        ))),
    }
}

/// Sets the caller's pid namespace's last automatic pid (the next one
/// handed out is above it); see [`write_proc_sys`] for `scratch`.
pub fn set_ns_last_pid(value: i32, scratch: &std::path::Path) -> io::Result<()> {
    write_proc_sys("kernel/ns_last_pid", &value.to_string(), scratch)
}

/// Writes `value` to the sysctl `/proc/sys/FILE` of the caller's
/// namespaces. Where `/proc/sys` is read-only (runc makes it so in
/// containers) it writes through a private procfs mounted for the moment
/// at `scratch`, a directory this creates and removes: the container's own
/// /proc/sys stays read-only throughout.
pub fn write_proc_sys(file: &str, value: &str, scratch: &std::path::Path) -> io::Result<()> {
    let file = format!("sys/{file}");
    match std::fs::write(format!("/proc/{file}"), value) {
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::EROFS | libc::EACCES | libc::EPERM)
            ) => {}
        other => return other,
    }
    use nix::mount::{mount, umount2, MntFlags, MsFlags};
    std::fs::create_dir_all(scratch)?;
    let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    let result = mount(Some("proc"), scratch, Some("proc"), flags, None::<&str>)
        .map_err(|e| io::Error::other(format!("mounting proc at {}: {e}", scratch.display())))
        .and_then(|()| {
            let written = std::fs::write(scratch.join(&file), value);
            let _ = umount2(scratch, MntFlags::MNT_DETACH);
            written
        });
    let _ = std::fs::remove_dir(scratch);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owned_fd_refuses_a_closed_fd() {
        assert!(owned_fd(-1).is_err());
        assert!(owned_fd(987_654).is_err());
        let file = std::fs::File::open("/proc/self/stat").expect("open");
        let raw = std::os::fd::IntoRawFd::into_raw_fd(file);
        assert!(owned_fd(raw).is_ok());
    }

    #[test]
    fn write_proc_sys_goes_through_a_private_procfs_where_proc_sys_is_read_only() {
        use nix::mount::{mount, MsFlags};
        let dir = tempfile::tempdir().expect("tempdir");
        let scratch = dir.path().join("proc");
        let in_child = scratch.clone();
        // A child with mount and IPC namespaces of its own (the knob is the
        // IPC namespace's) and /proc/sys made read-only as runc makes it.
        let child = crate::sys::testing::TestChild::fork(move || {
            let none = None::<&str>;
            let step = || -> Result<(), (i64, String)> {
                let fail = |code: i64| move |e: nix::Error| (code, e.to_string());
                nix::sched::unshare(
                    nix::sched::CloneFlags::CLONE_NEWNS | nix::sched::CloneFlags::CLONE_NEWIPC,
                )
                .map_err(fail(2))?;
                mount(none, "/", none, MsFlags::MS_REC | MsFlags::MS_PRIVATE, none)
                    .map_err(fail(3))?;
                mount(Some("/proc/sys"), "/proc/sys", none, MsFlags::MS_BIND, none)
                    .map_err(fail(4))?;
                let ro = MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY;
                mount(none, "/proc/sys", none, ro, none).map_err(fail(5))?;
                const KNOB: &str = "/proc/sys/kernel/shm_next_id";
                if std::fs::write(KNOB, "7").is_ok() {
                    return Err((6, "/proc/sys is still writable".into()));
                }
                write_proc_sys("kernel/shm_next_id", "7", &in_child)
                    .map_err(|e| (7, e.to_string()))?;
                let now = std::fs::read_to_string(KNOB).map_err(|e| (8, e.to_string()))?;
                if now.trim() != "7" {
                    return Err((9, format!("{KNOB} is {now:?}")));
                }
                if in_child.exists() {
                    return Err((10, "the scratch directory is left".into()));
                }
                Ok(())
            };
            match step() {
                Ok(()) => 1,
                Err((code, e)) => {
                    eprintln!("write_proc_sys child, step {code}: {e}");
                    -code
                }
            }
        });
        assert_eq!(
            child.value, 1,
            "the child's step that failed (see its stderr)"
        );
        assert!(!scratch.exists(), "nothing made in this namespace");
    }

    #[test]
    fn detach_mounts_unmounts_in_another_namespace_only() {
        // A child in its own mount namespace with a tmpfs; we remove it
        // from outside, and our own namespace never had it.
        let dir = tempfile::tempdir().expect("tempdir");
        let target = dir.path().join("m");
        std::fs::create_dir(&target).expect("mkdir");
        let ready = dir.path().join("ready");
        let script = format!(
            "mount -t tmpfs none {t} && touch {t}/inside && touch {r} && sleep 30",
            t = target.display(),
            r = ready.display()
        );
        let mut child = std::process::Command::new("unshare")
            .args(["-m", "--propagation", "private", "sh", "-c", &script])
            .spawn()
            .expect("unshare");
        let t0 = std::time::Instant::now();
        while !ready.exists() && t0.elapsed() < std::time::Duration::from_secs(10) {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        // unshare execs sh in place, so the child's pid is the namespace's.
        let pid = child.id() as i32;
        let inside = format!("/proc/{pid}/root{}/inside", target.display());
        assert!(std::path::Path::new(&inside).exists(), "tmpfs not mounted");
        let t = target.to_string_lossy().into_owned();
        detach_mounts(pid, &[&t], &[]).expect("detach");
        assert!(
            !std::path::Path::new(&inside).exists(),
            "tmpfs still mounted"
        );
        let err = detach_mounts(pid, &[&t], &[]).expect_err("second unmount");
        assert!(err.to_string().contains(&t), "{err}");
        let _ = child.kill();
        let _ = child.wait();
    }
}
