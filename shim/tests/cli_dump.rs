//! `cowsnap dump` failures as a user sees them: exit status, one error line
//! naming the pid or path, and a target left running untraced.

use std::process::{Command, Stdio};

fn cowsnap() -> Command {
    Command::new(env!("CARGO_BIN_EXE_cowsnap"))
}

fn tracer_of(pid: u32) -> Option<i32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("TracerPid:"))
        .and_then(|v| v.trim().parse().ok())
}

#[test]
fn dump_of_nonexistent_pid_fails_naming_it() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("img");
    let out = cowsnap()
        .args(["dump", "--quiet", "--pid", "2147483000", "--images"])
        .arg(&dir)
        .output()
        .expect("run cowsnap");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("2147483000"), "{stderr}");
    assert!(!dir.exists());
}

#[test]
fn dump_into_unwritable_dir_fails_and_leaves_target_running() {
    let mut sleeper = Command::new("sleep")
        .arg("30")
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn sleep");
    let out = cowsnap()
        .args([
            "dump",
            "--quiet",
            "--pid",
            &sleeper.id().to_string(),
            "--images",
        ])
        .arg("/proc/cowsnap-unwritable/img")
        .output()
        .expect("run cowsnap");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("/proc/cowsnap-unwritable"), "{stderr}");
    assert_eq!(tracer_of(sleeper.id()), Some(0));
    assert!(
        sleeper.try_wait().expect("try_wait").is_none(),
        "still running"
    );
    let _ = sleeper.kill();
    let _ = sleeper.wait();
}
