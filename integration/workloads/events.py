#!/usr/bin/env python3
"""Event fds and POSIX timers with a timeline, standard library only (ctypes
for timerfd, signalfd and timer_create, which Python 3.11's os module lacks).

Usage: events.py DIR

One epoll set watches:
  - a periodic relative CLOCK_MONOTONIC timerfd (every 50 ms): each read
    adds its expirations to `ticks`, logged with the monotonic time;
  - a one-shot absolute CLOCK_REALTIME timerfd set to fire 3 s after start:
    `abs_fired` is the wall-clock time it fired at;
  - a signalfd for SIGUSR2 (blocked otherwise): `sigusr2` counts them;
  - an eventfd written 5 (read on SIGUSR1 into `eventfd`), and a semaphore
    eventfd written 3 (read until empty: `sem_reads`);
  - an inotify instance watching DIR/watched for IN_CREATE (a second watch
    on DIR, added first and removed, makes its descriptor 2):
    `inotify` counts the events that carry that descriptor.
Two POSIX timers (timer_create; a first one is deleted, so their ids are
not the kernel's first): a periodic CLOCK_MONOTONIC SIGEV_SIGNAL timer
(every 40 ms, SIGRTMIN+2, counted by a handler with timer_getoverrun:
`pticks`, logged in `plog`), and a periodic SIGEV_THREAD_ID timer (every
100 ms, SIGRTMIN+3) aimed at a second thread that takes its signals with
sigwaitinfo (`tticks`, `tlog`). `timer_ids` are the ids timer_create gave,
`proc_timers` is /proc/self/timers at the report, `worker_tid` the thread's.
Prints "ready START_WALL" once set up. On SIGUSR1 writes DIR/report.json.
"""
import ctypes
import json
import os
import select
import signal
import struct
import sys
import threading
import time

out = sys.argv[1]
libc = ctypes.CDLL(None, use_errno=True)


class Timespec(ctypes.Structure):
    _fields_ = [("sec", ctypes.c_long), ("nsec", ctypes.c_long)]


class Itimerspec(ctypes.Structure):
    _fields_ = [("interval", Timespec), ("value", Timespec)]


def check(rc, what):
    if rc < 0:
        raise OSError(ctypes.get_errno(), what)
    return rc


TFD_NONBLOCK = os.O_NONBLOCK
start_wall = time.time()
periodic = check(libc.timerfd_create(time.CLOCK_MONOTONIC, TFD_NONBLOCK), "timerfd_create")
spec = Itimerspec(Timespec(0, 50_000_000), Timespec(0, 50_000_000))
check(libc.timerfd_settime(periodic, 0, ctypes.byref(spec), None), "settime")
absolute = check(libc.timerfd_create(time.CLOCK_REALTIME, TFD_NONBLOCK), "timerfd_create")
at = start_wall + 3.0
spec = Itimerspec(Timespec(0, 0), Timespec(int(at), int((at % 1) * 1e9)))
check(libc.timerfd_settime(absolute, 1, ctypes.byref(spec), None), "settime abs")

signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGUSR2])
mask = (ctypes.c_ulong * 16)()
mask[0] = 1 << (signal.SIGUSR2 - 1)
sigfd = check(libc.signalfd(-1, mask, os.O_NONBLOCK), "signalfd")
counter = os.eventfd(0, os.EFD_NONBLOCK)
os.eventfd_write(counter, 5)
sem = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_SEMAPHORE)
os.eventfd_write(sem, 3)

IN_CREATE, IN_NONBLOCK = 0x100, os.O_NONBLOCK
ino = check(libc.inotify_init1(IN_NONBLOCK), "inotify_init1")
watched = os.path.join(out, "watched")
os.mkdir(watched)
first = check(libc.inotify_add_watch(ino, out.encode(), IN_CREATE), "add_watch")
check(libc.inotify_rm_watch(ino, first), "rm_watch")
wd = check(libc.inotify_add_watch(ino, watched.encode(), IN_CREATE), "add_watch")
try:
    os.read(ino, 4096)  # the IN_IGNORED of the removed watch
except BlockingIOError:
    pass

class Sigevent(ctypes.Structure):
    _fields_ = [("value", ctypes.c_uint64), ("signo", ctypes.c_int), ("notify", ctypes.c_int),
                ("tid", ctypes.c_int), ("_pad", ctypes.c_int * 11)]


SIGEV_SIGNAL, SIGEV_THREAD_ID = 0, 4
PSIG, TSIG = signal.SIGRTMIN + 2, signal.SIGRTMIN + 3
libc.timer_getoverrun.argtypes = [ctypes.c_void_p]


def timer_create(clock, ev):
    tid = ctypes.c_void_p(0)
    check(libc.timer_create(clock, ctypes.byref(ev), ctypes.byref(tid)), "timer_create")
    return tid


def timer_arm(timer, ns):
    spec = Itimerspec(Timespec(0, ns), Timespec(0, ns))
    check(libc.timer_settime(timer, 0, ctypes.byref(spec), None), "timer_settime")


libc.timer_delete.argtypes = [ctypes.c_void_p]
libc.timer_settime.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
throwaway = timer_create(time.CLOCK_MONOTONIC, Sigevent(0, PSIG, SIGEV_SIGNAL, 0))
ptimer = timer_create(time.CLOCK_MONOTONIC, Sigevent(0x51, PSIG, SIGEV_SIGNAL, 0))
check(libc.timer_delete(throwaway), "timer_delete")
signal.pthread_sigmask(signal.SIG_BLOCK, [TSIG])
worker_ready = threading.Event()
worker = {}


def worker_main():
    worker["tid"] = threading.get_native_id()
    worker_ready.set()
    while True:
        signal.sigwaitinfo([TSIG])
        state["tticks"] += 1 + max(0, libc.timer_getoverrun(worker["timer"]))
        state["tlog"].append([time.monotonic(), state["tticks"]])
        del state["tlog"][:-200]


ep = select.epoll()
for fd in (periodic, absolute, sigfd, ino):
    ep.register(fd, select.EPOLLIN)
state = {"ticks": 0, "log": [], "abs_fired": None, "sigusr2": 0, "start_wall": start_wall,
         "inotify": 0, "inotify_other": 0, "wd": wd,
         "pticks": 0, "plog": [], "tticks": 0, "tlog": []}


def posix_tick(*_):
    state["pticks"] += 1 + max(0, libc.timer_getoverrun(ptimer))
    state["plog"].append([time.monotonic(), state["pticks"]])
    del state["plog"][:-400]


signal.signal(PSIG, posix_tick)
threading.Thread(target=worker_main, daemon=True).start()
worker_ready.wait()
worker["timer"] = timer_create(time.CLOCK_MONOTONIC,
                               Sigevent(0x52, TSIG, SIGEV_THREAD_ID, worker["tid"]))
state["timer_ids"] = [ptimer.value, worker["timer"].value]
state["worker_tid"] = worker["tid"]
timer_arm(ptimer, 40_000_000)
timer_arm(worker["timer"], 100_000_000)


def report(*_):
    # The eventfds are read on the first report only (reading consumes).
    if "eventfd" not in state:
        try:
            state["eventfd"] = os.eventfd_read(counter)
        except BlockingIOError:
            state["eventfd"] = 0
        reads = 0
        while True:
            try:
                os.eventfd_read(sem)
                reads += 1
            except BlockingIOError:
                break
        state["sem_reads"] = reads
    with open("/proc/self/timers") as f:
        state["proc_timers"] = f.read()
    r = dict(state)
    tmp = os.path.join(out, "report.json.tmp")
    with open(tmp, "w") as f:
        json.dump(r, f)
    os.rename(tmp, os.path.join(out, "report.json"))


signal.signal(signal.SIGUSR1, report)
print(f"ready {start_wall}", flush=True)
while True:
    for fd, _ev in ep.poll():
        if fd == periodic:
            try:
                n = int.from_bytes(os.read(periodic, 8), "little")
            except BlockingIOError:
                continue
            state["ticks"] += n
            state["log"].append([time.monotonic(), state["ticks"]])
            del state["log"][:-400]
        elif fd == absolute:
            try:
                os.read(absolute, 8)
                state["abs_fired"] = time.time()
            except BlockingIOError:
                pass
        elif fd == ino:
            try:
                buf = os.read(ino, 4096)
            except BlockingIOError:
                continue
            off = 0
            while off + 16 <= len(buf):
                ewd, _mask, _cookie, length = struct.unpack_from("iIII", buf, off)
                state["inotify" if ewd == wd else "inotify_other"] += 1
                off += 16 + length
        elif fd == sigfd:
            try:
                os.read(sigfd, 128)
                state["sigusr2"] += 1
            except BlockingIOError:
                pass
