//! In-memory images for the fuzz targets of `fuzz/` and for the test that
//! replays their corpus (`tests/fuzz_corpus.rs`): an image as a map from
//! file name to contents, opened with the checks of [`Image::open`], then
//! put through what `inspect`, `verify` and restore planning do with it.
//!
//! Every function here takes untrusted bytes and must return, whatever
//! they are: a panic, an abort or a huge allocation is a bug of the parser
//! under test. This module owns no format rule of its own.
//!
//! A target replaces one file of a valid base image (the seed image of
//! `fuzz/seed/image`) with the input and [`reseal`]s the manifest (sizes and
//! checksums), so the input reaches the parsers and cross-file checks behind
//! the checksums; [`Target::Image`] takes every file from the input.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use xxhash_rust::xxh3::xxh3_128;

use super::inspect::inspect_report;
use super::pagestore::{decode_frame, validate_index};
use super::reader::{check_file_list, check_hash, check_size, parse_manifest};
use super::sockets::SOCKETS_FILE;
use super::types::{MANIFEST_FILE, PAGES_FILE, PAGE_INDEX_FILE, PIPES_FILE, PLAN_FILE, TREE_FILE};
use super::{Image, ImageError};

/// Every file of an image directory, `manifest.json` included, by name.
pub type ImageFiles = BTreeMap<String, Vec<u8>>;

/// Where an in-memory image says it lives (errors and reports name it).
const IN_MEMORY: &str = "(in memory)";

/// Separates the files of a [`Target::Image`] input: `\n@@ NAME\n` before
/// each file's contents (the first may omit its leading newline).
const ARCHIVE_MARK: &[u8] = b"\n@@ ";

/// One fuzz target: which file of the base image the input replaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// `manifest.json` as it is; resealed and tried again if only sizes or
    /// checksums were off.
    Manifest,
    Tree,
    /// The root's `proc-<pid>.json`.
    Process,
    Pipes,
    Sockets,
    PageIndex,
    /// The `pages` file (zstd frames, decompressed and checksummed).
    Pages,
    /// The root's binary page runs, `proc-<pid>.runs` (format 1.5). A base
    /// image of an older format is first given that layout.
    Runs,
    /// The stored restore plan, `plan.bin` (format 1.6). A base image
    /// without one is first given its own (after the 1.5 layout).
    Plan,
    /// Every file, from an archive of `\n@@ NAME\n` sections (see
    /// [`archive`]): inputs that change several files at once.
    Image,
}

impl Target {
    pub const ALL: [Target; 10] = [
        Target::Manifest,
        Target::Tree,
        Target::Process,
        Target::Pipes,
        Target::Sockets,
        Target::PageIndex,
        Target::Pages,
        Target::Runs,
        Target::Plan,
        Target::Image,
    ];

    /// The target's name: its binary in `fuzz/` and its corpus directory.
    pub fn name(self) -> &'static str {
        match self {
            Target::Manifest => "manifest",
            Target::Tree => "tree",
            Target::Process => "process",
            Target::Pipes => "pipes",
            Target::Sockets => "sockets",
            Target::PageIndex => "page_index",
            Target::Pages => "pages",
            Target::Runs => "runs",
            Target::Plan => "plan",
            Target::Image => "image",
        }
    }

    pub fn from_name(name: &str) -> Option<Target> {
        Target::ALL.into_iter().find(|t| t.name() == name)
    }

    /// The file of `base` this target replaces (None for [`Target::Image`]).
    pub fn file(self, base: &ImageFiles) -> Option<String> {
        let name = match self {
            Target::Manifest => MANIFEST_FILE,
            Target::Tree => TREE_FILE,
            Target::Process => return root_process_file(base),
            Target::Pipes => PIPES_FILE,
            Target::Sockets => SOCKETS_FILE,
            Target::PageIndex => PAGE_INDEX_FILE,
            Target::Pages => PAGES_FILE,
            Target::Plan => PLAN_FILE,
            Target::Runs => {
                let manifest = parse_manifest(base.get(MANIFEST_FILE)?).ok()?;
                return Some(super::runs::runs_file_name(manifest.root_pid));
            }
            Target::Image => return None,
        };
        Some(name.into())
    }
}

/// The root's process file: `proc-<root_pid>.json` of the base manifest.
fn root_process_file(base: &ImageFiles) -> Option<String> {
    let manifest = parse_manifest(base.get(MANIFEST_FILE)?).ok()?;
    Some(super::types::process_file_name(manifest.root_pid))
}

/// Runs `target` on `input` over `base`: the image it makes is opened and,
/// if it opens, reported on, planned and verified frame by frame.
pub fn run(target: Target, base: &ImageFiles, input: &[u8]) -> Result<(), ImageError> {
    if target == Target::Manifest {
        let mut files = base.clone();
        files.insert(MANIFEST_FILE.into(), input.to_vec());
        match check(&files) {
            Err(ImageError::SizeMismatch { .. } | ImageError::ChecksumMismatch { .. }) => {}
            other => return other,
        }
    }
    check(&image_files(target, base, input))
}

/// `base` as `target` needs it: with the file the target replaces
/// (the runs target's once the base has the 1.5 layout, the plan target's
/// once it has a plan). Fuzzing prepares it once; a base prepared already
/// is returned as it is.
pub fn base_for(target: Target, base: &ImageFiles) -> ImageFiles {
    match target {
        Target::Runs => with_runs_file(base),
        Target::Plan => with_plan_file(&with_runs_file(base)),
        _ => base.clone(),
    }
}

/// The image `target` makes of `input` over `base`, resealed.
pub fn image_files(target: Target, base: &ImageFiles, input: &[u8]) -> ImageFiles {
    let mut files = match target {
        Target::Image => unarchive(input),
        _ => base_for(target, base),
    };
    if let Some(name) = target.file(base) {
        files.insert(name, input.to_vec());
    }
    reseal(&mut files);
    files
}

/// `base` with the root's page runs in `proc-<pid>.runs` (format 1.5),
/// listed in the manifest (sized and checksummed by [`reseal`]); as it is
/// if it has that file already or its root process does not parse.
pub fn with_runs_file(base: &ImageFiles) -> ImageFiles {
    let mut files = base.clone();
    let Some(json_name) = root_process_file(base) else {
        return files;
    };
    let Some(runs_name) = Target::Runs.file(base) else {
        return files;
    };
    if files.contains_key(&runs_name) {
        return files;
    }
    let Some(mut process) = files
        .get(&json_name)
        .and_then(|b| serde_json::from_slice::<super::types::ProcessImage>(b).ok())
    else {
        return files;
    };
    let Ok(runs) = super::runs::encode(&process.vmas) else {
        return files;
    };
    for vma in &mut process.vmas {
        vma.pages.clear();
    }
    process.runs_file = Some(runs_name.clone());
    let (Ok(json), Some(manifest)) = (
        serde_json::to_vec(&process),
        files
            .get(MANIFEST_FILE)
            .and_then(|m| serde_json::from_slice::<serde_json::Value>(m).ok()),
    ) else {
        return files;
    };
    let mut manifest = manifest;
    if let Some(list) = manifest.get_mut("files").and_then(|f| f.as_array_mut()) {
        list.push(serde_json::json!({"name": runs_name, "size": 0, "xxh3_128": "0".repeat(32)}));
    }
    if let Ok(bytes) = serde_json::to_vec_pretty(&manifest) {
        files.insert(MANIFEST_FILE.into(), bytes);
    }
    files.insert(json_name, json);
    files.insert(runs_name, runs);
    reseal(&mut files);
    files
}

/// `base` with its own restore plan in `plan.bin` (format 1.6), listed in
/// the manifest; as it is if it has one already or does not open and plan.
pub fn with_plan_file(base: &ImageFiles) -> ImageFiles {
    let mut files = base.clone();
    if files.contains_key(PLAN_FILE) {
        return files;
    }
    let Ok(image) = open(&files) else {
        return files;
    };
    let Ok(plan) = crate::restore::plan::plan(&image.tree.processes, &image.processes) else {
        return files;
    };
    let binding = crate::restore::plan_store::binding(&image.manifest.files, image.page_size());
    let Ok(bytes) = crate::restore::plan_store::encode(&plan, binding) else {
        return files;
    };
    let Some(mut manifest) = files
        .get(MANIFEST_FILE)
        .and_then(|m| serde_json::from_slice::<serde_json::Value>(m).ok())
    else {
        return files;
    };
    if let Some(list) = manifest.get_mut("files").and_then(|f| f.as_array_mut()) {
        list.push(serde_json::json!({"name": PLAN_FILE, "size": 0, "xxh3_128": "0".repeat(32)}));
    }
    if let Ok(m) = serde_json::to_vec_pretty(&manifest) {
        files.insert(MANIFEST_FILE.into(), m);
    }
    files.insert(PLAN_FILE.into(), bytes);
    reseal(&mut files);
    files
}

/// Rewrites the size and xxh3-128 of every file the manifest lists and
/// `files` holds, keeping every other byte of meaning (the manifest is
/// re-serialized). Leaves a manifest that is not a JSON object alone.
pub fn reseal(files: &mut ImageFiles) {
    let Some(bytes) = files.get(MANIFEST_FILE) else {
        return;
    };
    let Ok(mut manifest) = serde_json::from_slice::<serde_json::Value>(bytes) else {
        return;
    };
    let Some(list) = manifest.get_mut("files").and_then(|f| f.as_array_mut()) else {
        return;
    };
    for entry in list.iter_mut().filter_map(|e| e.as_object_mut()) {
        let Some(contents) = entry
            .get("name")
            .and_then(|n| n.as_str())
            .and_then(|n| files.get(n))
        else {
            continue;
        };
        entry.insert("size".into(), contents.len().into());
        entry.insert(
            "xxh3_128".into(),
            format!("{:032x}", xxh3_128(contents)).into(),
        );
    }
    if let Ok(bytes) = serde_json::to_vec_pretty(&manifest) {
        files.insert(MANIFEST_FILE.into(), bytes);
    }
}

/// [`Image::open`] of an image held in memory: the same checks, in the
/// same order.
pub fn open(files: &ImageFiles) -> Result<Image, ImageError> {
    let dir = Path::new(IN_MEMORY);
    let manifest_bytes = files
        .get(MANIFEST_FILE)
        .ok_or_else(|| ImageError::Incomplete { dir: dir.into() })?;
    let manifest = parse_manifest(manifest_bytes)?;
    check_file_list(&manifest)?;
    for entry in &manifest.files {
        let contents = files
            .get(&entry.name)
            .ok_or_else(|| ImageError::MissingFile {
                dir: dir.into(),
                name: entry.name.clone(),
            })?;
        check_size(entry, contents.len() as u64)?;
    }
    let mut contents = HashMap::new();
    for (i, entry) in manifest.files.iter().enumerate() {
        let bytes = &files[&entry.name];
        check_hash(i, entry, xxh3_128(bytes))?;
        if entry.name != PAGES_FILE {
            contents.insert(entry.name.clone(), bytes.clone());
        }
    }
    Image::from_checked_files(dir, manifest, contents)
}

/// Opens the image, then does what `inspect` (the report), restore (the
/// plan) and `verify` (every frame decompressed against its checksum) do
/// with an image that opened.
pub fn check(files: &ImageFiles) -> Result<(), ImageError> {
    let image = open(files)?;
    let _ = inspect_report(&image);
    // A plan error is a refusal like any other; only a panic matters here.
    let _ = crate::restore::plan::plan(&image.tree.processes, &image.processes);
    // What restore (decode) and verify (compare) do with a stored plan.
    if let Some(bytes) = &image.plan {
        if let Ok(stored) = crate::restore::plan_store::decode(bytes, &image) {
            let _ = crate::restore::plan_store::compare(&stored, &image);
        }
    }
    let pages = files.get(PAGES_FILE).map_or(&[][..], Vec::as_slice);
    let checksums = validate_index(&image.index, image.page_size(), pages.len() as u64)?;
    let mut out = Vec::new();
    for (i, (entry, checksum)) in image.index.frames.iter().zip(checksums).enumerate() {
        // validate_index checked that the frame lies inside `pages`.
        let start = entry.offset as usize;
        let compressed = &pages[start..start + entry.compressed_len as usize];
        out.resize((entry.page_count * image.page_size()) as usize, 0);
        decode_frame(i, entry, image.page_size(), checksum, compressed, &mut out)?;
    }
    Ok(())
}

/// Every file of the image directory `dir`.
pub fn read_dir(dir: &Path) -> Result<ImageFiles, ImageError> {
    let mut files = ImageFiles::new();
    for entry in std::fs::read_dir(dir).map_err(|e| ImageError::io(dir, e))? {
        let path = entry.map_err(|e| ImageError::io(dir, e))?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let bytes = std::fs::read(&path).map_err(|e| ImageError::io(&path, e))?;
        files.insert(name.into(), bytes);
    }
    Ok(files)
}

/// The [`Target::Image`] input holding `files`: `@@ NAME\n` and the
/// contents of each, sections separated by a newline.
pub fn archive(files: &ImageFiles) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, contents) in files {
        if !out.is_empty() {
            out.push(b'\n');
        }
        out.extend_from_slice(b"@@ ");
        out.extend_from_slice(name.as_bytes());
        out.push(b'\n');
        out.extend_from_slice(contents);
    }
    out
}

/// The files of an [`archive`]; anything before the first mark is dropped,
/// a later section of the same name wins.
pub fn unarchive(input: &[u8]) -> ImageFiles {
    let mut files = ImageFiles::new();
    let body = match input.strip_prefix(&ARCHIVE_MARK[1..]) {
        Some(rest) => rest,
        None => match find(input, ARCHIVE_MARK) {
            Some(at) => &input[at + ARCHIVE_MARK.len()..],
            None => return files,
        },
    };
    let mut rest = body;
    loop {
        let (section, next) = match find(rest, ARCHIVE_MARK) {
            Some(at) => (&rest[..at], Some(&rest[at + ARCHIVE_MARK.len()..])),
            None => (rest, None),
        };
        let (name, contents) = match section.iter().position(|&b| b == b'\n') {
            Some(nl) => (&section[..nl], &section[nl + 1..]),
            None => (section, &[][..]),
        };
        files.insert(
            String::from_utf8_lossy(name).into_owned(),
            contents.to_vec(),
        );
        match next {
            Some(next) => rest = next,
            None => return files,
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::testutil::build;

    #[test]
    fn archive_round_trip() {
        let mut files = ImageFiles::new();
        files.insert("a".into(), b"one\n@@ not a mark".to_vec());
        files.insert("b".into(), Vec::new());
        files.insert("c".into(), b"\x00\xff".to_vec());
        let mut without_false_mark = files.clone();
        without_false_mark.insert("a".into(), b"one".to_vec());
        without_false_mark.insert("not a mark".into(), Vec::new());
        // A mark inside contents starts a section: the fuzzer may use that.
        assert_eq!(unarchive(&archive(&files)), without_false_mark);
        files.insert("a".into(), b"one".to_vec());
        assert_eq!(unarchive(&archive(&files)), files);
        assert!(unarchive(b"no mark").is_empty());
    }

    #[test]
    fn every_target_accepts_its_own_file_of_a_valid_image() {
        let tmp = tempfile::tempdir().unwrap();
        let base = read_dir(&build(tmp.path())).unwrap();
        check(&base).expect("the fixture image checks");
        for target in Target::ALL {
            let files = base_for(target, &base);
            let input = match target.file(&files) {
                Some(name) => files[&name].clone(),
                None => archive(&files),
            };
            run(target, &base, &input).unwrap_or_else(|e| panic!("{}: {e}", target.name()));
            assert_eq!(Target::from_name(target.name()), Some(target));
        }
    }

    #[test]
    fn a_changed_file_is_resealed() {
        let tmp = tempfile::tempdir().unwrap();
        let base = read_dir(&build(tmp.path())).unwrap();
        let mut files = base.clone();
        let mut pipes = files[PIPES_FILE].clone();
        pipes.push(b'\n');
        files.insert(PIPES_FILE.into(), pipes);
        assert!(matches!(open(&files), Err(ImageError::SizeMismatch { .. })));
        reseal(&mut files);
        open(&files).expect("resealed");
    }
}
