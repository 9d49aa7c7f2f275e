//! What a container restore may give the restored processes: no more than
//! the new container's runtime spec grants its own process. An image is a
//! description of processes, and a crafted one could claim uid 0 and every
//! capability; in a container, the restore helper runs as root with every
//! capability (it must, to rebuild the tree), so the bound is checked
//! against the spec before anything is created (by the shim) and again by
//! the helper itself, which takes the limits from its command line.
//!
//! The rules, per process of the image (zombies have no credentials):
//! - every uid (real, effective, saved, filesystem) is the spec's
//!   `process.user.uid`, unless the spec's bounding set holds `CAP_SETUID`
//!   (then the processes could have switched to any uid); gids and
//!   supplementary groups likewise with `CAP_SETGID` (the spec's gid and
//!   additional gids). Inside a user namespace the kernel also refuses an
//!   unmapped id.
//! - every capability set (bounding, permitted, effective, inheritable,
//!   ambient) is within the spec's bounding set: no process of the
//!   container can ever hold another.
//! - when the spec sets `noNewPrivileges`, every process has it (it cannot
//!   be cleared, so an image without it is not of this container).
//! - when the spec has a seccomp profile, it is not compared with the
//!   image's filters: [`Limits::seccomp`] carries the profile compiled
//!   ([`super::seccomp`]) and the restorer installs it on every process
//!   after the image's own filters. Filters stack, so each process is at
//!   least as strict as the profile whatever the image claims (one with no
//!   filter at all included); this supersedes the check, made before, that
//!   every process merely had some filter.
//!
//! A violation refuses the restore, naming the pid, the field, what the
//! image claims and what the spec allows.

use serde::{Deserialize, Serialize};

use crate::image::types::ProcessEntry;
use crate::image::Image;

use super::seccomp::{SeccompError, SeccompProgram};
use super::RestoreError;

/// The bound a container's spec puts on its processes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    pub uid: u32,
    pub gid: u32,
    pub additional_gids: Vec<u32>,
    /// Bit n = capability n.
    pub bounding: u64,
    pub no_new_privs: bool,
    /// The spec's seccomp profile compiled: every restored process is put
    /// under it on top of its own filters.
    pub seccomp: Option<SeccompProgram>,
}

/// A capability set as bits (bit n = capability n).
pub fn cap_bits<'a>(caps: impl IntoIterator<Item = &'a caps::Capability>) -> u64 {
    caps.into_iter()
        .filter(|c| c.index() < 64)
        .fold(0, |acc, c| acc | 1u64 << c.index())
}

/// The names of the capabilities in `bits`, as `caps` spells them.
pub fn cap_names(bits: u64) -> Vec<String> {
    let mut all: Vec<caps::Capability> = caps::all().into_iter().collect();
    all.sort_by_key(|c| c.index());
    all.into_iter()
        .filter(|c| c.index() < 64 && bits & (1u64 << c.index()) != 0)
        .map(|c| c.to_string())
        .collect()
}

impl Limits {
    /// The limits of `spec`'s process; `runtime_bounding` (the shim's own
    /// bounding set) stands for a spec that names no capabilities (runc
    /// then leaves them as they are). Fails when the seccomp profile does
    /// not compile (or uses what a restore cannot honour).
    pub fn from_spec(
        spec: &oci_spec::runtime::Spec,
        runtime_bounding: u64,
    ) -> Result<Limits, SeccompError> {
        let process = spec.process().as_ref();
        let user = process.map(|p| p.user());
        let bounding =
            process
                .and_then(|p| p.capabilities().as_ref())
                .map_or(runtime_bounding, |c| {
                    c.bounding().as_ref().map_or(0, |set| {
                        let names: Vec<caps::Capability> = set
                            .iter()
                            .filter_map(|c| format!("CAP_{c}").parse().ok())
                            .collect();
                        cap_bits(&names)
                    })
                });
        let seccomp = match spec.linux().as_ref().and_then(|l| l.seccomp().as_ref()) {
            // Without noNewPrivileges the program may precede capset.
            Some(profile) => Some(super::seccomp::compile(
                profile,
                !process.and_then(|p| p.no_new_privileges()).unwrap_or(false),
            )?),
            None => None,
        };
        Ok(Limits {
            uid: user.map_or(0, |u| u.uid()),
            gid: user.map_or(0, |u| u.gid()),
            additional_gids: user
                .and_then(|u| u.additional_gids().clone())
                .unwrap_or_default(),
            bounding,
            no_new_privs: process.and_then(|p| p.no_new_privileges()).unwrap_or(false),
            seccomp,
        })
    }

    fn has(&self, cap: caps::Capability) -> bool {
        self.bounding & (1u64 << cap.index()) != 0
    }

    /// The first process of `image` that would get more than these limits.
    pub fn check(&self, image: &Image) -> Result<(), RestoreError> {
        for entry in image.tree.processes.iter().filter(|e| e.zombie.is_none()) {
            self.check_process(entry)?;
        }
        Ok(())
    }

    fn check_process(&self, e: &ProcessEntry) -> Result<(), RestoreError> {
        let refuse = |field: &str, claims: String, allows: String| {
            Err(RestoreError::NotSupported(format!(
                "pid {}: the image claims {field} {claims}, the container's spec allows {allows}: \
                 a restore gives no process more than its container grants",
                e.pid
            )))
        };
        let c = &e.creds;
        if !self.has(caps::Capability::CAP_SETUID) && c.uids.iter().any(|&u| u != self.uid) {
            return refuse(
                "uids",
                format!("{:?}", c.uids),
                format!("only uid {} (no CAP_SETUID)", self.uid),
            );
        }
        if !self.has(caps::Capability::CAP_SETGID) {
            let allowed = |g: &u32| *g == self.gid || self.additional_gids.contains(g);
            if !c.gids.iter().all(allowed) || !c.groups.iter().all(allowed) {
                return refuse(
                    "gids and groups",
                    format!("{:?} {:?}", c.gids, c.groups),
                    format!(
                        "only gid {} and groups {:?} (no CAP_SETGID)",
                        self.gid, self.additional_gids
                    ),
                );
            }
        }
        for (set, bits) in [
            ("bounding", c.cap_bounding),
            ("permitted", c.cap_permitted),
            ("effective", c.cap_effective),
            ("inheritable", c.cap_inheritable),
            ("ambient", c.cap_ambient),
        ] {
            let extra = bits & !self.bounding;
            if extra != 0 {
                return refuse(
                    &format!("{set} capabilities"),
                    cap_names(extra).join(","),
                    format!(
                        "the bounding set {{{}}}",
                        cap_names(self.bounding).join(",")
                    ),
                );
            }
        }
        if self.no_new_privs && !c.no_new_privs {
            return refuse(
                "no_new_privs",
                "unset".into(),
                "only processes with it set (noNewPrivileges)".into(),
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::types::Creds;

    fn spec(json: serde_json::Value) -> oci_spec::runtime::Spec {
        serde_json::from_value(json).expect("spec")
    }

    fn entry(creds: Creds) -> ProcessEntry {
        let mut e = crate::image::testutil::tree().processes[0].clone();
        e.creds = creds;
        e
    }

    fn root_with_every_cap() -> Creds {
        let mut c = crate::image::testutil::tree().processes[0].creds.clone();
        c.uids = [0; 4];
        c.gids = [0; 4];
        c.cap_bounding = u64::MAX >> 23;
        c.cap_permitted = u64::MAX >> 23;
        c.cap_effective = u64::MAX >> 23;
        c
    }

    #[test]
    fn a_spec_of_user_1000_without_capabilities_refuses_root_and_capabilities() {
        let limits = Limits::from_spec(
            &spec(serde_json::json!({
                "ociVersion": "1.0.2", "root": {"path": "rootfs"},
                "process": {"user": {"uid": 1000, "gid": 1000, "additionalGids": [5]},
                            "cwd": "/", "capabilities": {"bounding": []},
                            "noNewPrivileges": true},
                "linux": {"seccomp": {"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [
                    {"names": ["futex", "prctl", "munmap", "rt_sigreturn"],
                     "action": "SCMP_ACT_ALLOW"}]}}
            })),
            u64::MAX,
        )
        .expect("limits");
        let program = limits.seccomp.clone().expect("the profile, compiled");
        assert_eq!(
            limits,
            Limits {
                uid: 1000,
                gid: 1000,
                additional_gids: vec![5],
                bounding: 0,
                no_new_privs: true,
                seccomp: Some(program)
            }
        );
        let e = limits
            .check_process(&entry(root_with_every_cap()))
            .expect_err("uid 0");
        assert!(
            e.to_string()
                .contains("claims uids [0, 0, 0, 0], the container's spec allows only uid 1000"),
            "{e}"
        );
        let mut c = root_with_every_cap();
        c.uids = [1000; 4];
        c.gids = [1000, 1000, 5, 1000];
        let e = limits.check_process(&entry(c.clone())).expect_err("caps");
        assert!(
            e.to_string().contains("bounding capabilities CAP_CHOWN,"),
            "{e}"
        );
        for set in [
            &mut c.cap_bounding,
            &mut c.cap_permitted,
            &mut c.cap_effective,
        ] {
            *set = 0;
        }
        c.no_new_privs = false;
        let e = limits.check_process(&entry(c.clone())).expect_err("nnp");
        assert!(e.to_string().contains("no_new_privs unset"), "{e}");
        c.no_new_privs = true;
        // No filter of its own: the restorer puts it under the profile.
        c.seccomp_mode = 0;
        limits.check_process(&entry(c)).expect("within the spec");
    }

    #[test]
    fn a_root_spec_with_setuid_allows_other_users_but_not_capabilities_outside_its_set() {
        let limits = Limits::from_spec(
            &spec(serde_json::json!({
                "ociVersion": "1.0.2", "root": {"path": "rootfs"},
                "process": {"user": {"uid": 0, "gid": 0}, "cwd": "/",
                            "capabilities": {"bounding": ["CAP_SETUID", "CAP_SETGID", "CAP_KILL"]}}
            })),
            u64::MAX,
        )
        .expect("limits");
        assert_eq!(
            cap_names(limits.bounding),
            vec!["CAP_KILL", "CAP_SETGID", "CAP_SETUID"]
        );
        let mut c = root_with_every_cap();
        c.uids = [33, 33, 33, 33];
        c.gids = [33; 4];
        c.groups = vec![4, 33];
        c.cap_bounding = limits.bounding;
        c.cap_permitted = 1 << caps::Capability::CAP_KILL.index();
        c.cap_effective = c.cap_permitted;
        limits
            .check_process(&entry(c.clone()))
            .expect("a worker that switched user");
        c.cap_ambient = 1 << caps::Capability::CAP_SYS_ADMIN.index();
        let e = limits
            .check_process(&entry(c))
            .expect_err("ambient SYS_ADMIN");
        assert!(
            e.to_string().contains("ambient capabilities CAP_SYS_ADMIN"),
            "{e}"
        );
    }

    #[test]
    fn a_spec_without_capabilities_is_bounded_by_the_runtime() {
        let limits = Limits::from_spec(
            &spec(serde_json::json!({
                "ociVersion": "1.0.2", "root": {"path": "rootfs"},
                "process": {"user": {"uid": 0, "gid": 0}, "cwd": "/"}
            })),
            0b1010,
        )
        .expect("limits");
        assert_eq!(limits.bounding, 0b1010);
        assert!(!limits.no_new_privs && limits.seccomp.is_none());
    }

    #[test]
    fn a_profile_that_cannot_be_honoured_refuses_the_limits() {
        let e = Limits::from_spec(
            &spec(serde_json::json!({
                "ociVersion": "1.0.2", "root": {"path": "rootfs"},
                "process": {"user": {"uid": 0, "gid": 0}, "cwd": "/"},
                "linux": {"seccomp": {"defaultAction": "SCMP_ACT_NOTIFY"}}
            })),
            u64::MAX,
        )
        .expect_err("notify");
        assert!(e.to_string().contains("SCMP_ACT_NOTIFY"), "{e}");
    }
}
