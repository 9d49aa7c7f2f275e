//! The tree's mount namespace: whether the root lives in one other than the
//! dumper's, and if so how it differs (`/proc/PID/mountinfo` against
//! `/proc/self/mountinfo`). Supported: a private copy of the dumper's
//! namespace with a fresh procfs and tmpfs mounts added (what `unshare
//! --mount-proc` makes); restore makes those again. A tree with a root
//! directory of its own (a container, after `pivot_root`) is recorded as
//! such and left to its runtime. Any other difference is a refusal, naming
//! the first mount that differs. Reads only; never mounts anything.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::image::types::{MountNs, RecreatedFs, RecreatedMount};

#[derive(Debug, thiserror::Error)]
pub enum MountNsError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: line {line}: {why}")]
    Parse {
        path: PathBuf,
        line: usize,
        why: &'static str,
    },
}

/// One line of a mountinfo file (the fields compared; ids are not).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct MountInfo {
    /// The mount's root within its filesystem (`/` unless a bind mount).
    pub root: String,
    pub mountpoint: String,
    /// Per-mount flags (`rw,nosuid,relatime`).
    pub flags: String,
    pub fstype: String,
    pub source: String,
    /// Per-superblock options (`rw,size=1024k`).
    pub super_options: String,
}

/// Parses a `/proc/PID/mountinfo` text (see proc(5)).
pub fn parse_mountinfo(path: &Path, text: &str) -> Result<Vec<MountInfo>, MountNsError> {
    let mut mounts = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let bad = |why| MountNsError::Parse {
            path: path.to_path_buf(),
            line: n + 1,
            why,
        };
        if line.trim().is_empty() {
            continue;
        }
        let fields: Vec<&str> = line.split(' ').collect();
        let dash = fields
            .iter()
            .position(|f| *f == "-")
            .ok_or_else(|| bad("no \"-\" separator"))?;
        if dash < 6 || fields.len() < dash + 4 {
            return Err(bad("too few fields"));
        }
        mounts.push(MountInfo {
            root: crate::sys::procfs::unescape_mountinfo(fields[3]),
            mountpoint: crate::sys::procfs::unescape_mountinfo(fields[4]),
            flags: fields[5].to_string(),
            fstype: fields[dash + 1].to_string(),
            source: crate::sys::procfs::unescape_mountinfo(fields[dash + 2]),
            super_options: fields[dash + 3].to_string(),
        });
    }
    Ok(mounts)
}

fn read_mountinfo(pid: &str) -> Result<Vec<MountInfo>, MountNsError> {
    let path = PathBuf::from(format!("/proc/{pid}/mountinfo"));
    let text = std::fs::read_to_string(&path).map_err(|source| MountNsError::Io {
        path: path.clone(),
        source,
    })?;
    parse_mountinfo(&path, &text)
}

/// What differs between the dumper's mounts and the tree's.
#[derive(Debug, PartialEq, Eq)]
pub enum Difference {
    /// Only mounts restore can make again, in the tree's mount order, and
    /// mount points the tree lacks (latest first).
    Recreatable {
        mounts: Vec<RecreatedMount>,
        unmounted: Vec<String>,
    },
    /// The first mount that differs and cannot be made again (one in the
    /// tree's namespace only; or `/` itself in the dumper's only).
    Unsupported {
        mountpoint: String,
        fstype: String,
        missing: bool,
    },
}

/// Compares the tree's mount table with the dumper's. A mount the same in
/// both (filesystem, root, flags and options at the same place: a copy
/// made by `unshare`) is no difference. The tree's other mounts must be
/// procfs or tmpfs mounts of a whole filesystem. The dumper's other mounts
/// are ones made outside since the copy (a host mounting a container's
/// rootfs, a USB stick): the restored namespace detaches them, but `/`
/// itself must be the same.
pub fn compare(dumper: &[MountInfo], tree: &[MountInfo]) -> Difference {
    let mut unmatched: BTreeMap<&MountInfo, usize> = BTreeMap::new();
    for m in tree {
        *unmatched.entry(m).or_default() += 1;
    }
    let mut unmounted = Vec::new();
    for m in dumper {
        match unmatched.get_mut(m) {
            Some(n) if *n > 0 => *n -= 1,
            _ if m.mountpoint == "/" => {
                return Difference::Unsupported {
                    mountpoint: m.mountpoint.clone(),
                    fstype: m.fstype.clone(),
                    missing: true,
                }
            }
            _ => unmounted.push(m.mountpoint.clone()),
        }
    }
    unmounted.reverse();
    unmounted.dedup();
    let mut added = Vec::new();
    for m in tree {
        if let Some(n) = unmatched.get_mut(m).filter(|n| **n > 0) {
            *n -= 1;
            added.push(m);
        }
    }
    let mut mounts = Vec::with_capacity(added.len());
    for m in added {
        let fstype = match m.fstype.as_str() {
            "proc" => Some(RecreatedFs::Proc),
            // Not under /proc: restore mounts tmpfs before the procfs.
            "tmpfs" if !m.mountpoint.starts_with("/proc/") && m.mountpoint != "/proc" => {
                Some(RecreatedFs::Tmpfs)
            }
            _ => None,
        };
        let Some(fstype) = fstype.filter(|_| m.root == "/") else {
            return Difference::Unsupported {
                mountpoint: m.mountpoint.clone(),
                fstype: m.fstype.clone(),
                missing: false,
            };
        };
        let data = m
            .super_options
            .split(',')
            .filter(|o| *o != "rw" && *o != "ro" && !o.is_empty())
            .collect::<Vec<_>>()
            .join(",");
        mounts.push(RecreatedMount {
            mountpoint: m.mountpoint.clone(),
            fstype,
            source: m.source.clone(),
            flags: m.flags.split(',').map(str::to_string).collect(),
            data,
        });
    }
    Difference::Recreatable { mounts, unmounted }
}

/// The tree's mount namespace, or `None` when it is the dumper's. What
/// cannot be restored is listed in `refusals`, naming `root_pid` and the
/// first mount that differs.
pub fn collect(root_pid: i32, refusals: &mut Vec<String>) -> Result<Option<MountNs>, MountNsError> {
    let link = |pid: &str| {
        let path = PathBuf::from(format!("/proc/{pid}/ns/mnt"));
        std::fs::read_link(&path).map_err(|source| MountNsError::Io { path, source })
    };
    let pid = root_pid.to_string();
    if link(&pid)? == link("self")? {
        return Ok(None);
    }
    let stat = |path: PathBuf| {
        std::fs::metadata(&path)
            .map(|m| (m.dev(), m.ino()))
            .map_err(|source| MountNsError::Io { path, source })
    };
    // A root directory of its own: a container, whose mounts its runtime
    // makes again around a restore (`restore-init` runs inside them).
    if stat(PathBuf::from(format!("/proc/{pid}/root")))? != stat(PathBuf::from("/"))? {
        return Ok(Some(MountNs::OwnRoot));
    }
    match compare(&read_mountinfo("self")?, &read_mountinfo(&pid)?) {
        Difference::Recreatable { mounts, unmounted } => {
            Ok(Some(MountNs::PrivateCopy { mounts, unmounted }))
        }
        Difference::Unsupported {
            mountpoint,
            fstype,
            missing,
        } => {
            refusals.push(format!(
                "pid {root_pid} lives in a mount namespace of its own whose mounts differ from \
                 this one's: {mountpoint} ({fstype}{})",
                if missing {
                    ", not mounted in the tree's"
                } else {
                    ""
                }
            ));
            Ok(None)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The dumper's table, then what `unshare -p -f --mount-proc` shows in
    /// its namespace: the same mounts (other ids, no propagation tags), and
    /// a procfs on /proc.
    const HOST: &str = "\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw,errors=remount-ro
23 22 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:12 - proc proc rw
24 22 0:5 / /dev rw,nosuid shared:2 - devtmpfs udev rw,size=4000k,mode=755
25 22 0:30 / /mnt/with\\040space rw,relatime shared:3 - tmpfs tmpfs rw
";
    const UNSHARED: &str = "\
401 300 8:1 / / rw,relatime - ext4 /dev/sda1 rw,errors=remount-ro
402 401 0:21 / /proc rw,nosuid,nodev,noexec,relatime - proc proc rw
403 401 0:5 / /dev rw,nosuid - devtmpfs udev rw,size=4000k,mode=755
404 401 0:30 / /mnt/with\\040space rw,relatime - tmpfs tmpfs rw
405 402 0:77 / /proc rw,nosuid,nodev,noexec,relatime - proc proc rw
406 401 0:78 / /scratch rw,nodev,relatime - tmpfs none rw,size=1024k,mode=700
";

    fn parse(text: &str) -> Vec<MountInfo> {
        parse_mountinfo(Path::new("mountinfo"), text).expect("parses")
    }

    #[test]
    fn mountinfo_fields_are_read_and_unescaped() {
        let host = parse(HOST);
        assert_eq!(host.len(), 4);
        assert_eq!(host[1].fstype, "proc");
        assert_eq!(host[2].super_options, "rw,size=4000k,mode=755");
        assert_eq!(host[3].mountpoint, "/mnt/with space");
        let err = parse_mountinfo(Path::new("m"), "1 2 3:4 / / rw shared:1 ext4 x rw\n")
            .expect_err("no separator");
        assert!(err.to_string().contains("line 1"), "{err}");
        assert!(parse_mountinfo(Path::new("m"), "1 2 - ext4 x rw\n").is_err());
    }

    #[test]
    fn a_copy_with_procfs_and_tmpfs_added_is_recreatable_in_order() {
        let Difference::Recreatable { mounts, unmounted } = compare(&parse(HOST), &parse(UNSHARED))
        else {
            panic!("not recreatable");
        };
        assert!(unmounted.is_empty());
        assert_eq!(mounts.len(), 2);
        assert_eq!(mounts[0].mountpoint, "/proc");
        assert_eq!(mounts[0].fstype, RecreatedFs::Proc);
        assert_eq!(mounts[0].data, "");
        assert_eq!(mounts[1].mountpoint, "/scratch");
        assert_eq!(mounts[1].fstype, RecreatedFs::Tmpfs);
        assert_eq!(mounts[1].flags, ["rw", "nodev", "relatime"]);
        assert_eq!(mounts[1].data, "size=1024k,mode=700");
        assert_eq!(mounts[1].source, "none");
        // The same table: nothing to make.
        assert_eq!(
            compare(&parse(HOST), &parse(HOST)),
            Difference::Recreatable {
                mounts: Vec::new(),
                unmounted: Vec::new()
            }
        );
        // Mounted outside since the copy: detached at restore, latest first.
        let later = format!("{HOST}26 22 0:40 / /mnt/usb rw - vfat /dev/sdb1 rw\n27 26 0:41 / /mnt/usb/x rw - tmpfs t rw\n");
        let Difference::Recreatable { unmounted, .. } = compare(&parse(&later), &parse(UNSHARED))
        else {
            panic!("not recreatable");
        };
        assert_eq!(unmounted, ["/mnt/usb/x", "/mnt/usb"]);
    }

    #[test]
    fn other_differences_name_the_first_mount() {
        let bind =
            format!("{UNSHARED}407 401 8:1 /srv /mnt/bind rw,relatime - ext4 /dev/sda1 rw\n");
        assert_eq!(
            compare(&parse(HOST), &parse(&bind)),
            Difference::Unsupported {
                mountpoint: "/mnt/bind".into(),
                fstype: "ext4".into(),
                missing: false
            }
        );
        // A tmpfs bound from a subdirectory is a bind mount too.
        let sub = format!("{UNSHARED}407 401 0:30 /sub /mnt/sub rw - tmpfs tmpfs rw\n");
        assert!(matches!(
            compare(&parse(HOST), &parse(&sub)),
            Difference::Unsupported { ref mountpoint, .. } if mountpoint == "/mnt/sub"
        ));
        let under_proc = format!("{UNSHARED}407 405 0:79 / /proc/x rw - tmpfs tmpfs rw\n");
        assert!(matches!(
            compare(&parse(HOST), &parse(&under_proc)),
            Difference::Unsupported { ref mountpoint, .. } if mountpoint == "/proc/x"
        ));
        // Remounted read-only in the tree's namespace: a new / of its own.
        let ro = UNSHARED.replace("/ / rw,relatime", "/ / ro,relatime");
        assert!(matches!(
            compare(&parse(HOST), &parse(&ro)),
            Difference::Unsupported { ref mountpoint, missing: true, .. } if mountpoint == "/"
        ));
        // Remounted read-only elsewhere: ext4, not made again.
        let dev_ro = UNSHARED.replace("/dev rw,nosuid", "/dev ro,nosuid");
        assert_eq!(
            compare(&parse(HOST), &parse(&dev_ro)),
            Difference::Unsupported {
                mountpoint: "/dev".into(),
                fstype: "devtmpfs".into(),
                missing: false
            }
        );
    }

    /// A child in a private copy of this mount namespace that ran `then`
    /// there (0 on success).
    fn in_private_copy(then: impl FnOnce() -> i64) -> crate::sys::testing::TestChild {
        use nix::mount::{mount, MsFlags};
        let child = crate::sys::testing::TestChild::fork(|| {
            let none: Option<&str> = None;
            if nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).is_err()
                || mount(none, "/", none, MsFlags::MS_REC | MsFlags::MS_PRIVATE, none).is_err()
            {
                return -1;
            }
            then()
        });
        assert_eq!(child.value, 0, "the child's namespace was not set up");
        child
    }

    #[test]
    fn a_private_copy_with_a_tmpfs_is_recorded_and_a_bind_mount_refused() {
        use nix::mount::{mount, MsFlags};
        let dir = tempfile::tempdir().expect("tempdir");
        let t = dir.path().join("t");
        std::fs::create_dir(&t).expect("mkdir");
        let tmpfs = t.clone();
        let child = in_private_copy(move || {
            let opts = Some("size=64k,mode=711");
            mount(
                Some("cowsnap-unit"),
                &tmpfs,
                Some("tmpfs"),
                MsFlags::MS_NODEV,
                opts,
            )
            .map_or(-1, |_| 0)
        });
        let mut refusals = Vec::new();
        let got = collect(child.pid, &mut refusals).expect("collect");
        assert!(refusals.is_empty(), "{refusals:?}");
        let Some(MountNs::PrivateCopy { mounts, .. }) = got else {
            panic!("not a private copy: {got:?}");
        };
        let want = t.to_str().expect("utf-8");
        let m = mounts
            .iter()
            .find(|m| m.mountpoint == want)
            .unwrap_or_else(|| panic!("no {want} in {mounts:?}"));
        assert_eq!(
            (m.fstype, m.source.as_str()),
            (RecreatedFs::Tmpfs, "cowsnap-unit")
        );
        assert!(m.flags.iter().any(|f| f == "nodev"), "{:?}", m.flags);
        assert!(
            m.data.contains("size=64k") && m.data.contains("mode=711"),
            "{}",
            m.data
        );

        let (src, dst) = (dir.path().join("src"), dir.path().join("dst"));
        std::fs::create_dir(&src).expect("mkdir");
        std::fs::create_dir(&dst).expect("mkdir");
        let (s, d) = (src.clone(), dst.clone());
        let child = in_private_copy(move || {
            let none: Option<&str> = None;
            mount(Some(&s), &d, none, MsFlags::MS_BIND, none).map_or(-1, |_| 0)
        });
        let got = collect(child.pid, &mut refusals).expect("collect");
        assert_eq!(got, None);
        let want = format!(
            "pid {} lives in a mount namespace of its own whose mounts differ from this one's: {} (",
            child.pid,
            dst.display()
        );
        assert!(
            refusals.len() == 1 && refusals[0].starts_with(&want),
            "{refusals:?}"
        );
    }

    #[test]
    fn a_root_of_its_own_is_left_to_its_runtime() {
        // As a container after pivot_root: a root directory other than ours.
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().to_path_buf();
        let child = in_private_copy(move || nix::unistd::chroot(&root).map_or(-1, |_| 0));
        let mut refusals = Vec::new();
        assert_eq!(
            collect(child.pid, &mut refusals).expect("collect"),
            Some(MountNs::OwnRoot)
        );
        assert!(refusals.is_empty(), "{refusals:?}");
    }

    #[test]
    fn the_dumpers_own_namespace_is_none() {
        let mut refusals = Vec::new();
        let me = std::process::id() as i32;
        assert_eq!(collect(me, &mut refusals).expect("collect"), None);
        assert!(refusals.is_empty());
    }
}
