//! The restored tree's own mount namespace, when the image says the tree
//! had a private copy of the dumper's (`MountNs::PrivateCopy`): the root,
//! before it forks or opens anything, enters a new mount namespace (a copy
//! of the caller's), makes every mount private, and mounts the recorded
//! tmpfs again; once every process is in place, the restore command has a
//! process of the tree's pid namespace mount the recorded procfs (a procfs
//! mounted earlier would hide the caller's /proc the restore still reads
//! there). The caller's own mount namespace is never changed. CLI
//! restores only: a container's namespace is runc's.

use std::ffi::CString;

use nix::errno::Errno;
use nix::mount::{mount, umount2, MntFlags, MsFlags};

use crate::image::types::{MountNs, RecreatedFs, RecreatedMount, MOUNT_FLAGS};
use crate::sys::ns::FreshMount;

/// What a tree with a private copy of the dumper's namespace had mounted
/// and not; `None` when the tree stays in the caller's namespace.
pub struct PrivateCopy<'a> {
    pub mounts: &'a [RecreatedMount],
    pub unmounted: &'a [String],
}

pub fn private_copy(mount_ns: Option<&MountNs>) -> Option<PrivateCopy<'_>> {
    match mount_ns {
        Some(MountNs::PrivateCopy { mounts, unmounted }) => Some(PrivateCopy { mounts, unmounted }),
        Some(MountNs::OwnRoot) | None => None,
    }
}

fn flags(m: &RecreatedMount) -> libc::c_ulong {
    m.flags
        .iter()
        .filter_map(|f| MOUNT_FLAGS.iter().find(|(name, _)| name == f))
        .fold(0, |all, (_, bit)| all | bit)
}

fn fresh(m: &RecreatedMount) -> Result<FreshMount, String> {
    let c = |s: &str| CString::new(s).map_err(|_| format!("{s:?} holds a NUL"));
    let source = if m.source.is_empty() {
        m.fstype.name()
    } else {
        &m.source
    };
    Ok(FreshMount {
        source: c(source)?,
        fstype: c(m.fstype.name())?,
        target: c(&m.mountpoint)?,
        flags: flags(m),
        data: c(&m.data)?,
    })
}

/// In the root, before it forks: a new mount namespace whose mounts are
/// all private (nothing propagates back to the caller's), without the
/// mounts the tree did not have (those mounted here now), with the tmpfs
/// mounts it had made again in order.
pub fn enter_new(copy: &PrivateCopy) -> Result<(), String> {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)
        .map_err(|e| format!("unshare(CLONE_NEWNS): {e}"))?;
    let none: Option<&str> = None;
    mount(none, "/", none, MsFlags::MS_REC | MsFlags::MS_PRIVATE, none)
        .map_err(|e| format!("making / private in the new mount namespace: {e}"))?;
    for path in copy.unmounted {
        match umount2(path.as_str(), MntFlags::MNT_DETACH) {
            // Not mounted here (any more): nothing to hide.
            Ok(()) | Err(Errno::EINVAL | Errno::ENOENT) => {}
            Err(e) => return Err(format!("detaching {path}: {e}")),
        }
    }
    for m in copy
        .mounts
        .iter()
        .filter(|m| m.fstype == RecreatedFs::Tmpfs)
    {
        let f = fresh(m)?;
        mount(
            Some(f.source.as_c_str()),
            f.target.as_c_str(),
            Some(f.fstype.as_c_str()),
            MsFlags::from_bits_retain(f.flags),
            Some(f.data.as_c_str()),
        )
        .map_err(|e| format!("mounting tmpfs on {} ({}): {e}", m.mountpoint, m.data))?;
    }
    Ok(())
}

/// From the restore command, once every process is in place: the procfs
/// mounts of `mounts`, made in `root`'s mount namespace by a process of
/// its pid namespace.
pub fn mount_procfs(root: i32, mounts: &[RecreatedMount]) -> Result<(), String> {
    let procfs: Vec<FreshMount> = mounts
        .iter()
        .filter(|m| m.fstype == RecreatedFs::Proc)
        .map(fresh)
        .collect::<Result<_, _>>()?;
    if procfs.is_empty() {
        return Ok(());
    }
    crate::sys::ns::mount_in(root, &procfs).map_err(|e| e.to_string())
}
