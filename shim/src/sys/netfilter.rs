//! The connection lock: an nftables table that drops every packet of a set of
//! TCP connections while their sockets are down between dump and restore, so
//! that the peer never gets a RST from a kernel that has no socket for them
//! (it just retransmits, and the restored socket answers).
//!
//! This module owns tables it creates in family `inet` under a caller-chosen
//! name (e.g. `cowsnap_<id>`), with two base chains at priority raw (-300,
//! before conntrack) on hooks `input` and `output`. It drives the `nft`
//! binary (`nft -f -`, the script on stdin, applied as one transaction); it
//! never touches any other table, never flushes the ruleset, and never puts a
//! caller-supplied string into a script unchecked (table names are limited to
//! `[A-Za-z0-9_]`, at most 64 characters; addresses are formatted from typed
//! values).
//!
//! What a drop looks like to the endpoints: a packet from the peer is
//! dropped on input and the peer retransmits it later; a packet a local
//! socket sends into the lock fails at the output hook, which TCP takes as
//! "not sent" and retries on its timers. Either way no RST is generated.
//!
//! Network namespace: nft acts on the namespace it runs in. A lock made with
//! `*_in_netns_of(pid, ..)` runs every nft command as
//! `nsenter --net=/proc/PID/ns/net nft ..`, so PID must stay alive (and keep
//! its pid) for as long as the lock is used from here; the plain functions act
//! on this process's own namespace.

use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::{Command, Stdio};

/// Longest table name accepted (nft allows more; cowsnap needs far less).
const MAX_NAME: usize = 64;

/// Base chain priority: `raw`, before conntrack (-200) sees the packet.
const PRIORITY_RAW: i32 = -300;

#[derive(Debug, thiserror::Error)]
pub enum NetfilterError {
    #[error("nft table name {0:?}: only [A-Za-z0-9_], 1 to 64 characters")]
    BadName(String),
    #[error("connection {local} -> {remote}: local and remote are of different address families")]
    MixedFamilies {
        local: SocketAddr,
        remote: SocketAddr,
    },
    #[error("nft table inet {table}: {op}: running {tool}: {source}")]
    Spawn {
        table: String,
        op: &'static str,
        tool: String,
        #[source]
        source: std::io::Error,
    },
    #[error("nft table inet {table}: {op}: nft failed ({status}): {stderr}")]
    Nft {
        table: String,
        op: &'static str,
        status: std::process::ExitStatus,
        stderr: String,
    },
}

/// A table of drop rules for some connections. Dropping it deletes the table
/// (best effort) unless [`ConnectionLock::keep`] or [`ConnectionLock::release`]
/// was called.
#[derive(Debug)]
pub struct ConnectionLock {
    table: String,
    /// Run nft in the network namespace of this pid (None: our own).
    netns_pid: Option<i32>,
    /// Whether Drop still has to delete the table.
    armed: bool,
}

impl ConnectionLock {
    /// Creates table `name` in this process's network namespace with drop
    /// rules for every (local, remote) pair, both directions, on input and
    /// output. Fails if the table exists already (nothing is changed then).
    pub fn block(
        name: &str,
        conns: &[(SocketAddr, SocketAddr)],
    ) -> Result<ConnectionLock, NetfilterError> {
        Self::block_in(None, name, conns)
    }

    /// [`ConnectionLock::block`] in the network namespace of `pid`.
    pub fn block_in_netns_of(
        pid: i32,
        name: &str,
        conns: &[(SocketAddr, SocketAddr)],
    ) -> Result<ConnectionLock, NetfilterError> {
        Self::block_in(Some(pid), name, conns)
    }

    fn block_in(
        netns_pid: Option<i32>,
        name: &str,
        conns: &[(SocketAddr, SocketAddr)],
    ) -> Result<ConnectionLock, NetfilterError> {
        check_name(name)?;
        let script = block_script(name, conns)?;
        run_nft(netns_pid, name, "create", &["-f", "-"], Some(&script))?;
        Ok(ConnectionLock {
            table: name.to_string(),
            netns_pid,
            armed: true,
        })
    }

    /// The lock left by an earlier process (dump made it, restore releases
    /// it), by name, in this process's network namespace. Does not check that
    /// the table exists; the name is checked when the lock is used.
    pub fn adopt(name: &str) -> ConnectionLock {
        ConnectionLock {
            table: name.to_string(),
            netns_pid: None,
            armed: true,
        }
    }

    /// [`ConnectionLock::adopt`] in the network namespace of `pid`.
    pub fn adopt_in_netns_of(pid: i32, name: &str) -> ConnectionLock {
        ConnectionLock {
            table: name.to_string(),
            netns_pid: Some(pid),
            armed: true,
        }
    }

    pub fn name(&self) -> &str {
        &self.table
    }

    /// Deletes the table; succeeds if it is already gone.
    pub fn release(mut self) -> Result<(), NetfilterError> {
        self.armed = false;
        delete_table(self.netns_pid, &self.table)
    }

    /// Leaves the table in place past this process (dump --exit hands it to
    /// restore, which adopts it by the returned name).
    pub fn keep(mut self) -> String {
        self.armed = false;
        std::mem::take(&mut self.table)
    }

    /// Whether table `name` exists in this process's network namespace.
    pub fn exists(name: &str) -> Result<bool, NetfilterError> {
        table_exists(None, name)
    }

    /// [`ConnectionLock::exists`] in the network namespace of `pid`.
    pub fn exists_in_netns_of(pid: i32, name: &str) -> Result<bool, NetfilterError> {
        table_exists(Some(pid), name)
    }
}

impl Drop for ConnectionLock {
    fn drop(&mut self) {
        if self.armed {
            if let Err(e) = delete_table(self.netns_pid, &self.table) {
                log::warn!("connection lock: {e}");
            }
        }
    }
}

fn check_name(name: &str) -> Result<(), NetfilterError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(NetfilterError::BadName(name.to_string()))
    }
}

/// `create table` (fails if it exists) plus chains and rules, one transaction.
fn block_script(name: &str, conns: &[(SocketAddr, SocketAddr)]) -> Result<String, NetfilterError> {
    let mut s = format!("create table inet {name}\n");
    for hook in ["input", "output"] {
        s += &format!(
            "add chain inet {name} {hook} {{ type filter hook {hook} priority {PRIORITY_RAW}; policy accept; }}\n"
        );
    }
    for &(local, remote) in conns {
        let there = match_packet(local, remote)?;
        let back = match_packet(remote, local)?;
        for hook in ["input", "output"] {
            s += &format!("add rule inet {name} {hook} {there} drop\n");
            s += &format!("add rule inet {name} {hook} {back} drop\n");
        }
    }
    Ok(s)
}

/// An nft match for TCP packets from `src` to `dst`. IPv4-mapped IPv6
/// addresses (a v6 socket talking to a v4 peer) travel as IPv4 packets.
fn match_packet(src: SocketAddr, dst: SocketAddr) -> Result<String, NetfilterError> {
    let canon = |ip: IpAddr| match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    };
    let (s, d) = (canon(src.ip()), canon(dst.ip()));
    let proto = match (s, d) {
        (IpAddr::V4(_), IpAddr::V4(_)) => "ip",
        (IpAddr::V6(_), IpAddr::V6(_)) => "ip6",
        _ => {
            return Err(NetfilterError::MixedFamilies {
                local: src,
                remote: dst,
            })
        }
    };
    Ok(format!(
        "{proto} saddr {s} {proto} daddr {d} tcp sport {} tcp dport {}",
        src.port(),
        dst.port()
    ))
}

/// Deletes the table whether or not it exists: `add table` is a no-op on an
/// existing one, so the transaction always has a table to delete.
fn delete_table(netns_pid: Option<i32>, name: &str) -> Result<(), NetfilterError> {
    check_name(name)?;
    let script = format!("add table inet {name}\ndelete table inet {name}\n");
    run_nft(netns_pid, name, "delete", &["-f", "-"], Some(&script)).map(drop)
}

fn table_exists(netns_pid: Option<i32>, name: &str) -> Result<bool, NetfilterError> {
    check_name(name)?;
    let out = run_nft(netns_pid, name, "list", &["list", "tables", "inet"], None)?;
    let want = format!("table inet {name}");
    Ok(out.lines().any(|l| l.trim() == want))
}

/// Where a system tool lives: the usual sbin/bin directories first (root's
/// PATH in a service may lack sbin), else whatever PATH finds.
fn tool(name: &str) -> PathBuf {
    ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
        .iter()
        .map(|d| PathBuf::from(d).join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from(name))
}

/// Runs nft with `args` (in `netns_pid`'s network namespace if given),
/// `stdin` fed to it; returns its stdout.
fn run_nft(
    netns_pid: Option<i32>,
    table: &str,
    op: &'static str,
    args: &[&str],
    stdin: Option<&str>,
) -> Result<String, NetfilterError> {
    let nft = tool("nft");
    let mut cmd = match netns_pid {
        None => Command::new(&nft),
        Some(pid) => {
            let mut c = Command::new(tool("nsenter"));
            c.arg(format!("--net=/proc/{pid}/ns/net"))
                .arg("--")
                .arg(&nft);
            c
        }
    };
    cmd.args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let program = cmd.get_program().to_string_lossy().into_owned();
    let spawn_err = |source| NetfilterError::Spawn {
        table: table.to_string(),
        op,
        tool: program.clone(),
        source,
    };
    let mut child = cmd.spawn().map_err(spawn_err)?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        // nft reads the whole script before it exits; a write error means it
        // died early, and its status and stderr below say why.
        let _ = pipe.write_all(text.as_bytes());
    }
    let out = child.wait_with_output().map_err(spawn_err)?;
    if !out.status.success() {
        return Err(NetfilterError::Nft {
            table: table.to_string(),
            op,
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// A table name no other test (or test run) uses.
    pub(crate) fn unique_name(tag: &str) -> String {
        static N: AtomicU32 = AtomicU32::new(0);
        format!(
            "cowsnap_t{tag}_{}_{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        )
    }

    #[test]
    fn block_exists_release() {
        let name = unique_name("lock");
        let a: SocketAddr = "127.0.0.1:4001".parse().expect("addr");
        let b: SocketAddr = "127.0.0.1:4002".parse().expect("addr");
        let c: SocketAddr = "[::1]:4003".parse().expect("addr");
        let d: SocketAddr = "[::ffff:127.0.0.1]:4004".parse().expect("addr");
        let e: SocketAddr = "[::ffff:127.0.0.1]:4005".parse().expect("addr");
        assert!(!ConnectionLock::exists(&name).expect("exists"));
        let lock = ConnectionLock::block(&name, &[(a, b), (c, c), (d, e)]).expect("block");
        assert_eq!(lock.name(), name);
        assert!(ConnectionLock::exists(&name).expect("exists"));
        // The rules are there, both directions, in both chains.
        let listing = run_nft(None, &name, "list", &["list", "table", "inet", &name], None)
            .expect("list table");
        assert!(
            listing.contains("tcp sport 4001 tcp dport 4002 drop"),
            "{listing}"
        );
        assert!(listing.contains("ip6 saddr ::1 ip6 daddr ::1"), "{listing}");
        assert!(
            listing.contains("tcp sport 4005 tcp dport 4004 drop"),
            "{listing}"
        );
        assert_eq!(listing.matches(" drop").count(), 12, "{listing}");
        // A second lock of the same name is refused and leaves the first alone.
        assert!(matches!(
            ConnectionLock::block(&name, &[]),
            Err(NetfilterError::Nft { .. })
        ));
        assert!(ConnectionLock::exists(&name).expect("exists"));
        lock.release().expect("release");
        assert!(!ConnectionLock::exists(&name).expect("exists"));
        // Gone already: still Ok.
        ConnectionLock::adopt(&name)
            .release()
            .expect("release again");
    }

    #[test]
    fn keep_adopt_and_drop() {
        let name = unique_name("keep");
        let kept = ConnectionLock::block(&name, &[]).expect("block").keep();
        assert_eq!(kept, name);
        assert!(
            ConnectionLock::exists(&name).expect("exists"),
            "keep leaves it"
        );
        drop(ConnectionLock::adopt(&kept));
        assert!(
            !ConnectionLock::exists(&name).expect("exists"),
            "drop deletes"
        );
    }

    #[test]
    fn netns_of_self_is_our_netns() {
        let name = unique_name("ns");
        let me = std::process::id() as i32;
        let lock = ConnectionLock::block_in_netns_of(me, &name, &[]).expect("block");
        assert!(ConnectionLock::exists(&name).expect("exists"));
        assert!(ConnectionLock::exists_in_netns_of(me, &name).expect("exists"));
        lock.release().expect("release");
        assert!(!ConnectionLock::exists(&name).expect("exists"));
    }

    #[test]
    fn bad_names_and_families_are_refused() {
        let a: SocketAddr = "127.0.0.1:1".parse().expect("addr");
        let b: SocketAddr = "[::1]:2".parse().expect("addr");
        let long = "x".repeat(65);
        for bad in ["", "a b", "x; flush ruleset", "t-1", "ä", long.as_str()] {
            assert!(
                matches!(
                    ConnectionLock::block(bad, &[]),
                    Err(NetfilterError::BadName(_))
                ),
                "{bad:?}"
            );
            assert!(ConnectionLock::exists(bad).is_err(), "{bad:?}");
            assert!(ConnectionLock::adopt(bad).release().is_err(), "{bad:?}");
        }
        let mut longest = unique_name("len");
        while longest.len() < MAX_NAME {
            longest.push('y');
        }
        ConnectionLock::block(&longest, &[])
            .expect("64 characters are fine")
            .release()
            .expect("release");
        let name = unique_name("mixed");
        assert!(matches!(
            ConnectionLock::block(&name, &[(a, b)]),
            Err(NetfilterError::MixedFamilies { .. })
        ));
        assert!(!ConnectionLock::exists(&name).expect("exists"));
    }
}
