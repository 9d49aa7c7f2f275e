//! Signal restore against the real kernel: each test forks a child that
//! blocks everything, restores from a synthetic image, and reports what the
//! kernel then shows (rt_sigaction, /proc/self/status, rt_sigtimedwait, getitimer).

use super::*;
use crate::image::types::{SigAction, ThreadImage, UserRegs};
use crate::restore::fds::tests::process;
use crate::sys::restore_sys::in_child;

const SA_SIGINFO: u64 = 0x4;
const SA_RESTART: u64 = 0x1000_0000;
const SA_RESTORER: u64 = 0x0400_0000;
const SA_ONSTACK: u64 = 0x0800_0000;

fn bit(sig: i32) -> u64 {
    1u64 << (sig - 1)
}

fn thread(tid: i32, pending: Vec<String>) -> ThreadImage {
    ThreadImage {
        tid,
        nstid: vec![tid],
        regs: UserRegs::default(),
        xsave: String::new(),
        sigmask: 0,
        pending,
        sigaltstack: Default::default(),
        clear_child_tid: 0,
        rseq: None,
        comm: "t".into(),
    }
}

/// A 128-byte siginfo: signo, code, pid, uid, and a sigval (rt layout).
fn siginfo(signo: i32, code: i32, pid: i32, uid: u32, value: u64) -> [u8; SIGINFO_SIZE] {
    let mut b = [0u8; SIGINFO_SIZE];
    b[0..4].copy_from_slice(&signo.to_ne_bytes());
    b[8..12].copy_from_slice(&code.to_ne_bytes());
    b[16..20].copy_from_slice(&pid.to_ne_bytes());
    b[20..24].copy_from_slice(&uid.to_ne_bytes());
    b[24..32].copy_from_slice(&value.to_ne_bytes());
    b
}

fn status_mask(status: &str, key: &str) -> Result<u64, String> {
    let line = status
        .lines()
        .find(|l| l.starts_with(key))
        .ok_or_else(|| format!("{key} missing"))?;
    u64::from_str_radix(line[key.len()..].trim(), 16).map_err(|e| format!("{key}: {e}"))
}

#[test]
fn sigactions_are_restored_exactly_including_glibc_reserved_signals() {
    let mut image = process(700, vec![]);
    let set = |image: &mut ProcessImage, sig: i32, a: SigAction| {
        image.signals.actions[sig as usize - 1] = a;
    };
    set(
        &mut image,
        libc::SIGUSR1,
        SigAction {
            handler: 0x7f00_0000_1000,
            flags: SA_SIGINFO | SA_RESTORER | SA_RESTART,
            restorer: 0x7f00_0000_2000,
            mask: bit(libc::SIGUSR2) | bit(libc::SIGINT),
        },
    );
    set(
        &mut image,
        libc::SIGTERM,
        SigAction {
            handler: 1,
            flags: 0,
            restorer: 0,
            mask: 0,
        },
    );
    set(
        &mut image,
        33,
        SigAction {
            handler: 0x7f00_0000_3000,
            flags: SA_RESTORER | SA_ONSTACK,
            restorer: 0x7f00_0000_2000,
            mask: bit(64),
        },
    );
    // Never installed: the kernel refuses SIGKILL/SIGSTOP; restore skips them.
    set(
        &mut image,
        libc::SIGKILL,
        SigAction {
            handler: 0x1234,
            flags: 0,
            restorer: 0,
            mask: 0,
        },
    );
    let report = in_child(|_| {
        restore_sys::block_all_signals().map_err(|e| e.to_string())?;
        restore_sigactions(700, &image).map_err(|e| e.to_string())?;
        let mut got = Vec::new();
        for sig in 1..=64 {
            let a = restore_sys::rt_sigaction(sig, None).map_err(|e| format!("{sig}: {e}"))?;
            got.push([a.handler, a.flags, a.restorer, a.mask]);
        }
        serde_json::to_vec(&got).map_err(|e| e.to_string())
    })
    .expect("child");
    let got: Vec<[u64; 4]> = serde_json::from_slice(&report).expect("report");
    for (i, a) in image.signals.actions.iter().enumerate() {
        let sig = i as i32 + 1;
        if sig == libc::SIGKILL || sig == libc::SIGSTOP {
            assert_eq!(got[i], [0; 4], "signal {sig} stays default");
            continue;
        }
        assert_eq!(
            got[i],
            [a.handler, a.flags, a.restorer, a.mask],
            "signal {sig}"
        );
    }
}

#[test]
fn pending_signals_are_requeued_with_their_siginfo() {
    let usr2 = siginfo(
        libc::SIGUSR2,
        -1, /* SI_QUEUE */
        4321,
        1000,
        0xdead_beef,
    );
    // si_code SI_USER (0) and SI_KERNEL (0x80): only allowed because the target is ourselves.
    let rt = siginfo(35, 0, 777, 0, 0);
    let segv_like = siginfo(libc::SIGPIPE, 0x80, 0, 0, 0);
    let hup = siginfo(libc::SIGHUP, -6 /* SI_TKILL */, 99, 0, 0);
    let mut image = process(701, vec![]);
    image.signals.shared_pending = vec![hex::encode(usr2), hex::encode(rt), hex::encode(segv_like)];
    image.threads = vec![thread(701, vec![hex::encode(hup)])];

    let report = in_child(|_| {
        restore_sys::block_all_signals().map_err(|e| e.to_string())?;
        queue_pending(701, &image).map_err(|e| e.to_string())?;
        let pending = restore_sys::sigpending().map_err(|e| e.to_string())?;
        let status =
            std::fs::read_to_string("/proc/thread-self/status").map_err(|e| e.to_string())?;
        let shd = status_mask(&status, "ShdPnd:")?;
        let thr = status_mask(&status, "SigPnd:")?;
        let mut infos = Vec::new();
        for sig in [libc::SIGUSR2, 35, libc::SIGPIPE, libc::SIGHUP] {
            let info = restore_sys::take_pending(bit(sig))
                .map_err(|e| e.to_string())?
                .ok_or_else(|| format!("signal {sig} not pending"))?;
            infos.push(hex::encode(info));
        }
        let after = restore_sys::sigpending().map_err(|e| e.to_string())?;
        serde_json::to_vec(&(pending, shd, thr, infos, after)).map_err(|e| e.to_string())
    })
    .expect("child");
    let (pending, shd, thr, infos, after): (u64, u64, u64, Vec<String>, u64) =
        serde_json::from_slice(&report).expect("report");
    let shared_bits = bit(libc::SIGUSR2) | bit(35) | bit(libc::SIGPIPE);
    assert_eq!(shd, shared_bits, "process-wide queue");
    assert_eq!(thr, bit(libc::SIGHUP), "leader thread's queue");
    assert_eq!(pending, shared_bits | bit(libc::SIGHUP));
    assert_eq!(
        infos,
        vec![
            hex::encode(usr2),
            hex::encode(rt),
            hex::encode(segv_like),
            hex::encode(hup)
        ],
        "siginfo kept byte for byte"
    );
    assert_eq!(after, 0);
}

#[test]
fn other_threads_pending_signals_are_listed_for_the_blob_not_queued_here() {
    let usr1 = siginfo(libc::SIGUSR1, -6 /* SI_TKILL */, 1, 0, 0);
    let rt = siginfo(40, -1 /* SI_QUEUE */, 1, 0, 0x5eed);
    let mut image = process(702, vec![]);
    image.threads = vec![
        thread(702, vec![]),
        thread(703, vec![hex::encode(usr1), hex::encode(rt)]),
        thread(704, vec![]),
        thread(705, vec![hex::encode(siginfo(libc::SIGUSR2, 0, 1, 0, 0))]),
    ];
    let listed = other_thread_pending(702, &image).expect("decode");
    let tids: Vec<i32> = listed.iter().map(|(tid, _)| *tid).collect();
    assert_eq!(
        tids,
        vec![703, 705],
        "threads with pending signals, in order"
    );
    assert_eq!(
        listed[0].1,
        vec![
            PendingSignal {
                signal: libc::SIGUSR1,
                info: usr1
            },
            PendingSignal {
                signal: 40,
                info: rt
            }
        ],
        "oldest first, siginfo kept"
    );
    // The runtime queues nothing of theirs (it has no such threads): the
    // leader's and the process-wide queues stay empty.
    let report = in_child(|_| {
        restore_sys::block_all_signals().map_err(|e| e.to_string())?;
        queue_pending(702, &image).map_err(|e| e.to_string())?;
        restore_sys::sigpending()
            .map(|p| p.to_ne_bytes().to_vec())
            .map_err(|e| e.to_string())
    })
    .expect("child");
    let pending = u64::from_ne_bytes(report.try_into().expect("8 bytes"));
    assert_eq!(
        pending, 0,
        "nothing queued for other threads by the runtime"
    );
}

#[test]
fn malformed_siginfo_is_refused() {
    let e = decode_queue(1, 2, &["zz".into()]).expect_err("hex");
    assert!(
        matches!(
            e,
            SignalError::BadSiginfo {
                pid: 1,
                tid: 2,
                index: 0,
                ..
            }
        ),
        "{e}"
    );
    let e = decode_queue(1, 2, &[hex::encode([0u8; 64])]).expect_err("short");
    assert!(e.to_string().contains("64 bytes"), "{e}");
    let e = decode_queue(1, 2, &[hex::encode(siginfo(65, 0, 0, 0, 0))]).expect_err("range");
    assert!(
        matches!(e, SignalError::BadSignal { signal: 65, .. }),
        "{e}"
    );
    let e =
        decode_queue(1, 2, &[hex::encode(siginfo(libc::SIGKILL, 0, 0, 0, 0))]).expect_err("kill");
    assert!(
        matches!(e, SignalError::UnqueueableSignal { signal: 9, .. }),
        "{e}"
    );
    let mut image = process(3, vec![]);
    image.signals.actions.pop();
    let e = restore_sigactions(3, &image).expect_err("count");
    assert!(
        matches!(e, SignalError::ActionCount { found: 63, .. }),
        "{e}"
    );
}

#[test]
fn itimers_are_armed_from_microseconds() {
    let mut image = process(704, vec![]);
    image.itimers.real = [100_000_123, 200_500_000];
    image.itimers.virt = [3_000_000, 50_000_000];
    image.itimers.prof = [1_250_000, 7_000_001];
    let report = in_child(|_| {
        restore_sys::block_all_signals().map_err(|e| e.to_string())?;
        set_itimers(704, &image).map_err(|e| e.to_string())?;
        let mut got = Vec::new();
        for which in [Itimer::Real, Itimer::Virtual, Itimer::Prof] {
            got.push(restore_sys::get_itimer(which).map_err(|e| e.to_string())?);
        }
        serde_json::to_vec(&got).map_err(|e| e.to_string())
    })
    .expect("child");
    let got: Vec<[u64; 2]> = serde_json::from_slice(&report).expect("report");
    let t = image.itimers;
    // The kernel adds one tick to a CPU timer's value (set_cpu_itimer), at
    // most 10 ms for HZ >= 100; the real timer is exact.
    for (name, set, now, slack) in [
        ("real", t.real, got[0], 0),
        ("virtual", t.virt, got[1], 10_000),
        ("prof", t.prof, got[2], 10_000),
    ] {
        assert_eq!(now[0], set[0], "{name} interval");
        assert!(
            now[1] > 0 && now[1] <= set[1] + slack,
            "{name} value {now:?} vs {set:?}"
        );
    }
}
