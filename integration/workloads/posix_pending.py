#!/usr/bin/env python3
"""A periodic POSIX timer whose signal stays pending, standard library only
(ctypes for timer_create).

Usage: posix_pending.py DIR

Blocks SIGRTMIN+4 and arms a CLOCK_MONOTONIC SIGEV_SIGNAL timer every
300 ms, so from its first expiry on its signal is pending (the kernel
queues one and counts the rest as overruns). Prints "ready" once armed.
Once DIR/go exists it takes five signals with sigwaitinfo and writes
DIR/out.json: per signal [seconds since go, si_code, timer_getoverrun].
"""
import ctypes
import json
import os
import signal
import sys
import time

out = sys.argv[1]
libc = ctypes.CDLL(None, use_errno=True)


class Sigevent(ctypes.Structure):
    _fields_ = [("value", ctypes.c_uint64), ("signo", ctypes.c_int), ("notify", ctypes.c_int),
                ("tid", ctypes.c_int), ("_pad", ctypes.c_int * 11)]


class Timespec(ctypes.Structure):
    _fields_ = [("sec", ctypes.c_long), ("nsec", ctypes.c_long)]


class Itimerspec(ctypes.Structure):
    _fields_ = [("interval", Timespec), ("value", Timespec)]


SYS_TIMER_CREATE, SYS_TIMER_SETTIME, SYS_TIMER_GETOVERRUN = 222, 223, 225
SIG = signal.SIGRTMIN + 4
signal.pthread_sigmask(signal.SIG_BLOCK, [SIG])
ev = Sigevent(0x77, SIG, 0, 0)
timer = ctypes.c_int(0)
if libc.syscall(SYS_TIMER_CREATE, time.CLOCK_MONOTONIC, ctypes.byref(ev), ctypes.byref(timer)):
    raise OSError(ctypes.get_errno(), "timer_create")
spec = Itimerspec(Timespec(0, 300_000_000), Timespec(0, 300_000_000))
if libc.syscall(SYS_TIMER_SETTIME, timer.value, 0, ctypes.byref(spec), None):
    raise OSError(ctypes.get_errno(), "timer_settime")
print("ready", flush=True)
while not os.path.exists(os.path.join(out, "go")):
    time.sleep(0.01)
t0 = time.monotonic()
got = []
for _ in range(5):
    si = signal.sigwaitinfo([SIG])
    got.append([time.monotonic() - t0, si.si_code, libc.syscall(SYS_TIMER_GETOVERRUN, timer.value)])
tmp = os.path.join(out, "out.json.tmp")
with open(tmp, "w") as f:
    json.dump(got, f)
os.rename(tmp, os.path.join(out, "out.json"))
time.sleep(600)
