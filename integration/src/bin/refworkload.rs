//! `cowsnap-refworkload`: the reference process tree of DESIGN.md "Targets".
//!
//! The root maps `--mib` MiB of anonymous private memory and fills it
//! deterministically, then builds a tree whose sharing pattern depends on
//! `--mode`; every process dirties a deterministic subset of pages. Every byte
//! is a function of (tag, page index), so each process can recompute the
//! memory it must hold and check it on SIGUSR1: before a dump, after a dump,
//! after a restore.
//!
//! Page contents: first half of each page splitmix64 bytes, second half zeros.
//! Within the base fill, page `i % 64 == 61` is never touched (not present),
//! `== 62` is only read (kernel zero page), `== 63` is written with a zero
//! byte (a present all-zero page); children may later dirty any of them.
//!
//! Protocol (integration/tests and bench/dump.sh rely on it):
//! - `--report PATH` is appended to with one write(2) per line:
//!   `REGION <pid> <private|shared> <start-hex> <bytes>` once per process after setup;
//!   `SHM <shmid> <attached|unattached> <bytes>` by the root in `sysv-shm` mode
//!   (the attached segment is private, mode 0600, attached by every process;
//!   the unattached one has key 0x5c000000 | (root pid & 0xffffff), mode 0640,
//!   and is checked by the root, which attaches it by id, on SIGUSR1);
//!   `OK <pid>` or `BAD <pid> <addr-hex> <what>` after each SIGUSR1.
//! - `--ready PATH`: the root writes its pid there (atomically, by rename) once
//!   every process of the tree is set up.
//! - SIGTERM to the root: it SIGKILLs every descendant, reaps them, removes its
//!   SysV segments and exits 0. Other processes keep the default SIGTERM action.
//! - `thread-signals` mode: every process runs one extra thread that blocks
//!   SIGUSR2 and SIGRTMIN+6 (40 with glibc) and has both pending, directed at
//!   it: SIGUSR2 from `tgkill` (SI_TKILL) and the real-time one from
//!   `rt_tgsigqueueinfo` (SI_QUEUE) with the value `0x5eed_0000_0000 | tid`.
//!   After each SIGUSR1 (once the OK/BAD line is written) that thread takes
//!   every signal pending for it and appends
//!   `PENDING <pid> <tid> <signo>:<si_code>:<value-hex>...` (none: nothing after the tid).
//! - `stack-growth` mode: the root grows its stack by 256 KiB before forking
//!   (so the stack's pages are shared with the children); on SIGUSR1 every
//!   process also recurses until its stack is more than 64 KiB below where
//!   its [stack] VMA started, and answers BAD unless the VMA grew that far
//!   (without VM_GROWSDOWN the process dies of SIGSEGV instead).
//!
//! - `zombie` mode: like `plain`, and the root forks two more children that
//!   end at once, one with `exit(7)`, one killed by SIGTERM, and leaves them
//!   zombies (it reports `ZOMBIE <pid>` for each before the ready file). On
//!   the first SIGUSR1 it reaps them (before its OK/BAD line) and reports
//!   `REAPED <pid> <wait-status-decimal>` for each; it reaps nothing else
//!   before that.
//!
//! - `shared-file` mode: like `plain`, and before forking the root opens
//!   `shared-file` next to the report file (O_RDWR, not close-on-exec) and
//!   writes 5 bytes, so every process holds that one open file description;
//!   after forking each process also opens `own-file` there itself. Each
//!   process reports `FILE <pid> <shared-fd> <own-fd>` after setup.
//!
//! This is a test program: it talks to the kernel through raw libc calls and
//! dies with a message on any unexpected failure.

use std::ffi::CString;
use std::io::Write;
use std::os::fd::RawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier, Mutex};

use clap::{Parser, ValueEnum};

/// Sharing patterns of DESIGN.md "Targets".
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Mode {
    /// Parent + children, children dirty part of the inherited region.
    Plain,
    /// Each child makes the middle third of its region read-only after dirtying.
    SplitVma,
    /// Each child moves its whole region to another address with mremap.
    MovedVma,
    /// The parent rewrites 30% of its pages after forking.
    ParentDirty,
    /// The parent unmaps the region after forking: only siblings share.
    Sibling,
    /// Children fork a grandchild each and exit; grandchildren reparent to the root.
    Reparented,
    /// A chain of `--depth` processes, each forked by the previous one.
    DeepChain,
    /// Every process runs `--threads` extra threads with their own buffers.
    Threads,
    /// Plus a MAP_SHARED|MAP_ANONYMOUS region written by everyone.
    SharedAnon,
    /// Plus a shared mapping of a memfd written by everyone.
    Memfd,
    /// Plus an attached SysV segment written by everyone and one nobody has attached.
    SysvShm,
    /// Plus, in every process, a thread with signals pending for it alone.
    ThreadSignals,
    /// Plus a stack shared with the children that must grow on demand after a restore.
    StackGrowth,
    /// Plus two children of the root that exited (exit 7, SIGTERM), unreaped until SIGUSR1.
    Zombie,
    /// Plus a file opened by the root before forking (one shared description) and one per process.
    SharedFile,
}

#[derive(Parser, Debug)]
#[command(
    name = "cowsnap-refworkload",
    about = "Reference process tree for cowsnap tests and benchmarks"
)]
struct Args {
    /// Size of the private region (and of the shared one, if any) in MiB.
    #[arg(long, default_value_t = 16)]
    mib: u64,
    /// Children of the root (ignored by deep-chain).
    #[arg(long, default_value_t = 3)]
    children: u32,
    /// Percentage of pages each process dirties.
    #[arg(long, default_value_t = 10)]
    dirty_pct: u32,
    #[arg(long, value_enum, default_value = "plain")]
    mode: Mode,
    /// Processes below the root in deep-chain mode.
    #[arg(long, default_value_t = 16)]
    depth: u32,
    /// Extra threads per process in threads mode.
    #[arg(long, default_value_t = 3)]
    threads: u32,
    /// File the processes append REGION/SHM/OK/BAD lines to.
    #[arg(long)]
    report: Option<PathBuf>,
    /// File the root writes its pid to once the tree is set up.
    #[arg(long)]
    ready: Option<PathBuf>,
    /// Plus this many one-page mappings in the root (inherited by the
    /// children), each written, alternately read-write and read-only so
    /// that none merges with its neighbour: a tree of many VMAs.
    #[arg(long, default_value_t = 0)]
    extra_vmas: usize,
}

// Tags select the pseudo-random stream of a page; distinct writers use
// distinct tags so that equal content implies the same physical page.
const BASE_TAG: u64 = 0;
const PARENT_REWRITE_TAG: u64 = 0xFFFF;
const PARENT_REWRITE_PCT: u32 = 30;
const GRANDCHILD_TAG: u64 = 1000;
const SHARED_BASE_TAG: u64 = 0x1_0000;
const SHARED_CHILD_TAG: u64 = 0x2_0000;
const UNATTACHED_TAG: u64 = 0x3_0000;
const THREAD_TAG: u64 = 0x4_0000;
/// The unattached SysV segment: key `UNATTACHED_KEY_BASE | (root pid & 0xffffff)`, this mode.
const UNATTACHED_KEY_BASE: libc::key_t = 0x5c00_0000;
const UNATTACHED_MODE: libc::c_int = 0o640;
/// Pages in each extra thread's buffer.
const THREAD_BUFFER_PAGES: usize = 16;

/// Real-time signal pending for the extra thread of `thread-signals`: SIGRTMIN + this.
const PENDING_RT_OFFSET: libc::c_int = 6;
/// `sigval` of that signal: this | the thread's tid.
const PENDING_VALUE_BASE: u64 = 0x5eed_0000_0000;
/// How far below its start the [stack] VMA must grow on each check.
const STACK_GROWTH: usize = 64 * 1024;
/// How much the root grows its stack before forking in `stack-growth`.
const STACK_PRELOAD: usize = 256 * 1024;

static GOT_USR1: AtomicBool = AtomicBool::new(false);
/// Set by the main thread after a verification: the signal thread reports
/// (and so consumes) its pending signals.
static TAKE_PENDING: AtomicBool = AtomicBool::new(false);
static GOT_TERM: AtomicBool = AtomicBool::new(false);
/// `zombie` mode: the root's children that exited and are not reaped yet.
static ZOMBIES: Mutex<Vec<i32>> = Mutex::new(Vec::new());
/// `shared-file` mode: the fd of the file the root opened before forking.
static SHARED_FILE_FD: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(-1);
/// Exit code of the first zombie of `zombie` mode (the second dies of SIGTERM).
const ZOMBIE_EXIT_CODE: libc::c_int = 7;

extern "C" fn on_signal(signal: libc::c_int) {
    // Only atomic stores: async-signal-safe.
    match signal {
        libc::SIGUSR1 => GOT_USR1.store(true, Ordering::SeqCst),
        libc::SIGTERM => GOT_TERM.store(true, Ordering::SeqCst),
        _ => {}
    }
}

fn die(what: &str) -> ! {
    let err = std::io::Error::last_os_error();
    // SAFETY: getpid has no preconditions.
    let pid = unsafe { libc::getpid() };
    eprintln!("cowsnap-refworkload[{pid}]: {what}: {err}");
    std::process::exit(1)
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if size <= 0 {
        die("sysconf(_SC_PAGESIZE)");
    }
    size as usize
}

fn getpid() -> i32 {
    // SAFETY: getpid has no preconditions.
    unsafe { libc::getpid() }
}

// ---------------------------------------------------------------- contents

fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn mix(tag: u64, index: u64) -> u64 {
    let mut state =
        tag.wrapping_mul(0xD6E8_FEB8_6659_FD93) ^ index.rotate_left(29) ^ 0x0063_6F77_736E_6170;
    splitmix64(&mut state)
}

/// First half: splitmix64 stream seeded by (tag, index); second half: zeros.
fn fill_page(buf: &mut [u8], tag: u64, index: u64) {
    let half = buf.len() / 2;
    let mut state = mix(tag, index);
    for word in buf[..half].chunks_exact_mut(8) {
        word.copy_from_slice(&splitmix64(&mut state).to_le_bytes());
    }
    buf[half..].fill(0);
}

/// Whether the writer `tag` dirties page `index` (about `pct` percent of pages).
fn dirtied(tag: u64, index: u64, pct: u32) -> bool {
    mix(tag ^ 0xD1A7_D1A7_0000_0000, index) % 100 < u64::from(pct)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum BaseKind {
    Random,
    /// Never touched: not present.
    Untouched,
    /// Only read: maps the kernel zero page (private) or a zero page-cache page (shared).
    ReadOnly,
    /// A zero byte written: a present, all-zero page.
    ZeroWritten,
}

fn base_kind(index: u64) -> BaseKind {
    match index % 64 {
        61 => BaseKind::Untouched,
        62 => BaseKind::ReadOnly,
        63 => BaseKind::ZeroWritten,
        _ => BaseKind::Random,
    }
}

/// The writes a process's private region went through after the base fill,
/// oldest first: (tag, percent).
#[derive(Clone, Debug, Default)]
struct PrivateModel {
    steps: Vec<(u64, u32)>,
}

impl PrivateModel {
    fn expected(&self, index: u64, buf: &mut [u8]) {
        for &(tag, pct) in self.steps.iter().rev() {
            if dirtied(tag, index, pct) {
                fill_page(buf, tag, index);
                return;
            }
        }
        base_content(BASE_TAG, index, buf);
    }
}

fn base_content(tag: u64, index: u64, buf: &mut [u8]) {
    match base_kind(index) {
        BaseKind::Random => fill_page(buf, tag, index),
        _ => buf.fill(0),
    }
}

/// Content of the shared region once set up: the root's base fill, and page
/// `i` rewritten by child `i % (children + 1) - 1` if that child dirties it.
fn expected_shared(children: u32, pct: u32, index: u64, buf: &mut [u8]) {
    let owner = index % (u64::from(children) + 1);
    if owner > 0 {
        let tag = SHARED_CHILD_TAG + owner - 1;
        if dirtied(tag, index, pct) {
            fill_page(buf, tag, index);
            return;
        }
    }
    base_content(SHARED_BASE_TAG, index, buf);
}

// ---------------------------------------------------------------- regions

/// A mapping this program owns; pages are accessed through raw pointers
/// because other processes may share them.
#[derive(Clone, Copy, Debug)]
struct Region {
    base: usize,
    len: usize,
    page: usize,
}

impl Region {
    fn pages(&self) -> u64 {
        (self.len / self.page) as u64
    }
    fn addr(&self, index: u64) -> usize {
        self.base + index as usize * self.page
    }
    #[allow(clippy::mut_from_ref)]
    fn page_mut(&self, index: u64) -> &mut [u8] {
        // SAFETY: the region is mapped readable and writable for its whole
        // length while setup writes it, and this single-threaded setup code
        // holds no other reference to the page.
        unsafe { std::slice::from_raw_parts_mut(self.addr(index) as *mut u8, self.page) }
    }
    fn page(&self, index: u64) -> &[u8] {
        // SAFETY: the region stays mapped readable for the process's life.
        unsafe { std::slice::from_raw_parts(self.addr(index) as *const u8, self.page) }
    }
    fn read_byte(&self, index: u64) {
        // SAFETY: mapped and readable; volatile so the read really faults.
        unsafe { std::ptr::read_volatile(self.addr(index) as *const u8) };
    }
    fn write_zero_byte(&self, index: u64) {
        // SAFETY: mapped and writable during setup.
        unsafe { std::ptr::write_volatile(self.addr(index) as *mut u8, 0) };
    }

    /// Base fill with `tag`, honouring [`base_kind`].
    fn fill_base(&self, tag: u64) {
        for index in 0..self.pages() {
            match base_kind(index) {
                BaseKind::Random => fill_page(self.page_mut(index), tag, index),
                BaseKind::Untouched => {}
                BaseKind::ReadOnly => self.read_byte(index),
                BaseKind::ZeroWritten => self.write_zero_byte(index),
            }
        }
    }

    fn dirty(&self, tag: u64, pct: u32) {
        for index in 0..self.pages() {
            if dirtied(tag, index, pct) {
                fill_page(self.page_mut(index), tag, index);
            }
        }
    }

    /// Reads one byte of every page, so a shared region is present in this
    /// process's page tables (the dump then sees every shared page everywhere).
    fn touch_all(&self) {
        for index in 0..self.pages() {
            self.read_byte(index);
        }
    }
}

fn map_anonymous(len: usize, flags: libc::c_int, what: &str) -> usize {
    // SAFETY: a fresh anonymous mapping at an address the kernel picks.
    let addr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            flags | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if addr == libc::MAP_FAILED {
        die(what);
    }
    addr as usize
}

fn map_private_region(len: usize, page: usize) -> Region {
    let base = map_anonymous(len, libc::MAP_PRIVATE, "mmap private region");
    // No THP: keeps every page 4 KiB and stops khugepaged from moving pages,
    // so tests can compare physical pages before and after a dump.
    // SAFETY: advice on our own mapping.
    if unsafe { libc::madvise(base as *mut libc::c_void, len, libc::MADV_NOHUGEPAGE) } != 0 {
        die("madvise(MADV_NOHUGEPAGE)");
    }
    Region { base, len, page }
}

fn map_shared_anon_region(len: usize, page: usize) -> Region {
    let base = map_anonymous(len, libc::MAP_SHARED, "mmap shared anonymous region");
    Region { base, len, page }
}

fn map_memfd_region(len: usize, page: usize) -> Region {
    let name = CString::new("cowsnap-ref").unwrap_or_default();
    // SAFETY: name is a valid C string.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        die("memfd_create");
    }
    // SAFETY: fd is our memfd.
    if unsafe { libc::ftruncate(fd, len as libc::off_t) } != 0 {
        die("ftruncate(memfd)");
    }
    // SAFETY: a fresh shared mapping of our memfd.
    let addr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd,
            0,
        )
    };
    if addr == libc::MAP_FAILED {
        die("mmap memfd");
    }
    // The mapping keeps the memfd alive; no fd stays open in the tree.
    // SAFETY: fd is ours and not used again.
    unsafe { libc::close(fd) };
    Region {
        base: addr as usize,
        len,
        page,
    }
}

fn sysv_create(len: usize) -> i32 {
    sysv_create_keyed(libc::IPC_PRIVATE, len, 0o600)
}

fn sysv_create_keyed(key: libc::key_t, len: usize, mode: libc::c_int) -> i32 {
    // SAFETY: creates a new segment; IPC_EXCL never opens someone else's.
    let id = unsafe { libc::shmget(key, len, libc::IPC_CREAT | libc::IPC_EXCL | mode) };
    if id < 0 {
        die("shmget");
    }
    id
}

/// Key of the segment nobody attaches: public (restores must keep keys),
/// unique per tree (derived from the root's pid).
fn unattached_key() -> libc::key_t {
    UNATTACHED_KEY_BASE | (getpid() & 0xff_ffff)
}

fn sysv_attach(id: i32, flags: libc::c_int) -> usize {
    // SAFETY: attach at an address the kernel picks.
    let addr = unsafe { libc::shmat(id, std::ptr::null(), flags) };
    if addr as isize == -1 {
        die("shmat");
    }
    addr as usize
}

fn sysv_detach(addr: usize) {
    // SAFETY: addr is an attachment this process made and no longer uses.
    if unsafe { libc::shmdt(addr as *const libc::c_void) } != 0 {
        die("shmdt");
    }
}

fn sysv_remove(id: i32) {
    // SAFETY: IPC_RMID on our own segment; no buffer is passed.
    unsafe { libc::shmctl(id, libc::IPC_RMID, std::ptr::null_mut()) };
}

/// Moves the region to a fresh address: reserve a range, then mremap over it.
fn move_region(region: Region) -> Region {
    // SAFETY: an inaccessible reservation at an address the kernel picks.
    let target = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            region.len,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if target == libc::MAP_FAILED {
        die("mmap reservation for mremap");
    }
    // SAFETY: moves our own region over our own reservation; nothing refers
    // to the old address afterwards.
    let moved = unsafe {
        libc::mremap(
            region.base as *mut libc::c_void,
            region.len,
            region.len,
            libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
            target,
        )
    };
    if moved == libc::MAP_FAILED {
        die("mremap");
    }
    Region {
        base: moved as usize,
        ..region
    }
}

// ---------------------------------------------------------------- processes

/// What one process holds and must find intact when it verifies.
#[derive(Clone)]
struct Role {
    /// None once the root of `sibling` unmapped it.
    private: Option<(Region, PrivateModel)>,
    /// Byte range of the private region made read-only (split-vma children).
    readonly: Option<(usize, usize)>,
    shared: Option<Region>,
    /// The SysV segment nobody has attached (root of sysv-shm only).
    unattached: Option<(i32, usize)>,
    threads: Arc<Mutex<Vec<ThreadBuffer>>>,
}

#[derive(Clone, Copy)]
struct ThreadBuffer {
    addr: usize,
    tag: u64,
}

struct Tree {
    args: Args,
    page: usize,
    report_fd: RawFd,
    /// Setup pipe: every non-root process writes its pid once set up.
    setup_read: RawFd,
    setup_write: RawFd,
    shared: Option<Region>,
}

impl Tree {
    fn report(&self, line: &str) {
        if self.report_fd < 0 {
            return;
        }
        // One write(2) per line: O_APPEND keeps lines of concurrent writers whole.
        // SAFETY: the buffer is valid for its length.
        unsafe { libc::write(self.report_fd, line.as_ptr().cast(), line.len()) };
    }

    fn report_regions(&self, role: &Role) {
        let pid = getpid();
        if let Some((region, _)) = &role.private {
            self.report(&format!(
                "REGION {pid} private {:#x} {}\n",
                region.base, region.len
            ));
        }
        if let Some(region) = &role.shared {
            self.report(&format!(
                "REGION {pid} shared {:#x} {}\n",
                region.base, region.len
            ));
        }
        if self.args.mode == Mode::SharedFile {
            let own = open_next_to_report(&self.args.report, "own-file");
            let shared = SHARED_FILE_FD.load(Ordering::SeqCst);
            self.report(&format!("FILE {pid} {shared} {own}\n"));
        }
    }

    /// Tells the root this process is set up, and drops the setup pipe.
    fn notify_setup(&self) {
        let pid = getpid().to_le_bytes();
        // SAFETY: 4 bytes from a valid buffer; atomic since < PIPE_BUF.
        if unsafe { libc::write(self.setup_write, pid.as_ptr().cast(), pid.len()) } != 4 {
            die("write setup pipe");
        }
        // SAFETY: our copy of the write end, not used again.
        unsafe { libc::close(self.setup_write) };
    }

    /// Fork; the child closes the setup pipe's read end and gets default SIGTERM.
    fn fork(&self) -> Option<i32> {
        // SAFETY: the process is single-threaded when it forks (threads are
        // started only after the last fork).
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            die("fork");
        }
        if pid > 0 {
            return Some(pid);
        }
        // SAFETY: our inherited copy of the read end; only the root reads it.
        unsafe { libc::close(self.setup_read) };
        // SAFETY: restoring the default action for SIGTERM.
        unsafe { libc::signal(libc::SIGTERM, libc::SIG_DFL) };
        None
    }

    /// Writes a child's slice of the shared region and maps all of it.
    fn setup_shared_as_child(&self, child: u32) {
        if let Some(shared) = &self.shared {
            let owner = u64::from(child) + 1;
            let stride = u64::from(self.args.children) + 1;
            let tag = SHARED_CHILD_TAG + u64::from(child);
            for index in (0..shared.pages()).filter(|i| i % stride == owner) {
                if dirtied(tag, index, self.args.dirty_pct) {
                    fill_page(shared.page_mut(index), tag, index);
                }
            }
            shared.touch_all();
        }
    }

    /// Finishes a non-root process: threads, report, notify, sleep forever.
    fn finish_child(&self, role: Role) -> ! {
        self.start_threads(&role);
        self.report_regions(&role);
        self.notify_setup();
        self.sleep_loop(&role, None)
    }

    fn start_threads(&self, role: &Role) {
        if self.args.mode == Mode::ThreadSignals {
            self.start_signal_thread();
            return;
        }
        if self.args.mode != Mode::Threads || self.args.threads == 0 {
            return;
        }
        // Extra threads inherit this mask, so SIGUSR1/SIGTERM always reach the
        // main thread, which is the one that verifies.
        let mask = signal_set(&[libc::SIGUSR1, libc::SIGTERM]);
        set_mask(libc::SIG_BLOCK, &mask);
        let ready = Arc::new(Barrier::new(self.args.threads as usize + 1));
        let pid = getpid() as u64;
        for index in 0..self.args.threads {
            let ready = Arc::clone(&ready);
            let buffers = Arc::clone(&role.threads);
            let page = self.page;
            let spawned = std::thread::Builder::new()
                .name(format!("ref-worker-{index}"))
                .spawn(move || {
                    let tag = THREAD_TAG ^ (pid << 16) ^ u64::from(index);
                    let buffer =
                        Box::leak(vec![0u8; THREAD_BUFFER_PAGES * page].into_boxed_slice());
                    for (page_index, chunk) in buffer.chunks_exact_mut(page).enumerate() {
                        fill_page(chunk, tag, page_index as u64);
                    }
                    if let Ok(mut list) = buffers.lock() {
                        list.push(ThreadBuffer {
                            addr: buffer.as_ptr() as usize,
                            tag,
                        });
                    }
                    ready.wait();
                    loop {
                        sleep_interruptible(3600);
                    }
                });
            if spawned.is_err() {
                die("spawn thread");
            }
        }
        ready.wait();
        set_mask(libc::SIG_UNBLOCK, &mask);
    }

    /// `thread-signals`: one thread with SIGUSR2 and SIGRTMIN+6 blocked and
    /// pending for it alone (see the module doc).
    fn start_signal_thread(&self) {
        // The thread inherits this mask: SIGUSR1/SIGTERM stay the main thread's.
        let mask = signal_set(&[libc::SIGUSR1, libc::SIGTERM]);
        set_mask(libc::SIG_BLOCK, &mask);
        let rt = libc::SIGRTMIN() + PENDING_RT_OFFSET;
        let (tid_tx, tid_rx) = std::sync::mpsc::channel::<i32>();
        let report_fd = self.report_fd;
        let spawned = std::thread::Builder::new()
            .name("ref-signals".into())
            .spawn(move || {
                set_mask(libc::SIG_BLOCK, &signal_set(&[libc::SIGUSR2, rt]));
                // SAFETY: gettid has no preconditions.
                let tid = unsafe { libc::gettid() };
                if tid_tx.send(tid).is_err() {
                    die("signal thread: main thread gone");
                }
                loop {
                    if TAKE_PENDING.swap(false, Ordering::SeqCst) {
                        let line = format!("PENDING {} {tid}{}\n", getpid(), take_pending(rt));
                        if report_fd >= 0 {
                            // SAFETY: the buffer is valid for its length.
                            unsafe { libc::write(report_fd, line.as_ptr().cast(), line.len()) };
                        }
                    }
                    sleep_millis(20);
                }
            });
        if spawned.is_err() {
            die("spawn signal thread");
        }
        let Ok(tid) = tid_rx.recv() else {
            die("signal thread did not start")
        };
        let pid = getpid();
        // SAFETY: a signal to a thread of this process, which blocks it.
        if unsafe { libc::syscall(libc::SYS_tgkill, pid, tid, libc::SIGUSR2) } != 0 {
            die("tgkill SIGUSR2");
        }
        let info = siginfo_queue(rt, pid, PENDING_VALUE_BASE | tid as u64);
        // SAFETY: `info` is a 128-byte siginfo the kernel only reads; the
        // target is a thread of this process, which blocks the signal.
        if unsafe { libc::syscall(libc::SYS_rt_tgsigqueueinfo, pid, tid, rt, info.as_ptr()) } != 0 {
            die("rt_tgsigqueueinfo");
        }
        set_mask(libc::SIG_UNBLOCK, &mask);
    }

    fn verify(&self, role: &Role) -> Result<(), (usize, String)> {
        if self.args.mode == Mode::StackGrowth {
            check_stack_grows(self.page)?;
        }
        let mut expected = vec![0u8; self.page];
        if let Some((region, model)) = &role.private {
            for index in 0..region.pages() {
                model.expected(index, &mut expected);
                if region.page(index) != expected.as_slice() {
                    return Err((region.addr(index), "private page content".into()));
                }
            }
            check_protection(region.base, "rw-p")?;
            if let Some((start, end)) = role.readonly {
                let (map_start, map_end, perms) =
                    mapping_at(start).ok_or((start, "read-only part not mapped".to_string()))?;
                if perms != "r--p" || map_start != start || map_end != end {
                    return Err((
                        start,
                        format!("read-only part is {map_start:#x}-{map_end:#x} {perms}"),
                    ));
                }
                if end < region.base + region.len {
                    check_protection(end, "rw-p")?;
                }
            }
        }
        if let Some(region) = &role.shared {
            for index in 0..region.pages() {
                expected_shared(
                    self.args.children,
                    self.args.dirty_pct,
                    index,
                    &mut expected,
                );
                if region.page(index) != expected.as_slice() {
                    return Err((region.addr(index), "shared page content".into()));
                }
            }
        }
        if let Some((id, len)) = role.unattached {
            let addr = sysv_attach(id, libc::SHM_RDONLY);
            let segment = Region {
                base: addr,
                len,
                page: self.page,
            };
            let mut result = Ok(());
            for index in 0..segment.pages() {
                base_content(UNATTACHED_TAG, index, &mut expected);
                if segment.page(index) != expected.as_slice() {
                    result = Err((
                        index as usize * self.page,
                        format!("unattached segment {id} content at offset"),
                    ));
                    break;
                }
            }
            sysv_detach(addr);
            result?;
        }
        if let Ok(buffers) = role.threads.lock() {
            if self.args.mode == Mode::Threads && buffers.len() != self.args.threads as usize {
                return Err((
                    0,
                    format!(
                        "{} thread buffers, expected {}",
                        buffers.len(),
                        self.args.threads
                    ),
                ));
            }
            for buffer in buffers.iter() {
                let region = Region {
                    base: buffer.addr,
                    len: THREAD_BUFFER_PAGES * self.page,
                    page: self.page,
                };
                for index in 0..region.pages() {
                    fill_page(&mut expected, buffer.tag, index);
                    if region.page(index) != expected.as_slice() {
                        return Err((region.addr(index), "thread buffer content".into()));
                    }
                }
            }
        }
        Ok(())
    }

    /// Sleeps forever and verifies on SIGUSR1. The root (`root` = its
    /// descendants and SysV segments) also reaps and handles SIGTERM.
    fn sleep_loop(&self, role: &Role, root: Option<(&[i32], &[i32])>) -> ! {
        let pid = getpid();
        loop {
            if let Some((descendants, segments)) = root {
                if GOT_TERM.load(Ordering::SeqCst) {
                    shutdown(descendants, segments);
                }
            }
            if GOT_USR1.swap(false, Ordering::SeqCst) {
                if root.is_some() {
                    self.reap_zombies();
                }
                let line = match self.verify(role) {
                    Ok(()) => format!("OK {pid}\n"),
                    Err((addr, what)) => format!("BAD {pid} {addr:#x} {what}\n"),
                };
                self.report(&line);
                if self.args.mode == Mode::ThreadSignals {
                    TAKE_PENDING.store(true, Ordering::SeqCst);
                }
            }
            // In zombie mode nothing is reaped before the zombies are.
            let zombies_left = ZOMBIES.lock().is_ok_and(|z| !z.is_empty());
            if root.is_some() && !zombies_left {
                reap_exited();
            }
            sleep_interruptible(1);
        }
    }
}

impl Tree {
    /// `zombie` mode, root: forks the two children that end at once and
    /// waits until both are zombies (without reaping them).
    fn make_zombies(&self) {
        for killed in [false, true] {
            // SAFETY: the child only resets a signal, signals itself and exits.
            let pid = unsafe { libc::fork() };
            if pid < 0 {
                die("fork (zombie)");
            }
            if pid == 0 {
                if killed {
                    // SAFETY: default action for SIGTERM (the root's handler
                    // was inherited), unblocked, then sent to ourselves.
                    unsafe {
                        libc::signal(libc::SIGTERM, libc::SIG_DFL);
                        set_mask(libc::SIG_UNBLOCK, &signal_set(&[libc::SIGTERM]));
                        libc::kill(libc::getpid(), libc::SIGTERM);
                    }
                }
                // SAFETY: _exit skips atexit handlers shared with the parent.
                unsafe { libc::_exit(ZOMBIE_EXIT_CODE) };
            }
            // SAFETY: siginfo_t is plain data; WNOWAIT leaves the child a zombie.
            let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
            loop {
                // SAFETY: info is a valid out-pointer; pid is our child.
                let r = unsafe {
                    libc::waitid(
                        libc::P_PID,
                        pid as libc::id_t,
                        &mut info,
                        libc::WEXITED | libc::WNOWAIT,
                    )
                };
                if r == 0 {
                    break;
                }
                if std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
                    die("waitid (zombie)");
                }
            }
            if let Ok(mut zombies) = ZOMBIES.lock() {
                zombies.push(pid);
            }
            self.report(&format!("ZOMBIE {pid}\n"));
        }
    }

    /// Reaps the zombies of `zombie` mode, reporting what waitpid returned.
    fn reap_zombies(&self) {
        let zombies = ZOMBIES
            .lock()
            .map(|mut z| std::mem::take(&mut *z))
            .unwrap_or_default();
        for pid in zombies {
            let mut status = 0;
            // SAFETY: status is a valid out-pointer; pid is our child.
            let reaped = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
            if reaped == pid {
                self.report(&format!("REAPED {pid} {status}\n"));
            } else {
                self.report(&format!("REAPED {pid} none\n"));
            }
        }
    }
}

fn signal_set(signals: &[libc::c_int]) -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: set is a valid sigset_t.
    unsafe { libc::sigemptyset(&mut set) };
    for &signal in signals {
        // SAFETY: set is a valid sigset_t and signal a valid number.
        unsafe { libc::sigaddset(&mut set, signal) };
    }
    set
}

fn set_mask(how: libc::c_int, set: &libc::sigset_t) {
    // SAFETY: set is a valid sigset_t; the old mask is not wanted.
    if unsafe { libc::pthread_sigmask(how, set, std::ptr::null_mut()) } != 0 {
        die("pthread_sigmask");
    }
}

/// One nanosleep; returns early (EINTR) when a signal arrives.
fn sleep_interruptible(seconds: libc::time_t) {
    let request = libc::timespec {
        tv_sec: seconds,
        tv_nsec: 0,
    };
    // SAFETY: valid timespec; remaining time is not wanted.
    unsafe { libc::nanosleep(&request, std::ptr::null_mut()) };
}

fn sleep_millis(ms: libc::c_long) {
    let request = libc::timespec {
        tv_sec: 0,
        tv_nsec: ms * 1_000_000,
    };
    // SAFETY: valid timespec; remaining time is not wanted.
    unsafe { libc::nanosleep(&request, std::ptr::null_mut()) };
}

/// A 128-byte SI_QUEUE siginfo: signo, code, pid, uid, sigval.
fn siginfo_queue(signo: libc::c_int, pid: i32, value: u64) -> [u8; 128] {
    const SI_QUEUE: i32 = -1;
    // SAFETY: getuid has no preconditions.
    let uid = unsafe { libc::getuid() };
    let mut info = [0u8; 128];
    info[0..4].copy_from_slice(&signo.to_ne_bytes());
    info[8..12].copy_from_slice(&SI_QUEUE.to_ne_bytes());
    info[16..20].copy_from_slice(&pid.to_ne_bytes());
    info[20..24].copy_from_slice(&uid.to_ne_bytes());
    info[24..32].copy_from_slice(&value.to_ne_bytes());
    info
}

/// Takes every pending SIGUSR2 and `rt` of the calling thread (which
/// blocks them): ` <signo>:<si_code>:<value-hex>` each, lowest signal first.
fn take_pending(rt: libc::c_int) -> String {
    let set: u64 = 1 << (libc::SIGUSR2 - 1) | 1 << (rt - 1);
    let zero = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    let mut out = String::new();
    loop {
        let mut info = [0u8; 128];
        // SAFETY: an 8-byte mask, a 128-byte siginfo buffer and a timespec,
        // all live for the call.
        let signo = unsafe {
            libc::syscall(
                libc::SYS_rt_sigtimedwait,
                &set as *const u64,
                info.as_mut_ptr(),
                &zero as *const libc::timespec,
                8usize,
            )
        };
        if signo <= 0 {
            return out;
        }
        let code = i32::from_ne_bytes([info[8], info[9], info[10], info[11]]);
        let mut value = [0u8; 8];
        value.copy_from_slice(&info[24..32]);
        out.push_str(&format!(" {signo}:{code}:{:#x}", u64::from_ne_bytes(value)));
    }
}

/// Start and end of this process's [stack] VMA.
fn stack_vma() -> Option<(usize, usize)> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    let line = maps.lines().find(|l| l.ends_with("[stack]"))?;
    let (start, end) = line.split_whitespace().next()?.split_once('-')?;
    Some((
        usize::from_str_radix(start, 16).ok()?,
        usize::from_str_radix(end, 16).ok()?,
    ))
}

/// Recurses with 16 KiB frames, each written, until a frame lies below
/// `until`; returns the lowest address written.
#[inline(never)]
fn grow_stack(until: usize) -> usize {
    let mut frame = [0u8; 16 * 1024];
    for byte in frame.iter_mut().step_by(512) {
        // SAFETY: a byte of our own frame; volatile so the page really faults in.
        unsafe { std::ptr::write_volatile(byte, 1) };
    }
    let here = frame.as_ptr() as usize;
    let lowest = if here > until {
        grow_stack(until)
    } else {
        here
    };
    std::hint::black_box(&frame);
    lowest
}

/// Grows the stack more than [`STACK_GROWTH`] below the [stack] VMA's
/// start, and checks that the VMA followed.
fn check_stack_grows(page: usize) -> Result<(), (usize, String)> {
    let (start, _) = stack_vma().ok_or((0, "no [stack] mapping".to_string()))?;
    let lowest = grow_stack(start - STACK_GROWTH);
    let (now, _) = stack_vma().ok_or((0, "no [stack] mapping after growing".to_string()))?;
    if now > lowest & !(page - 1) {
        return Err((
            lowest,
            format!("[stack] starts at {now:#x} (was {start:#x}) after writing {lowest:#x}"),
        ));
    }
    Ok(())
}

/// The /proc/self/maps entry containing `addr`: (start, end, perms).
fn mapping_at(addr: usize) -> Option<(usize, usize, String)> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    for line in maps.lines() {
        let mut fields = line.split_whitespace();
        let range = fields.next()?;
        let perms = fields.next()?;
        let (start, end) = range.split_once('-')?;
        let start = usize::from_str_radix(start, 16).ok()?;
        let end = usize::from_str_radix(end, 16).ok()?;
        if (start..end).contains(&addr) {
            return Some((start, end, perms.to_string()));
        }
    }
    None
}

fn check_protection(addr: usize, want: &str) -> Result<(), (usize, String)> {
    match mapping_at(addr) {
        Some((_, _, perms)) if perms == want => Ok(()),
        Some((start, end, perms)) => Err((
            addr,
            format!("mapping {start:#x}-{end:#x} is {perms}, expected {want}"),
        )),
        None => Err((addr, "not mapped".into())),
    }
}

fn reap_exited() {
    loop {
        let mut status = 0;
        // SAFETY: status is a valid out-pointer.
        if unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) } <= 0 {
            return;
        }
    }
}

fn shutdown(descendants: &[i32], segments: &[i32]) -> ! {
    for &pid in descendants {
        // SAFETY: plain kill of a process of our tree (ESRCH is harmless).
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    // Orphans of killed intermediate processes come to us (subreaper): reap
    // until no child is left.
    loop {
        let mut status = 0;
        // SAFETY: status is a valid out-pointer.
        let reaped = unsafe { libc::waitpid(-1, &mut status, 0) };
        if reaped < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            break;
        }
    }
    for &id in segments {
        sysv_remove(id);
    }
    std::process::exit(0)
}

fn install_handlers() {
    for signal in [libc::SIGUSR1, libc::SIGTERM] {
        // SAFETY: sigaction is plain data; zeroed is a valid empty action.
        let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
        action.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as usize;
        action.sa_flags = 0; // no SA_RESTART: nanosleep returns EINTR and we look at the flags
                             // SAFETY: valid action; the handler only does atomic stores.
        if unsafe { libc::sigaction(signal, &action, std::ptr::null_mut()) } != 0 {
            die("sigaction");
        }
    }
}

fn open_report(path: &Option<PathBuf>) -> RawFd {
    let Some(path) = path else { return -1 };
    let Ok(cpath) = CString::new(path.as_os_str().as_encoded_bytes()) else {
        die("report path contains NUL")
    };
    // SAFETY: valid C string path.
    let fd = unsafe {
        libc::open(
            cpath.as_ptr(),
            libc::O_WRONLY | libc::O_APPEND | libc::O_CREAT | libc::O_CLOEXEC,
            0o644,
        )
    };
    if fd < 0 {
        die(&format!("open report file {}", path.display()));
    }
    fd
}

/// `shared-file` mode: opens (creating) `name` in the report file's
/// directory, read-write, inheritable.
fn open_next_to_report(report: &Option<PathBuf>, name: &str) -> RawFd {
    let Some(dir) = report.as_ref().and_then(|r| r.parent()) else {
        die("shared-file mode needs --report")
    };
    let path = dir.join(name);
    let Ok(cpath) = CString::new(path.as_os_str().as_encoded_bytes()) else {
        die("shared-file path contains NUL")
    };
    // SAFETY: valid C string path.
    let fd = unsafe { libc::open(cpath.as_ptr(), libc::O_RDWR | libc::O_CREAT, 0o644) };
    if fd < 0 {
        die(&format!("open {}", path.display()));
    }
    fd
}

fn write_ready(path: &Option<PathBuf>, pid: i32) {
    let Some(path) = path else { return };
    let tmp = path.with_extension("tmp");
    let written = std::fs::File::create(&tmp)
        .and_then(|mut file| file.write_all(format!("{pid}\n").as_bytes()))
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(err) = written {
        eprintln!(
            "cowsnap-refworkload: write ready file {}: {err}",
            path.display()
        );
        std::process::exit(1);
    }
}

/// `count` one-page private mappings, each written with its index, every
/// other one then made read-only (so that neighbours never merge).
fn map_extra_vmas(count: usize, page: usize) {
    for i in 0..count {
        // SAFETY: a fresh anonymous mapping, written within its one page.
        unsafe {
            let addr = libc::mmap(
                std::ptr::null_mut(),
                page,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            if addr == libc::MAP_FAILED {
                die("mmap of an extra VMA");
            }
            *(addr as *mut u64) = i as u64 + 1;
            if i % 2 == 1 && libc::mprotect(addr, page, libc::PROT_READ) != 0 {
                die("mprotect of an extra VMA");
            }
        }
    }
}

fn main() {
    let args = Args::parse();
    let page = page_size();
    let len = usize::try_from(args.mib * 1024 * 1024).unwrap_or_else(|_| die("--mib too large"));
    if len == 0 {
        eprintln!("cowsnap-refworkload: --mib must be at least 1");
        std::process::exit(2);
    }
    if args.mode == Mode::DeepChain && args.depth == 0 {
        eprintln!("cowsnap-refworkload: --depth must be at least 1");
        std::process::exit(2);
    }
    // Orphaned grandchildren (reparented mode, or a killed chain) come to us.
    // SAFETY: prctl with integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
        die("prctl(PR_SET_CHILD_SUBREAPER)");
    }
    install_handlers();
    let report_fd = open_report(&args.report);
    let mut pipe_fds = [0; 2];
    // SAFETY: pipe_fds is a valid 2-element array.
    if unsafe { libc::pipe2(pipe_fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        die("pipe2");
    }

    if args.mode == Mode::SharedFile {
        let fd = open_next_to_report(&args.report, "shared-file");
        // SAFETY: 5 bytes from a valid buffer.
        if unsafe { libc::write(fd, b"head\n".as_ptr().cast(), 5) } != 5 {
            die("write shared-file");
        }
        SHARED_FILE_FD.store(fd, Ordering::SeqCst);
    }

    let private = map_private_region(len, page);
    private.fill_base(BASE_TAG);
    map_extra_vmas(args.extra_vmas, page);
    if args.mode == Mode::StackGrowth {
        // Children inherit (copy-on-write) a stack with written pages.
        let here = &len as *const usize as usize;
        std::hint::black_box(grow_stack(here - STACK_PRELOAD));
    }

    let mut segments = Vec::new();
    let shared = match args.mode {
        Mode::SharedAnon => Some(map_shared_anon_region(len, page)),
        Mode::Memfd => Some(map_memfd_region(len, page)),
        Mode::SysvShm => {
            let id = sysv_create(len);
            segments.push(id);
            Some(Region {
                base: sysv_attach(id, 0),
                len,
                page,
            })
        }
        _ => None,
    };
    if let Some(shared) = &shared {
        shared.fill_base(SHARED_BASE_TAG);
        shared.touch_all();
    }
    let unattached = if args.mode == Mode::SysvShm {
        let unattached_len = len.min(4 * 1024 * 1024);
        let id = sysv_create_keyed(unattached_key(), unattached_len, UNATTACHED_MODE);
        segments.push(id);
        let addr = sysv_attach(id, 0);
        Region {
            base: addr,
            len: unattached_len,
            page,
        }
        .fill_base(UNATTACHED_TAG);
        sysv_detach(addr);
        Some((id, unattached_len))
    } else {
        None
    };

    let tree = Tree {
        args,
        page,
        report_fd,
        setup_read: pipe_fds[0],
        setup_write: pipe_fds[1],
        shared,
    };
    let mut root_role = Role {
        private: Some((private, PrivateModel::default())),
        readonly: None,
        shared,
        unattached,
        threads: Arc::new(Mutex::new(Vec::new())),
    };
    let pct = tree.args.dirty_pct;

    let mut direct_children = Vec::new();
    let expected_setups = match tree.args.mode {
        Mode::DeepChain => {
            if let Some(pid) = tree.fork() {
                direct_children.push(pid);
            } else {
                run_chain_level(&tree, private, 1);
            }
            tree.args.depth
        }
        Mode::Reparented => {
            for child in 0..tree.args.children {
                if let Some(pid) = tree.fork() {
                    direct_children.push(pid);
                    continue;
                }
                let tag = 1 + u64::from(child);
                private.dirty(tag, pct);
                if tree.fork().is_some() {
                    // The intermediate child leaves at once; its child is reparented to the root.
                    // SAFETY: _exit skips atexit handlers shared with the parent.
                    unsafe { libc::_exit(0) };
                }
                let grandchild_tag = GRANDCHILD_TAG + u64::from(child);
                private.dirty(grandchild_tag, pct);
                tree.setup_shared_as_child(child);
                tree.finish_child(Role {
                    private: Some((
                        private,
                        PrivateModel {
                            steps: vec![(tag, pct), (grandchild_tag, pct)],
                        },
                    )),
                    readonly: None,
                    shared,
                    unattached: None,
                    threads: Arc::new(Mutex::new(Vec::new())),
                });
            }
            tree.args.children
        }
        _ => {
            for child in 0..tree.args.children {
                if let Some(pid) = tree.fork() {
                    direct_children.push(pid);
                } else {
                    run_child(&tree, private, child);
                }
            }
            tree.args.children
        }
    };
    // The root's own copy of the write end must go, so a crashed child shows as EOF.
    // SAFETY: our write end, not used again by the root.
    unsafe { libc::close(tree.setup_write) };

    match tree.args.mode {
        Mode::ParentDirty => {
            private.dirty(PARENT_REWRITE_TAG, PARENT_REWRITE_PCT);
            root_role.private = Some((
                private,
                PrivateModel {
                    steps: vec![(PARENT_REWRITE_TAG, PARENT_REWRITE_PCT)],
                },
            ));
        }
        Mode::Sibling => {
            // SAFETY: nothing in the root refers to the region any more.
            if unsafe { libc::munmap(private.base as *mut libc::c_void, private.len) } != 0 {
                die("munmap");
            }
            root_role.private = None;
        }
        _ => {}
    }

    let mut descendants = Vec::new();
    while descendants.len() < expected_setups as usize {
        let mut pid = [0u8; 4];
        // SAFETY: reads at most 4 bytes into a valid buffer.
        let n = unsafe { libc::read(tree.setup_read, pid.as_mut_ptr().cast(), pid.len()) };
        match n {
            4 => descendants.push(i32::from_le_bytes(pid)),
            n if n < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) => {}
            _ => die(&format!(
                "a process of the tree died during setup ({} of {expected_setups} set up)",
                descendants.len()
            )),
        }
    }
    // SAFETY: the read end is not used again.
    unsafe { libc::close(tree.setup_read) };
    if tree.args.mode == Mode::Reparented {
        for &pid in &direct_children {
            let mut status = 0;
            // SAFETY: status is a valid out-pointer; pid is our child.
            unsafe { libc::waitpid(pid, &mut status, 0) };
        }
    }
    // Direct children that exited (reparented mode) are reaped: their pids
    // may be reused, so only live ones join the list SIGTERM kills.
    for pid in direct_children
        .into_iter()
        .filter(|_| tree.args.mode != Mode::Reparented)
    {
        if !descendants.contains(&pid) {
            descendants.push(pid);
        }
    }

    if tree.args.mode == Mode::Zombie {
        tree.make_zombies();
    }
    tree.start_threads(&root_role);
    tree.report_regions(&root_role);
    if tree.args.mode == Mode::SysvShm {
        if let (Some(shared), Some((id, len))) = (shared, unattached) {
            tree.report(&format!("SHM {} attached {}\n", segments[0], shared.len));
            tree.report(&format!("SHM {id} unattached {len}\n"));
        }
    }
    write_ready(&tree.args.ready, getpid());
    tree.sleep_loop(&root_role, Some((&descendants, &segments)))
}

fn run_child(tree: &Tree, private: Region, child: u32) -> ! {
    let pct = tree.args.dirty_pct;
    let tag = 1 + u64::from(child);
    private.dirty(tag, pct);
    let mut region = private;
    let mut readonly = None;
    match tree.args.mode {
        Mode::SplitVma => {
            let third = (private.pages() / 3) as usize * tree.page;
            let start = private.base + third;
            let end = private.base + 2 * third;
            if third > 0 {
                // SAFETY: a sub-range of our own region; we only read it from now on.
                if unsafe {
                    libc::mprotect(start as *mut libc::c_void, end - start, libc::PROT_READ)
                } != 0
                {
                    die("mprotect");
                }
                readonly = Some((start, end));
            }
        }
        Mode::MovedVma => region = move_region(private),
        _ => {}
    }
    tree.setup_shared_as_child(child);
    tree.finish_child(Role {
        private: Some((
            region,
            PrivateModel {
                steps: vec![(tag, pct)],
            },
        )),
        readonly,
        shared: tree.shared,
        unattached: None,
        threads: Arc::new(Mutex::new(Vec::new())),
    })
}

/// Level `level` (1-based) of the deep chain: dirty, fork the next level, sleep.
fn run_chain_level(tree: &Tree, private: Region, level: u32) -> ! {
    let pct = tree.args.dirty_pct;
    private.dirty(u64::from(level), pct);
    if level < tree.args.depth && tree.fork().is_none() {
        run_chain_level(tree, private, level + 1);
    }
    tree.finish_child(Role {
        private: Some((
            private,
            PrivateModel {
                steps: (1..=level).map(|l| (u64::from(l), pct)).collect(),
            },
        )),
        readonly: None,
        shared: tree.shared,
        unattached: None,
        threads: Arc::new(Mutex::new(Vec::new())),
    })
}
