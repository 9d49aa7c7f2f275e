//! Parsers for the /proc files the dumper reads: `stat`, `status`, `smaps`,
//! `auxv`, `fdinfo`, `task/TID/children`, `ns/*`. Every parser is a pure
//! function of the file's text (tested with fixtures); the `read_*`
//! functions only add the file read. Nothing here writes to /proc.

use std::fs;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ProcfsError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: cannot parse {field}: {detail}")]
    Parse {
        path: PathBuf,
        field: String,
        detail: String,
    },
}

fn parse_err(path: &Path, field: &str, detail: impl Into<String>) -> ProcfsError {
    ProcfsError::Parse {
        path: path.to_path_buf(),
        field: field.to_string(),
        detail: detail.into(),
    }
}

fn read_string(path: &Path) -> Result<String, ProcfsError> {
    fs::read_to_string(path).map_err(|source| ProcfsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn read_bytes(path: &Path) -> Result<Vec<u8>, ProcfsError> {
    fs::read(path).map_err(|source| ProcfsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Target of a /proc symlink (exe, cwd, root, fd/N, ns/X) as a string.
pub fn read_link(path: &Path) -> Result<String, ProcfsError> {
    fs::read_link(path)
        .map(|p| p.to_string_lossy().into_owned())
        .map_err(|source| ProcfsError::Read {
            path: path.to_path_buf(),
            source,
        })
}

pub fn proc_path(pid: i32, file: &str) -> PathBuf {
    PathBuf::from(format!("/proc/{pid}/{file}"))
}

// ---------------------------------------------------------------------------
// /proc/PID/stat

/// The fields of /proc/PID/stat the dumper needs.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Stat {
    pub pid: i32,
    pub comm: String,
    pub state: char,
    pub ppid: i32,
    pub pgrp: i32,
    pub session: i32,
    pub num_threads: i64,
    /// Fields 26..=28: start_code, end_code, start_stack.
    pub start_code: u64,
    pub end_code: u64,
    pub start_stack: u64,
    /// Fields 45..=51.
    pub start_data: u64,
    pub end_data: u64,
    pub start_brk: u64,
    pub arg_start: u64,
    pub arg_end: u64,
    pub env_start: u64,
    pub env_end: u64,
}

pub fn parse_stat(path: &Path, text: &str) -> Result<Stat, ProcfsError> {
    // comm may hold spaces and ')': it runs from the first '(' to the last ')'.
    let open = text
        .find('(')
        .ok_or_else(|| parse_err(path, "comm", "no '('"))?;
    let close = text
        .rfind(')')
        .ok_or_else(|| parse_err(path, "comm", "no ')'"))?;
    if close < open {
        return Err(parse_err(path, "comm", "')' before '('"));
    }
    let pid = text[..open]
        .trim()
        .parse::<i32>()
        .map_err(|e| parse_err(path, "pid", e.to_string()))?;
    let comm = text[open + 1..close].to_string();
    // rest[0] is field 3 (state).
    let rest: Vec<&str> = text[close + 1..].split_whitespace().collect();
    let field = |n: usize| -> Result<&str, ProcfsError> {
        rest.get(n - 3)
            .copied()
            .ok_or_else(|| parse_err(path, &format!("field {n}"), "missing"))
    };
    let num = |n: usize| -> Result<u64, ProcfsError> {
        field(n)?
            .parse::<u64>()
            .map_err(|e| parse_err(path, &format!("field {n}"), e.to_string()))
    };
    let int = |n: usize| -> Result<i64, ProcfsError> {
        field(n)?
            .parse::<i64>()
            .map_err(|e| parse_err(path, &format!("field {n}"), e.to_string()))
    };
    let state = field(3)?
        .chars()
        .next()
        .ok_or_else(|| parse_err(path, "state", "empty"))?;
    Ok(Stat {
        pid,
        comm,
        state,
        ppid: int(4)? as i32,
        pgrp: int(5)? as i32,
        session: int(6)? as i32,
        num_threads: int(20)?,
        start_code: num(26)?,
        end_code: num(27)?,
        start_stack: num(28)?,
        start_data: num(45)?,
        end_data: num(46)?,
        start_brk: num(47)?,
        arg_start: num(48)?,
        arg_end: num(49)?,
        env_start: num(50)?,
        env_end: num(51)?,
    })
}

/// Whether `pid` exists and is neither a zombie nor dead (its memory,
/// fds and threads still exist).
pub fn is_alive(pid: i32) -> bool {
    read_stat(pid).is_ok_and(|s| !matches!(s.state, 'Z' | 'X'))
}

pub fn read_stat(pid: i32) -> Result<Stat, ProcfsError> {
    let path = proc_path(pid, "stat");
    parse_stat(&path, &read_string(&path)?)
}

// ---------------------------------------------------------------------------
// /proc/PID/status

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Status {
    pub umask: u32,
    pub tracer_pid: i32,
    /// real, effective, saved, filesystem
    pub uids: [u32; 4],
    pub gids: [u32; 4],
    pub groups: Vec<u32>,
    pub nspid: Vec<i32>,
    pub threads: u32,
    pub cap_inheritable: u64,
    pub cap_permitted: u64,
    pub cap_effective: u64,
    pub cap_bounding: u64,
    pub cap_ambient: u64,
    pub no_new_privs: bool,
    pub seccomp: u32,
    /// Filters attached to the task (`Seccomp_filters`, Linux 5.9+).
    pub seccomp_filters: u32,
}

pub fn parse_status(path: &Path, text: &str) -> Result<Status, ProcfsError> {
    let mut st = Status::default();
    let mut seen_uid = false;
    let mut seen_cap = false;
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        let dec_list = |field: &str| -> Result<Vec<u64>, ProcfsError> {
            value
                .split_whitespace()
                .map(|v| {
                    v.parse::<u64>()
                        .map_err(|e| parse_err(path, field, format!("{value:?}: {e}")))
                })
                .collect()
        };
        let hex = |field: &str| -> Result<u64, ProcfsError> {
            u64::from_str_radix(value, 16)
                .map_err(|e| parse_err(path, field, format!("{value:?}: {e}")))
        };
        let dec = |field: &str| -> Result<u64, ProcfsError> {
            value
                .parse::<u64>()
                .map_err(|e| parse_err(path, field, format!("{value:?}: {e}")))
        };
        let four = |field: &str| -> Result<[u32; 4], ProcfsError> {
            let v = dec_list(field)?;
            if v.len() != 4 {
                return Err(parse_err(path, field, format!("{value:?}: want 4 ids")));
            }
            Ok([v[0] as u32, v[1] as u32, v[2] as u32, v[3] as u32])
        };
        match key {
            "Umask" => {
                st.umask = u32::from_str_radix(value, 8)
                    .map_err(|e| parse_err(path, key, format!("{value:?}: {e}")))?
            }
            "TracerPid" => st.tracer_pid = dec(key)? as i32,
            "Uid" => {
                st.uids = four(key)?;
                seen_uid = true;
            }
            "Gid" => st.gids = four(key)?,
            "Groups" => st.groups = dec_list(key)?.into_iter().map(|g| g as u32).collect(),
            "NSpid" => st.nspid = dec_list(key)?.into_iter().map(|p| p as i32).collect(),
            "Threads" => st.threads = dec(key)? as u32,
            "CapInh" => st.cap_inheritable = hex(key)?,
            "CapPrm" => st.cap_permitted = hex(key)?,
            "CapEff" => {
                st.cap_effective = hex(key)?;
                seen_cap = true;
            }
            "CapBnd" => st.cap_bounding = hex(key)?,
            "CapAmb" => st.cap_ambient = hex(key)?,
            "NoNewPrivs" => st.no_new_privs = dec(key)? != 0,
            "Seccomp" => st.seccomp = dec(key)? as u32,
            "Seccomp_filters" => st.seccomp_filters = dec(key)? as u32,
            _ => {}
        }
    }
    if !seen_uid {
        return Err(parse_err(path, "Uid", "missing"));
    }
    if !seen_cap {
        return Err(parse_err(path, "CapEff", "missing"));
    }
    Ok(st)
}

pub fn read_status(pid: i32) -> Result<Status, ProcfsError> {
    let path = proc_path(pid, "status");
    parse_status(&path, &read_string(&path)?)
}

// ---------------------------------------------------------------------------
// /proc/PID/smaps (and maps: same header lines, no attribute lines)

/// One VMA as /proc/PID/smaps shows it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MapsEntry {
    pub start: u64,
    pub end: u64,
    pub read: bool,
    pub write: bool,
    pub exec: bool,
    /// `s` (MAP_SHARED) rather than `p`.
    pub shared: bool,
    pub offset: u64,
    pub dev_major: u32,
    pub dev_minor: u32,
    pub inode: u64,
    /// The path column with any " (deleted)" suffix removed; empty for plain anonymous.
    pub path: String,
    /// The path column ended in " (deleted)".
    pub deleted: bool,
    /// Two-letter flags of the `VmFlags:` line (smaps only).
    pub vm_flags: Vec<String>,
    /// `Rss:` and `Swap:` in KiB (smaps only): a VMA with neither holds no page
    /// worth a pagemap walk.
    pub rss_kb: Option<u64>,
    pub swap_kb: Option<u64>,
}

impl MapsEntry {
    /// PROT_* bits.
    pub fn prot(&self) -> u32 {
        let mut p = 0;
        if self.read {
            p |= libc::PROT_READ as u32;
        }
        if self.write {
            p |= libc::PROT_WRITE as u32;
        }
        if self.exec {
            p |= libc::PROT_EXEC as u32;
        }
        p
    }
    /// `makedev(major, minor)`.
    pub fn dev(&self) -> u64 {
        libc::makedev(self.dev_major, self.dev_minor)
    }
    pub fn has_flag(&self, flag: &str) -> bool {
        self.vm_flags.iter().any(|f| f == flag)
    }
}

const DELETED_SUFFIX: &str = " (deleted)";

/// Splits off the first whitespace-separated token; returns (token, rest).
fn next_token(s: &str) -> Option<(&str, &str)> {
    let s = s.trim_start();
    if s.is_empty() {
        return None;
    }
    let end = s.find(char::is_whitespace).unwrap_or(s.len());
    Some((&s[..end], &s[end..]))
}

fn parse_maps_header(path: &Path, line: &str) -> Result<MapsEntry, ProcfsError> {
    let bad = |field: &str| parse_err(path, field, format!("line {line:?}"));
    let (range, rest) = next_token(line).ok_or_else(|| bad("range"))?;
    let (perms, rest) = next_token(rest).ok_or_else(|| bad("perms"))?;
    let (offset, rest) = next_token(rest).ok_or_else(|| bad("offset"))?;
    let (dev, rest) = next_token(rest).ok_or_else(|| bad("dev"))?;
    let (inode, rest) = next_token(rest).ok_or_else(|| bad("inode"))?;
    let (start, end) = range.split_once('-').ok_or_else(|| bad("range"))?;
    let start = u64::from_str_radix(start, 16).map_err(|_| bad("start"))?;
    let end = u64::from_str_radix(end, 16).map_err(|_| bad("end"))?;
    let p = perms.as_bytes();
    if p.len() != 4 {
        return Err(bad("perms"));
    }
    let (major, minor) = dev.split_once(':').ok_or_else(|| bad("dev"))?;
    // The path column is everything after the padding; it may contain spaces.
    let mut path_col = rest.trim_start().trim_end_matches('\n').to_string();
    let mut deleted = false;
    if let Some(stripped) = path_col.strip_suffix(DELETED_SUFFIX) {
        path_col = stripped.to_string();
        deleted = true;
    }
    Ok(MapsEntry {
        start,
        end,
        read: p[0] == b'r',
        write: p[1] == b'w',
        exec: p[2] == b'x',
        shared: p[3] == b's',
        offset: u64::from_str_radix(offset, 16).map_err(|_| bad("offset"))?,
        dev_major: u32::from_str_radix(major, 16).map_err(|_| bad("dev major"))?,
        dev_minor: u32::from_str_radix(minor, 16).map_err(|_| bad("dev minor"))?,
        inode: inode.parse::<u64>().map_err(|_| bad("inode"))?,
        path: path_col,
        deleted,
        vm_flags: Vec::new(),
        rss_kb: None,
        swap_kb: None,
    })
}

/// Parses /proc/PID/smaps or /proc/PID/maps text.
pub fn parse_smaps(path: &Path, text: &str) -> Result<Vec<MapsEntry>, ProcfsError> {
    let mut out: Vec<MapsEntry> = Vec::new();
    for line in text.lines() {
        if line.is_empty() {
            continue;
        }
        let first = line.split_whitespace().next().unwrap_or("");
        if first.ends_with(':') {
            // An attribute line of the VMA above.
            let last = out
                .last_mut()
                .ok_or_else(|| parse_err(path, first, "before any VMA"))?;
            let kb = || -> Result<u64, ProcfsError> {
                line.split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse::<u64>().ok())
                    .ok_or_else(|| parse_err(path, first, format!("line {line:?}")))
            };
            match first {
                "VmFlags:" => {
                    last.vm_flags = line
                        .split_whitespace()
                        .skip(1)
                        .map(str::to_string)
                        .collect()
                }
                "Rss:" => last.rss_kb = Some(kb()?),
                "Swap:" => last.swap_kb = Some(kb()?),
                _ => {}
            }
            continue;
        }
        out.push(parse_maps_header(path, line)?);
    }
    Ok(out)
}

pub fn read_smaps(pid: i32) -> Result<Vec<MapsEntry>, ProcfsError> {
    let path = proc_path(pid, "smaps");
    parse_smaps(&path, &read_string(&path)?)
}

// ---------------------------------------------------------------------------
// /proc/PID/auxv

/// (type, value) pairs up to, not including, AT_NULL.
pub fn parse_auxv(path: &Path, bytes: &[u8]) -> Result<Vec<[u64; 2]>, ProcfsError> {
    if !bytes.len().is_multiple_of(16) {
        return Err(parse_err(
            path,
            "auxv",
            format!("length {} is not a multiple of 16", bytes.len()),
        ));
    }
    let mut out = Vec::new();
    for pair in bytes.chunks_exact(16) {
        let mut a = [0u8; 8];
        let mut b = [0u8; 8];
        a.copy_from_slice(&pair[..8]);
        b.copy_from_slice(&pair[8..]);
        let kind = u64::from_ne_bytes(a);
        if kind == libc::AT_NULL {
            break;
        }
        out.push([kind, u64::from_ne_bytes(b)]);
    }
    Ok(out)
}

pub fn read_auxv(pid: i32) -> Result<Vec<[u64; 2]>, ProcfsError> {
    let path = proc_path(pid, "auxv");
    parse_auxv(&path, &read_bytes(&path)?)
}

// ---------------------------------------------------------------------------
// /proc/PID/fdinfo/N

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FdInfo {
    pub pos: u64,
    /// O_* flags (the kernel prints them in octal).
    pub flags: u32,
}

pub fn parse_fdinfo(path: &Path, text: &str) -> Result<FdInfo, ProcfsError> {
    let mut pos = None;
    let mut flags = None;
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        match key {
            "pos" => {
                pos = Some(
                    value
                        .parse::<u64>()
                        .map_err(|e| parse_err(path, "pos", format!("{value:?}: {e}")))?,
                )
            }
            "flags" => {
                flags = Some(
                    u32::from_str_radix(value, 8)
                        .map_err(|e| parse_err(path, "flags", format!("{value:?}: {e}")))?,
                )
            }
            _ => {}
        }
    }
    Ok(FdInfo {
        pos: pos.ok_or_else(|| parse_err(path, "pos", "missing"))?,
        flags: flags.ok_or_else(|| parse_err(path, "flags", "missing"))?,
    })
}

pub fn read_fdinfo(pid: i32, fd: i32) -> Result<FdInfo, ProcfsError> {
    let path = proc_path(pid, &format!("fdinfo/{fd}"));
    parse_fdinfo(&path, &read_string(&path)?)
}

/// One registration of an epoll fd, as its fdinfo prints it
/// (`tfd: %8d events: %8x data: %16llx  pos:%lli ino:%lx sdev:%x`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EpollEntry {
    pub tfd: i32,
    pub events: u32,
    pub data: u64,
    /// Inode and device (kernel-internal encoding) of the watched file.
    pub ino: u64,
    pub sdev: u32,
}

/// The `tfd:` lines of an epoll fd's fdinfo.
pub fn parse_epoll_fdinfo(path: &Path, text: &str) -> Result<Vec<EpollEntry>, ProcfsError> {
    let mut out = Vec::new();
    for line in text.lines().filter(|l| l.starts_with("tfd:")) {
        let mut fields = std::collections::BTreeMap::new();
        // "tfd:        5 events:       19 data: ... pos:0 ino:3a sdev:8"
        let mut words = line.split_whitespace().peekable();
        while let Some(w) = words.next() {
            if let Some((key, value)) = w.split_once(':') {
                let value = if value.is_empty() {
                    words.next().unwrap_or("")
                } else {
                    value
                };
                fields.insert(key, value);
            }
        }
        let field = |name: &str| {
            fields
                .get(name)
                .copied()
                .ok_or_else(|| parse_err(path, name, format!("missing in {line:?}")))
        };
        let hex = |name: &str| {
            let v = field(name)?;
            u64::from_str_radix(v, 16).map_err(|e| parse_err(path, name, format!("{v:?}: {e}")))
        };
        let tfd = field("tfd")?;
        out.push(EpollEntry {
            tfd: tfd
                .parse()
                .map_err(|e| parse_err(path, "tfd", format!("{tfd:?}: {e}")))?,
            events: hex("events")? as u32,
            data: hex("data")?,
            ino: hex("ino")?,
            sdev: hex("sdev")? as u32,
        });
    }
    Ok(out)
}

/// An eventfd's fdinfo: `eventfd-count` (hex), `eventfd-id`, `eventfd-semaphore`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventfdInfo {
    pub count: u64,
    pub id: u64,
    pub semaphore: bool,
}

pub fn parse_eventfd_fdinfo(path: &Path, text: &str) -> Result<EventfdInfo, ProcfsError> {
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name).map(str::trim))
            .ok_or_else(|| parse_err(path, name, "missing"))
    };
    let count = field("eventfd-count:")?;
    let id = field("eventfd-id:")?;
    let semaphore = field("eventfd-semaphore:")?;
    Ok(EventfdInfo {
        count: u64::from_str_radix(count, 16)
            .map_err(|e| parse_err(path, "eventfd-count", format!("{count:?}: {e}")))?,
        id: id
            .parse()
            .map_err(|e| parse_err(path, "eventfd-id", format!("{id:?}: {e}")))?,
        semaphore: semaphore == "1",
    })
}

pub fn read_eventfd_fdinfo(pid: i32, fd: i32) -> Result<EventfdInfo, ProcfsError> {
    let path = proc_path(pid, &format!("fdinfo/{fd}"));
    parse_eventfd_fdinfo(&path, &read_string(&path)?)
}

/// A signalfd's fdinfo: `sigmask:` (hex, bit n-1 for signal n).
pub fn parse_signalfd_fdinfo(path: &Path, text: &str) -> Result<u64, ProcfsError> {
    let v = text
        .lines()
        .find_map(|l| l.strip_prefix("sigmask:").map(str::trim))
        .ok_or_else(|| parse_err(path, "sigmask", "missing"))?;
    u64::from_str_radix(v, 16).map_err(|e| parse_err(path, "sigmask", format!("{v:?}: {e}")))
}

pub fn read_signalfd_fdinfo(pid: i32, fd: i32) -> Result<u64, ProcfsError> {
    let path = proc_path(pid, &format!("fdinfo/{fd}"));
    parse_signalfd_fdinfo(&path, &read_string(&path)?)
}

/// A timerfd's fdinfo: clock, unread expirations, settime flags, time
/// left and interval (`it_value: (sec, nsec)`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimerfdInfo {
    pub clockid: i32,
    pub ticks: u64,
    pub settime_flags: i32,
    pub value: (i64, i64),
    pub interval: (i64, i64),
}

pub fn parse_timerfd_fdinfo(path: &Path, text: &str) -> Result<TimerfdInfo, ProcfsError> {
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name).map(str::trim))
            .ok_or_else(|| parse_err(path, name, "missing"))
    };
    let int = |name: &str, radix: u32| -> Result<i64, ProcfsError> {
        let v = field(name)?;
        i64::from_str_radix(v, radix).map_err(|e| parse_err(path, name, format!("{v:?}: {e}")))
    };
    let pair = |name: &str| -> Result<(i64, i64), ProcfsError> {
        let v = field(name)?;
        let inner = v
            .strip_prefix('(')
            .and_then(|r| r.strip_suffix(')'))
            .ok_or_else(|| parse_err(path, name, format!("{v:?}")))?;
        let (a, b) = inner
            .split_once(',')
            .ok_or_else(|| parse_err(path, name, format!("{v:?}")))?;
        let num = |x: &str| {
            x.trim()
                .parse::<i64>()
                .map_err(|e| parse_err(path, name, format!("{v:?}: {e}")))
        };
        Ok((num(a)?, num(b)?))
    };
    Ok(TimerfdInfo {
        clockid: int("clockid:", 10)? as i32,
        ticks: int("ticks:", 10)? as u64,
        settime_flags: int("settime flags:", 8)? as i32,
        value: pair("it_value:")?,
        interval: pair("it_interval:")?,
    })
}

pub fn read_timerfd_fdinfo(pid: i32, fd: i32) -> Result<TimerfdInfo, ProcfsError> {
    let path = proc_path(pid, &format!("fdinfo/{fd}"));
    parse_timerfd_fdinfo(&path, &read_string(&path)?)
}

/// How a POSIX timer notifies, as `/proc/PID/timers` names it
/// (`notify: KIND/pid.N` or `KIND/tid.N`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimerNotify {
    /// SIGEV_SIGNAL: the process gets `signo`.
    Signal,
    /// SIGEV_NONE: nothing is sent; the timer is only read.
    None,
    /// SIGEV_THREAD: a glibc construct the kernel never sees itself (glibc
    /// makes it SIGEV_THREAD_ID to a helper thread); shown for completeness.
    Thread,
}

/// One entry of `/proc/PID/timers`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcPosixTimer {
    pub id: i32,
    pub signo: i32,
    /// `sigev_value` (the kernel prints the pointer in hex).
    pub sigev_value: u64,
    pub notify: TimerNotify,
    /// SIGEV_THREAD_ID: `target` is a thread (`tid.N`), else the process.
    pub thread_id: bool,
    /// The pid or tid, in the namespace of this /proc.
    pub target: i32,
    pub clockid: i32,
}

/// Parses `/proc/PID/timers`: blocks of `ID:`, `signal: SIG/VALUE`,
/// `notify: KIND/pid.N|tid.N` and `ClockID:` lines, one per timer.
pub fn parse_posix_timers(path: &Path, text: &str) -> Result<Vec<ProcPosixTimer>, ProcfsError> {
    let mut out: Vec<ProcPosixTimer> = Vec::new();
    let num = |field: &str, v: &str| {
        v.trim()
            .parse::<i32>()
            .map_err(|e| parse_err(path, field, format!("{v:?}: {e}")))
    };
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let (key, value) = line
            .split_once(':')
            .ok_or_else(|| parse_err(path, "line", format!("{line:?}")))?;
        let value = value.trim();
        if key == "ID" {
            out.push(ProcPosixTimer {
                id: num("ID", value)?,
                signo: 0,
                sigev_value: 0,
                notify: TimerNotify::Signal,
                thread_id: false,
                target: 0,
                clockid: -1,
            });
            continue;
        }
        let t = out
            .last_mut()
            .ok_or_else(|| parse_err(path, key, "before any ID line"))?;
        match key {
            "signal" => {
                let (sig, val) = value
                    .split_once('/')
                    .ok_or_else(|| parse_err(path, "signal", format!("{value:?}")))?;
                t.signo = num("signal", sig)?;
                t.sigev_value = u64::from_str_radix(val.trim_start_matches("0x"), 16)
                    .map_err(|e| parse_err(path, "signal", format!("{value:?}: {e}")))?;
            }
            "notify" => {
                let bad = || parse_err(path, "notify", format!("{value:?}"));
                let (kind, target) = value.split_once('/').ok_or_else(bad)?;
                t.notify = match kind {
                    "signal" => TimerNotify::Signal,
                    "none" => TimerNotify::None,
                    "thread" => TimerNotify::Thread,
                    _ => return Err(bad()),
                };
                let (who, n) = target.split_once('.').ok_or_else(bad)?;
                t.thread_id = match who {
                    "tid" => true,
                    "pid" => false,
                    _ => return Err(bad()),
                };
                t.target = num("notify", n)?;
            }
            "ClockID" => t.clockid = num("ClockID", value)?,
            // Fields a newer kernel may add are not ours to judge.
            _ => {}
        }
    }
    Ok(out)
}

pub fn read_posix_timers(pid: i32) -> Result<Vec<ProcPosixTimer>, ProcfsError> {
    let path = proc_path(pid, "timers");
    parse_posix_timers(&path, &read_string(&path)?)
}

/// One watch of an inotify fd's fdinfo (`inotify wd:1 ino:.. sdev:..
/// mask:.. ignored_mask:.. fhandle-bytes:8 fhandle-type:1 f_handle:HEX`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InotifyEntry {
    pub wd: i32,
    pub ino: u64,
    /// The kernel's dev_t of the file system: major << 20 | minor.
    pub sdev: u32,
    pub mask: u32,
    pub handle_type: i32,
    pub handle: Vec<u8>,
}

pub fn parse_inotify_fdinfo(path: &Path, text: &str) -> Result<Vec<InotifyEntry>, ProcfsError> {
    let mut out = Vec::new();
    for line in text.lines().filter_map(|l| l.strip_prefix("inotify ")) {
        let fields: std::collections::BTreeMap<&str, &str> = line
            .split_whitespace()
            .filter_map(|w| w.split_once(':'))
            .collect();
        let field = |name: &str| {
            fields
                .get(name)
                .copied()
                .ok_or_else(|| parse_err(path, name, format!("missing in {line:?}")))
        };
        let hex = |name: &str| {
            let v = field(name)?;
            u64::from_str_radix(v, 16).map_err(|e| parse_err(path, name, format!("{v:?}: {e}")))
        };
        let wd = field("wd")?;
        let handle = field("f_handle")?;
        let ty = field("fhandle-type")?;
        out.push(InotifyEntry {
            wd: wd
                .parse()
                .map_err(|e| parse_err(path, "wd", format!("{wd:?}: {e}")))?,
            ino: hex("ino")?,
            sdev: hex("sdev")? as u32,
            mask: hex("mask")? as u32,
            handle_type: ty
                .parse()
                .map_err(|e| parse_err(path, "fhandle-type", format!("{ty:?}: {e}")))?,
            handle: hex::decode(handle)
                .map_err(|e| parse_err(path, "f_handle", format!("{handle:?}: {e}")))?,
        });
    }
    Ok(out)
}

pub fn read_inotify_fdinfo(pid: i32, fd: i32) -> Result<Vec<InotifyEntry>, ProcfsError> {
    let path = proc_path(pid, &format!("fdinfo/{fd}"));
    parse_inotify_fdinfo(&path, &read_string(&path)?)
}

pub fn read_epoll_fdinfo(pid: i32, fd: i32) -> Result<Vec<EpollEntry>, ProcfsError> {
    let path = proc_path(pid, &format!("fdinfo/{fd}"));
    parse_epoll_fdinfo(&path, &read_string(&path)?)
}

/// Open fd numbers of `pid`, ascending.
pub fn list_fds(pid: i32) -> Result<Vec<i32>, ProcfsError> {
    list_numeric_dir(&proc_path(pid, "fd"))
}

/// Thread ids of `pid` (from /proc/PID/task), ascending.
pub fn list_tids(pid: i32) -> Result<Vec<i32>, ProcfsError> {
    list_numeric_dir(&proc_path(pid, "task"))
}

fn list_numeric_dir(path: &Path) -> Result<Vec<i32>, ProcfsError> {
    let rd = fs::read_dir(path).map_err(|source| ProcfsError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let mut out = Vec::new();
    for entry in rd {
        let entry = entry.map_err(|source| ProcfsError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        if let Some(n) = entry.file_name().to_str().and_then(|s| s.parse().ok()) {
            out.push(n);
        }
    }
    out.sort_unstable();
    Ok(out)
}

// ---------------------------------------------------------------------------
// /proc/PID/task/TID/children, /proc/PID/ns/*

pub fn parse_children(path: &Path, text: &str) -> Result<Vec<i32>, ProcfsError> {
    text.split_whitespace()
        .map(|s| {
            s.parse::<i32>()
                .map_err(|e| parse_err(path, "child pid", format!("{s:?}: {e}")))
        })
        .collect()
}

/// Children of every thread of `pid` (children hang off the thread that forked them).
pub fn read_children(pid: i32) -> Result<Vec<i32>, ProcfsError> {
    let mut out = Vec::new();
    for tid in list_tids(pid)? {
        let path = proc_path(pid, &format!("task/{tid}/children"));
        match fs::read_to_string(&path) {
            Ok(text) => out.extend(parse_children(&path, &text)?),
            // The thread exited between listing and reading.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(ProcfsError::Read { path, source }),
        }
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

/// Parses a namespace link target such as `mnt:[4026531841]` into (kind, inode).
pub fn parse_ns_link(path: &Path, link: &str) -> Result<(String, u64), ProcfsError> {
    let (kind, rest) = link
        .split_once(":[")
        .ok_or_else(|| parse_err(path, "namespace link", link))?;
    let inode = rest
        .strip_suffix(']')
        .and_then(|s| s.parse::<u64>().ok())
        .ok_or_else(|| parse_err(path, "namespace inode", link))?;
    Ok((kind.to_string(), inode))
}

/// Every namespace of `pid` as (name in /proc/PID/ns, inode), sorted by name.
pub fn read_namespaces(pid: i32) -> Result<Vec<(String, u64)>, ProcfsError> {
    let dir = proc_path(pid, "ns");
    let rd = fs::read_dir(&dir).map_err(|source| ProcfsError::Read {
        path: dir.clone(),
        source,
    })?;
    let mut out = Vec::new();
    for entry in rd {
        let entry = entry.map_err(|source| ProcfsError::Read {
            path: dir.clone(),
            source,
        })?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        let link = read_link(&path)?;
        let (_, inode) = parse_ns_link(&path, &link)?;
        out.push((name, inode));
    }
    out.sort();
    Ok(out)
}

/// /proc/PID/comm without the newline.
pub fn read_comm(pid: i32) -> Result<String, ProcfsError> {
    let path = proc_path(pid, "comm");
    Ok(read_string(&path)?.trim_end_matches('\n').to_string())
}

/// Undoes mountinfo's octal escapes (`\040` for a space, `\011`, `\012`, `\134`).
pub fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| bytes[i] == b'\\' && d.iter().all(|b| (b'0'..=b'7').contains(b)));
        match octal {
            Some(d) => {
                let value = d.iter().fold(0u32, |v, b| v * 8 + u32::from(b - b'0'));
                out.push(value as u8);
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {

    #[test]
    fn posix_timers_of_every_notify_kind() {
        // As Linux 6.18 prints them (newest timer first).
        let text = "ID: 42\nsignal: 10/0000000000000007\nnotify: signal/tid.4350\nClockID: 7\n\
ID: 1\nsignal: 14/0000000000000000\nnotify: none/pid.4349\nClockID: 0\n\
ID: 0\nsignal: 35/00000000deadbeef\nnotify: signal/pid.4349\nClockID: 1\n";
        let got = parse_posix_timers(Path::new("t"), text).expect("parse");
        assert_eq!(
            got,
            vec![
                ProcPosixTimer {
                    id: 42,
                    signo: 10,
                    sigev_value: 7,
                    notify: TimerNotify::Signal,
                    thread_id: true,
                    target: 4350,
                    clockid: 7,
                },
                ProcPosixTimer {
                    id: 1,
                    signo: 14,
                    sigev_value: 0,
                    notify: TimerNotify::None,
                    thread_id: false,
                    target: 4349,
                    clockid: 0,
                },
                ProcPosixTimer {
                    id: 0,
                    signo: 35,
                    sigev_value: 0xdead_beef,
                    notify: TimerNotify::Signal,
                    thread_id: false,
                    target: 4349,
                    clockid: 1,
                },
            ]
        );
        assert_eq!(
            parse_posix_timers(Path::new("t"), "").expect("empty"),
            vec![]
        );
    }

    #[test]
    fn posix_timers_malformed_lines_are_errors() {
        for bad in [
            "signal: 10/0\n",                 // before any ID
            "ID: x\n",                        // not a number
            "ID: 1\nsignal: 10\n",            // no value
            "ID: 1\nsignal: 10/zz\n",         // value not hex
            "ID: 1\nnotify: bogus/pid.1\n",   // unknown kind
            "ID: 1\nnotify: signal/pgid.1\n", // unknown target
            "ID: 1\nnotify: signal/pid\n",    // no number
            "ID: 1\nClockID: one\n",          // not a number
            "garbage\n",                      // no colon
        ] {
            assert!(
                parse_posix_timers(Path::new("t"), bad).is_err(),
                "{bad:?} parsed"
            );
        }
    }

    #[test]
    fn posix_timers_of_a_live_process() {
        // Our own: none unless a test made one; the file exists and parses.
        read_posix_timers(std::process::id() as i32).expect("own /proc/PID/timers");
    }

    #[test]
    fn inotify_fdinfo_watches() {
        let text = "pos:\t0\nflags:\t00\nmnt_id:\t17\nino:\t1038\n\
inotify wd:2 ino:13 sdev:fe00000 mask:2 ignored_mask:0 fhandle-bytes:8 fhandle-type:1 f_handle:1300000000000000\n\
inotify wd:1 ino:3c4a7 sdev:fe00000 mask:300 ignored_mask:0 fhandle-bytes:8 fhandle-type:1 f_handle:a7c4030000000000\n";
        let got = parse_inotify_fdinfo(Path::new("i"), text).expect("parse");
        assert_eq!(got.len(), 2);
        assert_eq!(
            (got[1].wd, got[1].ino, got[1].sdev, got[1].mask),
            (1, 0x3c4a7, 0xfe00000, 0x300)
        );
        assert_eq!(got[1].handle, vec![0xa7, 0xc4, 3, 0, 0, 0, 0, 0]);
        assert!(parse_inotify_fdinfo(Path::new("i"), "inotify wd:x ino:1\n").is_err());
    }

    #[test]
    fn signalfd_and_timerfd_fdinfo() {
        let sig = "pos:\t0\nflags:\t04002\nmnt_id:\t17\nino:\t1038\nsigmask:\t0000000000000200\n";
        assert_eq!(
            parse_signalfd_fdinfo(Path::new("s"), sig).expect("sigmask"),
            1 << 9
        );
        let timer = "pos:\t0\nflags:\t02\nmnt_id:\t17\nino:\t1038\nclockid: 0\nticks: 3\n\
settime flags: 03\nit_value: (99, 996686015)\nit_interval: (0, 100000000)\n";
        assert_eq!(
            parse_timerfd_fdinfo(Path::new("t"), timer).expect("timerfd"),
            TimerfdInfo {
                clockid: 0,
                ticks: 3,
                settime_flags: 3,
                value: (99, 996_686_015),
                interval: (0, 100_000_000),
            }
        );
        assert!(parse_timerfd_fdinfo(Path::new("t"), "clockid: 1\nticks: 0\n").is_err());
        assert!(parse_signalfd_fdinfo(Path::new("s"), "sigmask: xyz\n").is_err());
    }

    #[test]
    fn eventfd_fdinfo_fields() {
        let text = "pos:\t0\nflags:\t02004002\nmnt_id:\t17\nino:\t1038\n\
eventfd-count:               2a\neventfd-id: 3\neventfd-semaphore: 1\n";
        let got = parse_eventfd_fdinfo(Path::new("fdinfo/9"), text).expect("parse");
        assert_eq!(
            got,
            EventfdInfo {
                count: 42,
                id: 3,
                semaphore: true
            }
        );
        assert!(parse_eventfd_fdinfo(Path::new("x"), "pos: 0\n").is_err());
    }

    #[test]
    fn epoll_fdinfo_lines() {
        let text = "pos:\t0\nflags:\t02000002\nmnt_id:\t15\nino:\t1057\n\
tfd:        5 events:       19 data:     7f0000000005  pos:0 ino:3a1b sdev:8\n\
tfd:       12 events: 80000001 data:                c  pos:0 ino:9 sdev:d\n";
        let got = parse_epoll_fdinfo(Path::new("fdinfo/4"), text).expect("parse");
        assert_eq!(
            got,
            vec![
                EpollEntry {
                    tfd: 5,
                    events: 0x19,
                    data: 0x7f0000000005,
                    ino: 0x3a1b,
                    sdev: 8
                },
                EpollEntry {
                    tfd: 12,
                    events: 0x8000_0001,
                    data: 0xc,
                    ino: 9,
                    sdev: 0xd
                },
            ]
        );
        let bad = "tfd:        5 events: zz data: 1  pos:0 ino:3 sdev:8\n";
        assert!(parse_epoll_fdinfo(Path::new("x"), bad).is_err());
        assert_eq!(
            parse_epoll_fdinfo(Path::new("x"), "pos: 0\n").expect("none"),
            vec![]
        );
    }

    use super::*;

    fn p() -> &'static Path {
        Path::new("/fixture")
    }

    const STAT: &str = "4242 (my (odd) prog) S 4000 4242 3999 34816 4242 4194304 1000 0 5 0 \
        10 20 0 0 20 0 3 0 123456 10000000 500 18446744073709551615 \
        94000000000000 94000000100000 140730000000000 0 0 0 0 4096 65536 1 0 0 17 1 0 0 0 0 0 \
        94000000200000 94000000300000 94000001000000 140730000001000 140730000002000 \
        140730000002000 140730000003000 0\n";

    #[test]
    fn stat_fields_after_comm_with_parens_and_spaces() {
        let s = parse_stat(p(), STAT).expect("parse");
        assert_eq!(s.pid, 4242);
        assert_eq!(s.comm, "my (odd) prog");
        assert_eq!(s.state, 'S');
        assert_eq!((s.ppid, s.pgrp, s.session), (4000, 4242, 3999));
        assert_eq!(s.num_threads, 3);
        assert_eq!(s.start_code, 94000000000000);
        assert_eq!(s.end_code, 94000000100000);
        assert_eq!(s.start_stack, 140730000000000);
        assert_eq!(s.start_data, 94000000200000);
        assert_eq!(s.end_data, 94000000300000);
        assert_eq!(s.start_brk, 94000001000000);
        assert_eq!(s.arg_start, 140730000001000);
        assert_eq!(s.arg_end, 140730000002000);
        assert_eq!(s.env_start, 140730000002000);
        assert_eq!(s.env_end, 140730000003000);
    }

    #[test]
    fn stat_truncated_names_missing_field() {
        let err = parse_stat(p(), "1 (x) S 0 1 1 0").expect_err("short");
        assert!(err.to_string().contains("field"), "{err}");
    }

    const STATUS: &str = "Name:\tbash\nUmask:\t0027\nState:\tS (sleeping)\nTgid:\t77\n\
        Pid:\t77\nPPid:\t1\nTracerPid:\t12\nUid:\t1000\t1001\t1002\t1003\n\
        Gid:\t2000\t2001\t2002\t2003\nFDSize:\t64\nGroups:\t4 24 27 \n\
        NStgid:\t77\t1\nNSpid:\t77\t1\nThreads:\t5\n\
        CapInh:\t0000000000000000\nCapPrm:\t000001fffeffffff\nCapEff:\t000001fffeffffff\n\
        CapBnd:\t000001ffffffffff\nCapAmb:\t0000000000000400\nNoNewPrivs:\t1\nSeccomp:\t2\n\
        Seccomp_filters:\t1\n";

    #[test]
    fn status_creds_caps_and_nspid() {
        let s = parse_status(p(), STATUS).expect("parse");
        assert_eq!(s.umask, 0o027);
        assert_eq!(s.tracer_pid, 12);
        assert_eq!(s.uids, [1000, 1001, 1002, 1003]);
        assert_eq!(s.gids, [2000, 2001, 2002, 2003]);
        assert_eq!(s.groups, vec![4, 24, 27]);
        assert_eq!(s.nspid, vec![77, 1]);
        assert_eq!(s.threads, 5);
        assert_eq!(s.cap_permitted, 0x1fffeffffff);
        assert_eq!(s.cap_bounding, 0x1ffffffffff);
        assert_eq!(s.cap_ambient, 0x400);
        assert!(s.no_new_privs);
        assert_eq!(s.seccomp, 2);
        assert_eq!(s.seccomp_filters, 1);
    }

    #[test]
    fn status_empty_groups_and_bad_uid() {
        let text = STATUS.replace("Groups:\t4 24 27 ", "Groups:\t");
        assert!(parse_status(p(), &text).expect("parse").groups.is_empty());
        let text = STATUS.replace("1000\t1001\t1002\t1003", "1000\t1001");
        let err = parse_status(p(), &text).expect_err("3 uids");
        assert!(err.to_string().contains("Uid"), "{err}");
    }

    const SMAPS: &str = "\
55d0c0a00000-55d0c0a02000 r--p 00000000 fe:01 1311 /usr/bin/cat
Size:                  8 kB
Rss:                   8 kB
VmFlags: rd mr mw me dw sd
55d0c1000000-55d0c1021000 rw-p 00000000 00:00 0                          [heap]
VmFlags: rd wr mr mw me ac sd
7f0000000000-7f0000100000 rw-s 00000000 00:01 2048                       /dev/zero (deleted)
VmFlags: rd wr sh mr mw me ms sd
7f0000100000-7f0000200000 rw-s 00001000 00:01 4096                       /memfd:my buf (deleted)
VmFlags: rd wr sh mr mw me ms sd
7f0000200000-7f0000300000 rw-s 00000000 00:01 32770                      /SYSV00000000 (deleted)
VmFlags: rd wr sh mr mw me ms sd
7f0000300000-7f0000301000 ---p 00000000 00:00 0 
VmFlags: mr mw me sd
7f0000400000-7f0000401000 rw-p 00002000 08:11 99                         /tmp/a file with spaces (deleted)
VmFlags: rd wr mr mw me ac sd
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0                          [stack]
VmFlags: rd wr mr mw me gd ac
7ffd00100000-7ffd00104000 r--p 00000000 00:00 0                          [vvar]
VmFlags: rd mr pf io de dd sd
7ffd00104000-7ffd00106000 r-xp 00000000 00:00 0                          [vdso]
VmFlags: rd ex mr mw me de sd
ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0                  [vsyscall]
VmFlags: ex
";

    #[test]
    fn smaps_every_kind_of_line() {
        let v = parse_smaps(p(), SMAPS).expect("parse");
        assert_eq!(v.len(), 11);
        assert_eq!(v[0].path, "/usr/bin/cat");
        assert_eq!(
            (v[0].dev_major, v[0].dev_minor, v[0].inode),
            (0xfe, 1, 1311)
        );
        assert!(v[0].read && !v[0].write && !v[0].shared);
        assert_eq!(v[0].prot(), libc::PROT_READ as u32);
        assert_eq!(v[0].vm_flags, vec!["rd", "mr", "mw", "me", "dw", "sd"]);
        assert_eq!(v[0].rss_kb, Some(8));
        assert_eq!(v[1].rss_kb, None);
        assert_eq!(v[1].path, "[heap]");
        assert_eq!(v[1].end - v[1].start, 0x21000);
        assert_eq!(v[2].path, "/dev/zero");
        assert!(v[2].deleted && v[2].shared);
        assert_eq!(v[3].path, "/memfd:my buf");
        assert_eq!(v[3].offset, 0x1000);
        assert!(v[3].deleted);
        assert_eq!(v[4].path, "/SYSV00000000");
        assert_eq!(v[4].inode, 32770);
        assert_eq!(v[5].path, "");
        assert_eq!(v[5].prot(), 0);
        assert!(!v[5].deleted);
        assert_eq!(v[6].path, "/tmp/a file with spaces");
        assert!(v[6].deleted);
        assert_eq!(v[6].dev(), libc::makedev(8, 0x11));
        assert!(v[7].has_flag("gd"));
        assert_eq!(v[8].path, "[vvar]");
        assert_eq!(v[9].path, "[vdso]");
        assert_eq!(v[10].start, 0xffffffffff600000);
        assert_eq!(v[10].path, "[vsyscall]");
    }

    #[test]
    fn smaps_bad_header_names_line() {
        let err = parse_smaps(p(), "zzzz-1000 rw-p 0 00:00 0\n").expect_err("bad");
        assert!(err.to_string().contains("zzzz"), "{err}");
    }

    #[test]
    fn auxv_pairs_stop_at_null() {
        let mut bytes = Vec::new();
        for v in [
            libc::AT_PAGESZ,
            4096,
            libc::AT_ENTRY,
            0x401000,
            0,
            0,
            99,
            99,
        ] {
            bytes.extend_from_slice(&v.to_ne_bytes());
        }
        let a = parse_auxv(p(), &bytes).expect("parse");
        assert_eq!(a, vec![[libc::AT_PAGESZ, 4096], [libc::AT_ENTRY, 0x401000]]);
        assert!(parse_auxv(p(), &bytes[..15]).is_err());
    }

    #[test]
    fn fdinfo_pos_and_octal_flags() {
        let fi = parse_fdinfo(p(), "pos:\t1234\nflags:\t02100002\nmnt_id:\t24\nino:\t5\n")
            .expect("parse");
        assert_eq!(fi.pos, 1234);
        assert_eq!(fi.flags, 0o2100002);
        assert!(parse_fdinfo(p(), "flags:\t02\n").is_err());
    }

    #[test]
    fn children_and_ns_links() {
        assert_eq!(
            parse_children(p(), "12 13 400 ").expect("parse"),
            vec![12, 13, 400]
        );
        assert!(parse_children(p(), "").expect("parse").is_empty());
        assert_eq!(
            parse_ns_link(p(), "mnt:[4026531841]").expect("parse"),
            ("mnt".to_string(), 4026531841)
        );
        assert!(parse_ns_link(p(), "mnt:4026531841").is_err());
    }

    #[test]
    fn live_self_files_parse() {
        let pid = std::process::id() as i32;
        let st = read_stat(pid).expect("stat");
        assert_eq!(st.pid, pid);
        assert!(st.start_code > 0, "root sees mm fields");
        let status = read_status(pid).expect("status");
        assert_eq!(status.nspid.last().copied(), Some(pid));
        let maps = read_smaps(pid).expect("smaps");
        assert!(maps.iter().any(|m| m.path == "[stack]"));
        assert!(maps.iter().all(|m| !m.vm_flags.is_empty()));
        assert!(read_auxv(pid)
            .expect("auxv")
            .iter()
            .any(|a| a[0] == libc::AT_PAGESZ));
        assert!(read_namespaces(pid)
            .expect("ns")
            .iter()
            .any(|(k, _)| k == "mnt"));
        assert!(!list_fds(pid).expect("fds").is_empty());
    }
}
