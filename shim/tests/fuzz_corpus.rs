//! Replays the fuzz corpus (`fuzz/corpus/<target>/`, seeds and every input
//! a fuzz run kept or that once crashed) through `cowsnap::image::fuzz`: each
//! must be refused or accepted, never panic. Each image is also written to
//! a directory and opened from there, which must agree with the in-memory
//! open. This is what CI runs of the fuzzing; README "Fuzzing" says how to
//! fuzz for real.

use std::mem::discriminant;
use std::path::{Path, PathBuf};

use cowsnap::image::fuzz::{self, ImageFiles, Target};
use cowsnap::image::Image;

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

fn base() -> ImageFiles {
    fuzz::read_dir(&fuzz_dir().join("seed/image")).expect("fuzz/seed/image")
}

/// Every input of `target`'s corpus, by path.
fn corpus(target: Target) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = fuzz_dir().join("corpus").join(target.name());
    let mut inputs: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("corpus entry").path())
        .filter(|p| p.is_file())
        .map(|p| {
            let bytes = std::fs::read(&p).expect("corpus input");
            (p, bytes)
        })
        .collect();
    inputs.sort();
    inputs
}

fn write_image(dir: &Path, files: &ImageFiles) {
    for (name, contents) in files {
        // Names a fuzzed archive made up (`../x`, empty) are not written:
        // the manifest check refuses them before any is opened.
        if name.is_empty() || name.contains(['/', '\0']) || name == "." || name == ".." {
            continue;
        }
        std::fs::write(dir.join(name), contents).expect("write image file");
    }
}

#[test]
fn the_seed_image_checks_out() {
    let base = base();
    fuzz::check(&base).expect("fuzz/seed/image is a valid image");
    let tmp = tempfile::tempdir().expect("tmp");
    write_image(tmp.path(), &base);
    Image::open(tmp.path()).expect("opens from disk");
    cowsnap::image::inspect::verify(tmp.path()).expect("verifies");
}

#[test]
fn every_corpus_input_is_refused_or_accepted_without_panic() {
    let base = base();
    let mut total = 0;
    for target in Target::ALL {
        let inputs = corpus(target);
        assert!(!inputs.is_empty(), "corpus of {} is empty", target.name());
        for (path, input) in inputs {
            // A panic names the input through the test's backtrace; say it first.
            eprintln!("{}", path.display());
            let _ = fuzz::run(target, &base, &input);
            let files = fuzz::image_files(target, &base, &input);
            let in_memory = fuzz::open(&files).map(|_| ());
            let tmp = tempfile::tempdir().expect("tmp");
            write_image(tmp.path(), &files);
            let on_disk = Image::open(tmp.path()).map(|_| ());
            match (&in_memory, &on_disk) {
                (Ok(()), Ok(())) => {}
                (Err(a), Err(b)) if discriminant(a) == discriminant(b) => {}
                _ => panic!(
                    "{}: in memory {in_memory:?}, on disk {on_disk:?}",
                    path.display()
                ),
            }
            total += 1;
        }
    }
    eprintln!("{total} corpus inputs replayed");
}

/// The runs target gives the (older) base image the 1.5 layout, and its
/// seed, the base root's own runs, makes an image that checks out: the
/// fuzzer starts from inputs the binary runs parser accepts.
#[test]
fn the_runs_seed_makes_a_valid_image() {
    let base = base();
    let seed = std::fs::read(fuzz_dir().join("corpus/runs/seed")).expect("runs seed");
    let files = fuzz::image_files(Target::Runs, &base, &seed);
    let runs = Target::Runs.file(&base).expect("the root's runs file");
    assert_eq!(files.get(&runs), Some(&seed));
    fuzz::check(&files).expect("the runs seed over the base image checks out");
    let image = fuzz::open(&files).expect("opens");
    assert!(image.processes[0].runs_file.is_some());
    assert!(image.processes[0].vmas.iter().all(|v| !v.pages.is_empty()));
}

/// The plan target gives the base image its own plan, and its seed, that
/// plan, makes an image whose stored plan decodes and matches.
#[test]
fn the_plan_seed_makes_a_valid_image() {
    let base = base();
    let seed = std::fs::read(fuzz_dir().join("corpus/plan/seed")).expect("plan seed");
    let files = fuzz::image_files(Target::Plan, &base, &seed);
    assert_eq!(files.get("plan.bin"), Some(&seed));
    fuzz::check(&files).expect("the plan seed over the base image checks out");
    let image = fuzz::open(&files).expect("opens");
    let stored =
        cowsnap::restore::plan_store::decode(image.plan.as_deref().expect("a plan"), &image)
            .expect("the seed plan fits the base image");
    cowsnap::restore::plan_store::compare(&stored, &image).expect("and is its plan");
}
