//! Writes the seed corpus `fuzz/corpus/<target>/` from the base image
//! (`fuzz/seed/image`): for each target its own file of that image (for
//! `image`, the archive of every file). Run after `seed/make.sh`; afl-fuzz
//! grows the corpus from there. With target names as arguments, only
//! those targets' corpora are written again.

use std::path::Path;

use cowsnap::image::fuzz::{archive, with_plan_file, with_runs_file, Target};

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
        // The runs target's file exists once the base has the 1.5 layout,
        // the plan target's once it has a plan.
        let files = match target {
            Target::Runs => with_runs_file(&base),
            Target::Plan => with_plan_file(&with_runs_file(&base)),
            _ => base.clone(),
        };
        let seed = match target.file(&files) {
            Some(name) => files.get(&name).cloned().unwrap_or_default(),
            None => archive(&files),
        };
        std::fs::write(dir.join("seed"), seed)?;
    }
    Ok(())
}
