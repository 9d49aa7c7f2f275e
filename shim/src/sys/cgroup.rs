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

/// A mounted cgroup hierarchy: the cgroup path its mount shows at its top
/// (`/`, unless only a subtree is mounted, as in a container) and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupMount {
    pub root: String,
    pub point: PathBuf,
}

impl CgroupMount {
    /// The directory of cgroup `path` (as `/proc/PID/cgroup` names it).
    pub fn dir_of(&self, path: &str) -> PathBuf {
        let rel = Path::new(path)
            .strip_prefix(&self.root)
            .unwrap_or(Path::new(path));
        self.point
            .join(rel.to_string_lossy().trim_start_matches('/'))
    }
}

/// Where the hierarchies a freezer can live in are mounted: the v1 freezer
/// hierarchy (legacy and hybrid layouts, `/sys/fs/cgroup/freezer`) and the
/// v2 hierarchy (`/sys/fs/cgroup` itself on a pure v2 host, the default of
/// current Debian and Ubuntu; `/sys/fs/cgroup/unified` on a hybrid one).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CgroupLayout {
    pub v1_freezer: Option<CgroupMount>,
    pub v2: Option<CgroupMount>,
}

impl CgroupLayout {
    /// The layout this process sees (`/proc/self/mountinfo`).
    pub fn current() -> Result<CgroupLayout, CgroupError> {
        let path = PathBuf::from("/proc/self/mountinfo");
        let text = fs::read_to_string(&path).map_err(io_err(&path))?;
        Ok(CgroupLayout::parse(&text))
    }

    /// The layout described by the text of a `mountinfo` file; the first
    /// mount of each hierarchy counts.
    pub fn parse(mountinfo: &str) -> CgroupLayout {
        let mut layout = CgroupLayout::default();
        for line in mountinfo.lines() {
            // ID PARENT MAJ:MIN ROOT POINT OPTIONS [OPTIONAL...] - TYPE SOURCE SUPER_OPTIONS
            let Some((left, right)) = line.split_once(" - ") else {
                continue;
            };
            let fields: Vec<&str> = left.split_whitespace().collect();
            let rfields: Vec<&str> = right.split_whitespace().collect();
            if fields.len() < 5 || rfields.is_empty() {
                continue;
            }
            let mount = || CgroupMount {
                root: crate::sys::procfs::unescape_mountinfo(fields[3]),
                point: PathBuf::from(crate::sys::procfs::unescape_mountinfo(fields[4])),
            };
            let super_options = rfields.get(2).copied().unwrap_or("");
            match rfields[0] {
                "cgroup" if super_options.split(',').any(|o| o == "freezer") => {
                    layout.v1_freezer.get_or_insert_with(mount);
                }
                "cgroup2" => {
                    layout.v2.get_or_insert_with(mount);
                }
                _ => {}
            }
        }
        layout
    }

    /// "hybrid", "unified" (v2 only), "legacy" (v1 freezer, no v2) or "none".
    pub fn name(&self) -> &'static str {
        match (&self.v1_freezer, &self.v2) {
            (Some(_), Some(_)) => "hybrid",
            (None, Some(_)) => "unified",
            (Some(_), None) => "legacy",
            (None, None) => "none",
        }
    }

    /// The freezer directory of a process whose `/proc/PID/cgroup` reads
    /// `cgroups`: its v1 freezer cgroup when that hierarchy is mounted and
    /// holds it (runc puts containers there on hybrid hosts), else its v2
    /// cgroup.
    pub fn freezer_dir(&self, cgroups: &str) -> Option<PathBuf> {
        for line in cgroups.lines() {
            let mut parts = line.splitn(3, ':');
            let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
            if controllers.split(',').any(|c| c == "freezer") {
                if let Some(m) = &self.v1_freezer {
                    return Some(m.dir_of(path));
                }
            }
        }
        let path = cgroups.lines().find_map(|l| l.strip_prefix("0::"))?;
        self.v2.as_ref().map(|m| m.dir_of(path))
    }
}

/// The freezer cgroup directory of `pid` (see [`CgroupLayout::freezer_dir`]).
pub fn freezer_dir_of(pid: i32) -> Result<PathBuf, CgroupError> {
    let cgroup_path = PathBuf::from(format!("/proc/{pid}/cgroup"));
    let cgroups = fs::read_to_string(&cgroup_path).map_err(io_err(&cgroup_path))?;
    CgroupLayout::current()?
        .freezer_dir(&cgroups)
        .ok_or(CgroupError::Unexpected {
            path: cgroup_path,
            content: cgroups.trim().to_string(),
        })
}

#[cfg(test)]
pub(crate) mod tests {
    /// This project's machines (Debian with systemd's hybrid layout): v1
    /// controllers under a tmpfs at /sys/fs/cgroup, v2 at .../unified.
    const HYBRID: &str = "\
25 30 0:22 / /sys rw,nosuid shared:7 - sysfs sysfs rw
26 25 0:23 / /sys/fs/cgroup ro,nosuid shared:8 - tmpfs tmpfs ro,mode=755
27 26 0:24 / /sys/fs/cgroup/unified rw,nosuid shared:9 - cgroup2 cgroup2 rw,nsdelegate
28 26 0:25 / /sys/fs/cgroup/systemd rw,nosuid shared:10 - cgroup cgroup rw,xattr,name=systemd
29 26 0:26 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid shared:11 - cgroup cgroup rw,cpu,cpuacct
30 26 0:27 / /sys/fs/cgroup/freezer rw,nosuid shared:12 - cgroup cgroup rw,freezer
";

    /// Debian 12 / Ubuntu 22.04 and later by default: /sys/fs/cgroup is cgroup2.
    const UNIFIED: &str = "\
22 27 0:21 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
26 22 0:23 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
27 22 0:24 / /sys/fs/pstore rw,nosuid,nodev,noexec,relatime shared:5 - pstore pstore rw
";

    /// Only v1 (an old distribution): the freezer shares a hierarchy.
    const LEGACY: &str = "\
26 25 0:23 / /sys/fs/cgroup rw shared:8 - tmpfs tmpfs rw,mode=755
31 26 0:28 / /sys/fs/cgroup/freezer,devices rw shared:13 - cgroup cgroup rw,devices,freezer
";

    fn mount(root: &str, point: &str) -> Option<CgroupMount> {
        Some(CgroupMount {
            root: root.into(),
            point: point.into(),
        })
    }

    #[test]
    fn layout_of_a_hybrid_host() {
        let layout = CgroupLayout::parse(HYBRID);
        assert_eq!(layout.name(), "hybrid");
        assert_eq!(layout.v1_freezer, mount("/", "/sys/fs/cgroup/freezer"));
        assert_eq!(layout.v2, mount("/", "/sys/fs/cgroup/unified"));
    }

    #[test]
    fn layout_of_a_pure_v2_host() {
        let layout = CgroupLayout::parse(UNIFIED);
        assert_eq!(layout.name(), "unified");
        assert_eq!(layout.v1_freezer, None);
        assert_eq!(layout.v2, mount("/", "/sys/fs/cgroup"));
        assert_eq!(
            layout.freezer_dir("0::/system.slice/c.scope\n"),
            Some(PathBuf::from("/sys/fs/cgroup/system.slice/c.scope"))
        );
    }

    #[test]
    fn layout_of_a_v1_only_host() {
        let layout = CgroupLayout::parse(LEGACY);
        assert_eq!(layout.name(), "legacy");
        assert_eq!(
            layout.v1_freezer,
            mount("/", "/sys/fs/cgroup/freezer,devices")
        );
        assert_eq!(
            layout.freezer_dir("4:devices,freezer:/lxc/c1\n"),
            Some(PathBuf::from("/sys/fs/cgroup/freezer,devices/lxc/c1"))
        );
        assert_eq!(layout.freezer_dir("0::/a\n"), None);
    }

    #[test]
    fn layout_of_a_container_and_of_nothing() {
        // Inside a container: a subtree of the host's hierarchy is mounted,
        // and the mount point has an escaped space.
        let text = "\
1200 1100 0:30 /kubepods/pod1 /sys/fs/cgroup\\040x ro,nosuid - cgroup2 cgroup rw
1201 1100 0:31 /kubepods/pod1 /mnt/other rw - cgroup2 cgroup rw
";
        let layout = CgroupLayout::parse(text);
        assert_eq!(layout.v2, mount("/kubepods/pod1", "/sys/fs/cgroup x"));
        assert_eq!(
            layout.freezer_dir("0::/kubepods/pod1/ctr\n"),
            Some(PathBuf::from("/sys/fs/cgroup x/ctr"))
        );
        let none = CgroupLayout::parse("garbage\n25 30 0:22 / /sys rw - sysfs sysfs rw\n");
        assert_eq!(none, CgroupLayout::default());
        assert_eq!(none.name(), "none");
        assert_eq!(none.freezer_dir("0::/a\n"), None);
    }

    #[test]
    fn freezer_dir_prefers_the_v1_freezer_on_a_hybrid_host() {
        let cgroups = "12:freezer:/default/ctr1\n1:name=systemd:/x\n0::/user.slice\n";
        let layout = CgroupLayout::parse(HYBRID);
        assert_eq!(
            layout.freezer_dir(cgroups),
            Some(PathBuf::from("/sys/fs/cgroup/freezer/default/ctr1"))
        );
        assert_eq!(
            layout.freezer_dir("0::/system.slice/c.scope\n"),
            Some(PathBuf::from("/sys/fs/cgroup/unified/system.slice/c.scope"))
        );
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
    use std::sync::Mutex;

    /// The hierarchy tests make their cgroups in: v2 or the v1 freezer
    /// where this host mounts it; if it does not (the v1 freezer on a pure
    /// v2 host, v2 on a v1-only one), one mounted for the tests under
    /// /run, left mounted for the next test. Fails the test if neither is
    /// possible: a freezer test never passes without freezing.
    pub(crate) fn test_hierarchy(v2: bool) -> PathBuf {
        static MOUNTING: Mutex<()> = Mutex::new(());
        let _serial = MOUNTING.lock().unwrap_or_else(|e| e.into_inner());
        let layout = CgroupLayout::current().expect("read /proc/self/mountinfo");
        let found = if v2 { &layout.v2 } else { &layout.v1_freezer };
        // Only a whole hierarchy will do: a test moves processes around in it.
        if let Some(m) = found.as_ref().filter(|m| m.root == "/") {
            return m.point.clone();
        }
        let (point, fstype, data) = if v2 {
            ("/run/cowsnap-test-cgroup2", "cgroup2", None)
        } else {
            ("/run/cowsnap-test-freezer", "cgroup", Some("freezer"))
        };
        fs::create_dir_all(point).unwrap_or_else(|e| panic!("mkdir {point}: {e}"));
        nix::mount::mount(
            Some("cowsnap-test"),
            point,
            Some(fstype),
            nix::mount::MsFlags::empty(),
            data,
        )
        .unwrap_or_else(|e| {
            panic!(
                "the {} layout has no {} hierarchy, and mounting one at {point} failed: {e}",
                layout.name(),
                if v2 { "cgroup v2" } else { "v1 freezer" }
            )
        });
        PathBuf::from(point)
    }

    /// A fresh cgroup in the v2 or v1 freezer hierarchy ([`test_hierarchy`])
    /// holding one `sleep` child; removed on drop.
    pub(crate) struct TestCgroup {
        pub dir: PathBuf,
        pub child: Child,
    }

    impl TestCgroup {
        pub(crate) fn new(v2: bool, tag: &str) -> TestCgroup {
            let root = test_hierarchy(v2);
            let dir = root.join(format!("cowsnap-test-{tag}-{}", std::process::id()));
            fs::create_dir(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
            let child = Command::new("sleep")
                .arg("100")
                .spawn()
                .expect("spawn sleep");
            fs::write(dir.join("cgroup.procs"), child.id().to_string()).expect("join cgroup");
            TestCgroup { dir, child }
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

    fn freeze_thaw(tag: &str, want_v2: bool) {
        let cg = TestCgroup::new(want_v2, tag);
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
        freeze_thaw("v1", false);
    }

    #[test]
    fn v2_freeze_thaw() {
        freeze_thaw("v2", true);
    }

    #[test]
    fn not_a_freezer() {
        let err = Freezer::detect(Path::new("/tmp")).expect_err("tmp");
        assert!(err.to_string().contains("/tmp"), "{err}");
    }
}
