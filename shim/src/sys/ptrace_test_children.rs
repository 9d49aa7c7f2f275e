//! Test-only helper processes for the ptrace, injection, seize and task-state
//! tests: real forked children that set up known state and report it over a
//! pipe, so a test can compare what cowsnap collects with what the child set.
//! The children only make raw libc calls after `fork` (the test harness is
//! multi-threaded); their unsafe code lives here because it is raw syscalls.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};

/// How long a test waits for a child's message before failing.
const RECV_TIMEOUT_MS: i32 = 20_000;

/// The child's ends of its two pipes.
pub(crate) struct Io {
    pub report: i32,
    pub command: i32,
}

impl Io {
    pub fn send(&self, bytes: &[u8]) {
        // SAFETY: `bytes` is a live buffer of the given length.
        unsafe { libc::write(self.report, bytes.as_ptr().cast(), bytes.len()) };
    }
    /// One `read` of one byte from the command pipe: (return value, byte).
    pub fn recv(&self) -> (isize, u8) {
        let mut b = 0u8;
        // SAFETY: `b` is a valid one-byte buffer.
        let r = unsafe { libc::read(self.command, (&mut b as *mut u8).cast(), 1) };
        (r, b)
    }
}

/// A forked test child; killed and reaped on drop.
pub(crate) struct Child {
    pub pid: i32,
    report: OwnedFd,
    command: OwnedFd,
    reaped: bool,
}

fn pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [0i32; 2];
    // SAFETY: `fds` is a valid array of two ints for pipe2 to fill.
    let r = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    assert_eq!(r, 0, "pipe2: {}", std::io::Error::last_os_error());
    // SAFETY: pipe2 just returned these two fresh descriptors, owned by nobody else.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

impl Child {
    /// Forks a child that runs `body` and `_exit`s with its return value.
    pub fn spawn(body: fn(&Io) -> i32) -> Child {
        let (report_r, report_w) = pipe();
        let (command_r, command_w) = pipe();
        // SAFETY: the child only runs `body`, which makes raw libc calls, then _exits.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
        if pid == 0 {
            // SAFETY: prctl with integer arguments; the child dies with the test thread.
            unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
            let io = Io {
                report: report_w.as_raw_fd(),
                command: command_r.as_raw_fd(),
            };
            let code = body(&io);
            // SAFETY: _exit never returns and skips the parent's atexit handlers.
            unsafe { libc::_exit(code) };
        }
        drop(report_w);
        drop(command_r);
        Child {
            pid,
            report: report_r,
            command: command_w,
            reaped: false,
        }
    }

    /// Reads exactly `n` bytes from the child, failing the test after a timeout.
    pub fn recv(&self, n: usize) -> Vec<u8> {
        let mut out = vec![0u8; n];
        let mut done = 0;
        while done < n {
            let mut pfd = libc::pollfd {
                fd: self.report.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: `pfd` is one valid pollfd.
            let r = unsafe { libc::poll(&mut pfd, 1, RECV_TIMEOUT_MS) };
            assert!(
                r > 0,
                "child {} sent nothing for {RECV_TIMEOUT_MS} ms",
                self.pid
            );
            // SAFETY: the destination is the unfilled tail of `out`.
            let got = unsafe {
                libc::read(
                    self.report.as_raw_fd(),
                    out[done..].as_mut_ptr().cast(),
                    n - done,
                )
            };
            assert!(got > 0, "child {} closed its report pipe", self.pid);
            done += got as usize;
        }
        out
    }

    /// Next byte from the child that is not in `skip`.
    pub fn recv_skipping(&self, skip: &[u8]) -> u8 {
        loop {
            let b = self.recv(1)[0];
            if !skip.contains(&b) {
                return b;
            }
        }
    }

    pub fn recv_u64s(&self, n: usize) -> Vec<u64> {
        self.recv(n * 8)
            .chunks_exact(8)
            .map(|c| u64::from_ne_bytes(c.try_into().expect("8-byte chunk")))
            .collect()
    }

    pub fn send(&self, bytes: &[u8]) {
        // SAFETY: `bytes` is a live buffer of the given length.
        let r =
            unsafe { libc::write(self.command.as_raw_fd(), bytes.as_ptr().cast(), bytes.len()) };
        assert_eq!(r, bytes.len() as isize, "write to child {}", self.pid);
    }

    /// Waits for the child to exit (it must already be on its way out).
    pub fn wait_exit(&mut self) -> i32 {
        let mut status = 0;
        // SAFETY: `status` is a valid out-pointer.
        let r = unsafe { libc::waitpid(self.pid, &mut status, 0) };
        assert_eq!(r, self.pid, "waitpid({})", self.pid);
        self.reaped = true;
        status
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        if !self.reaped {
            // SAFETY: plain syscalls on our own child's pid.
            unsafe {
                libc::kill(self.pid, libc::SIGKILL);
                let mut status = 0;
                libc::waitpid(self.pid, &mut status, 0);
            }
        }
    }
}

/// `/proc/PID/maps` as text.
pub(crate) fn maps(pid: i32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/maps")).expect("read maps")
}

/// The `TracerPid:` of a task.
pub(crate) fn tracer_pid(tid: i32) -> i32 {
    let status = std::fs::read_to_string(format!("/proc/{tid}/status")).expect("read status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("TracerPid:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("TracerPid line")
}

/// The single-letter state of a task (`/proc/TID/stat`), '?' if it is gone.
pub(crate) fn task_state(tid: i32) -> char {
    let stat = std::fs::read_to_string(format!("/proc/{tid}/stat")).unwrap_or_default();
    stat.rfind(')')
        .and_then(|i| stat[i + 1..].trim_start().chars().next())
        .unwrap_or('?')
}

/// Waits until the single-letter state of `pid` is `state` (e.g. 'Z' or 'S').
pub(crate) fn wait_state(pid: i32, state: char) {
    for _ in 0..20_000 {
        if task_state(pid) == state {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    panic!(
        "pid {pid} never reached state {state} (now {})",
        task_state(pid)
    );
}

// ---------------------------------------------------------------------------
// Child bodies

/// Echo child: reports b'r', then for each command byte `c` answers
/// [b'R', read's return value, c]; b'q' makes it exit 0.
pub(crate) fn echo_body(io: &Io) -> i32 {
    io.send(b"r");
    loop {
        let (r, b) = io.recv();
        io.send(&[b'R', r as u8, b]);
        if r <= 0 || b == b'q' {
            return 0;
        }
    }
}

/// Sleeper child: reports b'r', then loops nanosleep(20 ms) and reports b'S'
/// when the sleep returned 0 and b'E' when it failed (e.g. EINTR).
pub(crate) fn nanosleep_body(io: &Io) -> i32 {
    io.send(b"r");
    loop {
        let ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 20_000_000,
        };
        // SAFETY: `ts` is valid; no remainder is asked for.
        let r = unsafe { libc::nanosleep(&ts, std::ptr::null_mut()) };
        io.send(if r == 0 { b"S" } else { b"E" });
    }
}

/// Tree child: forks two children; the second forks a grandchild; all three
/// sleep in pause(). Reports b'T' and the three pids as u64s.
pub(crate) fn tree_body(io: &Io) -> i32 {
    // Leaves must not read the command pipe: the commands are for the root.
    fn leaf(_io: &Io) -> ! {
        // SAFETY: prctl with integer arguments (die with our parent), then pause().
        unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
        loop {
            // SAFETY: pause() only sleeps until a signal.
            unsafe { libc::pause() };
        }
    }
    // SAFETY: the children only block in read() on inherited fds.
    let a = unsafe { libc::fork() };
    if a == 0 {
        leaf(io);
    }
    let (gp, gc) = pipe();
    // SAFETY: as above; `b` forks once more and reports its child's pid.
    let b = unsafe { libc::fork() };
    if b == 0 {
        // SAFETY: as above.
        let c = unsafe { libc::fork() };
        if c == 0 {
            leaf(io);
        }
        // SAFETY: writes the grandchild's pid into our own pipe.
        unsafe { libc::write(gc.as_raw_fd(), (&c as *const i32).cast(), 4) };
        leaf(io);
    }
    let mut c = 0i32;
    // SAFETY: reads 4 bytes into `c`.
    unsafe { libc::read(gp.as_raw_fd(), (&mut c as *mut i32).cast(), 4) };
    let mut msg = vec![b'T'];
    for p in [a, b, c] {
        msg.extend_from_slice(&(p as u64).to_ne_bytes());
    }
    io.send(&msg);
    echo_body(io)
}

/// Zombie-parent child: forks a live child (in pause()) and then a child
/// that exits at once and is never reaped. Reports b'Z', live pid, zombie pid.
pub(crate) fn zombie_parent_body(io: &Io) -> i32 {
    // SAFETY: the children only read/exit.
    let live = unsafe { libc::fork() };
    if live == 0 {
        // SAFETY: prctl with integer arguments (die with our parent), then pause().
        unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
        loop {
            // SAFETY: pause() only sleeps until a signal.
            unsafe { libc::pause() };
        }
    }
    // SAFETY: the child exits at once.
    let zombie = unsafe { libc::fork() };
    if zombie == 0 {
        // SAFETY: _exit never returns.
        unsafe { libc::_exit(0) };
    }
    let mut msg = vec![b'Z'];
    for p in [live, zombie] {
        msg.extend_from_slice(&(p as u64).to_ne_bytes());
    }
    io.send(&msg);
    echo_body(io)
}

/// Tracer child: PTRACE_SEIZEs the pid it reads from the command pipe (4 bytes)
/// and reports b'A' and the errno (0 on success), then blocks.
pub(crate) fn tracer_body(io: &Io) -> i32 {
    let mut pid = 0i32;
    // SAFETY: reads 4 bytes into `pid`.
    unsafe { libc::read(io.command, (&mut pid as *mut i32).cast(), 4) };
    // SAFETY: PTRACE_SEIZE with no pointers.
    let r = unsafe { libc::ptrace(libc::PTRACE_SEIZE, pid, 0usize, 0usize) };
    let errno = if r == 0 {
        0
    } else {
        std::io::Error::last_os_error().raw_os_error().unwrap_or(-1)
    };
    io.send(&[b'A', errno as u8]);
    echo_body(io)
}

// The rich child: signal handlers, sigaltstack, masks, pending signals,
// itimers and a second thread, all reported to the test.

static REPORT_FD: AtomicI32 = AtomicI32::new(-1);
static THREAD_TID: AtomicI32 = AtomicI32::new(0);
static THREAD_TID_ADDR: AtomicU64 = AtomicU64::new(0);
static THREAD_MASK: AtomicU64 = AtomicU64::new(0);
static THREAD_GO: AtomicI32 = AtomicI32::new(0);

pub(crate) const RICH_ALTSTACK_SIZE: u64 = 64 * 1024;
/// An RT signal the rich child blocks and has queued process-wide.
pub(crate) const RICH_RT_SIG: i32 = 36;
pub(crate) const RICH_RT_VALUE: u64 = 0x5151;
/// Fields of the rich child's report, in order (u64 each, after a b'T').
pub(crate) const RICH_FIELDS: usize = 10;
pub(crate) mod rich {
    pub const HANDLER: usize = 0;
    pub const ALTSTACK_SP: usize = 1;
    pub const MAIN_TID_ADDR: usize = 2;
    pub const THREAD_TID: usize = 3;
    pub const THREAD_TID_ADDR: usize = 4;
    pub const BRK: usize = 5;
    pub const SECUREBITS: usize = 6;
    pub const MAIN_MASK: usize = 7;
    pub const THREAD_MASK: usize = 8;
    pub const RESTORER: usize = 9;
}

extern "C" fn rich_usr1(_sig: libc::c_int) {
    let fd = REPORT_FD.load(Ordering::SeqCst);
    // SAFETY: write(2) is async-signal-safe; the buffer is a static byte.
    unsafe { libc::write(fd, b"H".as_ptr().cast(), 1) };
}

fn current_mask() -> u64 {
    let mut old = 0u64;
    // SAFETY: raw rt_sigprocmask with a NULL new set reads the mask into `old`.
    unsafe {
        libc::syscall(
            libc::SYS_rt_sigprocmask,
            libc::SIG_BLOCK,
            std::ptr::null::<u64>(),
            &mut old as *mut u64,
            8usize,
        )
    };
    old
}

fn tid_address() -> u64 {
    let mut addr = 0u64;
    // SAFETY: PR_GET_TID_ADDRESS writes one pointer into `addr`.
    unsafe { libc::prctl(libc::PR_GET_TID_ADDRESS, &mut addr as *mut u64) };
    addr
}

extern "C" fn rich_thread(_arg: *mut libc::c_void) -> *mut libc::c_void {
    // SAFETY: raw syscalls on the calling thread with valid arguments.
    unsafe {
        libc::prctl(libc::PR_SET_NAME, c"rich-thread".as_ptr());
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGWINCH);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        THREAD_TID.store(libc::gettid(), Ordering::SeqCst);
    }
    THREAD_TID_ADDR.store(tid_address(), Ordering::SeqCst);
    THREAD_MASK.store(current_mask(), Ordering::SeqCst);
    THREAD_GO.store(1, Ordering::SeqCst);
    while THREAD_GO.load(Ordering::SeqCst) != 2 {
        std::hint::spin_loop();
        // SAFETY: plain syscall.
        unsafe { libc::sched_yield() };
    }
    let fd = REPORT_FD.load(Ordering::SeqCst);
    loop {
        let ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 20_000_000,
        };
        // SAFETY: `ts` is valid; no remainder asked for.
        let r = unsafe { libc::nanosleep(&ts, std::ptr::null_mut()) };
        let b = if r == 0 { b"S" } else { b"E" };
        // SAFETY: one static byte.
        unsafe { libc::write(fd, b.as_ptr().cast(), 1) };
    }
}

/// The rich child. Main thread: SIGUSR1 handler (SA_RESTART|SA_ONSTACK, mask
/// SIGWINCH), SIGTERM ignored, a 64 KiB sigaltstack, SIGUSR2 and signal 36
/// blocked, ITIMER_REAL (1000 s interval, 500 s value) and ITIMER_VIRTUAL
/// (3.25 s, 7 s), SIGUSR2 pending on itself, signal 36 queued process-wide with
/// value 0x5151, comm "rich-main". Second thread: also blocks SIGWINCH, no
/// altstack, loops nanosleep(20 ms) reporting b'S' (or b'E' on failure).
/// Then the main thread serves [`echo_body`] commands.
pub(crate) fn rich_body(io: &Io) -> i32 {
    REPORT_FD.store(io.report, Ordering::SeqCst);
    let mut restorer = 0u64;
    // SAFETY: raw libc calls with valid, initialised arguments.
    unsafe {
        libc::prctl(libc::PR_SET_NAME, c"rich-main".as_ptr());
        let mut act: libc::sigaction = std::mem::zeroed();
        act.sa_sigaction = rich_usr1 as *const () as usize;
        act.sa_flags = libc::SA_RESTART | libc::SA_ONSTACK;
        libc::sigemptyset(&mut act.sa_mask);
        libc::sigaddset(&mut act.sa_mask, libc::SIGWINCH);
        libc::sigaction(libc::SIGUSR1, &act, std::ptr::null_mut());
        let mut installed: libc::sigaction = std::mem::zeroed();
        libc::sigaction(libc::SIGUSR1, std::ptr::null(), &mut installed);
        if let Some(r) = installed.sa_restorer {
            restorer = r as usize as u64;
        }
        libc::signal(libc::SIGTERM, libc::SIG_IGN);

        let stack = libc::mmap(
            std::ptr::null_mut(),
            RICH_ALTSTACK_SIZE as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        let ss = libc::stack_t {
            ss_sp: stack,
            ss_flags: 0,
            ss_size: RICH_ALTSTACK_SIZE as usize,
        };
        libc::sigaltstack(&ss, std::ptr::null_mut());

        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGUSR2);
        libc::sigaddset(&mut set, RICH_RT_SIG);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());

        let real = libc::itimerval {
            it_interval: libc::timeval {
                tv_sec: 1000,
                tv_usec: 0,
            },
            it_value: libc::timeval {
                tv_sec: 500,
                tv_usec: 0,
            },
        };
        libc::setitimer(libc::ITIMER_REAL, &real, std::ptr::null_mut());
        let virt = libc::itimerval {
            it_interval: libc::timeval {
                tv_sec: 3,
                tv_usec: 250_000,
            },
            it_value: libc::timeval {
                tv_sec: 7,
                tv_usec: 0,
            },
        };
        libc::setitimer(libc::ITIMER_VIRTUAL, &virt, std::ptr::null_mut());

        let mut thread: libc::pthread_t = 0;
        libc::pthread_create(
            &mut thread,
            std::ptr::null(),
            rich_thread,
            std::ptr::null_mut(),
        );
        while THREAD_GO.load(Ordering::SeqCst) != 1 {
            libc::sched_yield();
        }

        let pid = libc::getpid();
        libc::syscall(libc::SYS_tgkill, pid, libc::gettid(), libc::SIGUSR2);
        libc::sigqueue(
            pid,
            RICH_RT_SIG,
            libc::sigval {
                sival_ptr: RICH_RT_VALUE as usize as *mut libc::c_void,
            },
        );
        let (stack_addr, handler) = (stack as u64, rich_usr1 as *const () as usize as u64);
        let brk = libc::syscall(libc::SYS_brk, 0usize) as u64;
        let securebits = libc::prctl(libc::PR_GET_SECUREBITS) as u64;
        let fields: [u64; RICH_FIELDS] = [
            handler,
            stack_addr,
            tid_address(),
            THREAD_TID.load(Ordering::SeqCst) as u64,
            THREAD_TID_ADDR.load(Ordering::SeqCst),
            brk,
            securebits,
            current_mask(),
            THREAD_MASK.load(Ordering::SeqCst),
            restorer,
        ];
        let mut msg = vec![b'T'];
        for f in fields {
            msg.extend_from_slice(&f.to_ne_bytes());
        }
        io.send(&msg);
        THREAD_GO.store(2, Ordering::SeqCst);
    }
    echo_body(io)
}

/// One classic BPF instruction as (code, jt, jf, k).
type Insn = (u16, u8, u8, u32);

/// The two seccomp programs [`seccomp_body`] installs, in install order:
/// allow everything; then fail getitimer with EPERM.
pub(crate) fn seccomp_programs() -> [Vec<Insn>; 2] {
    const LD_W_ABS: u16 = 0x20;
    const JEQ_K: u16 = 0x15;
    const RET_K: u16 = 0x06;
    [
        vec![(RET_K, 0, 0, libc::SECCOMP_RET_ALLOW)],
        vec![
            (LD_W_ABS, 0, 0, 0), // seccomp_data.nr
            (JEQ_K, 0, 1, libc::SYS_getitimer as u32),
            (RET_K, 0, 0, libc::SECCOMP_RET_ERRNO | libc::EPERM as u32),
            (RET_K, 0, 0, libc::SECCOMP_RET_ALLOW),
        ],
    ]
}

/// `struct sock_filter` bytes of a program, as PTRACE_SECCOMP_GET_FILTER returns them.
pub(crate) fn seccomp_bytes(prog: &[Insn]) -> Vec<u8> {
    let mut out = Vec::new();
    for &(code, jt, jf, k) in prog {
        out.extend_from_slice(&code.to_ne_bytes());
        out.push(jt);
        out.push(jf);
        out.extend_from_slice(&k.to_ne_bytes());
    }
    out
}

/// Seccomp child: installs [`seccomp_programs`], reports b'F' and whether its
/// own getitimer now fails with EPERM (1), then serves [`echo_body`].
pub(crate) fn seccomp_body(io: &Io) -> i32 {
    let programs = seccomp_programs();
    // SAFETY: raw prctl/seccomp/getitimer calls with valid, live arguments.
    let denied = unsafe {
        libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
        for prog in &programs {
            let mut filters: Vec<libc::sock_filter> = prog
                .iter()
                .map(|&(code, jt, jf, k)| libc::sock_filter { code, jt, jf, k })
                .collect();
            let fprog = libc::sock_fprog {
                len: filters.len() as u16,
                filter: filters.as_mut_ptr(),
            };
            libc::syscall(
                libc::SYS_seccomp,
                libc::SECCOMP_SET_MODE_FILTER,
                0,
                &fprog as *const libc::sock_fprog,
            );
        }
        let mut v: libc::itimerval = std::mem::zeroed();
        libc::getitimer(libc::ITIMER_REAL, &mut v) == -1
            && std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
    };
    io.send(&[b'F', denied as u8]);
    echo_body(io)
}
