"""Keep the event-loop thread on its core: the process's other threads don't preempt it.

Every unary Assign runs on one thread, the grpc.aio event loop, and that thread is the
server's bottleneck. The process's other threads (grpc's completion-queue poller and
event-engine workers, the store writer, the refresher, the handler pool) wake up tens of
thousands of times a second under load, and by default each wake-up may preempt the loop
in the middle of a request, which then resumes with cold caches: under the service
benchmark the loop thread was switched out involuntarily ~20,000 times a second and spent
a quarter to a third of its time waiting for a core.

Linux's ``SCHED_BATCH`` policy is ``SCHED_OTHER`` (same fair share, same nice value) minus
wake-up preemption: such a thread, woken, waits for the running one's slice to end
instead of taking its core. Giving it to every thread but the loop's is a hint that needs
no privilege and changes no thread's share of the CPU (sched(7)). Elsewhere this does
nothing.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger("allocator.sched")

# Both None where the calls do not exist (macOS has the constants but not the calls).
_BATCH = getattr(os, "SCHED_BATCH", None) if hasattr(os, "sched_setscheduler") else None
_OTHER = getattr(os, "SCHED_OTHER", None) if hasattr(os, "sched_setscheduler") else None
_TASKS = "/proc/self/task"


def batch_current_thread() -> None:
    """``SCHED_BATCH`` for the calling thread (a pool initializer; threads it starts inherit
    it)."""
    if _BATCH is not None and _OTHER is not None:
        _switch(0, _OTHER, _BATCH)


def unbatch_current_thread() -> None:
    """``SCHED_OTHER`` again for the calling thread if it inherited ``SCHED_BATCH`` (a
    process spawned by a server, standing in for another machine's); any other policy is
    left as it is."""
    if _BATCH is not None and _OTHER is not None:
        _switch(0, _BATCH, _OTHER)


def batch_all_but(keep: int) -> int:
    """``SCHED_BATCH`` for every thread of this process running ``SCHED_OTHER`` except the
    one whose native id is ``keep``, which gets ``SCHED_OTHER`` back if it inherited
    ``SCHED_BATCH`` (from a parent process that ran this); returns how many threads changed.

    Threads with another policy (real-time, idle) are left as someone set them. A thread
    that exits while this runs is skipped.
    """
    if _BATCH is None or _OTHER is None or not os.path.isdir(_TASKS):
        return 0
    changed = 0
    for entry in os.listdir(_TASKS):
        tid = int(entry)
        was, now = (_BATCH, _OTHER) if tid == keep else (_OTHER, _BATCH)
        changed += _switch(tid, was, now)
    return changed


def _switch(tid: int, was: int, now: int) -> bool:
    """Policy ``now`` for thread ``tid`` (0: the caller) if it runs ``was``; whether it
    changed. A thread that is gone, or a change not allowed (a seccomp profile, say), is
    no change: this is only a hint."""
    try:
        if os.sched_getscheduler(tid) == was:
            os.sched_setscheduler(tid, now, os.sched_param(0))
            return True
    except OSError as err:
        log.debug("thread %d: scheduling policy left as it is: %s", tid, err)
    return False
