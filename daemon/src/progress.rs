//! Follows the progress log a container's dump writes
//! (`cowsnap::dump::progress`) while containerd's `Tasks.Checkpoint`,
//! a unary call, is pending, and turns its lines into `DumpProgress`.
//!
//! cowsnapd creates the log itself (0600, in a 0700 directory) before the
//! call and keeps it open: the engine truncates and appends to the same
//! file, and the shim's removal of it once the dump ends does not take
//! away what is left to read. A log that cannot be created or read only
//! costs the progress events, never the checkpoint.

use std::future::Future;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use cowsnap::dump::progress::{self, DumpEvent, ProgressReader};
use tokio::io::AsyncReadExt;

use crate::proto::DumpProgress;

/// How often the log is read while the dump runs.
const POLL: Duration = Duration::from_millis(100);

/// An open progress log and what of it was read.
pub struct ProgressTail {
    path: PathBuf,
    file: tokio::fs::File,
    /// Device and inode of the log this tail created: only that one is
    /// removed at the end.
    identity: (u64, u64),
    read: u64,
    reader: ProgressReader,
}

impl ProgressTail {
    /// Creates the log of container `id` of `namespace` under `root` (the
    /// shim's `progress::CONTAINER_LOG_DIR`) and opens it.
    pub async fn create(root: &Path, namespace: &str, id: &str) -> Option<ProgressTail> {
        let path = progress::container_log_path(root, namespace, id)?;
        let opened = {
            let path = path.clone();
            tokio::task::spawn_blocking(move || -> std::io::Result<std::fs::File> {
                progress::create_log_dir(&path)?;
                std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(0o600)
                    .open(&path)
            })
            .await
        };
        let file = match opened {
            Ok(Ok(file)) => file,
            Ok(Err(e)) => {
                log::warn!("progress log {}: {e}", path.display());
                return None;
            }
            Err(e) => {
                log::warn!("progress log {}: {e}", path.display());
                return None;
            }
        };
        let identity = match file.metadata() {
            Ok(m) => (m.dev(), m.ino()),
            Err(e) => {
                log::warn!("progress log {}: {e}", path.display());
                return None;
            }
        };
        Some(ProgressTail {
            path,
            file: tokio::fs::File::from_std(file),
            identity,
            read: 0,
            reader: ProgressReader::new(),
        })
    }

    /// The events of the lines written since the last call.
    pub async fn poll(&mut self) -> Vec<DumpEvent> {
        // The engine truncates the log as it starts: what was read of it
        // before (a stale log) is void.
        if let Ok(m) = self.file.metadata().await {
            if m.len() < self.read {
                use tokio::io::AsyncSeekExt;
                if self.file.seek(std::io::SeekFrom::Start(0)).await.is_ok() {
                    self.read = 0;
                    self.reader = ProgressReader::new();
                }
            }
        }
        let mut bytes = Vec::new();
        if let Err(e) = self.file.read_to_end(&mut bytes).await {
            log::warn!("progress log {}: {e}", self.path.display());
        }
        self.read += bytes.len() as u64;
        self.reader
            .push(&bytes)
            .into_iter()
            .filter_map(|line| {
                line.map_err(|e| log::warn!("progress log {}: {e}", self.path.display()))
                    .ok()
            })
            .collect()
    }

    /// The last events, then removes the log if the shim has not (a dump
    /// that never started).
    pub async fn finish(mut self) -> Vec<DumpEvent> {
        let events = self.poll().await;
        let path = self.path.clone();
        let identity = self.identity;
        let _ = tokio::task::spawn_blocking(move || match std::fs::metadata(&path) {
            Ok(m) if (m.dev(), m.ino()) == identity => std::fs::remove_file(&path),
            _ => Ok(()),
        })
        .await;
        events
    }
}

/// The figures of a dump event, for the API (`seized` carries none).
pub fn dump_progress(event: &DumpEvent) -> Option<DumpProgress> {
    match event {
        DumpEvent::Seized { .. } => None,
        DumpEvent::Pages(_) | DumpEvent::Scanned(_) | DumpEvent::Done { .. } => {
            let c = event.counts();
            Some(DumpProgress {
                pages_scanned: c.pages_scanned,
                pages_stored: c.pages_stored,
                bytes_written: c.bytes_written,
                frozen_ms: c.frozen_ms,
            })
        }
    }
}

/// Awaits `call`, passing what `tail` reads meanwhile, and after it, to
/// `each`.
pub async fn follow<F: Future>(
    call: F,
    tail: Option<ProgressTail>,
    mut each: impl FnMut(DumpProgress),
) -> F::Output {
    let Some(mut tail) = tail else {
        return call.await;
    };
    tokio::pin!(call);
    let mut tick = tokio::time::interval(POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let output = loop {
        tokio::select! {
            output = &mut call => break output,
            _ = tick.tick() => {
                tail.poll().await.iter().filter_map(dump_progress).for_each(&mut each);
            }
        }
    };
    tail.finish()
        .await
        .iter()
        .filter_map(dump_progress)
        .for_each(&mut each);
    output
}

#[cfg(test)]
mod tests {
    use super::*;
    use cowsnap::dump::progress::{PageCounts, ProgressLog};

    fn counts(n: u64) -> PageCounts {
        PageCounts {
            pages_scanned: n,
            pages_stored: n,
            bytes_written: n * 10,
            frozen_ms: n,
        }
    }

    /// What an engine writes while the call is pending, and after the
    /// shim removed the log, all reaches `each`; the log is gone after.
    #[tokio::test]
    async fn follows_the_log_until_the_call_ends() {
        let root = tempfile::tempdir().expect("tempdir");
        let tail = ProgressTail::create(root.path(), "ns", "c")
            .await
            .expect("tail");
        let path = root.path().join("ns/c.jsonl");
        let writer = path.clone();
        let call = async move {
            // The engine truncates it as it starts, then appends.
            let log = ProgressLog::create(&writer).expect("log");
            log.emit(&DumpEvent::Seized {
                processes: 1,
                threads: 1,
                frozen_ms: 0,
            });
            log.emit(&DumpEvent::Pages(counts(1)));
            tokio::time::sleep(POLL * 3).await;
            log.emit(&DumpEvent::Done {
                counts: counts(2),
                processes: 1,
                threads: 1,
                total_ms: 5,
            });
            std::fs::remove_file(&writer).expect("the shim removes it");
            7
        };
        let mut got = Vec::new();
        let output = follow(call, Some(tail), |p| got.push(p)).await;
        assert_eq!(output, 7);
        let frozen: Vec<u64> = got.iter().map(|p| p.frozen_ms).collect();
        assert_eq!(frozen, [1, 2], "{got:?}");
        assert_eq!(got[1].bytes_written, 20);
        assert!(!path.exists());
    }

    /// A dump that never ran (containerd refused the call) leaves no log.
    #[tokio::test]
    async fn a_log_nobody_wrote_is_removed() {
        let root = tempfile::tempdir().expect("tempdir");
        let tail = ProgressTail::create(root.path(), "ns", "c").await;
        let mut got = Vec::new();
        follow(async {}, tail, |p| got.push(p)).await;
        assert!(got.is_empty());
        assert!(!root.path().join("ns/c.jsonl").exists());
    }
}
