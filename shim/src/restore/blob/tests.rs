//! Tests of the blob against the real kernel: a forked child rebuilds a
//! prepared layout through the blob and `rt_sigreturn`s into test code that
//! reports what it finds over a pipe. The target code runs with no libc
//! state (no TLS, its stack is one the blob mapped), so it uses raw
//! syscalls only and never panics on purpose.

use super::*;
use std::io::Read;
use std::os::fd::FromRawFd;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};

const P: u64 = PAGE;

// ---------------------------------------------------------------- pure parts

#[test]
fn find_hole_picks_highest_free_gap() {
    let busy = [
        Range {
            start: 0x10000,
            len: 0x10000,
        },
        Range {
            start: 0x40000,
            len: 0x1000,
        },
    ];
    assert_eq!(find_hole(&busy, 0x1000, 0x10000, 0x50000), Some(0x4f000));
    assert_eq!(find_hole(&busy, 0x10000, 0x10000, 0x41000), Some(0x30000));
    assert_eq!(find_hole(&busy, 0x30000, 0x10000, 0x41000), None);
}

#[test]
fn complement_skips_kept_ranges() {
    let keeps = [
        Range {
            start: 0x5000,
            len: 0x1000,
        },
        Range {
            start: 0x2000,
            len: 0x800,
        },
    ];
    let c = complement(&keeps, 0x1000, 0x8000);
    assert_eq!(
        c,
        vec![
            Range {
                start: 0x1000,
                len: 0x1000
            },
            Range {
                start: 0x3000,
                len: 0x2000
            },
            Range {
                start: 0x6000,
                len: 0x2000
            }
        ]
    );
}

#[test]
fn parse_maps_reads_paths_with_spaces() {
    let m = parse_maps(
        "7f00-7f10 r-xp 00001000 fe:00 12 /usr/lib/a b.so\n7ff0-7ff2 rw-p 00000000 00:00 0 \n",
    )
    .expect("parse");
    assert_eq!(m[0].path, "/usr/lib/a b.so");
    assert_eq!(m[0].offset, 0x1000);
    assert_eq!(m[1].path, "");
    assert!(parse_maps("zzz").is_err());
}

#[test]
fn xsave_area_gets_both_magics() {
    let mut x = vec![0u8; 832];
    x[512] = 3; // xstate_bv: x87 | SSE
    let v = xsave_for_frame(&x).expect("xsave");
    assert_eq!(&v[464..468], &abi::FP_XSTATE_MAGIC1.to_le_bytes());
    assert_eq!(&v[480..484], &832u32.to_le_bytes());
    assert_eq!(&v[832..836], &abi::FP_XSTATE_MAGIC2.to_le_bytes());
    assert!(xsave_for_frame(&[0u8; 100]).is_err());
}

#[test]
fn exit_code_names_the_step() {
    assert_eq!(
        BlobFailure::step_from_exit_code(abi::EXIT_BASE + abi::STEP_MOVE as i32),
        Some(abi::STEP_MOVE)
    );
    assert_eq!(BlobFailure::step_from_exit_code(1), None);
    let f = BlobFailure {
        step: abi::STEP_MOVE,
        errno: 22,
        thread: 0,
        index: 1,
        addr: 0x1000,
    };
    assert!(f.to_string().contains("step 5 (mremap): errno 22"), "{f}");
}

#[test]
fn blob_is_flat_and_small() {
    assert!(!BLOB.is_empty() && BLOB.len() as u64 <= BLOB_MEM_SIZE);
    const { assert!(BLOB_MEM_SIZE < 64 * 1024) };
    // Offset 0 is the entry stub: `and rsp, -16` (48 83 e4 f0).
    assert_eq!(&BLOB[..4], &[0x48, 0x83, 0xe4, 0xf0]);
}

// ------------------------------------------------------- target-side code

/// What the parent told the target to check, placed in a moved region.
#[repr(C)]
struct Ctx {
    fd: u64,
    flag: u32,
    _pad: u32,
    nchecks: u64,
    checks: [u64; 8],
    rseq: u64,
}

/// Saved by the entry stubs: rax rbx rcx rdx rsi rdi rbp r8..r15, xmm0 (2
/// words), rsp at entry, ..., eflags at index 31.
const SAVED_WORDS: usize = 32;
const S_RSI: usize = 4;
const S_XMM0: usize = 15;
const S_RSP: usize = 17;
const S_FLAGS: usize = 31;

macro_rules! entry_stub {
    ($name:literal, $target:path) => {
        core::arch::global_asm!(
            concat!(".globl ", $name),
            concat!($name, ":"),
            "pushfq",
            "sub rsp, 248",
            "mov [rsp], rax",
            "mov [rsp+8], rbx",
            "mov [rsp+16], rcx",
            "mov [rsp+24], rdx",
            "mov [rsp+32], rsi",
            "mov [rsp+40], rdi",
            "mov [rsp+48], rbp",
            "mov [rsp+56], r8",
            "mov [rsp+64], r9",
            "mov [rsp+72], r10",
            "mov [rsp+80], r11",
            "mov [rsp+88], r12",
            "mov [rsp+96], r13",
            "mov [rsp+104], r14",
            "mov [rsp+112], r15",
            "movdqu [rsp+120], xmm0",
            "lea rax, [rsp+256]",
            "mov [rsp+136], rax",
            "mov rdi, rsp",
            "call {f}",
            "ud2",
            f = sym $target,
        );
    };
}

entry_stub!("cowsnap_blob_test_main", target_main);
entry_stub!("cowsnap_blob_test_thread", target_thread);

extern "C" {
    fn cowsnap_blob_test_main();
    fn cowsnap_blob_test_thread();
}

#[inline(always)]
fn raw(nr: i64, a1: u64, a2: u64, a3: u64, a4: u64) -> i64 {
    let ret: i64;
    // SAFETY: a raw syscall; callers pass pointers into their own stack or
    // into the restored layout.
    unsafe {
        std::arch::asm!(
            "syscall",
            inlateout("rax") nr => ret,
            in("rdi") a1,
            in("rsi") a2,
            in("rdx") a3,
            in("r10") a4,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    ret
}

/// Sends `[tag][len u32][payload]` (the other thread is parked meanwhile).
/// Writes straight from `payload`: a large memcpy in libc reads libc's
/// .bss, which the plan does not keep.
fn send(fd: u64, tag: u8, payload: &[u8], _buf: &mut [u8]) {
    let n = payload.len() as u32;
    let head = [
        tag,
        n as u8,
        (n >> 8) as u8,
        (n >> 16) as u8,
        (n >> 24) as u8,
    ];
    write_all(fd, &head);
    write_all(fd, payload);
}

fn write_all(fd: u64, b: &[u8]) {
    let mut off = 0;
    while off < b.len() {
        let r = raw(
            libc::SYS_write,
            fd,
            b[off..].as_ptr() as u64,
            (b.len() - off) as u64,
            0,
        );
        if r <= 0 {
            break;
        }
        off += r as usize;
    }
}

/// Reads a NUL-terminated path's contents into `out`, returns the length.
fn read_file(path: &[u8], out: &mut [u8]) -> usize {
    let fd = raw(
        libc::SYS_open,
        path.as_ptr() as u64,
        libc::O_RDONLY as u64,
        0,
        0,
    );
    if fd < 0 {
        return 0;
    }
    let mut n = 0;
    while n < out.len() {
        let r = raw(
            libc::SYS_read,
            fd as u64,
            out[n..].as_ptr() as u64,
            (out.len() - n) as u64,
            0,
        );
        if r <= 0 {
            break;
        }
        n += r as usize;
    }
    raw(libc::SYS_close, fd as u64, 0, 0, 0);
    n
}

/// This process's /proc/self/pagemap entry of `addr` (0 if unreadable).
fn pagemap_entry(addr: u64) -> u64 {
    let fd = raw(
        libc::SYS_open,
        c"/proc/self/pagemap".as_ptr() as u64,
        libc::O_RDONLY as u64,
        0,
        0,
    );
    if fd < 0 {
        return 0;
    }
    let mut entry: u64 = 0;
    let ps = 4096u64;
    raw(
        libc::SYS_pread64,
        fd as u64,
        &mut entry as *mut u64 as u64,
        8,
        addr / ps * 8,
    );
    raw(libc::SYS_close, fd as u64, 0, 0, 0);
    entry
}

fn words_bytes(w: &[u64]) -> &[u8] {
    // SAFETY: u64s viewed as their bytes, same lifetime.
    unsafe { std::slice::from_raw_parts(w.as_ptr() as *const u8, w.len() * 8) }
}

fn sigmask() -> u64 {
    let mut old: u64 = 0;
    raw(
        libc::SYS_rt_sigprocmask,
        libc::SIG_BLOCK as u64,
        0,
        &mut old as *mut u64 as u64,
        8,
    );
    old
}

extern "C" fn target_thread(saved: *const u64) -> ! {
    // SAFETY: the stub passes its 32 saved words; rsi was set to the Ctx address.
    let saved = unsafe { std::slice::from_raw_parts(saved, SAVED_WORDS) };
    // SAFETY: the plan put a Ctx at the address the frame gave in rsi.
    let ctx = unsafe { &*(saved[S_RSI] as *const Ctx) };
    let mut buf = [0u8; 1024];
    let mut ids = [0u32; 3];
    raw(
        libc::SYS_getresgid,
        &mut ids[0] as *mut u32 as u64,
        &mut ids[1] as *mut u32 as u64,
        &mut ids[2] as *mut u32 as u64,
        0,
    );
    // The signals the blob queued onto this thread: the pending set, then
    // each siginfo taken off the queue (zero timeout: they must be there).
    let mut q = [0u8; 8 + THREAD_PENDING.len() * abi::SIGINFO_SIZE];
    let mut set: u64 = 0;
    raw(
        libc::SYS_rt_sigpending,
        &mut set as *mut u64 as u64,
        8,
        0,
        0,
    );
    q[..8].copy_from_slice(&set.to_le_bytes());
    let zero = [0u64; 2];
    for (k, &(sig, _, _)) in THREAD_PENDING.iter().enumerate() {
        let one: u64 = 1 << (sig - 1);
        let at = 8 + k * abi::SIGINFO_SIZE;
        raw(
            libc::SYS_rt_sigtimedwait,
            &one as *const u64 as u64,
            q[at..].as_mut_ptr() as u64,
            zero.as_ptr() as u64,
            8,
        );
    }
    send(ctx.fd, b'Q', &q, &mut buf);
    let mut words = [0u64; SAVED_WORDS + 3];
    words[..SAVED_WORDS].copy_from_slice(saved);
    words[SAVED_WORDS] = sigmask();
    words[SAVED_WORDS + 1] = ids[0] as u64 | (ids[1] as u64) << 32;
    words[SAVED_WORDS + 2] = raw(libc::SYS_gettid, 0, 0, 0, 0) as u64;
    send(ctx.fd, b'T', words_bytes(&words), &mut buf);
    // SAFETY: the flag is a u32 inside the Ctx, shared with the main thread.
    let flag = unsafe { &*(&ctx.flag as *const u32 as *const AtomicU32) };
    flag.store(1, Ordering::Release);
    raw(
        libc::SYS_futex,
        &ctx.flag as *const u32 as u64,
        libc::FUTEX_WAKE as u64,
        1,
        0,
    );
    loop {
        raw(
            libc::SYS_futex,
            &ctx.flag as *const u32 as u64,
            libc::FUTEX_WAIT as u64,
            1,
            0,
        );
    }
}

extern "C" fn target_main(saved: *const u64) -> ! {
    // SAFETY: as in target_thread.
    let saved = unsafe { std::slice::from_raw_parts(saved, SAVED_WORDS) };
    // SAFETY: as in target_thread.
    let ctx = unsafe { &*(saved[S_RSI] as *const Ctx) };
    let fd = ctx.fd;
    // SAFETY: as in target_thread.
    let flag = unsafe { &*(&ctx.flag as *const u32 as *const AtomicU32) };
    while flag.load(Ordering::Acquire) == 0 {
        raw(
            libc::SYS_futex,
            &ctx.flag as *const u32 as u64,
            libc::FUTEX_WAIT as u64,
            0,
            0,
        );
    }
    let mut buf = [0u8; 40000];
    let mut text = [0u8; 32768];
    send(fd, b'R', words_bytes(saved), &mut buf);
    // Before anything reads them: the file page mapped without a populate
    // entry (checks[5]) and the one with (checks[7]).
    let mapped = [pagemap_entry(ctx.checks[5]), pagemap_entry(ctx.checks[7])];
    send(fd, b'G', words_bytes(&mapped), &mut buf);
    let mut vals = [0u64; 8];
    for (i, v) in vals.iter_mut().enumerate().take(ctx.nchecks as usize) {
        // SAFETY: the parent listed addresses the plan maps readable.
        *v = unsafe { (ctx.checks[i] as *const u64).read_volatile() };
    }
    send(fd, b'D', words_bytes(&vals), &mut buf);
    let n = read_file(b"/proc/self/maps\0", &mut text);
    send(fd, b'M', &text[..n], &mut buf);
    let n = read_file(b"/proc/self/status\0", &mut text);
    send(fd, b'S', &text[..n], &mut buf);
    let n = read_file(b"/proc/self/cmdline\0", &mut text);
    send(fd, b'C', &text[..n], &mut buf);
    let brk = raw(libc::SYS_brk, 0, 0, 0, 0) as u64;
    // SAFETY: the rseq area is in the moved ctx region; cpu_id is at offset 4.
    let cpu = unsafe { ((ctx.rseq + 4) as *const u32).read_volatile() } as u64;
    let mut pending: u64 = 0;
    raw(
        libc::SYS_rt_sigpending,
        &mut pending as *mut u64 as u64,
        8,
        0,
        0,
    );
    send(
        fd,
        b'K',
        words_bytes(&[sigmask(), brk, cpu, pending]),
        &mut buf,
    );
    loop {
        raw(libc::SYS_exit_group, 0, 0, 0, 0);
    }
}

// ------------------------------------------------------------ the child

#[repr(C, align(64))]
struct XsaveBuf([u8; 16384]);
static mut XSAVE: XsaveBuf = XsaveBuf([0; 16384]);
static XSAVE_LEN: AtomicUsize = AtomicUsize::new(0);

extern "C" fn grab_fpstate(_: i32, _: *mut libc::siginfo_t, uc: *mut libc::c_void) {
    // SAFETY: the kernel passes its ucontext; fpstate points at the frame's
    // FXSAVE/XSAVE area, whose sw_reserved bytes give its size.
    unsafe {
        let uc = &*(uc as *const abi::UContext);
        let fp = uc.uc_mcontext.fpstate as *const u8;
        if fp.is_null() {
            return;
        }
        let magic = (fp.add(464) as *const u32).read_unaligned();
        let size = if magic == abi::FP_XSTATE_MAGIC1 {
            (fp.add(480) as *const u32).read_unaligned() as usize
        } else {
            512
        };
        let size = size.min(16384);
        std::ptr::copy_nonoverlapping(fp, std::ptr::addr_of_mut!(XSAVE.0) as *mut u8, size);
        XSAVE_LEN.store(size, Ordering::Release);
    }
}

/// The kernel's own signal frame XSAVE image of this thread.
fn capture_xsave() -> Result<Vec<u8>, String> {
    // SAFETY: installs a handler that only copies memory, raises it on this
    // (single) thread, restores the default.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = grab_fpstate as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO;
        if libc::sigaction(libc::SIGUSR1, &sa, std::ptr::null_mut()) != 0 {
            return Err("sigaction".into());
        }
        libc::raise(libc::SIGUSR1);
        libc::signal(libc::SIGUSR1, libc::SIG_DFL);
        let n = XSAVE_LEN.load(Ordering::Acquire);
        if n < 576 {
            return Err(format!("captured fpstate of {n} bytes"));
        }
        Ok(std::slice::from_raw_parts(std::ptr::addr_of!(XSAVE.0) as *const u8, n).to_vec())
    }
}

const XMM_MAIN: u128 = 0x1122_3344_5566_7788_99aa_bbcc_ddee_ff00;
const XMM_THREAD: u128 = 0x0f0e_0d0c_0b0a_0908_0706_0504_0302_0100;
const FILE_WORD: u64 = 0x454c_4946_2d64_6570; // "ped-FILE"
const CMDLINE: &[u8] = b"cowsnap\0restored\0";
/// Signals thread 1 has pending (and blocked) when restored: (signal,
/// si_code, si_value). SI_TKILL and SI_USER siginfos only the thread itself may queue.
const THREAD_PENDING: [(i32, i32, u64); 3] = [
    (libc::SIGUSR1, -6, 0),
    (40, -1, 0x5eed_cafe_0000_0042),
    (41, 0, 0),
];

/// A 128-byte siginfo: signo, code, pid, uid, and a sigval (rt layout).
fn siginfo(signo: i32, code: i32, pid: i32, value: u64) -> [u8; abi::SIGINFO_SIZE] {
    let mut b = [0u8; abi::SIGINFO_SIZE];
    b[0..4].copy_from_slice(&signo.to_ne_bytes());
    b[8..12].copy_from_slice(&code.to_ne_bytes());
    b[16..20].copy_from_slice(&pid.to_ne_bytes());
    b[24..32].copy_from_slice(&value.to_ne_bytes());
    b
}

fn thread_pending_infos() -> Vec<[u8; abi::SIGINFO_SIZE]> {
    THREAD_PENDING
        .iter()
        .map(|&(sig, code, value)| siginfo(sig, code, 4321, value))
        .collect()
}

fn thread_pending_mask() -> u64 {
    THREAD_PENDING
        .iter()
        .fold(0, |m, &(sig, _, _)| m | 1 << (sig - 1))
}

fn regs(seed: u64, rip: u64, rsp: u64, rdi: u64, rsi: u64) -> UserRegs {
    let v = |i: u64| seed << 56 | 0x00a0_0000_0000_0000 | i;
    UserRegs {
        rax: v(1),
        rbx: v(2),
        rcx: v(3),
        rdx: v(4),
        rbp: v(6),
        r8: v(8),
        r9: v(9),
        r10: v(10),
        r11: v(11),
        r12: v(12),
        r13: v(13),
        r14: v(14),
        r15: v(15),
        rdi,
        rsi,
        rip,
        rsp,
        eflags: 0x203, // IF | CF | bit 1
        cs: 0x33,
        ss: 0x2b,
        ..UserRegs::default()
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Where {
    BelowText,
    AboveText,
    Auto,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Case {
    Rebuild(Where),
    /// A move into the kernel half: mremap fails with EINVAL.
    BadMove,
    /// The block's magic corrupted after prepare: the blob refuses it.
    BadMagic,
}

fn mmap_fixed(addr: u64, len: u64) -> Result<(), String> {
    // SAFETY: MAP_FIXED_NOREPLACE never replaces an existing mapping.
    let p = unsafe {
        libc::mmap(
            addr as *mut libc::c_void,
            len as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
            -1,
            0,
        )
    };
    if p as u64 != addr {
        return Err(format!(
            "mmap {addr:#x}: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

fn fill(addr: u64, len: u64, word: u64) {
    for off in (0..len).step_by(8) {
        // SAFETY: the caller mapped [addr, addr+len) RW just before.
        unsafe { ((addr + off) as *mut u64).write(word ^ off) };
    }
}

fn perms_str(prot: i32, shared: bool) -> String {
    format!(
        "{}{}{}{}",
        if prot & libc::PROT_READ != 0 {
            'r'
        } else {
            '-'
        },
        if prot & libc::PROT_WRITE != 0 {
            'w'
        } else {
            '-'
        },
        if prot & libc::PROT_EXEC != 0 {
            'x'
        } else {
            '-'
        },
        if shared { 's' } else { 'p' }
    )
}

/// Builds the plan in the forked child, tells the parent what to expect
/// (the 'P' and 'X' messages), and jumps. Returns only on an error.
fn child(
    case: Case,
    wfd: i32,
    file: &std::path::Path,
    status: &StatusPage,
    barrier: &StatusPage,
) -> String {
    match child_inner(case, wfd, file, status, barrier) {
        Ok(never) => match never {},
        Err(e) => e,
    }
}

fn child_inner(
    case: Case,
    wfd: i32,
    file: &std::path::Path,
    status: &StatusPage,
    barrier: &StatusPage,
) -> Result<std::convert::Infallible, String> {
    let runtime = read_self_maps().map_err(|e| e.to_string())?;
    let exe = std::fs::read_link("/proc/self/exe").map_err(|e| e.to_string())?;
    let exe = exe.to_string_lossy().to_string();
    let text = runtime
        .iter()
        .find(|e| e.path == exe && e.perms.contains('x'))
        .ok_or("no executable text mapping")?
        .clone();
    let heap = runtime
        .iter()
        .find(|e| e.path == "[heap]")
        .ok_or("runtime has no [heap]")?
        .clone();
    let busy: Vec<Range> = runtime
        .iter()
        .map(|e| Range {
            start: e.start,
            len: e.end - e.start,
        })
        .collect();
    let w = find_hole(&busy, 1024 * P, 0x1_0000_0000, abi::USER_HIGH - (1 << 32))
        .ok_or("no plan area")?;

    let (x_src, x_dst) = (w, w + 2 * P);
    let (y_src, y_dst) = (w + 2 * P, w + 16 * P);
    let (z_src, z_dst) = (w + 32 * P, w + 33 * P);
    let stack0 = (w + 64 * P, 32 * P);
    let stack1 = (w + 112 * P, 32 * P);
    let a = w + 160 * P;
    let brk = w + 200 * P;
    let vdso_to = w + 300 * P;
    // Two pages of the one-page file, both asked to be populated: the first
    // must be mapped by the blob, the second (past EOF) fails and is ignored.
    let populated = w + 400 * P;
    for (addr, word) in [
        (x_src, 0x5858_5858u64),
        (y_src, 0x5959_5959),
        (z_src, 0x5a5a_5a5a),
    ] {
        mmap_fixed(addr, 2 * P)?;
        fill(addr, 2 * P, word);
    }
    // cmdline at the start of X (moved), Ctx and an rseq area in Y (moved).
    // SAFETY: X and Y were just mapped RW; Ctx fits in one page.
    unsafe {
        std::ptr::copy_nonoverlapping(CMDLINE.as_ptr(), x_src as *mut u8, CMDLINE.len());
        let ctx = y_src as *mut Ctx;
        ctx.write(Ctx {
            fd: wfd as u64,
            flag: 0,
            _pad: 0,
            nchecks: 6,
            checks: [
                x_dst,
                x_dst + P,
                y_dst + 2 * P - 8,
                z_dst + 8,
                z_dst + P + 16,
                heap.start,
                a + P,
                populated,
            ],
            rseq: y_dst + 2048,
        });
        std::ptr::write_bytes((y_src + 2048) as *mut u8, 0, 32);
        ((y_src + 2048 + 4) as *mut u32).write(u32::MAX);
    }
    let expected_checks = [
        u64::from_le_bytes(CMDLINE[..8].try_into().map_err(|_| "cmdline")?),
        0, // MADV_DONTNEED'd
        0x5959_5959 ^ (2 * P - 8),
        0x5a5a_5a5a ^ 8,
        0x5a5a_5a5a ^ (P + 16),
        FILE_WORD,
    ];

    let open_file = || -> Result<i32, String> {
        let c = std::ffi::CString::new(file.as_os_str().to_string_lossy().as_bytes())
            .map_err(|e| e.to_string())?;
        // SAFETY: a NUL-terminated path.
        let fd = unsafe { libc::open(c.as_ptr(), libc::O_RDONLY) };
        if fd < 0 {
            return Err(format!(
                "open {}: {}",
                file.display(),
                std::io::Error::last_os_error()
            ));
        }
        Ok(fd)
    };
    let fd = open_file()?;
    let populated_fd = open_file()?;

    let mut args = BlobArgs::new();
    // Keep the code the target runs: every file mapping of the runtime.
    let kept: Vec<&MapsEntry> = runtime
        .iter()
        .filter(|e| e.path.starts_with('/') && !e.path.contains("(deleted)"))
        .collect();
    for e in &kept {
        args.push_keep(e.start, e.end - e.start);
    }
    args.push_move(x_src, x_dst, 2 * P) // its destination is Y's source: Y must go first
        .push_move(y_src, y_dst, 2 * P)
        .push_move(z_src, z_dst, 2 * P) // overlaps itself: goes through scratch
        .push_map_file(
            heap.start,
            P,
            libc::PROT_READ,
            libc::MAP_PRIVATE,
            MapFd {
                fd,
                offset: 0,
                close: true,
            },
        )
        .push_map_anon(
            stack0.0,
            stack0.1,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE,
        )
        .push_map_anon(
            stack1.0,
            stack1.1,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE,
        )
        .push_map_anon(
            a,
            2 * P,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE,
        )
        .push_map_file(
            populated,
            2 * P,
            libc::PROT_READ,
            libc::MAP_PRIVATE,
            MapFd {
                fd: populated_fd,
                offset: 0,
                close: true,
            },
        )
        .push_populate(populated, P)
        .push_populate(populated + P, P)
        .push_mprotect(a, P, libc::PROT_READ)
        .push_madvise(x_dst + P, P, libc::MADV_DONTNEED)
        .set_vdso(vdso_to)
        .set_mm(
            PrctlMmMap {
                start_code: text.start,
                end_code: text.end,
                start_data: y_dst,
                end_data: y_dst + 2 * P,
                start_brk: brk,
                brk: brk + P,
                start_stack: stack0.0 + stack0.1 - P,
                arg_start: x_dst,
                arg_end: x_dst + CMDLINE.len() as u64,
                env_start: x_dst + CMDLINE.len() as u64,
                env_end: x_dst + CMDLINE.len() as u64,
                exe_fd: u32::MAX,
                ..Default::default()
            },
            &[[libc::AT_PAGESZ, P], [libc::AT_NULL, 0]],
        )
        .set_creds(CredsSpec {
            uids: [0; 4],
            gids: [4242; 4],
            groups: vec![7, 8],
            cap_effective: cap_mask(),
            cap_permitted: cap_mask(),
            cap_inheritable: 0,
            cap_bounding: cap_mask(),
            cap_ambient: 0,
            securebits: 0,
        })
        // One allow-all filter: SECCOMP_RET_ALLOW.
        .set_seccomp(true, vec![vec![0x06, 0, 0, 0, 0, 0, 0xff, 0x7f]])
        .set_status(status.addr())
        .set_barrier(barrier.addr() + 64, 2)
        .push_post_barrier_unmap(status.addr(), P)
        .push_post_barrier_unmap(barrier.addr(), P);
    if case == Case::BadMove {
        args.push_move(z_src + 8 * P, 0xffff_f000_0000_0000, P);
        mmap_fixed(z_src + 8 * P, P)?;
    }

    let mut t0 = ThreadSpec::new(regs(
        1,
        cowsnap_blob_test_main as *const () as u64,
        stack0.0 + stack0.1,
        wfd as u64,
        y_dst,
    ));
    let mut xs = capture_xsave()?;
    xs[160..176].copy_from_slice(&XMM_MAIN.to_le_bytes());
    xs[512] |= 2; // xstate_bv: SSE from the buffer
    t0.fpu = FpuState::Xsave(xs);
    t0.sigmask = 1 << (libc::SIGUSR2 - 1);
    t0.rseq = Some(Rseq {
        abi_pointer: y_dst + 2048,
        abi_size: 32,
        signature: 0x5305_3053,
        flags: 0,
    });
    let mut t1 = ThreadSpec::new(regs(
        2,
        cowsnap_blob_test_thread as *const () as u64,
        stack1.0 + stack1.1,
        wfd as u64,
        y_dst,
    ));
    let mut fx = Box::new([0u8; 512]);
    fx[0..2].copy_from_slice(&0x037fu16.to_le_bytes());
    fx[24..28].copy_from_slice(&0x1f80u32.to_le_bytes());
    fx[160..176].copy_from_slice(&XMM_THREAD.to_le_bytes());
    t1.fpu = FpuState::Fxsave(fx);
    t1.sigmask = thread_pending_mask();
    t1.pending = thread_pending_infos();
    args.push_thread(t0).push_thread(t1);

    // The plan as /proc/self/maps must show it afterwards.
    let mut expect: Vec<(u64, u64, String)> = kept
        .iter()
        .map(|e| (e.start, e.end, e.perms.clone()))
        .collect();
    let rw = perms_str(libc::PROT_READ | libc::PROT_WRITE, false);
    for (s, l) in [
        (x_dst, 2 * P),
        (y_dst, 2 * P),
        (z_dst, 2 * P),
        stack0,
        stack1,
        (a + P, P),
    ] {
        expect.push((s, s + l, rw.clone()));
    }
    expect.push((a, a + P, perms_str(libc::PROT_READ, false)));
    expect.push((
        heap.start,
        heap.start + P,
        perms_str(libc::PROT_READ, false),
    ));
    expect.push((
        populated,
        populated + 2 * P,
        perms_str(libc::PROT_READ, false),
    ));
    let vdso_at = runtime
        .iter()
        .find(|e| e.path == "[vdso]")
        .ok_or("no [vdso]")?
        .start;
    for e in runtime
        .iter()
        .filter(|e| e.path.starts_with("[vdso]") || e.path.starts_with("[vvar"))
    {
        expect.push((
            e.start + vdso_to - vdso_at,
            e.end + vdso_to - vdso_at,
            e.perms.clone(),
        ));
    }

    let placement = match case {
        Case::Rebuild(Where::BelowText) => {
            let mut b = busy.clone();
            b.extend(args.target_ranges(&[]));
            let size = 2 * 1024 * 1024;
            // Leave room for the region's own size below the text start.
            Placement::At(
                find_hole(&b, size, 0x10000, text.start).ok_or("no hole below text")? + size / 2,
            )
        }
        Case::Rebuild(Where::AboveText) => {
            let mut b = busy.clone();
            b.extend(args.target_ranges(&[]));
            let size = 2 * 1024 * 1024;
            Placement::At(find_hole(&b, size, text.end, w).ok_or("no hole above text")? + size / 2)
        }
        _ => Placement::Auto,
    };
    let prepared = prepare(&args, placement).map_err(|e| e.to_string())?;
    expect.push((
        prepared.base,
        prepared.base + prepared.code_len,
        "r-xp".into(),
    ));
    expect.push((
        prepared.base + prepared.code_len,
        prepared.base + prepared.kept_len,
        rw.clone(),
    ));
    let mut plan = String::new();
    for (s, e, p) in &expect {
        plan.push_str(&format!("{s:x} {e:x} {p}\n"));
    }
    let mut buf = vec![0u8; 65536];
    send(wfd as u64, b'P', plan.as_bytes(), &mut buf);
    let words: Vec<u64> = [
        prepared.base,
        text.start,
        text.end,
        brk + P,
        heap.start,
        vdso_to,
    ]
    .into_iter()
    .chain(expected_checks)
    .collect();
    send(wfd as u64, b'X', words_bytes(&words), &mut buf);
    if case == Case::BadMagic {
        // SAFETY: the block is ours (RW) until the jump.
        unsafe { (prepared.block_addr as *mut u64).write(0) };
    }
    prepared.jump()
}

fn cap_mask() -> u64 {
    let text = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix("CapBnd:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0)
}

// ------------------------------------------------------------ the parent

struct Outcome {
    msgs: Vec<(u8, Vec<u8>)>,
    exit: i32,
    status: Status,
    barrier: u32,
}

impl Outcome {
    fn msg(&self, tag: u8) -> &[u8] {
        match self.msgs.iter().find(|(t, _)| *t == tag) {
            Some((_, m)) => m,
            None => panic!(
                "no {:?} message; got {:?}; exit {}; status {:?}",
                tag as char,
                self.tags(),
                self.exit,
                self.status
            ),
        }
    }

    fn words(&self, tag: u8) -> Vec<u64> {
        self.msg(tag)
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
            .collect()
    }

    fn text(&self, tag: u8) -> String {
        String::from_utf8_lossy(self.msg(tag)).to_string()
    }

    fn tags(&self) -> String {
        self.msgs.iter().map(|(t, _)| *t as char).collect()
    }
}

fn run_case(case: Case) -> Outcome {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("mapped");
    let mut content = vec![0u8; P as usize];
    content[..8].copy_from_slice(&FILE_WORD.to_le_bytes());
    std::fs::write(&file, &content).expect("write mapped file");
    let status = StatusPage::new().expect("status page");
    let barrier = StatusPage::new().expect("barrier page");
    let mut fds = [0i32; 2];
    // SAFETY: pipe writes two fds into the array.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: the child only builds its plan (malloc is fork-safe in glibc)
    // and jumps into the blob or _exits; it never returns into the harness.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
    if pid == 0 {
        // SAFETY: closing our copy of the read end.
        unsafe { libc::close(fds[0]) };
        let err = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            child(case, fds[1], &file, &status, &barrier)
        }))
        .unwrap_or_else(|p| {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()));
            format!("child panicked: {}", msg.unwrap_or_default())
        });
        let mut buf = vec![0u8; 8192];
        send(fds[1] as u64, b'E', err.as_bytes(), &mut buf);
        // SAFETY: leave without running the harness's destructors.
        unsafe { libc::_exit(3) };
    }
    // SAFETY: closing our copy of the write end; the read end becomes a File we own.
    let mut rd = unsafe {
        libc::close(fds[1]);
        std::fs::File::from_raw_fd(fds[0])
    };
    let mut data = Vec::new();
    rd.read_to_end(&mut data).expect("read pipe");
    let mut st = 0;
    // SAFETY: waits for our own child.
    assert_eq!(unsafe { libc::waitpid(pid, &mut st, 0) }, pid);
    let exit = if libc::WIFEXITED(st) {
        libc::WEXITSTATUS(st)
    } else {
        -libc::WTERMSIG(st)
    };
    let mut msgs = Vec::new();
    let mut off = 0;
    while off + 5 <= data.len() {
        let len = u32::from_le_bytes(data[off + 1..off + 5].try_into().unwrap_or([0; 4])) as usize;
        let end = (off + 5 + len).min(data.len());
        msgs.push((data[off], data[off + 5..end].to_vec()));
        off = end;
    }
    // SAFETY: the barrier word lives in our own shared page.
    let barrier_word = unsafe { ((barrier.addr() + 64) as *const u32).read_volatile() };
    Outcome {
        msgs,
        exit,
        status: status.read(),
        barrier: barrier_word,
    }
}

fn check_rebuild(case: Case) {
    let o = run_case(case);
    if let Some((_, e)) = o.msgs.iter().find(|(t, _)| *t == b'E') {
        panic!(
            "child failed before the jump: {}",
            String::from_utf8_lossy(e)
        );
    }
    assert_eq!(
        o.exit,
        0,
        "child exit {} ({:?}); messages {}",
        o.exit,
        BlobFailure::from_status(&o.status).map(|f| f.to_string()),
        o.tags()
    );
    assert_eq!(
        o.status.state,
        abi::STATE_DONE,
        "{:?} barrier {}",
        o.status,
        o.barrier
    );
    assert_eq!(o.barrier, 2, "both threads passed the barrier");
    let x = o.words(b'X');
    let (vdso_to, expected_checks) = (x[5], &x[6..]);

    // Registers, FPU and mask of both threads.
    for (tag, seed, xmm) in [(b'R', 1u64, XMM_MAIN), (b'T', 2, XMM_THREAD)] {
        let w = o.words(tag);
        let want = regs(seed, 0, 0, 0, 0);
        let got = [
            w[0], w[1], w[2], w[3], w[6], w[7], w[8], w[9], w[10], w[11], w[12], w[13], w[14],
        ];
        let exp = [
            want.rax, want.rbx, want.rcx, want.rdx, want.rbp, want.r8, want.r9, want.r10, want.r11,
            want.r12, want.r13, want.r14, want.r15,
        ];
        assert_eq!(got, exp, "general registers of {}", tag as char);
        assert_eq!(
            w[S_FLAGS] & 0xcd5,
            0x001,
            "eflags (CF set, others clear) of {}",
            tag as char
        );
        assert_eq!(w[S_FLAGS] & 0x200, 0x200, "IF");
        let xmm0 = w[S_XMM0] as u128 | (w[S_XMM0 + 1] as u128) << 64;
        assert_eq!(xmm0, xmm, "xmm0 of {}", tag as char);
        assert_eq!(w[S_RSP] % 16, 0, "rsp at entry is the planned stack top");
    }
    let t = o.words(b'T');
    assert_eq!(t[SAVED_WORDS], thread_pending_mask(), "thread 1 mask");
    // Thread 1's pending signals: queued onto it, siginfo byte for byte.
    let q = o.msg(b'Q');
    let pending = u64::from_le_bytes(q[..8].try_into().unwrap_or_default());
    assert_eq!(pending, thread_pending_mask(), "thread 1 pending set");
    for (k, want) in thread_pending_infos().iter().enumerate() {
        let at = 8 + k * abi::SIGINFO_SIZE;
        assert_eq!(
            &q[at..at + abi::SIGINFO_SIZE],
            want.as_slice(),
            "siginfo #{k} of thread 1"
        );
    }
    assert_eq!(t[SAVED_WORDS + 1], 4242 | 4242 << 32, "thread 1 rgid/egid");
    let k = o.words(b'K');
    assert_eq!(k[0], 1 << (libc::SIGUSR2 - 1), "thread 0 mask");
    assert_eq!(k[1], x[3], "brk from PR_SET_MM_MAP");
    assert_eq!(k[3], 0, "nothing pending for thread 0 or the process");
    assert!(
        k[2] < 4096,
        "rseq cpu_id written by the kernel: {:#x}",
        k[2]
    );
    assert_eq!(
        &o.words(b'D')[..expected_checks.len()],
        expected_checks,
        "memory contents"
    );
    assert_eq!(o.msg(b'C'), CMDLINE, "cmdline from arg_start/arg_end");
    // MADV_POPULATE_READ mapped the populated file page; the file page
    // without a populate entry stayed unmapped until first use.
    let g = o.words(b'G');
    const PRESENT: u64 = 1 << 63;
    assert_eq!(g[0] & PRESENT, 0, "unpopulated file page: {:#x}", g[0]);
    assert_ne!(g[1] & PRESENT, 0, "populated file page: {:#x}", g[1]);

    let status = o.text(b'S');
    for want in [
        "Threads:\t2",
        "Gid:\t4242\t4242\t4242\t4242",
        "Groups:\t7 8",
        "NoNewPrivs:\t1",
        "Seccomp:\t2",
    ] {
        assert!(
            status.contains(want),
            "{want:?} missing from status:\n{status}"
        );
    }

    // /proc/self/maps equals the plan (plus [vsyscall]).
    let maps = parse_maps(&o.text(b'M')).expect("maps");
    let mut got: Vec<String> = maps
        .iter()
        .filter(|e| e.path != "[vsyscall]")
        .map(|e| format!("{:x} {:x} {}", e.start, e.end, e.perms))
        .collect();
    let mut want: Vec<String> = o.text(b'P').lines().map(str::to_string).collect();
    got.sort();
    want.sort();
    assert_eq!(got, want, "maps after restore:\n{}", o.text(b'M'));
    assert!(
        maps.iter()
            .any(|e| e.path == "[vdso]" && e.start == vdso_to),
        "vdso moved to {vdso_to:#x}"
    );
    let base = x[0];
    match case {
        Case::Rebuild(Where::BelowText) => {
            assert!(base < x[1], "blob {base:#x} below text {:#x}", x[1])
        }
        Case::Rebuild(Where::AboveText) => {
            assert!(base > x[2], "blob {base:#x} above text {:#x}", x[2])
        }
        _ => {}
    }
}

#[test]
fn rebuilds_layout_with_blob_below_text() {
    check_rebuild(Case::Rebuild(Where::BelowText));
}

#[test]
fn rebuilds_layout_with_blob_above_text() {
    check_rebuild(Case::Rebuild(Where::AboveText));
}

#[test]
fn rebuilds_layout_with_blob_placed_automatically() {
    check_rebuild(Case::Rebuild(Where::Auto));
}

#[test]
fn failed_move_reports_step_and_errno() {
    let o = run_case(Case::BadMove);
    assert!(
        o.msgs.iter().all(|(t, _)| *t != b'E'),
        "child failed before the jump: {}",
        o.tags()
    );
    let f = BlobFailure::from_status(&o.status)
        .unwrap_or_else(|| panic!("no failure reported: {:?}", o.status));
    assert_eq!(
        (f.step, f.errno, f.addr),
        (abi::STEP_MOVE, libc::EINVAL as u32, 0xffff_f000_0000_0000),
        "{f}"
    );
    assert_eq!(o.exit, abi::EXIT_BASE + abi::STEP_MOVE as i32);
    assert_eq!(
        BlobFailure::step_from_exit_code(o.exit),
        Some(abi::STEP_MOVE)
    );
}

#[test]
fn mismatched_block_is_refused() {
    let o = run_case(Case::BadMagic);
    let f = BlobFailure::from_status(&o.status)
        .unwrap_or_else(|| panic!("no failure reported: {:?}", o.status));
    assert_eq!(
        (f.step, f.errno),
        (abi::STEP_CHECK_ARGS, libc::EBADMSG as u32),
        "{f}"
    );
    assert_eq!(o.exit, abi::EXIT_BASE + abi::STEP_CHECK_ARGS as i32);
}

#[test]
fn unqueueable_pending_signal_is_refused_before_the_jump() {
    let mut args = BlobArgs::new();
    let mut t = ThreadSpec::new(UserRegs::default());
    t.pending = vec![
        siginfo(libc::SIGUSR2, -6, 1, 0),
        siginfo(libc::SIGKILL, 0, 1, 0),
    ];
    args.push_thread(ThreadSpec::new(UserRegs::default()))
        .push_thread(t);
    let scratch = Range::default();
    let e = build_block(&args, 0x10_0000, &[], &[], scratch, 0x10_0000, P, 0x20_0000)
        .expect_err("SIGKILL cannot be queued");
    assert!(
        matches!(&e, BlobError::Thread { thread: 1, reason } if reason.contains("#1") && reason.contains("signal 9")),
        "{e}"
    );
    let mut ok = BlobArgs::new();
    let mut t = ThreadSpec::new(UserRegs::default());
    t.pending = vec![siginfo(40, -1, 1, 7)];
    ok.push_thread(ThreadSpec::new(UserRegs::default()))
        .push_thread(t);
    let block =
        build_block(&ok, 0x10_0000, &[], &[], scratch, 0x10_0000, P, 0x20_0000).expect("block");
    // SAFETY: the block starts with an ArgHeader (plain data, unaligned read).
    let h: abi::ArgHeader = unsafe { (block.as_ptr() as *const abi::ArgHeader).read_unaligned() };
    let thread = |i: u64| -> abi::Thread {
        let at = (h.threads.offset + i * size_of::<abi::Thread>() as u64) as usize;
        // SAFETY: the thread table lies inside the block.
        unsafe { (block[at..].as_ptr() as *const abi::Thread).read_unaligned() }
    };
    assert_eq!(thread(0).pending.count, 0);
    let p = thread(1).pending;
    assert_eq!(p.count, 1);
    let at = p.offset as usize;
    assert_eq!(
        &block[at..at + abi::SIGINFO_SIZE],
        &siginfo(40, -1, 1, 7)[..]
    );
}

#[test]
fn adjacent_populate_ranges_merge() {
    let mut args = BlobArgs::new();
    args.push_populate(0x1000, 0x1000)
        .push_populate(0x2000, 0x2000)
        .push_populate(0x5000, 0x1000)
        .push_populate(0x6000, 0);
    assert_eq!(
        args.populates,
        vec![
            Range {
                start: 0x1000,
                len: 0x3000
            },
            Range {
                start: 0x5000,
                len: 0x1000
            },
        ]
    );
}
