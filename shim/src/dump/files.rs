//! Sizes of the files a process depends on by path (its executable and its
//! file mappings), so that restore can tell a file that was replaced by
//! another of a different size. Read through /proc/PID/root: a container's
//! paths resolve in the container's root, not the dumper's.

use std::collections::BTreeMap;

use crate::image::types::{Vma, VmaKind};

const DELETED_SUFFIX: &str = " (deleted)";

/// Adds the size of `exe` and of every file `vmas` map (by path) to `out`;
/// the first process that names a path decides its size.
pub fn record(pid: i32, exe: &str, vmas: &[Vma], out: &mut BTreeMap<String, u64>) {
    let mapped = vmas
        .iter()
        .filter(|v| matches!(v.kind, VmaKind::PrivateFile | VmaKind::SharedFile) && !v.deleted)
        .filter_map(|v| v.path.as_deref());
    for path in std::iter::once(exe).chain(mapped) {
        if !path.starts_with('/') || path.ends_with(DELETED_SUFFIX) || out.contains_key(path) {
            continue;
        }
        // Unreadable now (gone mid-dump): restore still checks it exists.
        if let Ok(meta) = std::fs::metadata(format!("/proc/{pid}/root{path}")) {
            out.insert(path.to_string(), meta.len());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_the_executable_and_mapped_files_of_a_live_process() {
        let pid = std::process::id() as i32;
        let exe = std::fs::read_link("/proc/self/exe").expect("exe");
        let exe = exe.to_str().expect("utf-8 exe path");
        let maps = crate::sys::procfs::read_smaps(pid).expect("smaps");
        let vmas: Vec<Vma> = maps
            .iter()
            .filter(|m| m.path.starts_with('/'))
            .map(|m| Vma {
                start: m.start,
                end: m.end,
                prot: 1,
                shared: false,
                kind: VmaKind::PrivateFile,
                path: Some(m.path.clone()),
                deleted: false,
                dev: 0,
                inode: 0,
                offset: 0,
                vm_flags: Vec::new(),
                pages: Vec::new(),
            })
            .collect();
        let mut out = BTreeMap::new();
        record(pid, exe, &vmas, &mut out);
        let size = std::fs::metadata(exe).expect("stat exe").len();
        assert_eq!(out.get(exe), Some(&size));
        for v in &vmas {
            let path = v.path.as_deref().expect("path");
            let real = std::fs::metadata(path).expect("stat").len();
            assert_eq!(out.get(path), Some(&real), "{path}");
        }
        // Relative names ("[heap]"-like) and deleted files are not recorded.
        let mut none = BTreeMap::new();
        record(pid, "/nonexistent/x (deleted)", &[], &mut none);
        assert!(none.is_empty());
    }
}
