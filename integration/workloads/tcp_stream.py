#!/usr/bin/env python3
"""One established TCP connection streaming both ways, standard library only.

Usage: tcp_stream.py PORT DIR

Listens on 127.0.0.1:PORT, accepts one client, then forever sends 8-byte
big-endian counters 0, 1, 2, ... and checks that what the client sends is
the same kind of sequence. On SIGUSR1 it writes DIR/report.json: how many
counters it received and sent, and the first gap it saw (none if null)."""
import json
import os
import selectors
import signal
import socket
import struct
import sys
import time

port = int(sys.argv[1])
out = sys.argv[2]
listener = socket.socket()
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind(("127.0.0.1", port))
listener.listen(1)
print("listening", flush=True)
conn, _ = listener.accept()
conn.setblocking(False)
state = {"received": 0, "sent": 0, "gap": None}
pending = b""
inbuf = b""


def report(*_):
    tmp = os.path.join(out, "report.json.tmp")
    with open(tmp, "w") as f:
        json.dump(state, f)
    os.rename(tmp, os.path.join(out, "report.json"))


signal.signal(signal.SIGUSR1, report)
sel = selectors.DefaultSelector()
sel.register(conn, selectors.EVENT_READ | selectors.EVENT_WRITE)
while True:
    for _key, ev in sel.select(timeout=0.05):
        if ev & selectors.EVENT_READ:
            try:
                data = conn.recv(65536)
            except BlockingIOError:
                data = None
            if data == b"":
                state["gap"] = state["gap"] or f"EOF after {state['received']}"
                report()
                sys.exit(0)
            if data:
                inbuf += data
                n = len(inbuf) // 8
                for i in range(n):
                    (v,) = struct.unpack_from(">Q", inbuf, i * 8)
                    if v != state["received"] and state["gap"] is None:
                        state["gap"] = f"expected {state['received']} got {v}"
                    state["received"] = v + 1
                inbuf = inbuf[n * 8 :]
        if ev & selectors.EVENT_WRITE:
            if not pending:
                base = state["sent"]
                pending = b"".join(struct.pack(">Q", base + i) for i in range(512))
                state["sent"] += 512
            try:
                k = conn.send(pending)
                pending = pending[k:]
            except BlockingIOError:
                pass
    time.sleep(0.002)
