#!/usr/bin/env python3
"""A multiprocessing.Pool program with deleted files, standard library only.

Usage: pool.py DIR

Before the pool forks its 3 workers, the parent makes:
  - a lock (multiprocessing.Lock: a POSIX semaphore from sem_open, whose
    /dev/shm/sem.* file is unlinked at once and stays mapped, shared);
  - a counter page: a file in /dev/shm, mapped MAP_SHARED and unlinked;
    every `bump` task adds 1 to it under the lock, in whichever worker;
  - a second counter in a named file, /dev/shm/cowsnap-pool-named-PID
    (mode 0640, left in place, as PostgreSQL's dynamic shared memory is),
    which `bump` also adds 1 to;
  - a temporary file (tempfile.TemporaryFile in DIR: O_TMPFILE, never
    named) with known contents, its offset left at 5;
  - a file in DIR mapped MAP_PRIVATE, its first byte changed in memory
    (a copy-on-write page), then unlinked.
Prints "ready PATH_OF_THE_NAMED_FILE" once the pool answers. On SIGUSR1 the main loop runs 50
`bump` tasks and a `square` map over the pool and writes DIR/report.json.
"""
import json
import mmap
import multiprocessing
import os
import signal
import sys
import tempfile
import time

out = sys.argv[1]
# Linux default start method: fork (the workers inherit what follows).
LOCK = multiprocessing.Lock()

shm_path = "/dev/shm/cowsnap-pool-%d" % os.getpid()
fd = os.open(shm_path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
os.ftruncate(fd, 8192)
COUNTER = mmap.mmap(fd, 8192, mmap.MAP_SHARED)
os.close(fd)
os.unlink(shm_path)

NAMED_PATH = "/dev/shm/cowsnap-pool-named-%d" % os.getpid()
fd = os.open(NAMED_PATH, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o640)
os.fchmod(fd, 0o640)
os.ftruncate(fd, 4096)
NAMED = mmap.mmap(fd, 4096, mmap.MAP_SHARED)
os.close(fd)

TMP = tempfile.TemporaryFile(dir=out)
TMP.write(b"hello deleted\n" * 1000)
TMP.flush()
TMP.seek(5)

private_path = os.path.join(out, "private-mapped")
with open(private_path, "wb") as f:
    f.write(b"private-original" + b"\0" * 4080)
fd = os.open(private_path, os.O_RDONLY)
PRIVATE = mmap.mmap(fd, 4096, mmap.MAP_PRIVATE, mmap.PROT_READ | mmap.PROT_WRITE)
os.close(fd)
PRIVATE[0:1] = b"P"
os.unlink(private_path)


def bump(_):
    with LOCK:
        n = int.from_bytes(COUNTER[0:8], "little")
        COUNTER[0:8] = (n + 1).to_bytes(8, "little")
        n = int.from_bytes(NAMED[0:8], "little")
        NAMED[0:8] = (n + 1).to_bytes(8, "little")
    return os.getpid()


def square(x):
    return x * x


asked = False


def on_usr1(signum, frame):
    global asked
    asked = True


def report(pool):
    workers = sorted(set(pool.map(bump, range(50), chunksize=1)))
    squares = sum(pool.map(square, range(100)))
    r = {
        "bumps": int.from_bytes(COUNTER[0:8], "little"),
        "named_bumps": int.from_bytes(NAMED[0:8], "little"),
        "squares": squares,
        "workers_seen": workers,
        "workers": sorted(p.pid for p in multiprocessing.active_children()),
        "tmp_pos": TMP.tell(),
        "tmp_data_ok": os.pread(TMP.fileno(), 14000, 0) == b"hello deleted\n" * 1000,
        "private": PRIVATE[0:16].decode(),
    }
    tmp = out + "/report.json.tmp"
    with open(tmp, "w") as f:
        json.dump(r, f)
    os.rename(tmp, out + "/report.json")


if __name__ == "__main__":
    signal.signal(signal.SIGUSR1, on_usr1)
    with multiprocessing.Pool(3) as pool:
        pool.map(square, range(10))
        print("ready", NAMED_PATH, flush=True)
        while True:
            time.sleep(0.05)
            if asked:
                asked = False
                report(pool)
