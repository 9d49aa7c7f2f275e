//! Test fixtures for the image module: a small valid image written with the
//! real writer, and helpers that break it in exactly one way (fixing the
//! manifest so only the intended check can fire).
//!
//! The image: root 100 and child 101, 5 unique pages in frames of 2 pages.
//! Page ids 0 and 1 are referenced by both processes (shared), 2 and 3 by
//! the root only, 4 by the child only.

use std::path::{Path, PathBuf};

use serde_json::Value;
use xxhash_rust::xxh3::xxh3_128;

use super::pagestore::PageStoreOptions;
use super::types::*;
use super::ImageWriter;

pub const ROOT: i32 = 100;
pub const CHILD: i32 = 101;
pub const PAGES: u64 = 5;
pub const PS: u64 = 4096;

/// Page contents derived from `seed`: half pseudo-random, half zero.
pub fn page(seed: u64) -> Vec<u8> {
    let mut out = vec![0u8; PS as usize];
    let mut x = seed.wrapping_add(1).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    for chunk in out[..PS as usize / 2].chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes());
    }
    out
}

fn entry(pid: i32, ppid: i32) -> ProcessEntry {
    ProcessEntry {
        pid,
        ppid,
        pgid: ROOT,
        sid: ROOT,
        nspid: vec![pid],
        tids: vec![pid],
        comm: format!("proc{pid}"),
        exe: "/bin/true".into(),
        cwd: "/".into(),
        root: "/".into(),
        umask: 0o022,
        creds: Creds {
            uids: [0; 4],
            gids: [0; 4],
            groups: vec![],
            cap_inheritable: 0,
            cap_permitted: u64::MAX,
            cap_effective: u64::MAX,
            cap_bounding: u64::MAX,
            cap_ambient: 0,
            securebits: 0,
            no_new_privs: false,
            seccomp_mode: 0,
            seccomp_filters: vec![],
        },
        rlimits: vec![Rlimit {
            resource: 7,
            name: "nofile".into(),
            soft: 1024,
            hard: 4096,
        }],
        namespaces: vec![NamespaceId {
            kind: "pid".into(),
            inode: 4026531836,
        }],
        file: process_file_name(pid),
        zombie: None,
    }
}

pub fn tree() -> Tree {
    Tree {
        processes: vec![entry(ROOT, 0), entry(CHILD, ROOT)],
        sysv_shm: Vec::new(),
        saved_files: Vec::new(),
        file_sizes: Default::default(),
        mount_ns: None,
    }
}

pub fn pipes() -> Vec<PipeImage> {
    vec![PipeImage {
        inode: 77,
        data: "6869".into(),
        capacity: 65536,
    }]
}

pub fn vma(start: u64, end: u64, pages: Vec<PageRun>) -> Vma {
    Vma {
        start,
        end,
        prot: 3,
        shared: false,
        kind: VmaKind::PrivateAnon,
        path: None,
        deleted: false,
        dev: 0,
        inode: 0,
        offset: 0,
        vm_flags: vec!["rd".into(), "wr".into()],
        pages,
    }
}

/// The memory image of `ROOT` or `CHILD` (anything else gets the child's layout).
pub fn process(pid: i32) -> ProcessImage {
    let shared = vma(
        0x10000,
        0x14000,
        vec![
            PageRun::Stored {
                start: 0x10000,
                pages: 2,
                first: 0,
            },
            PageRun::Zero {
                start: 0x12000,
                pages: 1,
            },
            PageRun::Absent {
                start: 0x13000,
                pages: 1,
            },
        ],
    );
    let own = if pid == ROOT {
        vma(
            0x20000,
            0x22000,
            vec![PageRun::Stored {
                start: 0x20000,
                pages: 2,
                first: 2,
            }],
        )
    } else {
        vma(
            0x30000,
            0x31000,
            vec![PageRun::Stored {
                start: 0x30000,
                pages: 1,
                first: 4,
            }],
        )
    };
    ProcessImage {
        unmapped_shmem: Vec::new(),
        posix_timers: Vec::new(),
        runs_file: None,
        pid,
        mm: MmFields {
            start_code: 0x400000,
            end_code: 0x401000,
            start_data: 0x402000,
            end_data: 0x403000,
            start_brk: 0x404000,
            brk: 0x405000,
            start_stack: 0x7ffd0000,
            arg_start: 0x7ffd1000,
            arg_end: 0x7ffd1010,
            env_start: 0x7ffd1010,
            env_end: 0x7ffd1020,
            auxv: vec![[6, 4096]],
            exe_file: "/bin/true".into(),
        },
        vmas: vec![shared, own],
        fds: vec![Fd {
            fd: 0,
            flags: 0,
            kind: FdKind::Pipe { inode: 77 },
        }],
        signals: ProcessSignals {
            actions: vec![
                SigAction {
                    handler: 0,
                    flags: 0,
                    restorer: 0,
                    mask: 0,
                };
                64
            ],
            shared_pending: vec![],
        },
        itimers: Itimers::default(),
        threads: vec![ThreadImage {
            tid: pid,
            nstid: vec![pid],
            regs: UserRegs::default(),
            xsave: "00".repeat(16),
            sigmask: 0,
            pending: vec![],
            sigaltstack: SigAltStack::default(),
            clear_child_tid: 0,
            rseq: None,
            comm: format!("proc{pid}"),
        }],
    }
}

/// Appends the fixture's pages and writes every metadata file.
pub fn fill(mut w: ImageWriter) -> ImageWriter {
    let pages: Vec<u8> = (0..PAGES).flat_map(page).collect();
    assert_eq!(w.pages().append(&pages).unwrap(), 0);
    w.write_tree(&tree()).unwrap();
    w.write_process(&process(ROOT)).unwrap();
    w.write_process(&process(CHILD)).unwrap();
    w.write_pipes(&pipes()).unwrap();
    w
}

/// Writes the fixture image to `parent/img` with 2-page frames; returns its path.
pub fn build(parent: &Path) -> PathBuf {
    let dir = parent.join("img");
    let options = PageStoreOptions {
        pages_per_frame: 2,
        level: 1,
        workers: 2,
    };
    let w = ImageWriter::create_with(&dir, PS, options).unwrap();
    fill(w).commit(ROOT).unwrap();
    dir
}

/// Applies `f` to manifest.json (no other fix-up).
pub fn edit_manifest(dir: &Path, f: impl FnOnce(&mut Value)) {
    let path = dir.join(MANIFEST_FILE);
    let mut value: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    f(&mut value);
    std::fs::write(&path, serde_json::to_vec_pretty(&value).unwrap()).unwrap();
}

/// Replaces file `name` and fixes its size and checksum in the manifest.
pub fn rewrite(dir: &Path, name: &str, bytes: &[u8]) {
    std::fs::write(dir.join(name), bytes).unwrap();
    let size = bytes.len() as u64;
    let hash = format!("{:032x}", xxh3_128(bytes));
    edit_manifest(dir, |m| {
        let files = m["files"].as_array_mut().unwrap();
        let entry = files.iter_mut().find(|f| f["name"] == name).unwrap();
        entry["size"] = size.into();
        entry["xxh3_128"] = hash.into();
    });
}

/// Applies `f` to JSON file `name` and fixes the manifest. A process file
/// is edited with its page runs inline (`vmas[i].pages`, as in images
/// before format 1.5) and written back that way, without `runs_file`.
pub fn edit_json(dir: &Path, name: &str, f: impl FnOnce(&mut Value)) {
    let mut value: Value = serde_json::from_slice(&std::fs::read(dir.join(name)).unwrap()).unwrap();
    if let Some(runs) = value
        .get("runs_file")
        .and_then(|r| r.as_str())
        .map(String::from)
    {
        let mut process: crate::image::types::ProcessImage =
            serde_json::from_value(value.clone()).unwrap();
        let bytes = std::fs::read(dir.join(&runs)).unwrap();
        crate::image::runs::decode_into(&runs, &bytes, &mut process.vmas, 4096).unwrap();
        process.runs_file = None;
        value = serde_json::to_value(&process).unwrap();
    }
    f(&mut value);
    rewrite(dir, name, &serde_json::to_vec(&value).unwrap());
}
