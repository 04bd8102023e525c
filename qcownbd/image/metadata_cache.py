"""One budget of metadata memory for every open image: an LRU of L2 tables.

A server with a fleet opens an overlay per client; a cache per image would
grow with the clients.  Every image's tables share this one instead, keyed
by (owner, L1 index) and bounded in bytes: a busy image takes the room idle
ones leave, and an idle image costs nothing here.

An owner (`Qcow1Tables`) registers, gets a token, `pin`s a table when
it gives it pointer updates not yet in the file and `unpin`s it once its
commit wrote them.  Eviction takes the least recently used unpinned
table, in constant time; when every table is pinned, the owner of the
oldest pinned one commits first (the crash-safe order of its own commit).
A dirty table is never dropped, and the budget holds.  Owners keep their
dirty tables referenced themselves too, so a commit never needs the cache.

Thread-safe: the event loop reads, inserts and pins tables; worker
threads commit (unpinning) and close images.  Lock order: an owner's
pending lock, then the cache's; no commit runs under the cache's lock.
"""

import itertools
import threading
import weakref
from collections import OrderedDict

#: the default budget: 4096 L2 tables of qemu-img's 4 KiB-cluster geometry (16 GiB of
#: disk mapped), or 1024 tables of a fleet overlay's (2 GiB)
DEFAULT_BUDGET = 32 * 1024 * 1024
#: the smallest budget: a table of qemu-img's geometry (a larger table than the
#: budget is still used, just never kept)
MIN_BUDGET = 4096


class MetadataCache:
    """L2 tables of many images in one LRU, at most ``budget`` bytes of them."""

    def __init__(self, budget: int = DEFAULT_BUDGET):
        self.budget = check_budget(budget)
        #: bytes of the tables held (never above the budget once `put` returns)
        self.used = 0
        self.hits = self.misses = self.evictions = 0
        #: commits made to free room (tables were changed faster than the timer commits)
        self.forced_commits = 0
        #: the tables that may go, oldest first
        self._tables: OrderedDict[tuple[int, int], object] = OrderedDict()
        #: the tables whose changes are not in the file yet, oldest first
        self._pinned: dict[tuple[int, int], object] = {}
        self._indices: dict[int, set[int]] = {}
        #: token -> weak reference to the owner (an image never closed ages out)
        self._owners: dict[int, weakref.ref] = {}
        self._tokens = itertools.count(1)
        self._lock = threading.Lock()

    def register(self, owner) -> int:
        """A token for ``owner``'s tables (see the module for what an owner does)."""
        token = next(self._tokens)
        with self._lock:
            self._owners[token] = weakref.ref(owner)
            self._indices[token] = set()
        return token

    def forget(self, token: int) -> None:
        """The owner closed: drop its tables and its registration."""
        with self._lock:
            self._drop(token)
            self._owners.pop(token, None)
            self._indices.pop(token, None)

    def drop(self, token: int) -> None:
        """Drop every table of ``token`` (its owner reread its L1 table)."""
        with self._lock:
            self._drop(token)

    def get(self, token: int, index: int):
        """The cached table, most recently used from now on; None when not cached."""
        key = (token, index)
        with self._lock:
            table = self._tables.get(key)
            if table is not None:
                self._tables.move_to_end(key)
            else:
                table = self._pinned.get(key)
                if table is None:
                    self.misses += 1
                    return None
            self.hits += 1
            return table

    def put(self, token: int, index: int, table) -> None:
        """Cache ``table`` (an array) as the newest, then evict down to the budget."""
        key = (token, index)
        with self._lock:
            if token not in self._indices:
                return          # its owner closed meanwhile
            old = self._tables.pop(key, None) or self._pinned.pop(key, None)
            if old is not None:
                self.used -= _nbytes(old)
            self._tables[key] = table
            self._indices[token].add(index)
            self.used += _nbytes(table)
        self._evict(keep=key)

    def pin(self, token: int, index: int) -> None:
        """Table ``index`` got changes not yet in the file: it stays until `unpin`.
        (A table already gone stays out: its owner's pending changes hold it.)"""
        key = (token, index)
        with self._lock:
            table = self._tables.pop(key, None)
            if table is not None:
                self._pinned[key] = table

    def unpin(self, token: int, indices) -> None:
        """These tables' changes are in the file: they may go again (newest first)."""
        with self._lock:
            for index in indices:
                table = self._pinned.pop((token, index), None)
                if table is not None:
                    self._tables[(token, index)] = table

    def resize(self, budget: int) -> None:
        """A new budget (a reload), applied at once."""
        self.budget = check_budget(budget)
        self._evict()

    def stats(self) -> dict:
        """What `qcownbd status` shows."""
        with self._lock:
            return {"budget": self.budget, "used": self.used,
                    "tables": len(self._tables) + len(self._pinned),
                    "dirty_tables": len(self._pinned), "images": len(self._owners),
                    "hits": self.hits, "misses": self.misses, "evictions": self.evictions,
                    "forced_commits": self.forced_commits}

    def _evict(self, keep=None) -> None:
        """Down to the budget; ``keep``, the table just put, goes last (its caller is
        about to change it: dropped now, it would be pinned outside the budget)."""
        while True:
            with self._lock:
                if self.used <= self.budget:
                    return
                victim = next(iter(self._tables), None)
                if victim is not None and (victim != keep or not self._pinned):
                    self._remove(victim)
                    self.evictions += 1
                    continue
                if not self._pinned:
                    return
                key = next(iter(self._pinned))
                owner = self._owners[key[0]]() if key[0] in self._owners else None
                if owner is None:       # never closed, now gone: nothing left to write
                    self._remove(key)
                    continue
                self.forced_commits += 1
            # every table waits for a commit: one now (an error reaches the request
            # that needed room; the cache stays over budget until the next put)
            owner.commit()
            if not owner.is_dirty(key[1]):
                self.unpin(key[0], [key[1]])    # committed, whoever did it

    def _remove(self, key: tuple[int, int]) -> None:
        table = self._tables.pop(key, None)
        if table is None:
            table = self._pinned.pop(key)
        self.used -= _nbytes(table)
        indices = self._indices.get(key[0])
        if indices is not None:
            indices.discard(key[1])

    def _drop(self, token: int) -> None:
        for index in self._indices.get(token, ()):
            key = (token, index)
            table = self._tables.pop(key, None)
            if table is None:
                table = self._pinned.pop(key)
            self.used -= _nbytes(table)
        if token in self._indices:
            self._indices[token] = set()


def _nbytes(table) -> int:
    return table.itemsize * len(table)


def check_budget(budget: int) -> int:
    """``budget`` when it can hold a table of any geometry; ValueError otherwise."""
    if budget < MIN_BUDGET:
        raise ValueError(f"metadata cache budget {budget} bytes is below the minimum, "
                         f"{MIN_BUDGET} bytes")
    return budget


#: the cache of every image this process opens, unless it is given another one
SHARED = MetadataCache()
