//! SysV shared memory of a restored tree. The root, before anything else,
//! creates every segment of `Tree::sysv_shm` again with its key, size,
//! owner and mode and its original shmid (a process may have stored the
//! id: `kernel.shm_next_id` is set right before each `shmget`, through a
//! private procfs where /proc/sys is read-only as in a container, and a
//! different id fails the restore naming it), then writes the pages no
//! VMA of the tree shows (the others are written by the holder of the
//! attachment, see `plan`). Attachments come back like shared anonymous
//! memory: the LCA of the attaching processes attaches the segment in its
//! staging area before forking (`shmat`, so `shm_nattch` counts every
//! attachment, inherited ones included), and each process moves its
//! window into place in the blob (`mremap` keeps an attachment one).
//!
//! Which IPC namespace: a restore into a new pid namespace also gets a new
//! IPC namespace when the image has segments (the tree is a copy beside
//! the original, whose segments may still exist with the same ids); the
//! current and container modes create them in the namespace they run in.
//! A failed restore in a new namespace loses its segments with the
//! namespace; elsewhere the root records each id it creates in the control
//! region and the restore command removes them after killing the tree.

use std::collections::HashSet;
use std::path::Path;

use crate::image::types::{PageRun, SysvShmSegment, Vma, VmaKind};
use crate::sys::shm::{self, ShmError, SHM_DEST, SHM_LOCKED};

use super::plan::PageFill;

#[derive(Debug, thiserror::Error)]
pub enum SysvError {
    #[error("SysV shm segment key {key:#x} shmid {shmid}: id {shmid} is taken by an existing segment (remove it, e.g. ipcrm -m {shmid}, or restore into a new pid namespace)")]
    IdTaken { key: i32, shmid: i32 },
    #[error(
        "SysV shm segment key {key:#x} shmid {shmid}: key {key:#x} is taken by segment {existing}"
    )]
    KeyTaken { key: i32, shmid: i32, existing: i32 },
    #[error("SysV shm segment key {key:#x} shmid {shmid}: created with id {got} instead; processes may hold id {shmid}")]
    IdDiffers { key: i32, shmid: i32, got: i32 },
    #[error("SysV shm segment key {key:#x} shmid {shmid}: {source}")]
    Shm {
        key: i32,
        shmid: i32,
        #[source]
        source: ShmError,
    },
    #[error("SysV shm segment shmid {shmid} is attached but not in the image's sysv_shm")]
    Unrecorded { shmid: i32 },
    #[error("creating a new IPC namespace for the tree's SysV segments: {0}")]
    Namespace(nix::Error),
    #[error(
        "{count} SysV shm segments: at most {max} can be restored outside a new IPC namespace"
    )]
    TooMany { count: usize, max: usize },
}

/// Enters a new IPC namespace (this process and every process it forks).
pub fn enter_new_namespace() -> Result<(), SysvError> {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWIPC).map_err(SysvError::Namespace)
}

/// Whether segment `existing` is `s` itself, left behind by the dumped
/// tree and unused since: the same key, id, size and creator pid, nobody
/// attached now, and nobody attached it after the dump (at `dumped_at`,
/// seconds since the epoch), so it still holds what the image holds.
fn left_by_the_dumped_tree(s: &SysvShmSegment, existing: i32, dumped_at: u64) -> bool {
    existing == s.shmid
        && shm::stat(existing).is_ok_and(|st| {
            st.nattch == 0
                && st.size == s.size
                && st.cpid == s.cpid
                && st.key == s.key
                && st.atime <= dumped_at as i64
        })
}

/// Creates `s` again with its id, key, size, owner and mode (`scratch`:
/// see `shm::set_next_id`).
fn create_one(s: &SysvShmSegment, dumped_at: u64, scratch: &Path) -> Result<i32, SysvError> {
    let err = |source| SysvError::Shm {
        key: s.key,
        shmid: s.shmid,
        source,
    };
    if let Some(existing) = shm::find_key(s.key) {
        if left_by_the_dumped_tree(s, existing, dumped_at) {
            // What the tree killed by `dump --exit` left (PostgreSQL keeps
            // such a segment as an interlock): replaced by the image's.
            shm::remove(existing).map_err(err)?;
        } else {
            return Err(SysvError::KeyTaken {
                key: s.key,
                shmid: s.shmid,
                existing,
            });
        }
    }
    if shm::stat(s.shmid).is_ok() {
        if left_by_the_dumped_tree(s, s.shmid, dumped_at) {
            shm::remove(s.shmid).map_err(err)?;
        } else {
            return Err(SysvError::IdTaken {
                key: s.key,
                shmid: s.shmid,
            });
        }
    }
    shm::set_next_id(s.shmid, scratch).map_err(err)?;
    let got = match shm::create(s.key, s.size, s.mode) {
        Ok(id) => id,
        Err(e) => {
            // The chosen id was not used: do not leave it to someone else.
            let _ = shm::clear_next_id();
            return Err(err(e));
        }
    };
    let finish = || -> Result<(), SysvError> {
        if got != s.shmid {
            return Err(SysvError::IdDiffers {
                key: s.key,
                shmid: s.shmid,
                got,
            });
        }
        shm::set_owner(got, s.uid, s.gid, s.mode).map_err(err)?;
        if s.mode & SHM_LOCKED != 0 {
            shm::lock(got).map_err(err)?;
        }
        Ok(())
    };
    if let Err(e) = finish() {
        let _ = shm::remove(got);
        return Err(e);
    }
    Ok(got)
}

/// Creates every segment, in image order; `record` is told each id right
/// after its creation. On failure the segments created so far are removed.
pub fn create_all(
    segments: &[SysvShmSegment],
    dumped_at: u64,
    scratch: &Path,
    mut record: impl FnMut(i32),
) -> Result<(), SysvError> {
    let mut created = Vec::with_capacity(segments.len());
    for s in segments {
        match create_one(s, dumped_at, scratch) {
            Ok(id) => {
                record(id);
                created.push(id);
            }
            Err(e) => {
                for id in created {
                    let _ = shm::remove(id);
                }
                return Err(e);
            }
        }
    }
    Ok(())
}

/// Stored pages of `s` that no VMA of the tree (`vmas`: every VMA of
/// every process) shows, as fills at segment offsets: the holder of the
/// attachment writes the others.
pub fn unmapped_fills<'a>(
    s: &SysvShmSegment,
    vmas: impl IntoIterator<Item = &'a Vma>,
    page: u64,
) -> Vec<PageFill> {
    let mut mapped: HashSet<u64> = HashSet::new();
    for v in vmas
        .into_iter()
        .filter(|v| v.kind == VmaKind::SysvShm && v.inode as i32 == s.shmid)
    {
        for run in &v.pages {
            if let PageRun::Stored { start, pages, .. } = *run {
                for k in 0..pages {
                    mapped.insert(v.offset + (start - v.start) + k * page);
                }
            }
        }
    }
    let mut fills: Vec<PageFill> = Vec::new();
    for run in &s.pages {
        let PageRun::Stored {
            start,
            pages,
            first,
        } = *run
        else {
            continue;
        };
        for k in 0..pages {
            let offset = start + k * page;
            if mapped.contains(&offset) {
                continue;
            }
            match fills.last_mut() {
                Some(f)
                    if f.offset + f.pages * page == offset && f.first + f.pages == first + k =>
                {
                    f.pages += 1
                }
                _ => fills.push(PageFill {
                    offset,
                    pages: 1,
                    first: first + k,
                }),
            }
        }
    }
    fills
}

/// Whether the segment was removed (IPC_RMID) while attached: it goes
/// again once its holder has attached it (or at once if nobody in the
/// tree has it attached).
pub fn destroyed(s: &SysvShmSegment) -> bool {
    s.mode & SHM_DEST != 0
}

/// The holder's staging attachment of `shmid`: the segment's first `len`
/// bytes at `staging`. A destroyed segment is removed again right after.
pub fn attach_staging(
    shmid: i32,
    staging: u64,
    len: u64,
    segments: &[SysvShmSegment],
) -> Result<crate::sys::mem::Mapping, SysvError> {
    let s = segments
        .iter()
        .find(|s| s.shmid == shmid)
        .ok_or(SysvError::Unrecorded { shmid })?;
    let err = |source| SysvError::Shm {
        key: s.key,
        shmid,
        source,
    };
    shm::attach_at(shmid, s.size, staging, len).map_err(err)?;
    if destroyed(s) {
        shm::remove(shmid).map_err(err)?;
    }
    Ok(crate::sys::mem::Mapping { addr: staging, len })
}

/// After a failed restore: removes the recorded segments that the restored
/// root (`creator`, as this process sees its pid) created.
pub fn remove_created(ids: &[i32], creator: i32) {
    for &id in ids {
        if shm::stat(id).is_ok_and(|st| st.cpid == creator) {
            let _ = shm::remove(id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::shm::tests::NEXT_ID_LOCK;

    const P: u64 = 4096;

    fn segment(shmid: i32, key: i32, pages: Vec<PageRun>) -> SysvShmSegment {
        SysvShmSegment {
            key,
            shmid,
            size: 3 * P + 10,
            uid: 5,
            gid: 6,
            cuid: 0,
            cgid: 0,
            mode: 0o640,
            cpid: 1,
            lpid: 1,
            nattch: 0,
            pages,
        }
    }

    #[test]
    fn fills_skip_pages_a_vma_stores() {
        let s = segment(
            9,
            0,
            vec![
                PageRun::Stored {
                    start: 0,
                    pages: 3,
                    first: 40,
                },
                PageRun::Absent {
                    start: 3 * P,
                    pages: 1,
                },
            ],
        );
        let window = Vma {
            start: 0x10000,
            end: 0x11000,
            prot: 3,
            shared: true,
            kind: VmaKind::SysvShm,
            path: None,
            deleted: true,
            dev: 1,
            inode: 9,
            offset: P,
            vm_flags: vec![],
            pages: vec![PageRun::Stored {
                start: 0x10000,
                pages: 1,
                first: 41,
            }],
        };
        let fills = unmapped_fills(&s, [&window], P);
        assert_eq!(
            fills,
            vec![
                PageFill {
                    offset: 0,
                    pages: 1,
                    first: 40
                },
                PageFill {
                    offset: 2 * P,
                    pages: 1,
                    first: 42
                },
            ]
        );
        assert_eq!(unmapped_fills(&s, [], P).len(), 1);
    }

    #[test]
    fn create_all_restores_ids_owner_and_mode_and_cleans_up_on_failure() {
        let _lock = NEXT_ID_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        // Ids far from what the kernel hands out by default.
        let a = segment(0x7123 + (7 << 15), 0, vec![]);
        let b = segment(0x7124 + (7 << 15), 0x5eed_0001, vec![]);
        let mut seen = Vec::new();
        // Used only where /proc/sys is read-only.
        let scratch_dir = tempfile::tempdir().expect("tempdir");
        let scratch = scratch_dir.path().join("proc");
        create_all(&[a.clone(), b.clone()], 0, &scratch, |id| seen.push(id)).expect("create");
        assert_eq!(seen, vec![a.shmid, b.shmid]);
        for s in [&a, &b] {
            let st = shm::stat(s.shmid).expect("stat");
            assert_eq!(
                (st.key, st.size, st.uid, st.gid, st.mode & 0o777),
                (s.key, s.size, 5, 6, 0o640)
            );
        }
        // b's key and a's id are taken now: nothing new stays behind.
        let c = segment(0x7125 + (7 << 15), 0, vec![]);
        let mut again = Vec::new();
        let err = create_all(&[c.clone(), b.clone()], 0, &scratch, |id| again.push(id))
            .expect_err("taken");
        assert!(
            matches!(
                err,
                SysvError::KeyTaken {
                    key: 0x5eed_0001,
                    ..
                }
            ),
            "{err}"
        );
        assert_eq!(again, vec![c.shmid]);
        assert!(shm::stat(c.shmid).is_err(), "c was removed");
        let err = create_all(std::slice::from_ref(&a), 0, &scratch, |_| {}).expect_err("id taken");
        assert!(err.to_string().contains(&a.shmid.to_string()), "{err}");
        remove_created(&[a.shmid, b.shmid], std::process::id() as i32);
        assert!(shm::stat(a.shmid).is_err() && shm::stat(b.shmid).is_err());
    }
}
