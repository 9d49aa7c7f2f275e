//! The container spec's seccomp profile as the classic BPF program every
//! process of a container restore is put under, on top of the filters its
//! image records.
//!
//! An image's filters are whatever the image says (a crafted one may have
//! none), so a restore does not compare them with the profile: it compiles
//! the profile as runc does (libseccomp, the same library runc and youki
//! load it with) and the restorer blob installs the program after the
//! image's filters. Seccomp filters stack and the kernel applies the most
//! restrictive result of all of them, so every restored process is at least
//! as strict as the spec by construction. An image's filter runs before the
//! profile is installed and could fake that `seccomp` call (an errno-0
//! answer is "success"); the controller therefore counts every thread's
//! filters in `/proc` before releasing the tree (`exec::check_confinement`).
//!
//! After the profile the restorer still makes a few syscalls (capset and
//! prctl when filters go in before capset; futex for the barrier; prctl and
//! munmap past it; rt_sigreturn): [`compile`] runs the program on each
//! ([`super::seccomp_bpf`]) and refuses a profile that denies one, naming
//! it, rather than let a process fail or die with the tree half released.
//!
//! The compilation follows runc: a syscall name this libseccomp does not know
//! is skipped, a rule whose action is the default action is skipped, and
//! conditions on the same argument are ORed (one rule each) where libseccomp
//! could not AND them. `SCMP_ACT_NOTIFY` is refused: nobody would listen
//! to a restored process's notifications. The profile's `flags` are
//! install flags, not part of the program, and are not applied.
//!
//! This module never loads a filter into the calling process.

use std::io::{Read, Seek};

use libseccomp::{
    ScmpAction, ScmpArch, ScmpArgCompare, ScmpCompareOp, ScmpFilterContext, ScmpSyscall,
};
use oci_spec::runtime::{LinuxSeccomp, LinuxSeccompAction, LinuxSeccompOperator};
use serde::{Deserialize, Serialize};

use super::seccomp_bpf::{self, SeccompData};

/// `struct sock_filter`: 8 bytes per instruction.
const INSN: usize = 8;
/// `BPF_MAXINSNS`: the kernel refuses a longer program.
const MAX_INSNS: usize = 4096;
const EPERM: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("not supported: the spec's seccomp profile uses {0}")]
    NotSupported(String),
    #[error("the spec's seccomp profile: {what}: {source}")]
    Libseccomp {
        what: String,
        #[source]
        source: libseccomp::error::SeccompError,
    },
    #[error("the spec's seccomp profile: {what} {value} is out of range")]
    OutOfRange { what: String, value: u64 },
    #[error(
        "not supported: the spec's seccomp profile denies {syscall}, which the restorer \
         makes after installing it ({when}); it answers {ret:#010x}"
    )]
    BlocksRestorer {
        syscall: &'static str,
        when: &'static str,
        ret: u32,
    },
    #[error("the spec's seccomp program cannot be evaluated: {0}")]
    Evaluate(#[from] super::seccomp_bpf::BpfError),
    #[error("exporting the spec's seccomp program: {0}")]
    Export(#[source] std::io::Error),
    #[error("the spec's seccomp program has {len} bytes: not 1 to {MAX_INSNS} whole instructions")]
    BadLength { len: usize },
}

/// A classic BPF seccomp program: `struct sock_filter` entries, as the
/// kernel's `SECCOMP_SET_MODE_FILTER` takes them. Serialized as hex (it
/// travels in the restore helper's `--limits`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeccompProgram(Vec<u8>);

impl SeccompProgram {
    pub fn from_bytes(bytes: Vec<u8>) -> Result<SeccompProgram, SeccompError> {
        let len = bytes.len();
        if len == 0 || !len.is_multiple_of(INSN) || len / INSN > MAX_INSNS {
            return Err(SeccompError::BadLength { len });
        }
        Ok(SeccompProgram(bytes))
    }

    pub fn bytes(&self) -> &[u8] {
        &self.0
    }

    /// Number of `struct sock_filter` instructions.
    pub fn instructions(&self) -> usize {
        self.0.len() / INSN
    }
}

impl Serialize for SeccompProgram {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(&self.0))
    }
}

impl<'de> Deserialize<'de> for SeccompProgram {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        let bytes = hex::decode(&text).map_err(serde::de::Error::custom)?;
        SeccompProgram::from_bytes(bytes).map_err(serde::de::Error::custom)
    }
}

fn lib(what: impl Into<String>) -> impl FnOnce(libseccomp::error::SeccompError) -> SeccompError {
    let what = what.into();
    move |source| SeccompError::Libseccomp { what, source }
}

fn action(
    action: LinuxSeccompAction,
    errno_ret: Option<u32>,
    what: &str,
) -> Result<ScmpAction, SeccompError> {
    let ret = |default: u32| -> Result<u16, SeccompError> {
        let value = errno_ret.unwrap_or(default);
        u16::try_from(value).map_err(|_| SeccompError::OutOfRange {
            what: format!("{what}: errnoRet"),
            value: value.into(),
        })
    };
    Ok(match action {
        LinuxSeccompAction::ScmpActAllow => ScmpAction::Allow,
        LinuxSeccompAction::ScmpActLog => ScmpAction::Log,
        LinuxSeccompAction::ScmpActErrno => ScmpAction::Errno(ret(EPERM)?.into()),
        // Without a tracer the kernel answers ENOSYS, as for the original.
        LinuxSeccompAction::ScmpActTrace => ScmpAction::Trace(ret(EPERM)?),
        LinuxSeccompAction::ScmpActTrap => ScmpAction::Trap,
        LinuxSeccompAction::ScmpActKill | LinuxSeccompAction::ScmpActKillThread => {
            ScmpAction::KillThread
        }
        LinuxSeccompAction::ScmpActKillProcess => ScmpAction::KillProcess,
        LinuxSeccompAction::ScmpActNotify => {
            let why = "a restored process's notifications would have no listener";
            return Err(SeccompError::NotSupported(format!(
                "SCMP_ACT_NOTIFY ({what}): {why}"
            )));
        }
    })
}

fn compare(op: LinuxSeccompOperator, value: u64, value_two: Option<u64>) -> (ScmpCompareOp, u64) {
    match op {
        LinuxSeccompOperator::ScmpCmpNe => (ScmpCompareOp::NotEqual, value),
        LinuxSeccompOperator::ScmpCmpLt => (ScmpCompareOp::Less, value),
        LinuxSeccompOperator::ScmpCmpLe => (ScmpCompareOp::LessOrEqual, value),
        LinuxSeccompOperator::ScmpCmpEq => (ScmpCompareOp::Equal, value),
        LinuxSeccompOperator::ScmpCmpGe => (ScmpCompareOp::GreaterEqual, value),
        LinuxSeccompOperator::ScmpCmpGt => (ScmpCompareOp::Greater, value),
        // OCI (and runc): `value` is the mask, `valueTwo` the datum.
        LinuxSeccompOperator::ScmpCmpMaskedEq => {
            (ScmpCompareOp::MaskedEqual(value), value_two.unwrap_or(0))
        }
    }
}

/// What the restorer calls once a process's filters are in, with the
/// arguments it passes (addresses as 0), when, and whether an errno answer
/// is harmless (the restorer ignores it). Not listed: `timer_settime`,
/// called only to arm a timer the image has armed, which a process under
/// a profile denying it could not have done.
const RESTORER_TAIL: [(&str, i64, [u64; 3], &str, bool); 5] = [
    (
        "futex",
        libc::SYS_futex,
        [0, 0, 0],
        "FUTEX_WAIT at the barrier",
        false,
    ),
    (
        "futex",
        libc::SYS_futex,
        [0, 1, i32::MAX as u64],
        "FUTEX_WAKE at the barrier",
        false,
    ),
    (
        "prctl",
        libc::SYS_prctl,
        [1, 0, 0],
        "PR_SET_PDEATHSIG past the barrier",
        false,
    ),
    (
        "munmap",
        libc::SYS_munmap,
        [0, 0, 0],
        "its status pages past the barrier",
        true,
    ),
    (
        "rt_sigreturn",
        libc::SYS_rt_sigreturn,
        [0, 0, 0],
        "into the restored registers",
        false,
    ),
];

/// What it calls besides when the filters go in before capset (a process
/// without no_new_privs, see the restorer blob).
const BEFORE_CAPSET: [(&str, i64, [u64; 3], &str, bool); 3] = [
    (
        "capset",
        libc::SYS_capset,
        [0, 0, 0],
        "dropping the helper's capabilities",
        false,
    ),
    (
        "prctl",
        libc::SYS_prctl,
        [47, 4, 0],
        "PR_CAP_AMBIENT_CLEAR_ALL",
        false,
    ),
    (
        "prctl",
        libc::SYS_prctl,
        [47, 2, 0],
        "PR_CAP_AMBIENT_RAISE",
        false,
    ),
];

/// `SECCOMP_RET_ERRNO`.
const RET_ERRNO: u32 = 0x0005_0000;

/// Refuses a program under which the restorer could not finish (it would
/// fail, or die, with the tree half released).
fn check_restorer_can_finish(
    program: &SeccompProgram,
    before_capset: bool,
) -> Result<(), SeccompError> {
    let extra: &[_] = if before_capset { &BEFORE_CAPSET } else { &[] };
    for &(syscall, nr, args, when, errno_ok) in RESTORER_TAIL.iter().chain(extra) {
        let ret = seccomp_bpf::evaluate(program.bytes(), &SeccompData::x86_64(nr, &args))?;
        let harmless = errno_ok && ret & seccomp_bpf::RET_ACTION_FULL == RET_ERRNO;
        if !seccomp_bpf::allows(ret) && !harmless {
            return Err(SeccompError::BlocksRestorer { syscall, when, ret });
        }
    }
    Ok(())
}

/// Compiles `profile` for the architectures it names (the native one
/// always) into the program the restorer installs, and checks that the
/// restorer can finish under it; `before_capset`: some process may lack
/// no_new_privs (the spec does not set it), so the program also precedes
/// capset.
pub fn compile(
    profile: &LinuxSeccomp,
    before_capset: bool,
) -> Result<SeccompProgram, SeccompError> {
    if profile.listener_path().is_some() {
        return Err(SeccompError::NotSupported(
            "a listenerPath (user notification)".into(),
        ));
    }
    let default = action(
        profile.default_action(),
        profile.default_errno_ret(),
        "defaultAction",
    )?;
    let mut filter = ScmpFilterContext::new(default).map_err(lib("a filter context"))?;
    // The program is installed by the restorer, which sets no_new_privs
    // itself where the image asks; libseccomp's own attribute is for load().
    filter
        .set_ctl_nnp(false)
        .map_err(lib("clearing the no_new_privs attribute"))?;
    for arch in profile.architectures().iter().flatten() {
        let name = serde_json::to_value(arch)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_else(|| format!("{arch:?}"));
        let scmp: ScmpArch = name.parse().map_err(lib(format!("architecture {name}")))?;
        if !filter
            .is_arch_present(scmp)
            .map_err(lib(format!("architecture {name}")))?
        {
            filter
                .add_arch(scmp)
                .map_err(lib(format!("architecture {name}")))?;
        }
    }
    for (k, rule) in profile.syscalls().iter().flatten().enumerate() {
        let what = format!("syscalls[{k}]");
        let act = action(rule.action(), rule.errno_ret(), &what)?;
        if act == default {
            continue; // libseccomp refuses it; runc skips it too
        }
        let mut conditions = Vec::new();
        let mut per_arg = [0usize; 6];
        for arg in rule.args().iter().flatten() {
            let index = arg.index();
            if index >= per_arg.len() {
                return Err(SeccompError::OutOfRange {
                    what: format!("{what}: argument index"),
                    value: index as u64,
                });
            }
            per_arg[index] += 1;
            let (op, datum) = compare(arg.op(), arg.value(), arg.value_two());
            conditions.push(ScmpArgCompare::new(index as u32, op, datum));
        }
        // Two conditions on one argument: libseccomp cannot AND them, runc ORs.
        let rules: Vec<Vec<ScmpArgCompare>> = if per_arg.iter().any(|&n| n > 1) {
            conditions.into_iter().map(|c| vec![c]).collect()
        } else {
            vec![conditions]
        };
        for name in rule.names() {
            let Ok(nr) = ScmpSyscall::from_name(name) else {
                continue; // unknown to this libseccomp: runc skips it too
            };
            for conds in &rules {
                filter
                    .add_rule_conditional(act, nr, conds)
                    .map_err(lib(format!("{what}: {name}")))?;
            }
        }
    }
    let program = export(&filter)?;
    check_restorer_can_finish(&program, before_capset)?;
    Ok(program)
}

/// Reads an OCI seccomp profile (a runtime spec's `linux.seccomp` object,
/// JSON) from `path` and compiles it.
pub fn compile_file(path: &std::path::Path) -> Result<SeccompProgram, super::RestoreError> {
    let error = |message: String| super::RestoreError::SeccompProfile {
        path: path.to_path_buf(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| error(e.to_string()))?;
    let profile: LinuxSeccomp = serde_json::from_str(&text).map_err(|e| error(e.to_string()))?;
    // The processes of a host image may lack no_new_privs.
    compile(&profile, true).map_err(|e| error(e.to_string()))
}

fn export(filter: &ScmpFilterContext) -> Result<SeccompProgram, SeccompError> {
    let fd = crate::sys::mem::memfd("cowsnap-seccomp", 0)
        .map_err(|e| SeccompError::Export(std::io::Error::other(e.to_string())))?;
    let mut file = std::fs::File::from(fd);
    filter
        .export_bpf(&file)
        .map_err(lib("exporting the program"))?;
    let mut bytes = Vec::new();
    file.rewind()
        .and_then(|_| file.read_to_end(&mut bytes))
        .map_err(SeccompError::Export)?;
    SeccompProgram::from_bytes(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile(json: serde_json::Value) -> LinuxSeccomp {
        serde_json::from_value(json).expect("profile")
    }

    /// A profile that allows everything but `mkdir`/`mkdirat` (EPERM) and
    /// `getpriority` with `which` = PRIO_PGRP (EACCES).
    fn deny_mkdir() -> LinuxSeccomp {
        profile(serde_json::json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
            "syscalls": [
                {"names": ["mkdir", "mkdirat", "no_such_syscall"], "action": "SCMP_ACT_ERRNO"},
                {"names": ["getpriority"], "action": "SCMP_ACT_ERRNO", "errnoRet": 13,
                 "args": [{"index": 0, "value": 1, "op": "SCMP_CMP_EQ"}]},
                {"names": ["getpid"], "action": "SCMP_ACT_ALLOW"}
            ]
        }))
    }

    /// Runs `probe` in a forked child under `program`; returns its exit code.
    fn under(program: &SeccompProgram, probe: fn() -> i32) -> i32 {
        // SAFETY: the child only makes raw syscalls and _exits; the test
        // process waits for it.
        unsafe {
            let pid = libc::fork();
            assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
            if pid == 0 {
                let prog = libc::sock_fprog {
                    len: program.instructions() as u16,
                    filter: program.bytes().as_ptr() as *mut libc::sock_filter,
                };
                if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
                    || libc::syscall(
                        libc::SYS_seccomp,
                        libc::SECCOMP_SET_MODE_FILTER,
                        0,
                        &prog as *const libc::sock_fprog,
                    ) != 0
                {
                    libc::_exit(100);
                }
                libc::_exit(probe());
            }
            let mut status = 0;
            assert_eq!(libc::waitpid(pid, &mut status, 0), pid);
            assert!(libc::WIFEXITED(status), "child status {status:#x}");
            libc::WEXITSTATUS(status)
        }
    }

    /// The errno of a raw syscall (0 if it succeeded).
    fn errno_of(r: libc::c_long) -> i32 {
        if r < 0 {
            std::io::Error::last_os_error().raw_os_error().unwrap_or(-1)
        } else {
            0
        }
    }

    #[test]
    fn a_profile_denying_mkdir_denies_it_in_the_kernel_and_allows_the_rest() {
        let program = compile(&deny_mkdir(), true).expect("compiles");
        let json = serde_json::to_string(&program).expect("serializes");
        assert_eq!(
            serde_json::from_str::<SeccompProgram>(&json).expect("parses"),
            program
        );
        // SAFETY (each probe): raw syscalls with valid, constant arguments.
        let mkdirat = || unsafe {
            errno_of(libc::syscall(
                libc::SYS_mkdirat,
                libc::AT_FDCWD,
                c"/proc/nonexistent-cowsnap".as_ptr(),
                0o700,
            ))
        };
        assert_eq!(under(&program, mkdirat), libc::EPERM);
        let getpgrp_priority =
            || unsafe { errno_of(libc::syscall(libc::SYS_getpriority, libc::PRIO_PGRP, 0)) };
        assert_eq!(under(&program, getpgrp_priority), libc::EACCES);
        let own_priority =
            || unsafe { errno_of(libc::syscall(libc::SYS_getpriority, libc::PRIO_PROCESS, 0)) };
        assert_eq!(under(&program, own_priority), 0);
        // Without the filter mkdirat reaches the kernel (ENOENT: no such /proc entry).
        assert_eq!(mkdirat(), libc::ENOENT);
    }

    #[test]
    fn kill_trap_log_and_trace_actions_compile_and_notify_is_refused() {
        for act in [
            "SCMP_ACT_KILL",
            "SCMP_ACT_KILL_THREAD",
            "SCMP_ACT_KILL_PROCESS",
            "SCMP_ACT_TRAP",
            "SCMP_ACT_LOG",
            "SCMP_ACT_TRACE",
        ] {
            let p = profile(serde_json::json!({
                "defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": 38,
                "syscalls": [
                    {"names": ["read", "write", "futex", "prctl", "munmap", "rt_sigreturn",
                               "capset"], "action": "SCMP_ACT_ALLOW"},
                    {"names": ["clone"], "action": act,
                     "args": [{"index": 0, "value": 2114060288, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ"}]},
                    {"names": ["personality"], "action": "SCMP_ACT_ALLOW",
                     "args": [{"index": 0, "value": 0, "op": "SCMP_CMP_EQ"},
                              {"index": 0, "value": 8, "op": "SCMP_CMP_EQ"}]}
                ]
            }));
            let program = compile(&p, true).unwrap_or_else(|e| panic!("{act}: {e}"));
            assert!(program.instructions() > 4, "{act}: {program:?}");
        }
        let notify = profile(serde_json::json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [{"names": ["mkdir"], "action": "SCMP_ACT_NOTIFY"}]
        }));
        let e = compile(&notify, true).expect_err("notify");
        assert!(
            e.to_string().starts_with(
                "not supported: the spec's seccomp profile uses SCMP_ACT_NOTIFY (syscalls[0])"
            ),
            "{e}"
        );
        let big_errno = profile(serde_json::json!({
            "defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": 70000
        }));
        let e = compile(&big_errno, true).expect_err("errno out of range");
        assert!(e.to_string().contains("errnoRet 70000"), "{e}");
    }

    #[test]
    fn a_profile_the_restorer_cannot_finish_under_is_refused() {
        let deny = |names: &[&str]| {
            profile(serde_json::json!({
                "defaultAction": "SCMP_ACT_ALLOW",
                "syscalls": [{"names": names, "action": "SCMP_ACT_ERRNO"}]
            }))
        };
        let e = compile(&deny(&["futex"]), false).expect_err("futex");
        assert!(
            e.to_string().starts_with(
                "not supported: the spec's seccomp profile denies futex, which the restorer \
                 makes after installing it (FUTEX_WAIT at the barrier)"
            ),
            "{e}"
        );
        let e = compile(&deny(&["rt_sigreturn"]), false).expect_err("rt_sigreturn");
        assert!(e.to_string().contains("denies rt_sigreturn"), "{e}");
        // capset only matters where filters precede it.
        compile(&deny(&["capset"]), false).expect("capset after the filters");
        let e = compile(&deny(&["capset"]), true).expect_err("capset before");
        assert!(e.to_string().contains("denies capset"), "{e}");
        // munmap's errno is ignored by the restorer; being killed is not.
        compile(&deny(&["munmap", "timer_settime"]), true).expect("errno for munmap");
        let kill_munmap = profile(serde_json::json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [{"names": ["munmap"], "action": "SCMP_ACT_KILL_PROCESS"}]
        }));
        let e = compile(&kill_munmap, false).expect_err("killed by munmap");
        assert!(e.to_string().contains("denies munmap"), "{e}");
        // A profile that allows futex only for FUTEX_WAKE still blocks the barrier.
        let wake_only = profile(serde_json::json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [{"names": ["futex"], "action": "SCMP_ACT_ERRNO",
                          "args": [{"index": 1, "value": 0, "op": "SCMP_CMP_EQ"}]}]
        }));
        let e = compile(&wake_only, false).expect_err("no FUTEX_WAIT");
        assert!(e.to_string().contains("FUTEX_WAIT"), "{e}");
    }

    /// The interpreter agrees with the kernel on a real compiled profile.
    #[test]
    fn the_interpreter_answers_as_the_kernel_does() {
        let program = compile(&deny_mkdir(), true).expect("compiles");
        let ask = |nr: i64, args: &[u64]| {
            seccomp_bpf::evaluate(program.bytes(), &SeccompData::x86_64(nr, args)).expect("runs")
        };
        assert_eq!(ask(libc::SYS_mkdirat, &[]), 0x0005_0001);
        assert_eq!(
            ask(libc::SYS_getpriority, &[libc::PRIO_PGRP as u64]),
            0x0005_000d
        );
        assert_eq!(
            ask(libc::SYS_getpriority, &[libc::PRIO_PROCESS as u64]),
            0x7fff_0000
        );
        assert_eq!(ask(libc::SYS_getpid, &[]), 0x7fff_0000);
    }

    #[test]
    fn a_program_that_is_not_whole_instructions_is_refused() {
        for len in [0, 7, 9, (MAX_INSNS + 1) * INSN] {
            let e = SeccompProgram::from_bytes(vec![0; len]).expect_err("bad length");
            assert!(e.to_string().contains(&format!("{len} bytes")), "{e}");
        }
        let e = serde_json::from_str::<SeccompProgram>("\"0600\"").expect_err("2 bytes");
        assert!(e.to_string().contains("2 bytes"), "{e}");
    }
}
