//! `cowsnap inspect` and `cowsnap verify`: summaries and full integrity checks of an image.
//!
//! [`inspect_report`] computes the numbers (tests and benchmarks use it
//! directly); [`inspect`] renders them as text or JSON. [`verify`] opens the
//! image (which checks every file checksum and every reference) and then
//! decompresses every frame against its checksum.

use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;

use super::types::{FormatVersion, MountNs, PageRun, ZombieExit};
use super::{Image, ImageError};

/// Everything `cowsnap inspect` reports.
#[derive(Debug, Clone, Serialize)]
pub struct InspectReport {
    pub dir: String,
    pub format_version: FormatVersion,
    pub engine_version: String,
    pub kernel_release: String,
    pub arch: String,
    pub page_size: u64,
    pub created_unix: u64,
    pub root_pid: i32,
    /// Tree order (parents first).
    pub processes: Vec<ProcessReport>,
    pub totals: Totals,
    /// The tree's own mount namespace, when it was not the dumper's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mount_ns: Option<MountNs>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ProcessReport {
    pub pid: i32,
    pub ppid: i32,
    pub comm: String,
    /// Distance from the root of the dump (0 for the root).
    pub depth: usize,
    pub threads: usize,
    pub vmas: usize,
    /// Pages of this process whose contents are in the store.
    pub pages_stored: u64,
    /// Present all-zero pages (not stored).
    pub pages_zero: u64,
    /// Pages neither present nor swapped.
    pub pages_absent: u64,
    /// Set for a zombie (exited, not yet reaped by its parent): how it ended.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub zombie: Option<ZombieExit>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Totals {
    /// Zombies included.
    pub processes: usize,
    pub zombies: usize,
    pub threads: usize,
    /// References to stored pages, summed over every process and address.
    pub pages_referenced: u64,
    /// Unique pages in the store.
    pub unique_pages_stored: u64,
    /// Stored pages referenced more than once (by any process, at any address).
    pub pages_shared: u64,
    /// Stored pages nobody references (a healthy dump has none).
    pub pages_unreferenced: u64,
    /// Stored pages by the number of distinct processes referencing them,
    /// in increasing order of `processes`.
    pub sharing_histogram: Vec<SharingBucket>,
    /// Zero pages that were not stored.
    pub pages_zero: u64,
    pub pages_absent: u64,
    /// File pages present at dump time, mapped again from the file on restore.
    pub pages_mapped: u64,
    /// Size of the `pages` file.
    pub bytes_stored: u64,
    /// Unique pages times the page size.
    pub bytes_unique_uncompressed: u64,
    /// `bytes_unique_uncompressed / bytes_stored` (0 for an empty store).
    pub compression_ratio: f64,
    /// `pages_referenced / unique_pages_stored` (0 for an empty store).
    pub dedup_ratio: f64,
    pub frames: usize,
    /// Every file of the image, manifest included.
    pub bytes_total: u64,
    /// Files carried with their contents (deleted, or on tmpfs), and the
    /// stored pages of their contents.
    pub saved_files: usize,
    pub saved_file_pages: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct SharingBucket {
    pub processes: u64,
    pub pages: u64,
}

/// Computes the report of an opened (hence validated) image.
pub fn inspect_report(image: &Image) -> InspectReport {
    let page_count = image.index.page_count as usize;
    // Per stored page: references, distinct processes, and the last process
    // seen (index + 1) so a process counts once per page.
    let mut refs = vec![0u32; page_count];
    let mut procs = vec![0u32; page_count];
    let mut last = vec![0u32; page_count];
    let mut processes = Vec::with_capacity(image.processes.len());
    let mut totals = Totals {
        processes: image.processes.len(),
        zombies: image
            .tree
            .processes
            .iter()
            .filter(|p| p.zombie.is_some())
            .count(),
        threads: 0,
        pages_referenced: 0,
        unique_pages_stored: image.index.page_count,
        pages_shared: 0,
        pages_unreferenced: 0,
        sharing_histogram: Vec::new(),
        pages_zero: 0,
        pages_absent: 0,
        pages_mapped: 0,
        bytes_stored: image.index.frames.iter().map(|f| f.compressed_len).sum(),
        bytes_unique_uncompressed: image.index.page_count * image.index.page_size,
        compression_ratio: 0.0,
        dedup_ratio: 0.0,
        frames: image.index.frames.len(),
        bytes_total: 0,
        saved_files: image.tree.saved_files.len(),
        saved_file_pages: 0,
    };
    // A saved file's pages are referenced by the file (no process).
    for &[_, first, pages] in image.tree.saved_files.iter().flat_map(|f| &f.pages) {
        totals.saved_file_pages = totals.saved_file_pages.saturating_add(pages);
        let lo = (first as usize).min(page_count);
        let hi = (first.saturating_add(pages) as usize).min(page_count);
        for r in &mut refs[lo..hi] {
            *r = r.saturating_add(1);
        }
    }
    for (i, (entry, process)) in image
        .tree
        .processes
        .iter()
        .zip(&image.processes)
        .enumerate()
    {
        let tag = i as u32 + 1;
        let (mut stored, mut zero, mut absent, mut mapped) = (0, 0, 0, 0);
        for run in process.vmas.iter().flat_map(|v| &v.pages) {
            match *run {
                PageRun::Stored { pages, first, .. } => {
                    stored += pages;
                    // Open checked every id against the store; clamp anyway
                    // so a report never panics.
                    let lo = (first as usize).min(page_count);
                    let hi = ((first + pages) as usize).min(page_count);
                    for id in lo..hi {
                        refs[id] = refs[id].saturating_add(1);
                        if last[id] != tag {
                            last[id] = tag;
                            procs[id] += 1;
                        }
                    }
                }
                PageRun::Zero { pages, .. } => zero += pages,
                PageRun::Absent { pages, .. } => absent += pages,
                PageRun::Mapped { pages, .. } => mapped += pages,
            }
        }
        // Each process's counts are bounded by its address space, their
        // sums over thousands of processes are not: saturate.
        totals.threads += process.threads.len();
        totals.pages_referenced = totals.pages_referenced.saturating_add(stored);
        totals.pages_zero = totals.pages_zero.saturating_add(zero);
        totals.pages_absent = totals.pages_absent.saturating_add(absent);
        totals.pages_mapped = totals.pages_mapped.saturating_add(mapped);
        processes.push(ProcessReport {
            pid: entry.pid,
            ppid: entry.ppid,
            comm: entry.comm.clone(),
            depth: depth_of(image, i),
            threads: process.threads.len(),
            vmas: process.vmas.len(),
            pages_stored: stored,
            pages_zero: zero,
            pages_absent: absent,
            zombie: entry.zombie,
        });
    }
    let mut histogram = std::collections::BTreeMap::<u64, u64>::new();
    for (r, p) in refs.iter().zip(&procs) {
        match *r {
            0 => totals.pages_unreferenced += 1,
            1 => {}
            _ => totals.pages_shared += 1,
        }
        if *p > 0 {
            *histogram.entry(u64::from(*p)).or_default() += 1;
        }
    }
    totals.sharing_histogram = histogram
        .into_iter()
        .map(|(processes, pages)| SharingBucket { processes, pages })
        .collect();
    if totals.bytes_stored > 0 {
        totals.compression_ratio =
            totals.bytes_unique_uncompressed as f64 / totals.bytes_stored as f64;
    }
    if totals.unique_pages_stored > 0 {
        totals.dedup_ratio = totals.pages_referenced as f64 / totals.unique_pages_stored as f64;
    }
    let manifest = &image.manifest;
    let manifest_size =
        std::fs::metadata(image.dir.join(super::types::MANIFEST_FILE)).map_or(0, |m| m.len());
    totals.bytes_total = manifest.files.iter().map(|f| f.size).sum::<u64>() + manifest_size;
    InspectReport {
        dir: image.dir.display().to_string(),
        format_version: manifest.format_version,
        engine_version: manifest.engine_version.clone(),
        kernel_release: manifest.kernel_release.clone(),
        arch: manifest.arch.clone(),
        page_size: manifest.page_size,
        created_unix: manifest.created_unix,
        root_pid: manifest.root_pid,
        processes,
        totals,
        mount_ns: image.tree.mount_ns.clone(),
    }
}

/// Depth of process `i` in the tree (parents come first, so they are known).
fn depth_of(image: &Image, i: usize) -> usize {
    let mut depth = 0;
    let mut ppid = image.tree.processes[i].ppid;
    // Bounded by the tree size so a cycle (which open refuses) cannot hang.
    while depth < image.tree.processes.len() {
        match image.tree.processes.iter().find(|p| p.pid == ppid) {
            Some(parent) => {
                depth += 1;
                ppid = parent.ppid;
            }
            None => break,
        }
    }
    depth
}

/// Text (or, with `json`, JSON) report of the image at `dir`.
pub fn inspect(dir: &Path, json: bool) -> Result<String, ImageError> {
    let image = Image::open(dir)?;
    let report = inspect_report(&image);
    if json {
        let mut text =
            serde_json::to_string_pretty(&report).map_err(|source| ImageError::Serialize {
                file: "inspect report".into(),
                source,
            })?;
        text.push('\n');
        return Ok(text);
    }
    Ok(render_text(&report))
}

fn render_text(r: &InspectReport) -> String {
    let mut out = String::new();
    let t = &r.totals;
    // Writing to a String cannot fail.
    let _ = writeln!(
        out,
        "image {}: cowsnap {}.{} by engine {}, kernel {} {}, page size {}, created {} (unix)",
        r.dir,
        r.format_version.major,
        r.format_version.minor,
        r.engine_version,
        r.kernel_release,
        r.arch,
        r.page_size,
        r.created_unix
    );
    let zombies = match t.zombies {
        0 => String::new(),
        n => format!(", {n} zombies"),
    };
    let _ = writeln!(
        out,
        "processes ({}{zombies}, root {}):",
        t.processes, r.root_pid
    );
    let _ = writeln!(
        out,
        "  {:<16} {:>7} {:>7} {:>5} {:>10} {:>10} {:>10}  comm",
        "pid", "ppid", "threads", "vmas", "stored", "zero", "absent"
    );
    for p in &r.processes {
        let pid = format!("{}{}", "  ".repeat(p.depth), p.pid);
        let _ = writeln!(
            out,
            "  {:<16} {:>7} {:>7} {:>5} {:>10} {:>10} {:>10}  {}",
            pid,
            p.ppid,
            p.threads,
            p.vmas,
            p.pages_stored,
            p.pages_zero,
            p.pages_absent,
            comm_column(p)
        );
    }
    if let Some(ns) = &r.mount_ns {
        let _ = writeln!(out, "mount namespace: {}", mount_ns_text(ns));
    }
    let _ = writeln!(out, "totals:");
    let rows: [(&str, String); 14] = [
        ("threads", t.threads.to_string()),
        ("pages referenced", t.pages_referenced.to_string()),
        ("unique pages stored", t.unique_pages_stored.to_string()),
        ("pages shared", t.pages_shared.to_string()),
        ("pages unreferenced", t.pages_unreferenced.to_string()),
        ("zero pages skipped", t.pages_zero.to_string()),
        ("absent pages", t.pages_absent.to_string()),
        ("mapped file pages", t.pages_mapped.to_string()),
        (
            "saved files (pages)",
            format!("{} ({})", t.saved_files, t.saved_file_pages),
        ),
        ("frames", t.frames.to_string()),
        ("bytes stored (pages)", t.bytes_stored.to_string()),
        (
            "bytes unique, uncompressed",
            t.bytes_unique_uncompressed.to_string(),
        ),
        ("compression ratio", format!("{:.2}", t.compression_ratio)),
        ("dedup ratio", format!("{:.2}", t.dedup_ratio)),
    ];
    for (name, value) in rows {
        let _ = writeln!(out, "  {name:<28} {value}");
    }
    let _ = writeln!(out, "  {:<28} {}", "bytes total (all files)", t.bytes_total);
    let _ = writeln!(
        out,
        "sharing (stored pages by number of processes using them):"
    );
    for b in &t.sharing_histogram {
        let _ = writeln!(out, "  {:>4} processes: {} pages", b.processes, b.pages);
    }
    out
}

/// What restore makes of the tree's own mount namespace, in a line.
fn mount_ns_text(ns: &MountNs) -> String {
    match ns {
        MountNs::OwnRoot => {
            "its own, with its own root (a container's: left to its runtime)".into()
        }
        MountNs::PrivateCopy { mounts, unmounted } => {
            let made: Vec<String> = mounts
                .iter()
                .map(|m| format!("{} on {}", m.fstype.name(), m.mountpoint))
                .collect();
            format!(
                "a private copy of the dumper's; made again: {}; detached: {}",
                if made.is_empty() {
                    "none".into()
                } else {
                    made.join(", ")
                },
                if unmounted.is_empty() {
                    "none".into()
                } else {
                    unmounted.join(", ")
                }
            )
        }
    }
}

/// `comm`, and for a zombie how it ended (what its parent's wait will report).
fn comm_column(p: &ProcessReport) -> String {
    match p.zombie {
        None => p.comm.clone(),
        Some(ZombieExit::Exited { code }) => format!("{} <zombie: exited {code}>", p.comm),
        Some(ZombieExit::Killed {
            signal,
            core_dumped,
        }) => format!(
            "{} <zombie: killed by signal {signal}{}>",
            p.comm,
            if core_dumped { ", core dumped" } else { "" }
        ),
    }
}

/// Full integrity check: every file, checksum, frame and page reference.
/// Returns a one-line summary on success.
pub fn verify(dir: &Path) -> Result<String, ImageError> {
    let image = Image::open(dir)?;
    image.verify_pages_file()?;
    let reader = image.page_reader()?;
    let frames = reader.frame_count();
    reader.verify_frames_decompressed()?;
    // A stored plan must be the one this image plans to: checked in full
    // here (restore only checks that it fits the image).
    let plan = match &image.plan {
        Some(bytes) => {
            let stored = crate::restore::plan_store::decode(bytes, &image)
                .map_err(|e| ImageError::StoredPlan(e.to_string()))?;
            crate::restore::plan_store::compare(&stored, &image)
                .map_err(|e| ImageError::StoredPlan(e.to_string()))?;
            "the stored plan matches"
        }
        None => "no stored plan",
    };
    let files = image.manifest.files.len() + 1;
    let manifest_size = std::fs::metadata(dir.join(super::types::MANIFEST_FILE))
        .map_err(|e| ImageError::io(dir.join(super::types::MANIFEST_FILE), e))?
        .len();
    let bytes: u64 = image.manifest.files.iter().map(|f| f.size).sum::<u64>() + manifest_size;
    Ok(format!(
        "{}: ok: {} processes, {} unique pages in {} frames, {} files ({} bytes), every checksum matches, {plan}",
        dir.display(),
        image.processes.len(),
        image.index.page_count,
        frames,
        files,
        bytes
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::testutil::{self, build, rewrite};
    use crate::image::types::{PAGES_FILE, PAGE_INDEX_FILE};

    #[test]
    fn report_counts_sharing() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = build(tmp.path());
        let image = Image::open(&dir).unwrap();
        let r = inspect_report(&image);
        let t = &r.totals;
        assert_eq!(t.processes, 2);
        assert_eq!(t.threads, 2);
        // Root: ids 0,1 (shared VMA) + 2,3; child: ids 0,1 + 4.
        assert_eq!(t.pages_referenced, 7);
        assert_eq!(t.unique_pages_stored, testutil::PAGES);
        assert_eq!(t.pages_shared, 2);
        assert_eq!(t.pages_unreferenced, 0);
        assert_eq!(
            t.sharing_histogram,
            vec![
                SharingBucket {
                    processes: 1,
                    pages: 3
                },
                SharingBucket {
                    processes: 2,
                    pages: 2
                }
            ]
        );
        assert_eq!(t.pages_zero, 2);
        assert_eq!(t.pages_absent, 2);
        assert_eq!(t.frames, 3);
        let pages_len = std::fs::metadata(dir.join(PAGES_FILE)).unwrap().len();
        assert_eq!(t.bytes_stored, pages_len);
        assert_eq!(t.bytes_unique_uncompressed, testutil::PAGES * testutil::PS);
        // Half of every page is zero: zstd must gain something.
        assert!(t.compression_ratio > 1.0, "ratio {}", t.compression_ratio);
        assert_eq!(r.processes[1].depth, 1);
        assert_eq!(r.processes[1].pages_stored, 3);
        assert_eq!(r.processes[0].pages_stored, 4);
    }

    #[test]
    fn inspect_renders_text_and_json() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = build(tmp.path());
        let text = inspect(&dir, false).unwrap();
        assert!(text.contains("proc101"), "{text}");
        assert!(text.contains("pages shared"), "{text}");
        let json: serde_json::Value = serde_json::from_str(&inspect(&dir, true).unwrap()).unwrap();
        assert_eq!(json["totals"]["pages_shared"], 2);
        assert_eq!(json["processes"][1]["pid"], testutil::CHILD);
    }

    #[test]
    fn inspect_shows_the_mount_namespace() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = build(tmp.path());
        assert!(!inspect(&dir, false).unwrap().contains("mount namespace"));
        testutil::edit_json(&dir, "tree.json", |v| {
            v["mount_ns"] = serde_json::json!({"kind": "private_copy", "unmounted": ["/mnt/usb"],
                "mounts": [{"mountpoint": "/proc", "fstype": "proc", "flags": ["rw"]}]});
        });
        let text = inspect(&dir, false).unwrap();
        assert!(
            text.contains("made again: proc on /proc; detached: /mnt/usb"),
            "{text}"
        );
        let json: serde_json::Value = serde_json::from_str(&inspect(&dir, true).unwrap()).unwrap();
        assert_eq!(json["mount_ns"]["mounts"][0]["mountpoint"], "/proc");
    }

    #[test]
    fn inspect_shows_zombies() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = build(tmp.path());
        testutil::edit_json(&dir, crate::image::types::TREE_FILE, |v| {
            v["processes"][1]["tids"] = serde_json::json!([]);
            v["processes"][1]["zombie"] = serde_json::json!({"how": "exited", "code": 7});
        });
        testutil::edit_json(&dir, "proc-101.json", |v| {
            v["vmas"] = serde_json::json!([]);
            v["fds"] = serde_json::json!([]);
            v["threads"] = serde_json::json!([]);
            v["signals"] = serde_json::json!({"actions": [], "shared_pending": []});
        });
        let text = inspect(&dir, false).unwrap();
        assert!(text.contains("proc101 <zombie: exited 7>"), "{text}");
        assert!(text.contains("(2, 1 zombies, root 100)"), "{text}");
        assert!(!text.contains("proc100 <zombie"), "{text}");
        let json: serde_json::Value = serde_json::from_str(&inspect(&dir, true).unwrap()).unwrap();
        assert_eq!(json["totals"]["zombies"], 1);
        assert_eq!(json["processes"][1]["zombie"]["code"], 7);
        assert!(json["processes"][0].get("zombie").is_none());
    }

    #[test]
    fn verify_accepts_good_image() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = build(tmp.path());
        let line = verify(&dir).unwrap();
        assert!(line.contains("5 unique pages in 3 frames"), "{line}");
    }

    #[test]
    fn verify_refuses_frame_checksum() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = build(tmp.path());
        testutil::edit_json(&dir, PAGE_INDEX_FILE, |v| {
            v["frames"][1]["xxh3_64"] = serde_json::json!("0123456789abcdef");
        });
        assert!(Image::open(&dir).is_ok());
        assert!(matches!(
            verify(&dir),
            Err(ImageError::FrameChecksum { frame: 1, .. })
        ));
    }

    #[test]
    fn verify_refuses_corrupt_frame() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = build(tmp.path());
        // Break the zstd magic of frame 0; the manifest is fixed so open passes.
        let mut pages = std::fs::read(dir.join(PAGES_FILE)).unwrap();
        pages[0] ^= 0xff;
        rewrite(&dir, PAGES_FILE, &pages);
        assert!(matches!(
            verify(&dir),
            Err(ImageError::FrameCorrupt { frame: 0, .. })
        ));
    }

    #[test]
    fn verify_refuses_frame_length() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = build(tmp.path());
        // Replace frame 2 (1 page) by a valid frame of 2 pages, fixing the index offsets.
        let pages = std::fs::read(dir.join(PAGES_FILE)).unwrap();
        let index: crate::image::types::PageIndex =
            serde_json::from_slice(&std::fs::read(dir.join(PAGE_INDEX_FILE)).unwrap()).unwrap();
        let f2 = &index.frames[2];
        let bigger = zstd::bulk::compress(&vec![7u8; 2 * testutil::PS as usize], 1).unwrap();
        let mut new_pages = pages[..f2.offset as usize].to_vec();
        new_pages.extend_from_slice(&bigger);
        rewrite(&dir, PAGES_FILE, &new_pages);
        let len = bigger.len();
        testutil::edit_json(&dir, PAGE_INDEX_FILE, |v| {
            v["frames"][2]["compressed_len"] = serde_json::json!(len);
        });
        assert!(matches!(
            verify(&dir),
            Err(ImageError::FrameLength {
                frame: 2,
                expected: 4096,
                actual: 8192
            })
        ));
    }
}
