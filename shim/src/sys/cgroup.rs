//! Cgroup freezers: v1 (`freezer.state`: FROZEN/THAWED) and v2
//! (`cgroup.freeze` 1/0, confirmed by `frozen 1` in `cgroup.events`), chosen
//! from the files the given directory holds; and the member processes of a
//! cgroup subtree. Only the freezer files are ever written.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("{path}: neither cgroup.freeze (v2) nor freezer.state (v1) found; not a freezer cgroup directory")]
    NotAFreezer { path: PathBuf },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: unexpected content {content:?}")]
    Unexpected { path: PathBuf, content: String },
    #[error("{path}: not {expected} after {waited_ms} ms (last state {last:?})")]
    Timeout {
        path: PathBuf,
        expected: &'static str,
        waited_ms: u128,
        last: String,
    },
}

/// Default wait for a freeze to complete.
pub const FREEZE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Freezer {
    /// A directory of the v1 freezer hierarchy.
    V1 { dir: PathBuf },
    /// A v2 cgroup directory.
    V2 { dir: PathBuf },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CgroupError + '_ {
    move |source| CgroupError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl Freezer {
    /// Picks v2 if `dir/cgroup.freeze` exists, else v1 if `dir/freezer.state` does.
    pub fn detect(dir: &Path) -> Result<Freezer, CgroupError> {
        if dir.join("cgroup.freeze").exists() {
            Ok(Freezer::V2 {
                dir: dir.to_path_buf(),
            })
        } else if dir.join("freezer.state").exists() {
            Ok(Freezer::V1 {
                dir: dir.to_path_buf(),
            })
        } else {
            Err(CgroupError::NotAFreezer {
                path: dir.to_path_buf(),
            })
        }
    }

    pub fn dir(&self) -> &Path {
        match self {
            Freezer::V1 { dir } | Freezer::V2 { dir } => dir,
        }
    }

    /// The file written to freeze/thaw, and what to write for each.
    pub fn control(&self) -> (PathBuf, &'static str, &'static str) {
        match self {
            Freezer::V1 { dir } => (dir.join("freezer.state"), "FROZEN", "THAWED"),
            Freezer::V2 { dir } => (dir.join("cgroup.freeze"), "1", "0"),
        }
    }

    /// Whether the cgroup is completely frozen now.
    pub fn is_frozen(&self) -> Result<bool, CgroupError> {
        Ok(self.state()? == "frozen")
    }

    /// "frozen", "thawed" or "freezing" (v1 FREEZING / v2 freeze requested, not done).
    fn state(&self) -> Result<String, CgroupError> {
        match self {
            Freezer::V1 { dir } => {
                let path = dir.join("freezer.state");
                let s = fs::read_to_string(&path).map_err(io_err(&path))?;
                match s.trim() {
                    "FROZEN" => Ok("frozen".into()),
                    "THAWED" => Ok("thawed".into()),
                    "FREEZING" => Ok("freezing".into()),
                    other => Err(CgroupError::Unexpected {
                        path,
                        content: other.to_string(),
                    }),
                }
            }
            Freezer::V2 { dir } => {
                let path = dir.join("cgroup.events");
                let s = fs::read_to_string(&path).map_err(io_err(&path))?;
                let frozen = s
                    .lines()
                    .find_map(|l| l.strip_prefix("frozen "))
                    .ok_or_else(|| CgroupError::Unexpected {
                        path: path.clone(),
                        content: s.clone(),
                    })?;
                let fpath = dir.join("cgroup.freeze");
                let want = fs::read_to_string(&fpath).map_err(io_err(&fpath))?;
                Ok(match (frozen.trim(), want.trim()) {
                    ("1", _) => "frozen".into(),
                    (_, "1") => "freezing".into(),
                    _ => "thawed".into(),
                })
            }
        }
    }

    /// Freezes the cgroup and waits until every task is frozen.
    pub fn freeze(&self, timeout: Duration) -> Result<(), CgroupError> {
        let (path, frozen, _) = self.control();
        fs::write(&path, frozen).map_err(io_err(&path))?;
        let t0 = Instant::now();
        let mut sleep = Duration::from_micros(100);
        loop {
            let state = self.state()?;
            if state == "frozen" {
                return Ok(());
            }
            if t0.elapsed() >= timeout {
                return Err(CgroupError::Timeout {
                    path,
                    expected: "frozen",
                    waited_ms: t0.elapsed().as_millis(),
                    last: state,
                });
            }
            // v1 retries the freeze of stragglers only when freezer.state is
            // written again or read; writing again is harmless.
            if let Freezer::V1 { .. } = self {
                fs::write(&path, frozen).map_err(io_err(&path))?;
            }
            std::thread::sleep(sleep);
            sleep = (sleep * 2).min(Duration::from_millis(20));
        }
    }

    /// Thaws the cgroup (does not wait: thawing cannot get stuck).
    pub fn thaw(&self) -> Result<(), CgroupError> {
        let (path, _, thawed) = self.control();
        fs::write(&path, thawed).map_err(io_err(&path))
    }

    /// Pids of every process in this cgroup and its descendants, ascending.
    pub fn members(&self) -> Result<Vec<i32>, CgroupError> {
        let mut out = Vec::new();
        collect_procs(self.dir(), &mut out)?;
        out.sort_unstable();
        out.dedup();
        Ok(out)
    }
}

fn collect_procs(dir: &Path, out: &mut Vec<i32>) -> Result<(), CgroupError> {
    let procs = dir.join("cgroup.procs");
    let text = fs::read_to_string(&procs).map_err(io_err(&procs))?;
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        out.push(line.trim().parse().map_err(|_| CgroupError::Unexpected {
            path: procs.clone(),
            content: line.to_string(),
        })?);
    }
    let rd = fs::read_dir(dir).map_err(io_err(dir))?;
    for entry in rd {
        let entry = entry.map_err(io_err(dir))?;
        if entry.file_type().map_err(io_err(dir))?.is_dir() {
            collect_procs(&entry.path(), out)?;
        }
    }
    Ok(())
}

/// The freezer cgroup directory of `pid`: its v1 freezer cgroup when the
/// v1 freezer hierarchy is mounted and holds it (runc puts containers
/// there on hybrid hosts), else its v2 cgroup.
pub fn freezer_dir_of(pid: i32) -> Result<PathBuf, CgroupError> {
    let cgroup_path = PathBuf::from(format!("/proc/{pid}/cgroup"));
    let cgroups = fs::read_to_string(&cgroup_path).map_err(io_err(&cgroup_path))?;
    let mountinfo_path = PathBuf::from("/proc/self/mountinfo");
    let mountinfo = fs::read_to_string(&mountinfo_path).map_err(io_err(&mountinfo_path))?;
    pick_freezer_dir(&cgroups, &mountinfo).ok_or(CgroupError::Unexpected {
        path: cgroup_path,
        content: cgroups.trim().to_string(),
    })
}

/// [`freezer_dir_of`] on the text of `/proc/PID/cgroup` and `/proc/self/mountinfo`.
fn pick_freezer_dir(cgroups: &str, mountinfo: &str) -> Option<PathBuf> {
    // Mount points per hierarchy: ("freezer" | "" for v2) -> (root, mount point).
    let mut v1 = None;
    let mut v2 = None;
    for line in mountinfo.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let fields: Vec<&str> = left.split_whitespace().collect();
        let rfields: Vec<&str> = right.split_whitespace().collect();
        if fields.len() < 5 || rfields.len() < 3 {
            continue;
        }
        let (root, point) = (fields[3], fields[4]);
        match rfields[0] {
            "cgroup" if rfields[2].split(',').any(|o| o == "freezer") => {
                v1.get_or_insert((root.to_string(), point.to_string()));
            }
            "cgroup2" => {
                v2.get_or_insert((root.to_string(), point.to_string()));
            }
            _ => {}
        }
    }
    let join = |(root, point): &(String, String), path: &str| {
        let rel = path.strip_prefix(root.as_str()).unwrap_or(path);
        PathBuf::from(point).join(rel.trim_start_matches('/'))
    };
    for line in cgroups.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        if controllers.split(',').any(|c| c == "freezer") {
            if let Some(m) = &v1 {
                return Some(join(m, path));
            }
        }
    }
    let path = cgroups.lines().find_map(|l| l.strip_prefix("0::"))?;
    v2.as_ref().map(|m| join(m, path))
}

#[cfg(test)]
pub(crate) mod tests {
    const MOUNTINFO: &str = "\
25 30 0:22 / /sys rw,nosuid shared:7 - sysfs sysfs rw
26 25 0:23 / /sys/fs/cgroup ro,nosuid shared:8 - tmpfs tmpfs ro,mode=755
27 26 0:24 / /sys/fs/cgroup/unified rw,nosuid shared:9 - cgroup2 cgroup2 rw,nsdelegate
30 26 0:27 / /sys/fs/cgroup/freezer rw,nosuid shared:12 - cgroup cgroup rw,freezer
";

    #[test]
    fn freezer_dir_prefers_the_v1_freezer_on_a_hybrid_host() {
        let cgroups = "12:freezer:/default/ctr1\n1:name=systemd:/x\n0::/user.slice\n";
        assert_eq!(
            pick_freezer_dir(cgroups, MOUNTINFO),
            Some(PathBuf::from("/sys/fs/cgroup/freezer/default/ctr1"))
        );
    }

    #[test]
    fn freezer_dir_falls_back_to_v2() {
        let cgroups = "0::/system.slice/c.scope\n";
        assert_eq!(
            pick_freezer_dir(cgroups, MOUNTINFO),
            Some(PathBuf::from("/sys/fs/cgroup/unified/system.slice/c.scope"))
        );
        let v2_only = "40 1 0:30 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n";
        assert_eq!(
            pick_freezer_dir("0::/a/b\n", v2_only),
            Some(PathBuf::from("/sys/fs/cgroup/a/b"))
        );
        assert_eq!(pick_freezer_dir("0::/a\n", ""), None);
    }

    #[test]
    fn freezer_dir_of_self_is_a_freezer() {
        // Our own cgroup may be a root (no freezer files there): it must
        // still be an existing directory of a cgroup hierarchy.
        let dir = freezer_dir_of(std::process::id() as i32).expect("freezer dir of self");
        assert!(dir.is_dir(), "{}", dir.display());
        assert!(dir.join("cgroup.procs").exists(), "{}", dir.display());
    }

    use super::*;
    use std::process::{Child, Command};

    /// A fresh cgroup under `root` holding one `sleep` child; removed on drop.
    pub(crate) struct TestCgroup {
        pub dir: PathBuf,
        pub child: Child,
    }

    impl TestCgroup {
        pub(crate) fn new(root: &str, tag: &str) -> Option<TestCgroup> {
            if !Path::new(root).exists() {
                return None;
            }
            let dir = PathBuf::from(format!("{root}/cowsnap-test-{tag}-{}", std::process::id()));
            fs::create_dir(&dir).expect("mkdir cgroup");
            let child = Command::new("sleep")
                .arg("100")
                .spawn()
                .expect("spawn sleep");
            fs::write(dir.join("cgroup.procs"), child.id().to_string()).expect("join cgroup");
            Some(TestCgroup { dir, child })
        }
    }

    impl Drop for TestCgroup {
        fn drop(&mut self) {
            let _ = Freezer::detect(&self.dir).map(|f| f.thaw());
            let _ = self.child.kill();
            let _ = self.child.wait();
            for _ in 0..100 {
                if fs::remove_dir(&self.dir).is_ok() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }

    fn proc_state(pid: u32) -> String {
        fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| {
                s.rsplit_once(") ")
                    .map(|(_, r)| r[..1].to_string())
                    .unwrap_or_default()
            })
            .unwrap_or_default()
    }

    fn freeze_thaw(root: &str, tag: &str, want_v2: bool) {
        let Some(cg) = TestCgroup::new(root, tag) else {
            eprintln!("{root} missing; skipped");
            return;
        };
        let f = Freezer::detect(&cg.dir).expect("detect");
        assert_eq!(matches!(f, Freezer::V2 { .. }), want_v2);
        assert_eq!(f.members().expect("members"), vec![cg.child.id() as i32]);
        assert!(!f.is_frozen().expect("state"));
        f.freeze(FREEZE_TIMEOUT).expect("freeze");
        assert!(f.is_frozen().expect("state"));
        f.thaw().expect("thaw");
        let t0 = Instant::now();
        while f.is_frozen().expect("state") && t0.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(!f.is_frozen().expect("state"));
        assert_ne!(proc_state(cg.child.id()), "");
    }

    #[test]
    fn v1_freeze_thaw() {
        freeze_thaw("/sys/fs/cgroup/freezer", "v1", false);
    }

    #[test]
    fn v2_freeze_thaw() {
        freeze_thaw("/sys/fs/cgroup/unified", "v2", true);
    }

    #[test]
    fn not_a_freezer() {
        let err = Freezer::detect(Path::new("/tmp")).expect_err("tmp");
        assert!(err.to_string().contains("/tmp"), "{err}");
    }
}
