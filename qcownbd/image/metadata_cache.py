"""One budget of metadata memory for every open image: an LRU of L2 tables.

A server with a fleet opens an overlay per client; a cache per image would
grow with the clients.  Every image's tables share this one instead, keyed
by (owner, L1 index) and bounded in bytes: a busy image takes the room idle
ones leave, and an idle image costs nothing here.

An owner (`Qcow1Tables`) registers, gets a token, and answers two
questions: `is_dirty(index)` (the table has pointer updates not yet in the
file) and `commit()` (write them, in the crash-safe order).  Eviction takes
the least recently used clean table; a dirty one is passed over a few
times (the commit timer usually cleans it soon), and when only dirty
tables are left the oldest one's owner commits first: a dirty table is
never dropped, and the budget holds.  Owners keep their dirty tables
referenced themselves too, so that a commit never needs the cache.

Thread-safe: the event loop reads and inserts tables, worker threads close
images (and commit, which never touches the cache).  No commit runs under
the cache's lock.
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
#: dirty tables passed over per eviction before a commit makes one clean
MAX_DIRTY_SKIPS = 32


class MetadataCache:
    """L2 tables of many images in one LRU, at most ``budget`` bytes of them."""

    def __init__(self, budget: int = DEFAULT_BUDGET):
        self.budget = check_budget(budget)
        #: bytes of the tables held (never above the budget once `put` returns)
        self.used = 0
        self.hits = self.misses = self.evictions = 0
        self._tables: OrderedDict[tuple[int, int], object] = OrderedDict()
        self._indices: dict[int, set[int]] = {}
        #: token -> weak reference to the owner (an image never closed ages out)
        self._owners: dict[int, weakref.ref] = {}
        self._tokens = itertools.count(1)
        self._lock = threading.Lock()

    def register(self, owner) -> int:
        """A token for ``owner``'s tables (see the module for what an owner answers)."""
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
            if table is None:
                self.misses += 1
                return None
            self._tables.move_to_end(key)
            self.hits += 1
            return table

    def put(self, token: int, index: int, table) -> None:
        """Cache ``table`` (an array) as the newest, then evict down to the budget."""
        key = (token, index)
        with self._lock:
            if token not in self._indices:
                return          # its owner closed meanwhile
            old = self._tables.pop(key, None)
            if old is not None:
                self.used -= _nbytes(old)
            self._tables[key] = table
            self._indices[token].add(index)
            self.used += _nbytes(table)
        self._evict()

    def resize(self, budget: int) -> None:
        """A new budget (a reload), applied at once."""
        self.budget = check_budget(budget)
        self._evict()

    def stats(self) -> dict:
        """What `qcownbd status` shows."""
        with self._lock:
            return {"budget": self.budget, "used": self.used, "tables": len(self._tables),
                    "images": len(self._owners), "hits": self.hits, "misses": self.misses,
                    "evictions": self.evictions}

    def _evict(self) -> None:
        skipped = 0
        while True:
            with self._lock:
                if self.used <= self.budget or not self._tables:
                    return
                key = next(iter(self._tables))
                owner = self._owners[key[0]]() if key[0] in self._owners else None
                if owner is None or not owner.is_dirty(key[1]):
                    self._remove(key)
                    self.evictions += 1
                    continue
                if skipped < min(MAX_DIRTY_SKIPS, len(self._tables) - 1):
                    self._tables.move_to_end(key)
                    skipped += 1
                    continue
            # the oldest tables all wait for a commit: one now (an error reaches the
            # request that needed room; the cache stays over budget until the next put)
            owner.commit()
            skipped = 0

    def _remove(self, key: tuple[int, int]) -> None:
        self.used -= _nbytes(self._tables.pop(key))
        indices = self._indices.get(key[0])
        if indices is not None:
            indices.discard(key[1])

    def _drop(self, token: int) -> None:
        for index in self._indices.get(token, ()):
            self.used -= _nbytes(self._tables.pop((token, index)))
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
