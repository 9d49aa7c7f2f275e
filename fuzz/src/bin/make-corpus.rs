//! Writes the seed corpus `fuzz/corpus/<target>/` from the base image
//! (`fuzz/seed/image`): for each target its own file of that image (for
//! `image`, the archive of every file). Run after `seed/make.sh`; afl-fuzz
//! grows the corpus from there. With target names as arguments, only
//! those targets' corpora are written again.

use std::path::Path;

use cowsnap::image::fuzz::{archive, base_for, Target};

fn main() -> std::io::Result<()> {
    let base = cowsnap_fuzz::base();
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let only: Vec<String> = std::env::args().skip(1).collect();
    for target in Target::ALL {
        if !only.is_empty() && !only.iter().any(|n| n == target.name()) {
            continue;
        }
        let dir = corpus.join(target.name());
        if dir.exists() {
            std::fs::remove_dir_all(&dir)?;
        }
        std::fs::create_dir_all(&dir)?;
        let files = base_for(target, &base);
        let seed = match target.file(&files) {
            Some(name) => files.get(&name).cloned().unwrap_or_default(),
            None => archive(&files),
        };
        std::fs::write(dir.join("seed"), seed)?;
    }
    Ok(())
}
