//! A dump's progress as typed events, one JSON object a line, for the
//! shim and cowsnapd to follow while `cowsnap dump --progress-json PATH`
//! runs (the stderr lines of `--quiet`-less dumps are for people).
//!
//! ```text
//! {"stage":"seized","processes":3,"threads":5,"frozen_ms":12}
//! {"stage":"pages","pages_scanned":8192,"pages_stored":4100,"bytes_written":1048576,"frozen_ms":510}
//! {"stage":"scanned","pages_scanned":9000,"pages_stored":4200,"bytes_written":1200000,"frozen_ms":640}
//! {"stage":"done","pages_scanned":9000,"pages_stored":4200,"bytes_written":1300000,"frozen_ms":655,
//!  "processes":3,"threads":5,"total_ms":700}
//! ```
//!
//! `pages` comes at most twice a second during the memory scan, `scanned`
//! once every page is captured, `done` once the image is complete. Each
//! line is written with one `write(2)`, so a reader that polls the file
//! sees whole lines or nothing of the last one. The log is best effort: a
//! failed write never fails the dump.
//!
//! A container's dump run by the shim writes to
//! [`container_log_path`]: `/run/cowsnap/progress/<namespace>/<id>.jsonl`
//! (directory 0700, file 0600, removed once the dump ends), where
//! cowsnapd reads it while containerd's `Tasks.Checkpoint` is pending.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Where the shim has container dumps write their progress.
pub const CONTAINER_LOG_DIR: &str = "/run/cowsnap/progress";

/// Page figures of a dump so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PageCounts {
    /// Present or swapped pages looked at.
    pub pages_scanned: u64,
    /// Unique pages stored (each physical page once).
    pub pages_stored: u64,
    /// Bytes of the image written: compressed page frames during the scan,
    /// every file of the image at `done`.
    pub bytes_written: u64,
    /// How long the tree has been stopped so far (at `done`: in all).
    pub frozen_ms: u64,
}

/// One line of the progress log.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "stage", rename_all = "snake_case")]
pub enum DumpEvent {
    /// Every task is stopped and seized.
    Seized {
        processes: u64,
        threads: u64,
        frozen_ms: u64,
    },
    /// The memory scan goes on.
    Pages(PageCounts),
    /// Every page and all state are captured; the image is being committed.
    Scanned(PageCounts),
    /// The image is complete.
    Done {
        #[serde(flatten)]
        counts: PageCounts,
        processes: u64,
        threads: u64,
        total_ms: u64,
    },
}

impl DumpEvent {
    /// The page figures the event carries (`seized` carries only the
    /// frozen time).
    pub fn counts(&self) -> PageCounts {
        match *self {
            DumpEvent::Seized { frozen_ms, .. } => PageCounts {
                frozen_ms,
                ..PageCounts::default()
            },
            DumpEvent::Pages(c) | DumpEvent::Scanned(c) => c,
            DumpEvent::Done { counts, .. } => counts,
        }
    }
}

/// The writing end: a cheap handle the dump and its memory scanner share;
/// [`ProgressLog::none`] writes nothing.
#[derive(Clone, Default)]
pub struct ProgressLog {
    file: Option<Arc<LogFile>>,
}

struct LogFile {
    file: File,
    path: PathBuf,
    /// A write failed once (reported once on stderr, then silent).
    failed: AtomicBool,
}

impl ProgressLog {
    pub fn none() -> ProgressLog {
        ProgressLog::default()
    }

    /// Creates (or truncates) `path`, mode 0600. Truncated, not replaced:
    /// a reader that opened it already (cowsnapd) keeps reading the file
    /// this dump writes; appended to, so that lines land at its end even
    /// if someone truncates it meanwhile.
    pub fn create(path: &Path) -> std::io::Result<ProgressLog> {
        let file = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .open(path)?;
        file.set_len(0)?;
        Ok(ProgressLog {
            file: Some(Arc::new(LogFile {
                file,
                path: path.to_path_buf(),
                failed: AtomicBool::new(false),
            })),
        })
    }

    pub fn is_on(&self) -> bool {
        self.file.is_some()
    }

    /// Appends `event` as one line, with one write.
    pub fn emit(&self, event: &DumpEvent) {
        let Some(log) = &self.file else {
            return;
        };
        let mut line = match serde_json::to_vec(event) {
            Ok(line) => line,
            Err(_) => return,
        };
        line.push(b'\n');
        if let Err(e) = (&log.file).write_all(&line) {
            if !log.failed.swap(true, Ordering::Relaxed) {
                eprintln!("cowsnap: progress log {}: {e}", log.path.display());
            }
        }
    }
}

/// Whether `part` can be one component of a path (a containerd namespace
/// or container id): not empty, no `/`, not `.` or `..`.
fn is_component(part: &str) -> bool {
    !part.is_empty() && part != "." && part != ".." && !part.contains('/') && !part.contains('\0')
}

/// The progress log of container `id` of containerd namespace
/// `namespace` under `root` ([`CONTAINER_LOG_DIR`] in production); None
/// when either cannot be a path component (containerd refuses such names).
pub fn container_log_path(root: &Path, namespace: &str, id: &str) -> Option<PathBuf> {
    (is_component(namespace) && is_component(id))
        .then(|| root.join(namespace).join(format!("{id}.jsonl")))
}

/// Creates the directories of `log` (a [`container_log_path`]) only root
/// can enter (0700).
pub fn create_log_dir(log: &Path) -> std::io::Result<()> {
    let Some(dir) = log.parent() else {
        return Ok(());
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

/// The reading end: bytes of the log as they come (in any pieces), out
/// whole events. A line that does not parse is returned as its error and
/// skipped.
#[derive(Debug, Default)]
pub struct ProgressReader {
    pending: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
#[error("progress line {line:?} does not parse: {source}")]
pub struct BadLine {
    pub line: String,
    #[source]
    pub source: serde_json::Error,
}

impl ProgressReader {
    pub fn new() -> ProgressReader {
        ProgressReader::default()
    }

    /// The events of every line `bytes` completes.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<Result<DumpEvent, BadLine>> {
        self.pending.extend_from_slice(bytes);
        let Some(end) = self.pending.iter().rposition(|b| *b == b'\n') else {
            return Vec::new();
        };
        let rest = self.pending.split_off(end + 1);
        let whole = std::mem::replace(&mut self.pending, rest);
        whole
            .split(|b| *b == b'\n')
            .filter(|line| !line.iter().all(u8::is_ascii_whitespace))
            .map(|line| {
                serde_json::from_slice(line).map_err(|source| BadLine {
                    line: String::from_utf8_lossy(line).into_owned(),
                    source,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(n: u64) -> PageCounts {
        PageCounts {
            pages_scanned: n,
            pages_stored: n / 2,
            bytes_written: n * 100,
            frozen_ms: n / 10,
        }
    }

    #[test]
    fn lines_are_tagged_by_stage_and_flat() {
        let done = DumpEvent::Done {
            counts: counts(40),
            processes: 3,
            threads: 5,
            total_ms: 9,
        };
        let text = serde_json::to_string(&done).expect("json");
        assert_eq!(
            text,
            r#"{"stage":"done","pages_scanned":40,"pages_stored":20,"bytes_written":4000,"frozen_ms":4,"processes":3,"threads":5,"total_ms":9}"#
        );
        let text = serde_json::to_string(&DumpEvent::Pages(counts(10))).expect("json");
        assert_eq!(
            text,
            r#"{"stage":"pages","pages_scanned":10,"pages_stored":5,"bytes_written":1000,"frozen_ms":1}"#
        );
        assert_eq!(done.counts(), counts(40));
    }

    #[test]
    fn the_log_round_trips_through_the_reader_in_any_pieces() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("p.jsonl");
        let log = ProgressLog::create(&path).expect("create");
        let events = [
            DumpEvent::Seized {
                processes: 2,
                threads: 3,
                frozen_ms: 1,
            },
            DumpEvent::Pages(counts(10)),
            DumpEvent::Scanned(counts(20)),
            DumpEvent::Done {
                counts: counts(20),
                processes: 2,
                threads: 3,
                total_ms: 7,
            },
        ];
        let shared = log.clone();
        for e in &events {
            shared.emit(e);
        }
        let bytes = std::fs::read(&path).expect("read");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        for piece in [1, 7, bytes.len()] {
            let mut reader = ProgressReader::new();
            let mut got = Vec::new();
            for chunk in bytes.chunks(piece) {
                got.extend(reader.push(chunk).into_iter().map(|r| r.expect("parses")));
            }
            assert_eq!(got, events, "pieces of {piece} bytes");
        }
    }

    #[test]
    fn a_bad_line_is_an_error_and_the_next_still_parses() {
        let mut reader = ProgressReader::new();
        let got = reader.push(b"{\"stage\":\"warp\"}\n{\"stage\":\"seized\",\"proc");
        assert_eq!(got.len(), 1);
        let err = got.into_iter().next().expect("one").expect_err("bad");
        assert!(err.to_string().contains("warp"), "{err}");
        let got = reader.push(b"esses\":1,\"threads\":1,\"frozen_ms\":0}\n");
        assert_eq!(
            got.into_iter()
                .map(|r| r.expect("parses"))
                .collect::<Vec<_>>(),
            [DumpEvent::Seized {
                processes: 1,
                threads: 1,
                frozen_ms: 0
            }]
        );
    }

    #[test]
    fn container_paths_refuse_what_is_not_one_component() {
        let root = Path::new("/run/cowsnap/progress");
        assert_eq!(
            container_log_path(root, "default", "web-1"),
            Some(PathBuf::from("/run/cowsnap/progress/default/web-1.jsonl"))
        );
        for (ns, id) in [
            ("", "a"),
            ("..", "a"),
            ("a", "../b"),
            ("a/b", "c"),
            ("a", "."),
        ] {
            assert_eq!(container_log_path(root, ns, id), None, "{ns:?} {id:?}");
        }
    }

    #[test]
    fn the_log_dir_is_root_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = container_log_path(dir.path(), "ns", "c").expect("path");
        create_log_dir(&log).expect("create");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(log.parent().expect("dir"))
            .expect("stat")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700);
    }
}
