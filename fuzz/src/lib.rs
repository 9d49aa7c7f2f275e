//! The body every fuzz target shares: loads the base image once (prepared
//! for the target, `fuzz::base_for`), then feeds
//! each AFL++ input to [`cowsnap::image::fuzz::run`]. A refusal is the
//! expected outcome; only a panic, an abort or a hang is a finding.

use std::path::{Path, PathBuf};

use cowsnap::image::fuzz::{self, ImageFiles, Target};

/// `fuzz/seed/image`: the real image every target mutates one file of.
pub fn seed_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("seed/image")
}

/// The base image's files (the process exits if they cannot be read: no
/// input could be judged without them).
pub fn base() -> ImageFiles {
    match fuzz::read_dir(&seed_dir()) {
        Ok(files) => files,
        Err(e) => {
            eprintln!("cowsnap-fuzz: base image: {e}");
            std::process::exit(2);
        }
    }
}

/// Runs `target` under AFL++'s persistent mode (or once on stdin when not
/// started by afl-fuzz).
pub fn main(target: Target) {
    // Once, not per input: giving the base its runs file or plan opens and
    // plans the whole image.
    let base = fuzz::base_for(target, &base());
    afl::fuzz!(|input: &[u8]| {
        let _ = fuzz::run(target, &base, input);
    });
}
