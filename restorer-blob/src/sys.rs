//! Raw x86_64 Linux syscalls for the blob: no libc exists here.

use core::arch::asm;

pub const SYS_MMAP: u64 = 9;
pub const SYS_MPROTECT: u64 = 10;
pub const SYS_MUNMAP: u64 = 11;
pub const SYS_RT_SIGPROCMASK: u64 = 14;
pub const SYS_RT_SIGRETURN: u64 = 15;
pub const SYS_MREMAP: u64 = 25;
pub const SYS_MADVISE: u64 = 28;
pub const SYS_CLOSE: u64 = 3;
pub const SYS_GETPID: u64 = 39;
pub const SYS_GETTID: u64 = 186;
pub const SYS_RT_TGSIGQUEUEINFO: u64 = 297;
pub const SYS_SETRESUID: u64 = 117;
pub const SYS_SETRESGID: u64 = 119;
pub const SYS_SETFSUID: u64 = 122;
pub const SYS_SETFSGID: u64 = 123;
pub const SYS_SETGROUPS: u64 = 116;
pub const SYS_CAPSET: u64 = 126;
pub const SYS_PRCTL: u64 = 157;
pub const SYS_ARCH_PRCTL: u64 = 158;
pub const SYS_FUTEX: u64 = 202;
pub const SYS_SET_TID_ADDRESS: u64 = 218;
pub const SYS_EXIT_GROUP: u64 = 231;
pub const SYS_SECCOMP: u64 = 317;
pub const SYS_RSEQ: u64 = 334;
pub const SYS_CLONE3: u64 = 435;
pub const SYS_TIMER_CREATE: u64 = 222;
pub const SYS_TIMER_SETTIME: u64 = 223;

/// Result of a raw syscall: `Err(errno)` for -4095..-1.
pub type SysResult = Result<u64, u32>;

/// # Safety
/// The caller upholds whatever the syscall `nr` requires of its arguments
/// (valid pointers, no unmapping of memory still in use).
#[inline(always)]
pub unsafe fn syscall6(nr: u64, a1: u64, a2: u64, a3: u64, a4: u64, a5: u64, a6: u64) -> SysResult {
    let ret: u64;
    // SAFETY: the syscall instruction clobbers only rcx and r11 (declared);
    // memory effects are the caller's contract above.
    unsafe {
        asm!(
            "syscall",
            inlateout("rax") nr => ret,
            in("rdi") a1,
            in("rsi") a2,
            in("rdx") a3,
            in("r10") a4,
            in("r8") a5,
            in("r9") a6,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    if ret > (-4096i64) as u64 {
        Err((ret as i64).unsigned_abs() as u32)
    } else {
        Ok(ret)
    }
}

/// # Safety
/// As for [`syscall6`].
#[inline(always)]
pub unsafe fn syscall(nr: u64, a1: u64, a2: u64, a3: u64, a4: u64) -> SysResult {
    // SAFETY: forwarded contract.
    unsafe { syscall6(nr, a1, a2, a3, a4, 0, 0) }
}

pub fn exit_group(code: i32) -> ! {
    loop {
        // SAFETY: exit_group takes no pointer and does not return.
        let _ = unsafe { syscall(SYS_EXIT_GROUP, code as u64, 0, 0, 0) };
    }
}
