//! Per-process facts that /proc and prlimit report (identity, creds, caps,
//! rlimits, links, namespaces, mm fields), turned into the image's
//! `ProcessEntry` and `MmFields`, and the parents-first order of `tree.json`.
//! Reads only; what needs ptrace comes from `task_state`. A zombie's entry
//! ([`zombie_entry`]) holds its identity and its exit status only.

use std::collections::{BTreeMap, HashSet};

use crate::image::types::{
    process_file_name, Creds, Itimers, MmFields, NamespaceId, ProcessEntry, ProcessImage,
    ProcessSignals, Rlimit, ZombieExit,
};
use crate::sys::process::{get_rlimit, ProcessError, RLIMIT_NAMES};
use crate::sys::procfs::{
    parse_stat, proc_path, read_auxv, read_comm, read_link, read_namespaces, read_stat,
    read_status, ProcfsError, Stat, Status,
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
    #[error("{path}: {source}")]
    Read {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("pid {pid} was a zombie when the tree was seized but is now in state {state}")]
    NoLongerZombie { pid: i32, state: char },
    #[error("pid {pid}: exit_code (field 52 of /proc/PID/stat) {field:?} is not an exit status")]
    BadExitCode { pid: i32, field: String },
    #[error("refusing to dump pid 1: it is the init of cowsnap's own pid namespace, so its tree holds every process of that namespace (the machine, in the host's), cowsnap included")]
    NamespaceInit,
    #[error("refusing to dump pid {pid}: this cowsnap process runs inside its tree (pid {pid} is one of its ancestors), and seizing its tree would stop the dumper itself")]
    ContainsDumper { pid: i32 },
}

/// Refuses, before anything is seized, a root whose tree would hold the
/// dumper: pid 1 of its pid namespace, itself, or any of its ancestors
/// (the tree is a root and its descendants, so it holds the dumper exactly
/// when the root is on the dumper's parent chain).
pub fn refuse_own_tree(root: i32) -> Result<(), TreeError> {
    if root == 1 {
        return Err(TreeError::NamespaceInit);
    }
    let mut pid = std::process::id() as i32;
    // A chain longer than pid_max would be a cycle read through races.
    for _ in 0..4_194_304 {
        if pid == root {
            return Err(TreeError::ContainsDumper { pid: root });
        }
        // 0: the parent is outside this pid namespace.
        if pid <= 1 {
            break;
        }
        pid = read_stat(pid)?.ppid;
    }
    Ok(())
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
        zombie: None,
    }
}

/// `exit_code`, field 52 of /proc/PID/stat: for a zombie, its wait status.
pub fn stat_exit_code(stat: &str) -> Option<&str> {
    // comm may hold anything: fields start after the last ')', at field 3.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(52 - 3)
}

/// The process file of a zombie: nothing (no memory, fds, signals, threads).
pub fn zombie_image(pid: i32) -> ProcessImage {
    ProcessImage {
        unmapped_shmem: Vec::new(),
        posix_timers: Vec::new(),
        runs_file: None,
        pid,
        mm: MmFields::default(),
        vmas: Vec::new(),
        fds: Vec::new(),
        signals: ProcessSignals {
            actions: Vec::new(),
            shared_pending: Vec::new(),
        },
        itimers: Itimers::default(),
        threads: Vec::new(),
    }
}

/// `tree.json` entry of the zombie `pid` (child of `ppid` in the tree):
/// identity, session and process group, and exit status. Its parent is
/// stopped, so it cannot be reaped while this reads.
pub fn zombie_entry(pid: i32, ppid: i32) -> Result<ProcessEntry, TreeError> {
    let path = proc_path(pid, "stat");
    let text = std::fs::read_to_string(&path).map_err(|source| TreeError::Read {
        path: path.clone(),
        source,
    })?;
    let stat = parse_stat(&path, &text)?;
    if stat.state != 'Z' {
        return Err(TreeError::NoLongerZombie {
            pid,
            state: stat.state,
        });
    }
    let field = stat_exit_code(&text).unwrap_or("");
    let zombie = field
        .parse::<u32>()
        .ok()
        .and_then(ZombieExit::from_wait_status)
        .ok_or_else(|| TreeError::BadExitCode {
            pid,
            field: field.to_string(),
        })?;
    let st = read_status(pid)?;
    Ok(ProcessEntry {
        pid,
        ppid,
        pgid: stat.pgrp,
        sid: stat.session,
        nspid: st.nspid.clone(),
        tids: Vec::new(),
        comm: stat.comm.clone(),
        exe: String::new(),
        cwd: String::new(),
        root: String::new(),
        umask: 0,
        creds: Creds {
            uids: st.uids,
            gids: st.gids,
            groups: st.groups,
            ..Creds::default()
        },
        rlimits: Vec::new(),
        namespaces: Vec::new(),
        file: process_file_name(pid),
        zombie: Some(zombie),
    })
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
    fn own_tree_refused_for_init_self_and_ancestors_only() {
        assert!(matches!(refuse_own_tree(1), Err(TreeError::NamespaceInit)));
        let me = std::process::id() as i32;
        let parent = nix::unistd::getppid().as_raw();
        for pid in [me, parent] {
            let err = refuse_own_tree(pid).expect_err("an ancestor of the dumper");
            assert!(err.to_string().contains(&format!("pid {pid}")), "{err}");
        }
        let mut child = std::process::Command::new("sleep")
            .arg("10")
            .spawn()
            .expect("spawn sleep");
        let result = refuse_own_tree(child.id() as i32);
        let _ = child.kill();
        let _ = child.wait();
        result.expect("a child of the dumper is not its ancestor");
    }

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
    fn exit_code_is_field_52_whatever_comm_holds() {
        let mut fields: Vec<String> = (3..=52).map(|n| n.to_string()).collect();
        fields[0] = "Z".into();
        fields[52 - 3] = "768".into();
        let text = format!("42 (a) b) c) {}\n", fields.join(" "));
        assert_eq!(stat_exit_code(&text), Some("768"));
        assert_eq!(stat_exit_code("42 (x) Z 1 2"), None);
    }

    #[test]
    fn zombie_entry_records_exit_status_and_identity() {
        use std::os::unix::process::ExitStatusExt;
        for (script, want) in [
            ("exit 7", ZombieExit::Exited { code: 7 }),
            (
                "kill -TERM $$",
                ZombieExit::Killed {
                    signal: libc::SIGTERM as u8,
                    core_dumped: false,
                },
            ),
        ] {
            let mut child = std::process::Command::new("sh")
                .args(["-c", script])
                .spawn()
                .expect("spawn sh");
            let pid = child.id() as i32;
            // Not reaped before the check: it stays a zombie of this process.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while read_stat(pid).map(|s| s.state).ok() != Some('Z') {
                assert!(
                    std::time::Instant::now() < deadline,
                    "pid {pid} not a zombie"
                );
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            let me = std::process::id() as i32;
            let entry = zombie_entry(pid, me).expect("zombie entry");
            assert_eq!(entry.zombie, Some(want), "{script}");
            assert_eq!((entry.pid, entry.ppid), (pid, me));
            assert_eq!(entry.nspid.last(), Some(&pid));
            assert!(entry.tids.is_empty());
            assert_eq!(entry.comm, "sh");
            let stat = read_stat(me).expect("own stat");
            assert_eq!((entry.pgid, entry.sid), (stat.pgrp, stat.session));
            // What waitpid reports is what was recorded.
            let status = child.wait().expect("wait");
            assert_eq!(status.into_raw() as u32, want.wait_status(), "{script}");
            assert!(zombie_entry(pid, me).is_err(), "reaped: no entry");
        }
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
