//! Per-process facts that /proc and prlimit report (identity, creds, caps,
//! rlimits, links, namespaces, mm fields), turned into the image's
//! `ProcessEntry` and `MmFields`, and the parents-first order of `tree.json`.
//! Reads only; what needs ptrace comes from `task_state`.

use std::collections::{BTreeMap, HashSet};

use crate::image::types::{process_file_name, Creds, MmFields, NamespaceId, ProcessEntry, Rlimit};
use crate::sys::process::{get_rlimit, ProcessError, RLIMIT_NAMES};
use crate::sys::procfs::{
    proc_path, read_auxv, read_comm, read_link, read_namespaces, read_stat, read_status,
    ProcfsError, Stat, Status,
};

use super::task_state::TaskState;

#[derive(Debug, thiserror::Error)]
pub enum TreeError {
    #[error(transparent)]
    Procfs(#[from] ProcfsError),
    #[error(transparent)]
    Rlimit(#[from] ProcessError),
    #[error("pid {pid}: parent {ppid} is not in the dumped set (only the root may have an outside parent)")]
    OutsideParent { pid: i32, ppid: i32 },
    #[error("root pid {root} is not among the processes to dump")]
    RootMissing { root: i32 },
}

/// What /proc says about one process, read once while it is stopped.
#[derive(Debug, Clone)]
pub struct ProcFacts {
    pub stat: Stat,
    pub status: Status,
    pub comm: String,
    pub exe: String,
    pub cwd: String,
    pub root: String,
    pub auxv: Vec<[u64; 2]>,
    pub rlimits: Vec<Rlimit>,
    pub namespaces: Vec<NamespaceId>,
}

/// Reads every fact of `pid` that needs no ptrace.
pub fn read_facts(pid: i32) -> Result<ProcFacts, TreeError> {
    let stat = read_stat(pid)?;
    let status = read_status(pid)?;
    let mut rlimits = Vec::with_capacity(RLIMIT_NAMES.len());
    for (resource, name) in RLIMIT_NAMES.iter().enumerate() {
        let (soft, hard) = get_rlimit(pid, resource as u32)?;
        rlimits.push(Rlimit {
            resource: resource as u32,
            name: name.to_string(),
            soft,
            hard,
        });
    }
    // A kernel thread or a zombie has no exe: keep it empty rather than fail here.
    let exe = read_link(&proc_path(pid, "exe")).unwrap_or_default();
    Ok(ProcFacts {
        comm: read_comm(pid)?,
        exe,
        cwd: read_link(&proc_path(pid, "cwd"))?,
        root: read_link(&proc_path(pid, "root"))?,
        auxv: read_auxv(pid)?,
        rlimits,
        namespaces: read_namespaces(pid)?
            .into_iter()
            .map(|(kind, inode)| NamespaceId { kind, inode })
            .collect(),
        stat,
        status,
    })
}

/// `tree.json` entry of a process. `ppid` 0 marks the root of the dump.
pub fn process_entry(
    pid: i32,
    ppid: i32,
    tids: &[i32],
    facts: &ProcFacts,
    state: &TaskState,
) -> ProcessEntry {
    let st = &facts.status;
    ProcessEntry {
        pid,
        ppid,
        pgid: facts.stat.pgrp,
        sid: facts.stat.session,
        nspid: st.nspid.clone(),
        tids: tids.to_vec(),
        comm: facts.comm.clone(),
        exe: facts.exe.clone(),
        cwd: facts.cwd.clone(),
        root: facts.root.clone(),
        umask: st.umask,
        creds: Creds {
            uids: st.uids,
            gids: st.gids,
            groups: st.groups.clone(),
            cap_inheritable: st.cap_inheritable,
            cap_permitted: st.cap_permitted,
            cap_effective: st.cap_effective,
            cap_bounding: st.cap_bounding,
            cap_ambient: st.cap_ambient,
            securebits: state.securebits,
            no_new_privs: st.no_new_privs,
            seccomp_mode: st.seccomp,
            seccomp_filters: state.seccomp_filters.clone(),
        },
        rlimits: facts.rlimits.clone(),
        namespaces: facts.namespaces.clone(),
        file: process_file_name(pid),
    }
}

pub fn mm_fields(facts: &ProcFacts, brk: u64) -> MmFields {
    let s = &facts.stat;
    MmFields {
        start_code: s.start_code,
        end_code: s.end_code,
        start_data: s.start_data,
        end_data: s.end_data,
        start_brk: s.start_brk,
        brk,
        start_stack: s.start_stack,
        arg_start: s.arg_start,
        arg_end: s.arg_end,
        env_start: s.env_start,
        env_end: s.env_end,
        auxv: facts.auxv.clone(),
        exe_file: facts.exe.clone(),
    }
}

/// Orders `(pid, ppid)` pairs parents first (pre-order from `root`, children
/// by pid). Every process but the root must have its parent in the set.
pub fn preorder(root: i32, procs: &[(i32, i32)]) -> Result<Vec<i32>, TreeError> {
    let pids: HashSet<i32> = procs.iter().map(|p| p.0).collect();
    if !pids.contains(&root) {
        return Err(TreeError::RootMissing { root });
    }
    let mut children: BTreeMap<i32, Vec<i32>> = BTreeMap::new();
    for &(pid, ppid) in procs {
        if pid == root {
            continue;
        }
        if !pids.contains(&ppid) {
            return Err(TreeError::OutsideParent { pid, ppid });
        }
        children.entry(ppid).or_default().push(pid);
    }
    let mut out = Vec::with_capacity(procs.len());
    let mut stack = vec![root];
    while let Some(pid) = stack.pop() {
        out.push(pid);
        if let Some(kids) = children.get_mut(&pid) {
            kids.sort_unstable();
            stack.extend(kids.iter().rev());
        }
    }
    if out.len() != procs.len() {
        // A cycle cannot happen with real ppids; a process unreachable from the
        // root has an ancestor chain that misses it.
        let reached: HashSet<i32> = out.iter().copied().collect();
        if let Some(&(pid, ppid)) = procs.iter().find(|p| !reached.contains(&p.0)) {
            return Err(TreeError::OutsideParent { pid, ppid });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preorder_parents_first() {
        let procs = [(10, 1), (13, 11), (11, 10), (12, 10), (14, 12)];
        assert_eq!(
            preorder(10, &procs).expect("order"),
            vec![10, 11, 13, 12, 14]
        );
    }

    #[test]
    fn preorder_refuses_outside_parent_and_missing_root() {
        let procs = [(10, 1), (11, 10), (20, 5)];
        match preorder(10, &procs) {
            Err(TreeError::OutsideParent { pid: 20, ppid: 5 }) => {}
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            preorder(99, &procs),
            Err(TreeError::RootMissing { root: 99 })
        ));
    }

    #[test]
    fn facts_of_self() {
        let pid = std::process::id() as i32;
        let f = read_facts(pid).expect("facts");
        assert_eq!(f.rlimits.len(), 16);
        assert_eq!(f.rlimits[libc::RLIMIT_NOFILE as usize].name, "nofile");
        assert!(f.exe.ends_with(
            &*std::env::current_exe()
                .expect("exe")
                .file_name()
                .expect("name")
                .to_string_lossy()
        ));
        assert_eq!(
            f.cwd,
            std::env::current_dir().expect("cwd").to_string_lossy()
        );
        assert_eq!(f.root, "/");
        assert!(f.namespaces.iter().any(|n| n.kind == "pid" && n.inode > 0));
        let mm = mm_fields(&f, 1234);
        assert_eq!(mm.brk, 1234);
        assert!(mm.arg_start < mm.arg_end);
    }
}
