"""Default rewards: decisions that got no reward within the attribution window.

Off unless an experiment sets ``default_reward`` (Azure Personalizer's "default reward").
The replica that issued a decision remembers it (compactly: one entry per Assign, one per
AssignBatch) until its window has passed, then writes a reward row carrying the
decision's own dedup key and the default value. A real reward for that decision, received
by any replica, has the same key, so whichever was logged first counts and the other is a
duplicate: never both. Real rewards are only accepted inside the window and defaults are
only written after it plus a grace period, so a real reward always wins.

The pending decisions are also saved in the store (table ``pending_defaults``, by the
writer thread every sync interval: :meth:`DefaultRewards.take_writes`) and reloaded at
start-up, so a crash forgets only those issued since the last save; entries of a replica
that is gone for good (ids default to host:pid, so a restart is a new replica) are taken
over by another one (:meth:`Store.adopt_pending_defaults`). A saved entry is
deleted once its default is committed; a crash in between writes it again after the
restart, which its dedup key makes a duplicate: never a double count. The memory is
bounded (``max_entries``; beyond it new decisions are not tracked and ``dropped`` counts
them).
"""

from __future__ import annotations

import hashlib
import heapq
import threading
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from allocator.tokens import batch_keys, decision_key


@dataclass(frozen=True)
class Pending:
    """Decisions issued together: one id, or one batch token with its arms."""

    experiment: str
    issued_at: float
    token: str
    arms: np.ndarray
    epoch: int
    batch: bool

    @property
    def key(self) -> str:
        """A short digest of the id or token, the entry's key in the store."""
        return hashlib.blake2b(self.token.encode(), digest_size=16).hexdigest()

    def keys(self) -> list[str]:
        """The dedup keys of these decisions (the same a real reward would log)."""
        if not self.batch:
            return [decision_key(self.token)]
        return batch_keys(self.token)


_DUE_CHUNK = 1_000  # entries popped per lock hold in DefaultRewards.due


class DefaultRewards:
    """Per-experiment queues of issued decisions awaiting their window's end."""

    def __init__(self, max_entries: int = 5_000_000) -> None:
        self.max_entries = max_entries
        self._queues: dict[str, deque[Pending]] = {}
        self._size = 0
        self._lock = threading.Lock()
        self.dropped = 0
        self._unsaved: list[Pending] = []  # tracked, not yet in the store
        self._done: list[str] = []  # keys to delete from the store

    def track(self, item: Pending, *, saved: bool = False) -> None:
        """Remember decisions just issued (called on the Assign path: O(1)).

        ``saved``: the store has it already (reloaded at start-up, or tracked again).
        """
        n = int(item.arms.shape[0])
        with self._lock:
            if self._size + n > self.max_entries:
                self.dropped += n
                return
            self._queues.setdefault(item.experiment, deque()).append(item)
            self._size += n
            if not saved:
                self._unsaved.append(item)

    def adopt(self, items: Iterable[Pending]) -> None:
        """Track saved entries taken over from a replica that is gone, in issue order.

        They are older than most of what is queued, so they are merged in by
        ``issued_at`` (``due`` pops from the front until the first entry not yet due),
        and past the bound, like ``retry``: they are saved and counted already. Only the
        queued entries older than the newest adopted one are touched (usually none), not
        the whole queue: ``track`` waits on this lock on the Assign path.
        """
        by_name: dict[str, list[Pending]] = {}
        for item in items:
            by_name.setdefault(item.experiment, []).append(item)
        for new in by_name.values():
            new.sort(key=lambda i: i.issued_at)
        with self._lock:
            for name, new in by_name.items():
                q = self._queues.setdefault(name, deque())
                newest = new[-1].issued_at
                older: list[Pending] = []
                while q and q[0].issued_at < newest:
                    older.append(q.popleft())
                merged = list(heapq.merge(older, new, key=lambda i: i.issued_at))
                q.extendleft(reversed(merged))
                self._size += sum(int(i.arms.shape[0]) for i in new)

    def retry(self, item: Pending) -> None:
        """Put back an entry popped by :meth:`due` whose default could not be written.

        At the front (it is older than what was left, and already due), and past the bound:
        it was counted before, and dropping it now would lose a decision already saved.
        """
        with self._lock:
            self._queues.setdefault(item.experiment, deque()).appendleft(item)
            self._size += int(item.arms.shape[0])

    def done(self, items: Iterable[Pending]) -> None:
        """These entries' defaults are committed (or no longer wanted): delete them."""
        with self._lock:
            self._done.extend(i.key for i in items)

    def take_writes(self) -> tuple[list[Pending], list[str]]:
        """What the store must learn: entries to save, then keys to delete."""
        with self._lock:
            unsaved, self._unsaved = self._unsaved, []
            done, self._done = self._done, []
        return unsaved, done

    def restore_writes(self, unsaved: list[Pending], done: list[str]) -> None:
        """Put back what :meth:`take_writes` gave when writing it failed."""
        with self._lock:
            self._unsaved[:0] = unsaved
            self._done[:0] = done

    def due(self, deadline: Callable[[str], float]) -> list[Pending]:
        """Pop every entry issued before ``deadline(experiment)`` (oldest first).

        The lock is taken per ``_DUE_CHUNK`` entries, not for the whole sweep: ``track``
        runs on the Assign path, which must not wait out millions of pops.
        """
        out: list[Pending] = []
        with self._lock:
            names = list(self._queues)
        for name in names:
            cutoff = deadline(name)
            while True:
                with self._lock:
                    q = self._queues.get(name)
                    popped = 0
                    while q and q[0].issued_at < cutoff and popped < _DUE_CHUNK:
                        item = q.popleft()
                        self._size -= int(item.arms.shape[0])
                        out.append(item)
                        popped += 1
                if popped < _DUE_CHUNK:
                    break
        return out

    def forget(self, experiment: str) -> None:
        """Stop tracking an experiment (archived, or default reward turned off)."""
        with self._lock:
            q = self._queues.pop(experiment, None)
            if q:
                self._size -= sum(int(i.arms.shape[0]) for i in q)
                self._done.extend(i.key for i in q)

    @property
    def size(self) -> int:
        """Decisions currently tracked."""
        return self._size
