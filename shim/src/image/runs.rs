//! `proc-<pid>.runs`: the page runs of every VMA of one process in a
//! compact binary form (format 1.5). The runs are most of a process
//! file's size (a child that dirtied 10% of 1 GiB at random has some
//! 50,000 of them, 3.7 MB of JSON), and parsing them as JSON was most of
//! the time an image took to open; the rest of the process stays JSON,
//! for people to read.
//!
//! The file is one zstd frame. Decompressed, it is the magic
//! [`RUNS_MAGIC`], the number of runs (u64), then per run, in VMA order
//! and address order within a VMA, five little-endian fields: the VMA's
//! index (u32), the run's kind (u32: 0 stored, 1 zero, 2 absent,
//! 3 mapped), its start address, its length in pages and, for a stored
//! run, its first page id (u64 each; 0 for other kinds). The reader
//! refuses a frame that declares more than the VMAs' pages could hold,
//! a bad magic, a count that does not match the length, an unknown kind,
//! or runs out of VMA order; [`super::reader`] then checks that they
//! cover every VMA exactly, as it does for JSON runs.

use super::types::{PageRun, Vma};
use super::ImageError;

/// First 8 bytes of a decompressed runs file.
pub const RUNS_MAGIC: &[u8; 8] = b"CSRUNS01";
const HEADER: usize = 16;
const RECORD: usize = 32;
/// Runs one process file may hold: 2^25 (a gigabyte decompressed).
pub const MAX_RUNS: u64 = 1 << 25;

/// The name of the runs file of process `pid`.
pub fn runs_file_name(pid: i32) -> String {
    format!("proc-{pid}.runs")
}

/// The runs of `vmas`, compressed.
pub fn encode(vmas: &[Vma]) -> Result<Vec<u8>, std::io::Error> {
    let count: usize = vmas.iter().map(|v| v.pages.len()).sum();
    let mut raw = Vec::with_capacity(HEADER + count * RECORD);
    raw.extend_from_slice(RUNS_MAGIC);
    raw.extend_from_slice(&(count as u64).to_le_bytes());
    for (index, vma) in vmas.iter().enumerate() {
        for run in &vma.pages {
            let (kind, first) = match *run {
                PageRun::Stored { first, .. } => (0u32, first),
                PageRun::Zero { .. } => (1, 0),
                PageRun::Absent { .. } => (2, 0),
                PageRun::Mapped { .. } => (3, 0),
            };
            raw.extend_from_slice(&(index as u32).to_le_bytes());
            raw.extend_from_slice(&kind.to_le_bytes());
            raw.extend_from_slice(&run.start().to_le_bytes());
            raw.extend_from_slice(&run.pages().to_le_bytes());
            raw.extend_from_slice(&first.to_le_bytes());
        }
    }
    zstd::bulk::compress(&raw, 3)
}

/// Fills every VMA's `pages` (which must be empty) from `bytes`, the
/// runs file `file`. `page_size` bounds the number of runs by the VMAs'
/// length (checked: a forged VMA cannot make it overflow).
pub fn decode_into(
    file: &str,
    bytes: &[u8],
    vmas: &mut [Vma],
    page_size: u64,
) -> Result<(), ImageError> {
    let bad = |why: String| ImageError::BadRuns {
        file: file.into(),
        why,
    };
    if let Some(v) = vmas.iter().find(|v| !v.pages.is_empty()) {
        return Err(bad(format!(
            "vma {:#x} has page runs in the JSON as well",
            v.start
        )));
    }
    // Every run has at least one page: no more runs than pages.
    let most = vmas
        .iter()
        .try_fold(0u64, |sum, v| {
            sum.checked_add(v.end.saturating_sub(v.start) / page_size.max(1))
        })
        .unwrap_or(u64::MAX)
        .min(MAX_RUNS);
    let capacity = HEADER as u64 + most * RECORD as u64;
    let declared = zstd::zstd_safe::get_frame_content_size(bytes)
        .map_err(|_| bad("not a zstd frame".into()))?;
    if let Some(declared) = declared {
        if declared > capacity {
            return Err(bad(format!(
                "declares {declared} bytes, more than {most} runs (the VMAs' pages) could take"
            )));
        }
    }
    let raw = zstd::bulk::decompress(bytes, capacity as usize)
        .map_err(|e| bad(format!("cannot decompress: {e}")))?;
    if raw.len() < HEADER || &raw[..8] != RUNS_MAGIC {
        return Err(bad("does not start with the runs magic".into()));
    }
    let count = u64::from_le_bytes(raw[8..16].try_into().expect("8 bytes"));
    let body = &raw[HEADER..];
    if body.len() % RECORD != 0 || (body.len() / RECORD) as u64 != count {
        return Err(bad(format!(
            "says {count} runs but holds {} bytes of records",
            body.len()
        )));
    }
    let u64_at = |r: &[u8], at: usize| u64::from_le_bytes(r[at..at + 8].try_into().expect("8"));
    let mut last_vma = 0usize;
    for (k, r) in body.chunks_exact(RECORD).enumerate() {
        let index = u32::from_le_bytes(r[0..4].try_into().expect("4")) as usize;
        let kind = u32::from_le_bytes(r[4..8].try_into().expect("4"));
        let (start, pages, first) = (u64_at(r, 8), u64_at(r, 16), u64_at(r, 24));
        if index >= vmas.len() || index < last_vma {
            return Err(bad(format!(
                "run {k} names vma {index} (of {}) out of order",
                vmas.len()
            )));
        }
        last_vma = index;
        let run = match kind {
            0 => PageRun::Stored {
                start,
                pages,
                first,
            },
            1 => PageRun::Zero { start, pages },
            2 => PageRun::Absent { start, pages },
            3 => PageRun::Mapped { start, pages },
            other => return Err(bad(format!("run {k} has unknown kind {other}"))),
        };
        vmas[index].pages.push(run);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::testutil::vma;

    fn sample() -> Vec<Vma> {
        vec![
            vma(
                0x1000,
                0x5000,
                vec![
                    PageRun::Stored {
                        start: 0x1000,
                        pages: 2,
                        first: 7,
                    },
                    PageRun::Zero {
                        start: 0x3000,
                        pages: 1,
                    },
                    PageRun::Absent {
                        start: 0x4000,
                        pages: 1,
                    },
                ],
            ),
            vma(
                0x8000,
                0x9000,
                vec![PageRun::Mapped {
                    start: 0x8000,
                    pages: 1,
                }],
            ),
        ]
    }

    fn emptied(vmas: &[Vma]) -> Vec<Vma> {
        vmas.iter()
            .map(|v| vma(v.start, v.end, Vec::new()))
            .collect()
    }

    #[test]
    fn runs_come_back_as_they_were_written() {
        let vmas = sample();
        let bytes = encode(&vmas).unwrap();
        let mut back = emptied(&vmas);
        decode_into("proc-1.runs", &bytes, &mut back, 4096).unwrap();
        assert_eq!(back, vmas);
    }

    fn decode_err(raw: &[u8], vmas: &mut [Vma]) -> String {
        let bytes = zstd::bulk::compress(raw, 1).unwrap();
        decode_into("proc-1.runs", &bytes, vmas, 4096)
            .unwrap_err()
            .to_string()
    }

    fn raw_of(vmas: &[Vma]) -> Vec<u8> {
        zstd::bulk::decompress(&encode(vmas).unwrap(), 1 << 20).unwrap()
    }

    #[test]
    fn forged_runs_files_are_refused_naming_what_is_wrong() {
        let vmas = sample();
        let raw = raw_of(&vmas);
        let mut magic = raw.clone();
        magic[0] = b'X';
        assert!(decode_err(&magic, &mut emptied(&vmas)).contains("magic"));
        let mut count = raw.clone();
        count[8] = 9;
        assert!(decode_err(&count, &mut emptied(&vmas)).contains("says 9 runs"));
        let mut kind = raw.clone();
        kind[HEADER + 4] = 9;
        assert!(decode_err(&kind, &mut emptied(&vmas)).contains("unknown kind 9"));
        let mut order = raw.clone();
        order[HEADER] = 1; // the first run names the second VMA, the next the first
        assert!(decode_err(&order, &mut emptied(&vmas)).contains("out of order"));
        let mut past = raw.clone();
        past[HEADER] = 5;
        assert!(decode_err(&past, &mut emptied(&vmas)).contains("vma 5 (of 2)"));
        // More runs than the VMAs have pages: refused before decompressing.
        let mut many = raw.clone();
        for _ in 0..4 {
            many.extend_from_slice(&raw[HEADER..HEADER + RECORD]);
        }
        many[8] = 8;
        assert!(decode_err(&many, &mut emptied(&vmas)).contains("more than 5 runs"));
        assert!(
            decode_into("proc-1.runs", b"not zstd", &mut emptied(&vmas), 4096)
                .unwrap_err()
                .to_string()
                .contains("not a zstd frame")
        );
        let mut both = emptied(&vmas);
        both[1].pages = vmas[1].pages.clone();
        let bytes = encode(&vmas).unwrap();
        assert!(decode_into("proc-1.runs", &bytes, &mut both, 4096)
            .unwrap_err()
            .to_string()
            .contains("in the JSON as well"));
    }
}
