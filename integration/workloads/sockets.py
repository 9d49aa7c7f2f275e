#!/usr/bin/env python3
"""Socket and epoll shapes a restore must bring back, standard library only.

Usage: sockets.py DIR [--tcp]

A parent and one child share:
  - unix socketpairs (stream, datagram, seqpacket) with data in flight in
    both directions (written, not yet read);
  - a named unix listener at DIR/listen.sock and an abstract one;
  - a TCP listener on [::1] (IPV6_V6ONLY, TCP_NODELAY, SO_REUSEADDR,
    TCP_DEFER_ACCEPT) and a bound UDP socket with SO_BROADCAST;
  - an eventfd-like counter is not used here (see nginx);
  - an epoll set created before the fork (so both hold it) watching the
    stream pair's parent end with EPOLLET, and a registration whose fd was
    closed after a dup (its file is still open under another number).
With --tcp, parent and child also hold the two ends of an established
loopback TCP connection with data in flight both ways (dump it with
--tcp-established).
On SIGUSR1 each process drains what it holds and writes DIR/report-<role>.json;
the parent writes DIR/ports.json at start (ports of its listeners).
"""
import json
import os
import select
import signal
import socket
import sys

out = sys.argv[1]
role = "parent"

pairs = {
    "stream": socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM),
    "dgram": socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM),
    "seqpacket": socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET),
}
named = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
named.bind(os.path.join(out, "listen.sock"))
os.chmod(os.path.join(out, "listen.sock"), 0o640)
named.listen(5)
abstract = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
abstract.bind(b"\0cowsnap-sockets-" + str(os.getpid()).encode())
abstract.listen(3)

tcp6 = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
tcp6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
tcp6.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
tcp6.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
tcp6.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, 5)
tcp6.bind(("::1", 0))
tcp6.listen(17)
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
udp.bind(("127.0.0.1", 0))

# A named FIFO with data in flight: the parent keeps the write end, the
# child the read end.
fifo_path = os.path.join(out, "fifo")
os.mkfifo(fifo_path)
fifo_rd = os.open(fifo_path, os.O_RDONLY | os.O_NONBLOCK)
fifo_wr = os.open(fifo_path, os.O_WRONLY)
os.write(fifo_wr, b"fifo-data-" * 100)

tcp_pair = None
if "--tcp" in sys.argv[2:]:
    lis = socket.socket()
    lis.bind(("127.0.0.1", 0))
    lis.listen(1)
    client = socket.create_connection(lis.getsockname())
    server, _ = lis.accept()
    lis.close()
    tcp_pair = (server, client)

ep = select.epoll()
ep.register(pairs["stream"][0].fileno(), select.EPOLLIN | select.EPOLLET)
ep.register(udp.fileno(), select.EPOLLIN | select.EPOLLONESHOT | (1 << 29))  # EPOLLWAKEUP
# A registration whose fd number is closed: the file lives on under `moved`.
ghost = os.dup(pairs["seqpacket"][0].fileno())
ep.register(ghost, select.EPOLLIN)
moved = os.dup(ghost)
os.close(ghost)

pid = os.fork()
if pid == 0:
    role = "child"
    os.close(fifo_wr)
    mine = {k: v[1] for k, v in pairs.items()}
    for v in pairs.values():
        v[0].close()
    if tcp_pair:
        tcp_pair[0].close()
        mine["tcp"] = tcp_pair[1]
else:
    os.close(fifo_rd)
    mine = {k: v[0] for k, v in pairs.items()}
    for v in pairs.values():
        v[1].close()
    if tcp_pair:
        tcp_pair[1].close()
        mine["tcp"] = tcp_pair[0]
    with open(os.path.join(out, "ports.json"), "w") as f:
        json.dump(
            {
                "tcp6": tcp6.getsockname()[1],
                "udp": udp.getsockname()[1],
                "child": pid,
                "abstract": "cowsnap-sockets-" + str(os.getpid()),
            },
            f,
        )

# Data in flight both ways: each side writes, nobody reads until SIGUSR1.
mine["stream"].sendall(f"{role}-stream-".encode() * 1000)
if "tcp" in mine:
    mine["tcp"].sendall(f"{role}-tcp-".encode() * 1000)
for i in range(3):
    mine["dgram"].send(f"{role}-dgram-{i}".encode())
    mine["seqpacket"].send(f"{role}-seq-{i}".encode())


def drain(sock, stream):
    sock.setblocking(False)
    got = []
    while True:
        try:
            data = sock.recv(1 << 20)
        except BlockingIOError:
            break
        if not data:
            break
        got.append(data.decode())
    return "".join(got) if stream else got


def report(*_):
    r = {"role": role, "pid": os.getpid()}
    # Before draining: the epoll set reports the queued stream data.
    r["epoll"] = sorted(fd for fd, _ in ep.poll(0))
    r["stream_fd"] = mine["stream"].fileno()
    r["ghost_fd"] = ghost
    # The event masks as the kernel holds them, by registered fd number.
    with open(f"/proc/self/fdinfo/{ep.fileno()}") as f:
        r["epoll_masks"] = {
            int(line.split()[1]): int(line.split()[3], 16)
            for line in f
            if line.startswith("tfd:")
        }
    r["udp_fd"] = udp.fileno()
    r["stream"] = drain(mine["stream"], True)
    r["dgram"] = drain(mine["dgram"], False)
    r["seqpacket"] = drain(mine["seqpacket"], False)
    if role == "child":
        got = b""
        while True:
            try:
                chunk = os.read(fifo_rd, 65536)
            except BlockingIOError:
                break
            if not chunk:
                break
            got += chunk
        r["fifo"] = got.decode()
    if "tcp" in mine:
        # All of it: the peer's bytes may still be on their way (loopback).
        want = len(("parent" if role == "child" else "child") + "-tcp-") * 1000
        got = b""
        mine["tcp"].settimeout(10)
        while len(got) < want:
            chunk = mine["tcp"].recv(want - len(got))
            if not chunk:
                break
            got += chunk
        r["tcp"] = got.decode()
    r["tcp6"] = {
        "v6only": tcp6.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY),
        "nodelay": tcp6.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY),
        "reuseaddr": tcp6.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR),
        "defer_accept": tcp6.getsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT),
        "port": tcp6.getsockname()[1],
    }
    r["udp_broadcast"] = udp.getsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST)
    r["named"] = named.getsockname()
    # The listeners still accept.
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.connect(os.path.join(out, "listen.sock"))
    a, _ = named.accept()
    c.sendall(b"ping")
    r["named_accept"] = a.recv(4).decode()
    a.close()
    c.close()
    tmp = os.path.join(out, f"report-{role}.json.tmp")
    with open(tmp, "w") as f:
        json.dump(r, f)
    os.rename(tmp, os.path.join(out, f"report-{role}.json"))


signal.signal(signal.SIGUSR1, report)
signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
if role == "parent":
    print("ready", flush=True)
while True:
    signal.pause()
