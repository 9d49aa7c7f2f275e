//! Pre-flight checks on a small image written with the real writer, whose
//! files live in a temporary directory the tests then change.

use std::path::{Path, PathBuf};

use super::*;
use crate::image::types::{Creds, Fd, PageRun, SavedFile, Tree, Vma};
use crate::image::ImageWriter;
use crate::restore::fds::tests::process;

const PID: i32 = 4100;

struct Fixture {
    _dir: tempfile::TempDir,
    root: PathBuf,
    image_dir: PathBuf,
}

impl Fixture {
    fn path(&self, name: &str) -> String {
        self.root.join(name).to_string_lossy().into_owned()
    }
    fn open(&self) -> Image {
        Image::open(&self.image_dir).expect("open image")
    }
}

/// exe (regular), lib.so (8 KiB, mapped from offset 4096), data (10 bytes,
/// open at fd 7), directory d (open at fd 9), /dev/null at fd 3.
fn fixture() -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("files");
    std::fs::create_dir(&root).expect("mkdir");
    std::fs::write(root.join("exe"), b"\x7fELF").expect("exe");
    std::fs::write(root.join("lib.so"), vec![0u8; 8192]).expect("lib");
    std::fs::write(root.join("data"), b"0123456789").expect("data");
    std::fs::create_dir(root.join("d")).expect("d");
    let p = |n: &str| root.join(n).to_string_lossy().into_owned();

    let entry = ProcessEntry {
        pid: PID,
        ppid: 0,
        pgid: PID,
        sid: PID,
        nspid: vec![PID],
        tids: vec![PID],
        comm: "fixture".into(),
        exe: p("exe"),
        cwd: p("d"),
        root: "/".into(),
        umask: 0o022,
        creds: Creds::default(),
        rlimits: vec![],
        namespaces: vec![],
        file: crate::image::types::process_file_name(PID),
        zombie: None,
    };
    let mut proc_image = process(
        PID,
        vec![
            Fd {
                fd: 3,
                flags: libc::O_WRONLY as u32,
                kind: FdKind::Device {
                    path: "/dev/null".into(),
                    rdev: libc::makedev(1, 3),
                    pos: 0,
                },
            },
            Fd {
                fd: 7,
                flags: libc::O_RDWR as u32,
                kind: FdKind::File {
                    path: p("data"),
                    pos: 4,
                    size: 10,
                    deleted: false,
                    description: None,
                    saved: None,
                },
            },
            Fd {
                fd: 9,
                flags: libc::O_RDONLY as u32,
                kind: FdKind::Directory { path: p("d") },
            },
        ],
    );
    proc_image.mm.exe_file = p("exe");
    proc_image.vmas = vec![Vma {
        start: 0x40_0000,
        end: 0x40_2000,
        prot: libc::PROT_READ as u32,
        shared: false,
        kind: VmaKind::PrivateFile,
        path: Some(p("lib.so")),
        deleted: false,
        dev: 0,
        inode: 0,
        offset: 4096,
        vm_flags: vec!["rd".into()],
        pages: vec![PageRun::Absent {
            start: 0x40_0000,
            pages: 2,
        }],
    }];
    let image_dir = dir.path().join("img");
    let mut w = ImageWriter::create(&image_dir, 4096).expect("writer");
    w.write_tree(&Tree {
        processes: vec![entry],
        sysv_shm: Vec::new(),
        saved_files: Vec::new(),
        // As the dump records them: the executable and the mapped file.
        file_sizes: [(p("exe"), 4), (p("lib.so"), 8192)].into_iter().collect(),
        mount_ns: None,
    })
    .expect("tree");
    w.write_process(&proc_image).expect("process");
    w.write_pipes(&[]).expect("pipes");
    w.commit(PID).expect("commit");
    Fixture {
        _dir: dir,
        root,
        image_dir,
    }
}

#[test]
fn intact_image_passes() {
    let f = fixture();
    check_files(&f.open(), Growth::AppendOnlyMayGrow).expect("all files there");
}

#[test]
fn missing_mapped_file_is_named() {
    let f = fixture();
    std::fs::remove_file(f.path("lib.so")).expect("rm");
    let e = check_files(&f.open(), Growth::AppendOnlyMayGrow).expect_err("missing");
    assert_eq!(
        e.to_string(),
        format!("pid {PID}: mapped file {:?} is missing", f.path("lib.so"))
    );
}

#[test]
fn an_empty_path_is_shown_quoted() {
    let f = fixture();
    let mut image = f.open();
    image.tree.processes[0].root = String::new();
    let e = check_files(&image, Growth::AppendOnlyMayGrow).expect_err("empty root");
    assert_eq!(e.to_string(), format!("pid {PID}: root \"\" is missing"));
}

#[test]
fn mapped_file_shorter_than_its_offset_is_refused() {
    let f = fixture();
    std::fs::write(f.path("lib.so"), vec![0u8; 4096]).expect("truncate");
    // An image without recorded sizes (written before they were).
    let mut image = f.open();
    image.tree.file_sizes.clear();
    let e = check_files(&image, Growth::AppendOnlyMayGrow).expect_err("too short");
    assert!(
        matches!(
            &e,
            CheckError::MappingPastEnd {
                pid: PID,
                size: 4096,
                offset: 4096,
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn executable_or_mapped_file_with_another_size_is_refused() {
    let f = fixture();
    std::fs::write(f.path("lib.so"), vec![0u8; 12288]).expect("grow lib.so");
    let e = check_files(&f.open(), Growth::AppendOnlyMayGrow).expect_err("lib.so changed");
    assert_eq!(
        e.to_string(),
        format!(
            "pid {PID}: mapped file {:?} size changed: image 8192, now 12288",
            f.path("lib.so")
        )
    );
    let f = fixture();
    std::fs::write(f.path("exe"), b"\x7fELF, but longer").expect("replace exe");
    let e = check_files(&f.open(), Growth::AppendOnlyMayGrow).expect_err("exe changed");
    assert!(
        e.to_string()
            .contains(&format!("executable {:?} size changed", f.path("exe"))),
        "{e}"
    );
}

/// The fixture's image with fd 7 (`data`, 10 bytes) opened with `flags`.
fn with_data_flags(f: &Fixture, flags: i32) -> Image {
    let mut image = f.open();
    image.processes[0].fds[1].flags = flags as u32;
    image
}

#[test]
fn open_file_with_another_size_is_refused() {
    let f = fixture();
    std::fs::write(f.path("data"), b"0123456789ab").expect("grow");
    // Open for reading and writing: the process may read what grew.
    let e = check_files(&f.open(), Growth::AppendOnlyMayGrow).expect_err("size");
    assert_eq!(
        e.to_string(),
        format!(
            "pid {PID}: fd 7 file {:?} size changed: image 10, now 12 \
             (only a file open write-only with O_APPEND may grow)",
            f.path("data")
        )
    );
    let e = check_files(&f.open(), Growth::Exact).expect_err("size, exact");
    assert_eq!(
        e.to_string(),
        format!(
            "pid {PID}: fd 7 file {:?} size changed: image 10, now 12",
            f.path("data")
        )
    );
}

#[test]
fn a_grown_file_passes_only_under_a_write_only_append_fd() {
    let f = fixture();
    std::fs::write(f.path("data"), b"0123456789 and then more!").expect("grow");
    let append = libc::O_WRONLY | libc::O_APPEND;
    check_files(&with_data_flags(&f, append), Growth::AppendOnlyMayGrow).expect("a log that grew");
    check_files(
        &with_data_flags(&f, append | libc::O_CLOEXEC | libc::O_NONBLOCK),
        Growth::AppendOnlyMayGrow,
    )
    .expect("other flags do not matter");
    for (flags, why) in [
        (libc::O_RDWR | libc::O_APPEND, "readable"),
        (libc::O_RDONLY | libc::O_APPEND, "read-only"),
        (libc::O_WRONLY, "write-only without O_APPEND"),
    ] {
        let e = check_files(&with_data_flags(&f, flags), Growth::AppendOnlyMayGrow).expect_err(why);
        assert!(
            matches!(
                &e,
                CheckError::GrewNotAppendOnly {
                    pid: PID,
                    image: 10,
                    now: 25,
                    ..
                }
            ),
            "{why}: {e}"
        );
    }
    // A container's rootfs: exact sizes, also for a log.
    let e = check_files(&with_data_flags(&f, append), Growth::Exact).expect_err("container");
    assert_eq!(
        e.to_string(),
        format!(
            "pid {PID}: fd 7 file {:?} size changed: image 10, now 25",
            f.path("data")
        )
    );
}

#[test]
fn a_shrunk_log_is_refused_naming_both_sizes() {
    let f = fixture();
    std::fs::write(f.path("data"), b"0123").expect("shrink");
    let append = libc::O_WRONLY | libc::O_APPEND;
    let e =
        check_files(&with_data_flags(&f, append), Growth::AppendOnlyMayGrow).expect_err("shrunk");
    assert_eq!(
        e.to_string(),
        format!(
            "pid {PID}: fd 7 file {:?} size changed: image 10, now 4",
            f.path("data")
        )
    );
}

#[test]
fn a_log_that_is_also_mapped_or_executed_must_keep_its_size() {
    // The same file appended to through fd 7 and mapped: the mapping is
    // read from it, so it is held to its size.
    let f = fixture();
    std::fs::write(f.path("lib.so"), vec![0u8; 12288]).expect("grow lib.so");
    let mut image = with_data_flags(&f, libc::O_WRONLY | libc::O_APPEND);
    if let FdKind::File { path, size, .. } = &mut image.processes[0].fds[1].kind {
        *path = f.path("lib.so");
        *size = 8192;
    }
    let e = check_files(&image, Growth::AppendOnlyMayGrow).expect_err("mapped");
    assert_eq!(
        e.to_string(),
        format!(
            "pid {PID}: mapped file {:?} size changed: image 8192, now 12288",
            f.path("lib.so")
        )
    );
    let f = fixture();
    std::fs::write(f.path("exe"), b"\x7fELF and a log line").expect("grow exe");
    let mut image = with_data_flags(&f, libc::O_WRONLY | libc::O_APPEND);
    if let FdKind::File { path, size, .. } = &mut image.processes[0].fds[1].kind {
        *path = f.path("exe");
        *size = 4;
    }
    let e = check_files(&image, Growth::AppendOnlyMayGrow).expect_err("executable");
    assert!(
        e.to_string().starts_with(&format!(
            "pid {PID}: executable {:?} size changed",
            f.path("exe")
        )),
        "{e}"
    );
}

#[test]
fn deleted_mapping_and_deleted_fd_file_are_not_supported() {
    let f = fixture();
    let mut image = f.open();
    image.processes[0].vmas[0].deleted = true;
    let e = check_files(&image, Growth::AppendOnlyMayGrow).expect_err("deleted mapping");
    assert_eq!(
        e.to_string(),
        format!(
            "not supported: pid {PID} maps deleted file {:?}",
            f.path("lib.so")
        )
    );

    let mut image = f.open();
    if let FdKind::File { deleted, .. } = &mut image.processes[0].fds[1].kind {
        *deleted = true;
    }
    let e = check_files(&image, Growth::AppendOnlyMayGrow).expect_err("deleted fd file");
    assert_eq!(
        e.to_string(),
        format!(
            "not supported: pid {PID} fd 7 file {:?} is deleted",
            f.path("data")
        )
    );
}

/// A saved file of the image for `path`, as dump records it.
fn saved_file(id: u32, path: &str, deleted: bool, dev: u64, inode: u64) -> SavedFile {
    SavedFile {
        id,
        path: path.into(),
        deleted,
        dev,
        inode,
        size: 10,
        mode: 0o600,
        uid: 0,
        gid: 0,
        pages: Vec::new(),
    }
}

#[test]
fn deleted_files_the_image_saved_and_missing_saved_tmpfs_files_pass() {
    let f = fixture();
    let mut image = f.open();
    // Both gone from their paths: restore makes them.
    std::fs::remove_file(f.path("lib.so")).expect("rm lib.so");
    std::fs::remove_file(f.path("data")).expect("rm data");
    let vma = &mut image.processes[0].vmas[0];
    vma.deleted = true;
    let (dev, inode) = (vma.dev, vma.inode);
    image.tree.saved_files = vec![
        saved_file(0, &f.path("lib.so"), true, dev, inode),
        saved_file(1, &f.path("data"), false, 9, 9),
    ];
    if let FdKind::File { saved, .. } = &mut image.processes[0].fds[1].kind {
        *saved = Some(1);
    }
    check_files(&image, Growth::Exact).expect("restore makes both");

    // A saved tmpfs file that exists is checked as any file is.
    std::fs::write(f.path("data"), b"twelve bytes").expect("data again");
    let e = check_files(&image, Growth::Exact).expect_err("size changed");
    assert!(
        e.to_string().contains("size changed: image 10, now 12"),
        "{e}"
    );
}

#[test]
fn wrong_kinds_and_unsupported_fds_are_refused() {
    let f = fixture();
    std::fs::remove_file(f.path("exe")).expect("rm exe");
    std::fs::create_dir(f.path("exe")).expect("exe as dir");
    let e = check_files(&f.open(), Growth::AppendOnlyMayGrow).expect_err("exe is a dir");
    assert_eq!(
        e.to_string(),
        format!(
            "pid {PID}: executable {:?} is not a regular file",
            f.path("exe")
        )
    );

    let f = fixture();
    std::fs::remove_dir(f.path("d")).expect("rm d");
    std::fs::write(f.path("d"), b"").expect("d as file");
    let e = check_files(&f.open(), Growth::AppendOnlyMayGrow).expect_err("cwd is a file");
    assert!(
        matches!(
            &e,
            CheckError::WrongType {
                expected: "directory",
                ..
            }
        ),
        "{e}"
    );

    let f = fixture();
    let mut image = f.open();
    image.processes[0].fds.push(Fd {
        fd: 11,
        flags: 2,
        kind: FdKind::Unsupported {
            link: "anon_inode:[eventfd]".into(),
        },
    });
    let e = check_files(&image, Growth::AppendOnlyMayGrow).expect_err("eventfd");
    assert_eq!(
        e.to_string(),
        format!("not supported: pid {PID} fd 11: anon_inode:[eventfd]")
    );
}

fn pid_max() -> i32 {
    std::fs::read_to_string("/proc/sys/kernel/pid_max")
        .expect("pid_max")
        .trim()
        .parse()
        .expect("pid_max number")
}

#[test]
fn taken_pid_names_its_owner_and_free_pids_pass() {
    let me = std::process::id() as i32;
    let comm = crate::sys::procfs::read_comm(me).expect("own comm");
    let e = check_pids_free(&[me]).expect_err("own pid");
    assert_eq!(e.to_string(), format!("pid {me} is taken (by {comm})"));

    let free = (2..pid_max())
        .rev()
        .find(|p| !Path::new(&format!("/proc/{p}")).exists())
        .expect("some free pid");
    check_pids_free(&[free]).expect("free pid");
    assert!(
        check_pids_free(&[free, me]).is_err(),
        "every pid is checked"
    );
}
