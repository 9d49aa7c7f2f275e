//! Process attributes a restored process sets on itself from its tree
//! entry before jumping into the blob: umask, rlimits, comm, root and cwd.
//!
//! Not here: pgid/sid (the tree builder's), creds, capabilities and seccomp
//! (the blob's: they must come last, after the runtime needs no privilege).
//!
//! Root and cwd. The dumper read both with readlink(/proc/PID/root|cwd),
//! which prints a path relative to the *reader's* root: a process chrooted
//! into /srv/jail with cwd /srv/jail/home shows root `/srv/jail` and cwd
//! `/srv/jail/home` (not `/home`); a cwd left outside the chroot still shows
//! its full path. So [`set_root_and_cwd`] does `chdir(cwd)` first, with both
//! paths resolved in the restorer's view, then `chroot(root)`, which leaves
//! the cwd where it is: that reproduces both cases exactly, where
//! chroot-then-chdir(relative cwd) would fail on the second. For a process
//! in another mount namespace (a container) the kernel prints paths from
//! that namespace's root, which is what a restore helper running inside the
//! container sees.
//!
//! Order for the caller: after everything that opens files by path (fds,
//! file mappings) and after forking children, because a chroot changes how
//! later paths resolve (and /proc may be absent inside it), RLIMIT_NOFILE
//! can make fd_base unusable and RLIMIT_NPROC can refuse forks. RLIMIT_AS
//! and RLIMIT_DATA are applied too: the runtime's memory plus the target
//! layout must fit under them until the blob unmaps the runtime; a caller
//! that cannot guarantee that can use [`set_rlimits`] with a filter.

use std::path::Path;

use crate::image::types::{ProcessEntry, Rlimit};
use crate::sys::restore_sys;

const DELETED_SUFFIX: &str = " (deleted)";

#[derive(Debug, thiserror::Error)]
pub enum AttrError {
    #[error(
        "pid {pid}: setrlimit {name} (resource {resource}) to soft {soft} hard {hard}: {source}"
    )]
    Rlimit {
        pid: i32,
        resource: u32,
        name: String,
        soft: u64,
        hard: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("pid {pid}: PR_SET_NAME {comm:?}: {source}")]
    Comm {
        pid: i32,
        comm: String,
        #[source]
        source: std::io::Error,
    },
    #[error("pid {pid}: chdir {path}: {source}")]
    Chdir {
        pid: i32,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("pid {pid}: chroot {path}: {source}")]
    Chroot {
        pid: i32,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("not supported: pid {pid}: {what} {path} is deleted or unreachable")]
    Unreachable {
        pid: i32,
        what: &'static str,
        path: String,
    },
}

/// Sets umask, every recorded rlimit, comm, then cwd and root (see the module doc for order).
pub fn apply(entry: &ProcessEntry) -> Result<(), AttrError> {
    let pid = entry.pid;
    check_reachable(pid, "cwd", &entry.cwd)?;
    check_reachable(pid, "root", &entry.root)?;
    restore_sys::set_umask(entry.umask);
    set_rlimits(pid, &entry.rlimits, |_| true)?;
    set_comm(pid, &entry.comm)?;
    set_root_and_cwd(pid, &entry.root, &entry.cwd)
}

/// Sets each rlimit of `rlimits` that `filter` accepts, soft and hard together.
pub fn set_rlimits(
    pid: i32,
    rlimits: &[Rlimit],
    filter: impl Fn(&Rlimit) -> bool,
) -> Result<(), AttrError> {
    for r in rlimits.iter().filter(|r| filter(r)) {
        restore_sys::set_rlimit(r.resource, r.soft, r.hard).map_err(|source| {
            AttrError::Rlimit {
                pid,
                resource: r.resource,
                name: r.name.clone(),
                soft: r.soft,
                hard: r.hard,
                source,
            }
        })?;
    }
    Ok(())
}

/// Names the calling (leader) thread; the kernel keeps the first 15 bytes.
pub fn set_comm(pid: i32, comm: &str) -> Result<(), AttrError> {
    restore_sys::set_thread_name(comm).map_err(|source| AttrError::Comm {
        pid,
        comm: comm.to_string(),
        source,
    })
}

/// `chdir(cwd)`, then `chroot(root)` unless root is `/` (see the module doc).
pub fn set_root_and_cwd(pid: i32, root: &str, cwd: &str) -> Result<(), AttrError> {
    check_reachable(pid, "cwd", cwd)?;
    check_reachable(pid, "root", root)?;
    restore_sys::chdir(Path::new(cwd)).map_err(|source| AttrError::Chdir {
        pid,
        path: cwd.to_string(),
        source,
    })?;
    if root != "/" {
        restore_sys::chroot(Path::new(root)).map_err(|source| AttrError::Chroot {
            pid,
            path: root.to_string(),
            source,
        })?;
    }
    Ok(())
}

/// A removed directory reads as "PATH (deleted)", one outside the reader's
/// reach as "(unreachable)PATH" or a relative path; none can be reopened.
fn check_reachable(pid: i32, what: &'static str, path: &str) -> Result<(), AttrError> {
    if path.ends_with(DELETED_SUFFIX) || !path.starts_with('/') {
        return Err(AttrError::Unreachable {
            pid,
            what,
            path: path.to_string(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::types::{Creds, ProcessEntry};
    use crate::sys::restore_sys::in_child;

    fn entry(root: &str, cwd: &str) -> ProcessEntry {
        ProcessEntry {
            pid: 900,
            ppid: 0,
            pgid: 900,
            sid: 900,
            nspid: vec![900],
            tids: vec![900],
            comm: "restored-comm-long".into(),
            exe: "/bin/true".into(),
            cwd: cwd.into(),
            root: root.into(),
            umask: 0o027,
            creds: Creds::default(),
            rlimits: vec![
                Rlimit {
                    resource: libc::RLIMIT_NOFILE,
                    name: "nofile".into(),
                    soft: 512,
                    hard: 2048,
                },
                Rlimit {
                    resource: libc::RLIMIT_CORE,
                    name: "core".into(),
                    soft: 0,
                    hard: u64::MAX,
                },
                Rlimit {
                    resource: libc::RLIMIT_MSGQUEUE,
                    name: "msgqueue".into(),
                    soft: 12345,
                    hard: 54321,
                },
            ],
            namespaces: vec![],
            file: "proc-900.json".into(),
            zombie: None,
        }
    }

    #[derive(Debug, serde::Serialize, serde::Deserialize, PartialEq)]
    struct Seen {
        umask: u32,
        rlimits: Vec<(u64, u64)>,
        comm: String,
        cwd: String,
        marker: bool,
    }

    fn apply_in_child(e: &ProcessEntry) -> Seen {
        let report = in_child(|_| {
            apply(e).map_err(|e| e.to_string())?;
            let umask = restore_sys::set_umask(0);
            let mut rlimits = Vec::new();
            for r in &e.rlimits {
                rlimits.push(restore_sys::get_rlimit_self(r.resource).map_err(|e| e.to_string())?);
            }
            let seen = Seen {
                umask,
                rlimits,
                comm: restore_sys::thread_name().map_err(|e| e.to_string())?,
                cwd: std::env::current_dir()
                    .map_err(|e| e.to_string())?
                    .to_string_lossy()
                    .into_owned(),
                marker: Path::new("/cowsnap-chroot-marker").exists(),
            };
            serde_json::to_vec(&seen).map_err(|e| e.to_string())
        })
        .expect("child");
        serde_json::from_slice(&report).expect("report")
    }

    #[test]
    fn apply_sets_umask_rlimits_comm_and_chroot_with_cwd_inside() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().to_string_lossy().into_owned();
        std::fs::create_dir(dir.path().join("work")).expect("mkdir");
        std::fs::write(dir.path().join("cowsnap-chroot-marker"), b"").expect("marker");
        let e = entry(&root, &format!("{root}/work"));
        let seen = apply_in_child(&e);
        assert_eq!(
            seen,
            Seen {
                umask: 0o027,
                rlimits: vec![(512, 2048), (0, u64::MAX), (12345, 54321)],
                comm: "restored-comm-l".into(),
                cwd: "/work".into(),
                marker: true,
            }
        );
    }

    #[test]
    fn root_slash_only_changes_cwd() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cwd = dir.path().to_string_lossy().into_owned();
        let seen = apply_in_child(&entry("/", &cwd));
        assert_eq!(seen.cwd, cwd);
        assert!(!seen.marker);
    }

    #[test]
    fn deleted_or_unreachable_dirs_are_refused_before_any_change() {
        let e = entry("/", "/tmp/gone (deleted)");
        let err = apply(&e).expect_err("deleted cwd");
        assert_eq!(
            err.to_string(),
            "not supported: pid 900: cwd /tmp/gone (deleted) is deleted or unreachable"
        );
        let e = entry("(unreachable)/x", "/");
        assert!(matches!(
            apply(&e),
            Err(AttrError::Unreachable { what: "root", .. })
        ));
    }

    #[test]
    fn rlimit_error_names_the_resource() {
        // soft above hard: the kernel refuses with EINVAL before changing anything.
        let bad = [Rlimit {
            resource: libc::RLIMIT_CORE,
            name: "core".into(),
            soft: 10,
            hard: 5,
        }];
        let err = set_rlimits(900, &bad, |_| true).expect_err("soft > hard");
        assert!(
            err.to_string()
                .starts_with("pid 900: setrlimit core (resource 4) to soft 10 hard 5:"),
            "{err}"
        );
    }
}
