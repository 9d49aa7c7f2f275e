#!/usr/bin/env python3
"""A preforking HTTP server, standard library only: the master loads a
model-sized block of memory (MIB MiB, arg 2) before forking WORKERS
workers (arg 3) that accept on the one listening socket of PORT (arg 1)
through an epoll selector. Each answer names the worker's pid and a
checksum of the shared memory, so a client sees which worker answered and
that the memory is intact."""
import hashlib
import os
import selectors
import signal
import socket
import sys

port = int(sys.argv[1])
mib = int(sys.argv[2]) if len(sys.argv) > 2 else 64
workers = int(sys.argv[3]) if len(sys.argv) > 3 else 4

# Half random, half zero per page, as the reference tree: pages the
# workers never write stay shared with the master after fork.
page = 4096
model = bytearray(mib << 20)
seed = hashlib.sha256(b"cowsnap").digest()
block = (seed * (page // 2 // len(seed) + 1))[: page // 2]
for off in range(0, len(model), page):
    model[off : off + page // 2] = block
digest = hashlib.sha256(model).hexdigest()[:16]

listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind(("127.0.0.1", port))
listener.listen(64)
listener.setblocking(False)


def serve():
    sel = selectors.EpollSelector()
    sel.register(listener, selectors.EVENT_READ)
    served = 0
    while True:
        for _key, _ev in sel.select():
            try:
                conn, _ = listener.accept()
            except BlockingIOError:
                continue
            conn.setblocking(True)
            with conn:
                req = b""
                while b"\r\n\r\n" not in req:
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    req += chunk
                served += 1
                body = f"pid={os.getpid()} model={hashlib.sha256(model).hexdigest()[:16]} served={served}\n".encode()
                conn.sendall(
                    b"HTTP/1.0 200 OK\r\nContent-Length: "
                    + str(len(body)).encode()
                    + b"\r\n\r\n"
                    + body
                )


children = []
for _ in range(workers):
    pid = os.fork()
    if pid == 0:
        serve()
        os._exit(0)
    children.append(pid)

signal.signal(signal.SIGTERM, lambda *_: [os.kill(c, signal.SIGTERM) for c in children] and os._exit(0))
print(f"ready {os.getpid()} model={digest}", flush=True)
while True:
    signal.pause()
