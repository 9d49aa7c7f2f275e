//! Tests of the fd restore: the pure plan (stdio policy, refusals) on
//! synthetic images, and `install` against the real kernel in a forked child.

use super::*;
use crate::image::types::{Itimers, MmFields, ProcessSignals, SigAction};
use crate::sys::restore_sys::{self, in_child};

pub(crate) fn process(pid: i32, fds: Vec<Fd>) -> ProcessImage {
    ProcessImage {
        unmapped_shmem: Vec::new(),
        posix_timers: Vec::new(),
        runs_file: None,
        pid,
        mm: MmFields {
            exe_file: "/bin/true".into(),
            ..MmFields::default()
        },
        vmas: vec![],
        fds,
        signals: ProcessSignals {
            actions: vec![
                SigAction {
                    handler: 0,
                    flags: 0,
                    restorer: 0,
                    mask: 0
                };
                64
            ],
            shared_pending: vec![],
        },
        itimers: Itimers::default(),
        threads: vec![],
    }
}

fn fd(fd: RawFd, flags: i32, kind: FdKind) -> Fd {
    Fd {
        fd,
        flags: flags as u32,
        kind,
    }
}

fn pipe(inode: u64) -> FdKind {
    FdKind::Pipe { inode }
}

fn tty() -> FdKind {
    FdKind::Tty {
        path: "/dev/pts/3".into(),
        rdev: 0,
    }
}

/// A PipeSet with made-up fd numbers (read 1000 + 2i, write 1001 + 2i), no kernel pipes.
fn fake_pipes(processes: &[ProcessImage]) -> PipeSet {
    let usage = pipe_usage(processes).expect("usage");
    PipeSet {
        ends: usage
            .keys()
            .enumerate()
            .map(|(i, &inode)| {
                let read = 1000 + 2 * i as RawFd;
                (
                    inode,
                    PipeEnds {
                        read,
                        write: read + 1,
                    },
                )
            })
            .collect(),
        external: usage
            .iter()
            .filter(|(_, u)| u.external())
            .map(|(i, _)| *i)
            .collect(),
        files: shared_files(processes)
            .keys()
            .map(|&id| (id, 2000 + id as RawFd))
            .collect(),
        sockets: Default::default(),
        signalfd_registrants: Default::default(),
        saved: Default::default(),
    }
}

fn sources(placements: &[Placement]) -> Vec<(RawFd, Source<'static>)> {
    placements
        .iter()
        .map(|p| {
            let s = match &p.source {
                Source::Dup(fd) => Source::Dup(*fd),
                Source::Open { path, flags, pos } => Source::Open {
                    path: path.to_string().into(),
                    flags: *flags,
                    pos: *pos,
                },
            };
            (p.fd, s)
        })
        .collect()
}

const INHERIT: Stdio = Stdio::Inherit {
    fds: [200, 201, 202],
};

/// Root: 0 tty, 1 write end of pipe 10 (its reader is outside the tree),
/// 2 write end of pipe 11 whose read end the child holds as its fd 0.
fn shell_tree() -> Vec<ProcessImage> {
    vec![
        process(
            1,
            vec![
                fd(0, libc::O_RDWR, tty()),
                fd(1, libc::O_WRONLY, pipe(10)),
                fd(2, libc::O_WRONLY, pipe(11)),
                fd(5, libc::O_RDWR, tty()),
            ],
        ),
        process(
            2,
            vec![
                fd(0, libc::O_RDONLY, pipe(11)),
                fd(1, libc::O_WRONLY, pipe(10)),
            ],
        ),
    ]
}

#[test]
fn inherit_replaces_ttys_and_outside_pipes_only_at_stdio_numbers() {
    let tree = shell_tree();
    let pipes = fake_pipes(&tree);
    let p10 = pipes.ends(10).expect("pipe 10");
    let p11 = pipes.ends(11).expect("pipe 11");
    assert!(pipes.is_external(10));
    assert!(!pipes.is_external(11));

    let root = plan(1, &tree[0], &pipes, &INHERIT, 64, &[]).expect("root plan");
    let tty_flags = libc::O_RDWR | libc::O_CLOEXEC | libc::O_NOCTTY;
    assert_eq!(
        sources(&root),
        vec![
            (0, Source::Dup(200)),
            (1, Source::Dup(201)),
            // Pipe 11 has both ends in the tree: recreated, not inherited.
            (2, Source::Dup(p11.write)),
            // A tty above fd 2 is reopened by path even with Inherit.
            (
                5,
                Source::Open {
                    path: "/dev/pts/3".into(),
                    flags: tty_flags,
                    pos: 0
                }
            ),
        ]
    );
    let child = plan(2, &tree[1], &pipes, &INHERIT, 64, &[]).expect("child plan");
    assert_eq!(
        sources(&child),
        vec![(0, Source::Dup(p11.read)), (1, Source::Dup(201))]
    );

    // From the image: the tty is reopened and pipe 10 recreated.
    let root = plan(1, &tree[0], &pipes, &Stdio::FromImage, 64, &[]).expect("plan");
    assert_eq!(
        sources(&root)[..2],
        [
            (
                0,
                Source::Open {
                    path: "/dev/pts/3".into(),
                    flags: tty_flags,
                    pos: 0
                }
            ),
            (1, Source::Dup(p10.write)),
        ]
    );
}

#[test]
fn plan_keeps_cloexec_and_drops_creation_flags() {
    let image = process(
        3,
        vec![
            fd(
                4,
                libc::O_WRONLY | libc::O_APPEND | libc::O_CREAT | libc::O_TRUNC | libc::O_CLOEXEC,
                FdKind::File {
                    path: "/tmp/log".into(),
                    pos: 77,
                    size: 100,
                    deleted: false,
                    description: None,
                    saved: None,
                },
            ),
            fd(
                6,
                libc::O_RDONLY,
                FdKind::Directory {
                    path: "/tmp".into(),
                },
            ),
        ],
    );
    let pipes = fake_pipes(std::slice::from_ref(&image));
    let got = plan(3, &image, &pipes, &INHERIT, 64, &[70]).expect("plan");
    assert_eq!(got[0].fd, 4);
    assert!(got[0].cloexec);
    assert_eq!(
        got[0].source,
        Source::Open {
            path: "/tmp/log".into(),
            flags: libc::O_WRONLY | libc::O_APPEND | libc::O_CLOEXEC | libc::O_NOCTTY,
            pos: 77
        }
    );
    assert!(!got[1].cloexec);
    assert_eq!(
        got[1].source,
        Source::Open {
            path: "/tmp".into(),
            flags: libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC | libc::O_NOCTTY,
            pos: 0
        }
    );
}

#[test]
fn plan_refusals_name_pid_and_fd() {
    let pipes = fake_pipes(&[]);
    let one = |f: Fd| process(42, vec![f]);

    let sock = one(fd(
        3,
        libc::O_RDWR,
        FdKind::Unsupported {
            link: "socket:[123]".into(),
        },
    ));
    let e = plan(42, &sock, &pipes, &INHERIT, 64, &[]).expect_err("socket");
    assert_eq!(e.to_string(), "not supported: pid 42 fd 3: socket:[123]");

    let deleted = one(fd(
        8,
        libc::O_RDONLY,
        FdKind::File {
            path: "/tmp/gone".into(),
            pos: 0,
            size: 0,
            deleted: true,
            description: None,
            saved: None,
        },
    ));
    let e = plan(42, &deleted, &pipes, &INHERIT, 64, &[]).expect_err("deleted");
    assert_eq!(
        e.to_string(),
        "not supported: pid 42 fd 8: deleted file /tmp/gone"
    );

    let orphan_pipe = one(fd(3, libc::O_RDONLY, pipe(99)));
    let e = plan(42, &orphan_pipe, &pipes, &INHERIT, 64, &[]).expect_err("pipe");
    assert!(
        matches!(
            e,
            FdError::PipeMissing {
                pid: 42,
                fd: 3,
                inode: 99
            }
        ),
        "{e}"
    );

    let high = one(fd(
        64,
        libc::O_RDONLY,
        FdKind::Directory { path: "/".into() },
    ));
    let e = plan(42, &high, &pipes, &INHERIT, 64, &[]).expect_err("high fd");
    assert!(matches!(e, FdError::FdAboveBase { fd: 64, .. }), "{e}");

    let ok = one(fd(
        3,
        libc::O_RDONLY,
        FdKind::Directory { path: "/".into() },
    ));
    let e = plan(42, &ok, &pipes, &INHERIT, 64, &[10]).expect_err("keep");
    assert!(matches!(e, FdError::KeepBelowBase { fd: 10, .. }), "{e}");

    let t = one(fd(2, libc::O_RDWR, tty()));
    let low = Stdio::Inherit { fds: [0, 1, 2] };
    let e = plan(42, &t, &pipes, &low, 64, &[]).expect_err("stdio");
    assert!(
        matches!(
            e,
            FdError::StdioBelowBase {
                fd: 2,
                stdio_fd: 2,
                ..
            }
        ),
        "{e}"
    );

    let twice = process(
        42,
        vec![
            fd(3, libc::O_RDONLY, FdKind::Directory { path: "/".into() }),
            fd(3, libc::O_RDONLY, FdKind::Directory { path: "/".into() }),
        ],
    );
    let e = plan(42, &twice, &pipes, &INHERIT, 64, &[]).expect_err("dup");
    assert!(matches!(e, FdError::DuplicateFd { fd: 3, .. }), "{e}");
}

#[test]
fn read_write_pipe_is_refused_before_any_pipe_exists() {
    let tree = vec![process(5, vec![fd(4, libc::O_RDWR, pipe(1))])];
    let e = PipeSet::create(&[], &Default::default(), &tree, Default::default(), 64)
        .expect_err("rdwr pipe");
    assert!(
        e.to_string()
            .starts_with("not supported: pid 5 fd 4: pipe 1 opened read-write"),
        "{e}"
    );
}

#[test]
fn max_fd_and_base() {
    assert_eq!(max_fd(&[]), -1);
    assert_eq!(fd_base(&[]), MIN_FD_BASE);
    let tree = shell_tree();
    assert_eq!(max_fd(&tree), 5);
    let big = vec![process(1, vec![fd(300, 0, tty())])];
    assert_eq!(max_fd(&big), 300);
    assert_eq!(fd_base(&big), 301);
}

/// What the child saw after install.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Seen {
    report_fd: RawFd,
    /// (fd, link, flags, pos) of every open fd below 1024.
    fds: Vec<(RawFd, String, u32, u64)>,
    pipe_bytes: Vec<u8>,
    pipe_capacity: u64,
    roundtrip: Vec<u8>,
}

fn describe_fds() -> Result<Vec<(RawFd, String, u32, u64)>, String> {
    let mut out = Vec::new();
    // readlink and a short read of fdinfo, fd by fd: listing /proc/self/fd
    // would itself hold an fd while listing.
    for n in 0..1024 {
        let link = match std::fs::read_link(format!("/proc/self/fd/{n}")) {
            Ok(l) => l.to_string_lossy().into_owned(),
            Err(_) => continue,
        };
        let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{n}"))
            .map_err(|e| format!("fdinfo {n}: {e}"))?;
        let info = crate::sys::procfs::parse_fdinfo(Path::new("fdinfo"), &info)
            .map_err(|e| e.to_string())?;
        out.push((n, link, info.flags, info.pos));
    }
    Ok(out)
}

#[test]
fn install_builds_the_exact_table_over_colliding_runtime_fds() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("data");
    std::fs::write(&file, b"0123456789").expect("write file");
    let file_s = file.to_string_lossy().into_owned();
    let dir_s = dir.path().to_string_lossy().into_owned();
    let image = process(
        4242,
        vec![
            // A tty at fd 1: the stdio policy hands it the inherited stdout.
            fd(1, libc::O_WRONLY, tty()),
            fd(
                3,
                libc::O_WRONLY,
                FdKind::Device {
                    path: "/dev/null".into(),
                    rdev: libc::makedev(1, 3),
                    pos: 0,
                },
            ),
            fd(4, libc::O_RDONLY, pipe(555)),
            fd(5, libc::O_WRONLY | libc::O_CLOEXEC, pipe(555)),
            fd(
                7,
                libc::O_RDWR | libc::O_APPEND | libc::O_LARGEFILE,
                FdKind::File {
                    path: file_s.clone(),
                    pos: 5,
                    size: 10,
                    deleted: false,
                    description: None,
                    saved: None,
                },
            ),
            fd(
                9,
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
                FdKind::Directory {
                    path: dir_s.clone(),
                },
            ),
        ],
    );
    let pipes = vec![PipeImage {
        inode: 555,
        data: hex::encode(b"abc"),
        capacity: 131072,
    }];
    let fd_base = 64;

    let report = in_child(|report_fd| {
        let err = |what: &str| {
            let what = what.to_string();
            move |e: std::io::Error| format!("{what}: {e}")
        };
        // The runtime holds unrelated fds at every number the image uses.
        let junk = restore_sys::open_raw(Path::new("/etc/hostname"), libc::O_RDONLY)
            .map_err(err("open junk"))?;
        for n in 0..=12 {
            if n != junk {
                restore_sys::dup_to(junk, n, false).map_err(err("dup junk"))?;
            }
        }
        let zero = restore_sys::open_raw(Path::new("/dev/zero"), libc::O_RDWR)
            .map_err(err("open /dev/zero"))?;
        let stdout = restore_sys::dup_at_least(zero, fd_base).map_err(err("dup stdio"))?;
        let stdio = Stdio::Inherit {
            fds: [stdout, stdout, stdout],
        };
        let image = &image;
        let set = PipeSet::create(
            &pipes,
            &Default::default(),
            std::slice::from_ref(image),
            Default::default(),
            fd_base,
        )
        .map_err(|e| e.to_string())?;
        if set.fds().iter().any(|&f| f < fd_base) {
            return Err(format!("pipe set below fd_base: {:?}", set.fds()));
        }
        install(4242, image, &set, &stdio, true, fd_base, &[report_fd])
            .map_err(|e| e.to_string())?;
        let fds = describe_fds()?;
        let mut pipe_bytes = [0u8; 3];
        restore_sys::read_exact(4, &mut pipe_bytes).map_err(err("read fd 4"))?;
        let pipe_capacity = restore_sys::get_pipe_size(4).map_err(err("F_GETPIPE_SZ"))?;
        restore_sys::write_all(5, b"xyz").map_err(err("write fd 5"))?;
        let mut roundtrip = [0u8; 3];
        restore_sys::read_exact(4, &mut roundtrip).map_err(err("read fd 4 again"))?;
        let seen = Seen {
            report_fd,
            fds,
            pipe_bytes: pipe_bytes.to_vec(),
            pipe_capacity,
            roundtrip: roundtrip.to_vec(),
        };
        serde_json::to_vec(&seen).map_err(|e| e.to_string())
    })
    .expect("child");
    let seen: Seen = serde_json::from_slice(&report).expect("report");

    let numbers: Vec<RawFd> = seen.fds.iter().map(|f| f.0).collect();
    assert_eq!(numbers, vec![1, 3, 4, 5, 7, 9, seen.report_fd], "{seen:#?}");
    let by = |n: RawFd| {
        seen.fds
            .iter()
            .find(|f| f.0 == n)
            .cloned()
            .unwrap_or_else(|| panic!("fd {n} missing: {seen:#?}"))
    };
    let cloexec = libc::O_CLOEXEC as u32;
    let acc = |flags: u32| flags as i32 & libc::O_ACCMODE;

    assert_eq!(by(1).1, "/dev/zero", "fd 1 is the inherited stdio");
    let null = by(3);
    assert_eq!(null.1, "/dev/null");
    assert_eq!(acc(null.2), libc::O_WRONLY);
    assert_eq!(null.2 & cloexec, 0);

    let (rd, wr) = (by(4), by(5));
    assert!(rd.1.starts_with("pipe:["), "{rd:?}");
    assert_eq!(rd.1, wr.1, "both ends of one pipe");
    assert_eq!(acc(rd.2), libc::O_RDONLY);
    assert_eq!(acc(wr.2), libc::O_WRONLY);
    assert_eq!(rd.2 & cloexec, 0);
    assert_eq!(wr.2 & cloexec, cloexec);
    assert_eq!(seen.pipe_bytes, b"abc");
    assert_eq!(seen.pipe_capacity, 131072);
    assert_eq!(seen.roundtrip, b"xyz");

    let f = by(7);
    assert_eq!(f.1, file_s);
    assert_eq!(acc(f.2), libc::O_RDWR);
    assert_eq!(f.2 & libc::O_APPEND as u32, libc::O_APPEND as u32);
    assert_eq!(f.2 & cloexec, 0);
    assert_eq!(f.3, 5, "file position");

    let d = by(9);
    assert_eq!(d.1, dir_s);
    assert_eq!(d.2 & libc::O_DIRECTORY as u32, libc::O_DIRECTORY as u32);
    assert_eq!(d.2 & cloexec, cloexec);
}

#[test]
fn pipe_set_refuses_data_larger_than_capacity() {
    let tree = vec![process(1, vec![fd(3, libc::O_RDONLY, pipe(7))])];
    let pipes = vec![PipeImage {
        inode: 7,
        data: hex::encode(vec![1u8; 8192]),
        capacity: 4096,
    }];
    let e = PipeSet::create(&pipes, &Default::default(), &tree, Default::default(), 64)
        .expect_err("overfull");
    assert!(
        matches!(
            e,
            FdError::PipeOverfull {
                inode: 7,
                len: 8192,
                capacity: 4096
            }
        ),
        "{e}"
    );
}

fn shared_file(path: &str, pos: u64, description: Option<u32>) -> FdKind {
    FdKind::File {
        path: path.into(),
        pos,
        size: 100,
        deleted: false,
        description,
        saved: None,
    }
}

#[test]
fn shared_descriptions_are_dups_of_the_set_and_unshared_files_reopen() {
    let parent = process(
        10,
        vec![
            fd(
                3,
                libc::O_WRONLY | libc::O_APPEND,
                shared_file("/tmp/log", 40, Some(0)),
            ),
            // A dup of the same description inside one process.
            fd(
                5,
                libc::O_WRONLY | libc::O_APPEND | libc::O_CLOEXEC,
                shared_file("/tmp/log", 40, Some(0)),
            ),
            fd(6, libc::O_RDONLY, shared_file("/tmp/own", 7, None)),
        ],
    );
    let child = process(
        11,
        vec![
            fd(
                3,
                libc::O_WRONLY | libc::O_APPEND,
                shared_file("/tmp/log", 40, Some(0)),
            ),
            fd(4, libc::O_RDWR, shared_file("/tmp/data", 0, Some(1))),
        ],
    );
    let other = process(
        12,
        vec![fd(9, libc::O_RDWR, shared_file("/tmp/data", 0, Some(1)))],
    );
    let tree = vec![parent, child, other];
    let set = fake_pipes(&tree);
    assert_eq!(
        (set.file(0), set.file(1), set.file(2)),
        (Some(2000), Some(2001), None)
    );
    let got = plan(10, &tree[0], &set, &INHERIT, 64, &[]).expect("plan parent");
    assert_eq!(
        sources(&got),
        vec![
            (3, Source::Dup(2000)),
            (5, Source::Dup(2000)),
            (
                6,
                Source::Open {
                    path: "/tmp/own".into(),
                    flags: libc::O_RDONLY | libc::O_CLOEXEC | libc::O_NOCTTY,
                    pos: 7
                }
            ),
        ]
    );
    assert_eq!(
        (got[0].cloexec, got[1].cloexec),
        (false, true),
        "cloexec stays per fd"
    );
    let got = plan(11, &tree[1], &set, &INHERIT, 64, &[]).expect("plan child");
    assert_eq!(
        sources(&got),
        vec![(3, Source::Dup(2000)), (4, Source::Dup(2001))]
    );
    let got = plan(12, &tree[2], &set, &INHERIT, 64, &[]).expect("plan other");
    assert_eq!(sources(&got), vec![(9, Source::Dup(2001))]);

    // An id the set does not hold is refused, naming pid and fd.
    let stray = process(
        13,
        vec![fd(3, libc::O_RDONLY, shared_file("/tmp/x", 0, Some(7)))],
    );
    let e = plan(13, &stray, &set, &INHERIT, 64, &[]).expect_err("missing");
    assert!(
        matches!(
            e,
            FdError::FileMissing {
                pid: 13,
                fd: 3,
                id: 7
            }
        ),
        "{e}"
    );
}

#[test]
fn pipe_set_opens_each_shared_description_once_at_its_pos() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("log");
    std::fs::write(&path, b"0123456789").expect("write");
    let path_s = path.to_string_lossy().into_owned();
    let tree = vec![
        process(
            1,
            vec![fd(3, libc::O_RDWR, shared_file(&path_s, 4, Some(0)))],
        ),
        process(
            2,
            vec![fd(3, libc::O_RDWR, shared_file(&path_s, 4, Some(0)))],
        ),
        process(3, vec![fd(3, libc::O_RDWR, shared_file(&path_s, 2, None))]),
    ];
    let set =
        PipeSet::create(&[], &Default::default(), &tree, Default::default(), 300).expect("create");
    let shared = set.file(0).expect("description 0 opened");
    assert!(shared >= 300, "{shared} below fd_base");
    assert_eq!(
        set.fds(),
        vec![shared],
        "one fd for the shared description only"
    );
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{shared}")).expect("fdinfo");
    let info = crate::sys::procfs::parse_fdinfo(Path::new("fdinfo"), &info).expect("parse");
    assert_eq!(info.pos, 4);
    assert_eq!(info.flags as i32 & libc::O_ACCMODE, libc::O_RDWR);
    set.close_all();
    assert!(
        std::fs::read_link(format!("/proc/self/fd/{shared}")).is_err(),
        "closed"
    );
}
