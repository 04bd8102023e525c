"""kill -9 of a server under heavy pipelined writes, then check what survived.

Images: plain, over a raw backing file, and plain served with a 2-table
L2 cache (evictions commit pointers in the middle of writes).  Each round
restarts `qcownbd serve` on the same QCOW1 image (so the
read-write open and its full metadata scan must accept what the last crash
left), checks that our reads equal QEMU's, runs a pipelined writer (random
sector-aligned writes, some with FUA, FLUSH every few requests, and
WRITE_ZEROES and cluster-aligned TRIMs that free clusters for later writes
to reuse) and kills the server at a random moment.  Then: `qcownbd check` exits 0 or 3, QEMU
reads the image, and every 512-byte sector holds the newest durable write
to it or some later write to it (or the pre-round bytes) - never garbage,
never an older value than a completed FLUSH/FUA guaranteed.  A zeroed or
trimmed sector counts as written with zeros: a freed cluster reused too early
would show another sector's bytes there.
"""

import random
import threading
import time
from collections import defaultdict
from functools import lru_cache

import pytest

from helpers import SECTOR, LoggedServer, make_qcow1, qcownbd_check, qemu_raw
from nbdclient import CMD_FLUSH, CMD_WRITE, FLAG_FUA, NbdClient

CMD_TRIM, CMD_WRITE_ZEROES = 4, 6
CLUSTER = 4096

MiB = 1 << 20
SIZE = 64 * MiB
#: most writes of a round go to a fresh window, so every round also allocates
WINDOW = 4 * MiB
DEPTH = 8
LENGTHS = [512, 1024, 4096, 4096 + 512, 32768, 65536, 131072]


@lru_cache(maxsize=4096)
def payload(seed: int, write_id: int, length: int) -> bytes:
    """The bytes of write number ``write_id`` (regenerated when needed, not kept)."""
    return random.Random(seed * 1_000_003 + write_id).randbytes(length)


class PipelinedWriter:
    """Writes until the server dies, logging what was acknowledged and made durable.

    In-flight writes never overlap, so the writes to one sector are totally
    ordered; ``durable[s]`` is the index in ``history[s]`` of the newest
    write a completed FLUSH (or its FUA) made durable.
    """

    def __init__(self, port: int, seed: int, window_start: int, can_trim: bool):
        self.seed, self.rnd = seed, random.Random(seed)
        self.window_start, self.can_trim = window_start, can_trim
        self.client = NbdClient.connect(port, "d", timeout=30)
        #: cookie -> offset, length, id, command (a zeroing one writes zeros)
        self.writes: dict[int, tuple[int, int, int, int]] = {}
        self.history: dict[int, list[int]] = defaultdict(list)
        self.durable: dict[int, int] = {}
        self.busy: set[int] = set()
        self.inflight: dict[int, object] = {}   # cookie -> "write" or the writes a FLUSH covers
        self.unflushed: list[int] = []
        self.acked = self.durable_writes = self.zeroed = 0
        self.failure: AssertionError | None = None

    def run(self) -> None:
        """Send and collect until the connection breaks."""
        try:
            while True:
                while len(self.inflight) < DEPTH:
                    self._send()
                self._collect()
        except (OSError, EOFError):
            pass  # the server was killed
        except AssertionError as exc:   # an error reply: reported by the test thread
            self.failure = exc

    def _send(self) -> None:
        if self.rnd.random() < 0.06:
            cookie = self.client.submit(CMD_FLUSH)
            self.inflight[cookie] = list(self.unflushed)
            self.unflushed = []
            return
        length = self.rnd.choice(LENGTHS)
        if self.rnd.random() < 0.7:
            first = (self.window_start + self.rnd.randrange(WINDOW - length)) // SECTOR
        else:
            first = self.rnd.randrange((SIZE - length) // SECTOR)
        command = self.rnd.choices([CMD_WRITE, CMD_WRITE_ZEROES, CMD_TRIM], [85, 8, 7])[0]
        if command == CMD_TRIM:
            if not self.can_trim:
                return
            first -= first % (CLUSTER // SECTOR)   # whole clusters: the server unmaps them all
            length = -(-length // CLUSTER) * CLUSTER
        sectors = range(first, first + length // SECTOR)
        if any(s in self.busy for s in sectors):
            return  # never two overlapping writes in flight: their order would be unknown
        write_id = len(self.writes)
        flags = FLAG_FUA if self.rnd.random() < 0.1 else 0
        data = payload(self.seed, write_id, length) if command == CMD_WRITE else b""
        cookie = self.client.submit(command, first * SECTOR, length, flags, data)
        self.writes[cookie] = (first * SECTOR, length, write_id, command)
        self.busy.update(sectors)
        for s in sectors:
            self.history[s].append(cookie)
        self.inflight[cookie] = "fua" if flags else "write"

    def _collect(self) -> None:
        cookie, error, _data = self.client.reply()
        assert error == 0, f"request {cookie} failed with errno {error}"
        kind = self.inflight.pop(cookie)
        if kind in ("write", "fua"):
            offset, length, _id, command = self.writes[cookie]
            self.busy.difference_update(range(offset // SECTOR, (offset + length) // SECTOR))
            self.acked += 1
            self.zeroed += command != CMD_WRITE
            if kind == "fua":
                self._made_durable([cookie])
            else:
                self.unflushed.append(cookie)
        else:
            self._made_durable(kind)

    def _made_durable(self, cookies) -> None:
        for cookie in cookies:
            offset, length, _id, _command = self.writes[cookie]
            self.durable_writes += 1
            for s in range(offset // SECTOR, (offset + length) // SECTOR):
                index = self.history[s].index(cookie)
                self.durable[s] = max(self.durable.get(s, -1), index)

    def allowed(self, sector: int, before: bytes) -> list[bytes]:
        """The contents sector ``sector`` may hold after the crash."""
        cookies = self.history.get(sector, [])
        newest = self.durable.get(sector, -1)
        choices = [] if newest >= 0 else [before]
        for cookie in cookies[max(newest, 0):]:
            offset, length, write_id, command = self.writes[cookie]
            if command != CMD_WRITE:
                choices.append(bytes(SECTOR))
                continue
            pos = sector * SECTOR - offset
            choices.append(payload(self.seed, write_id, length)[pos:pos + SECTOR])
        return choices

    def verify(self, got: bytes, before: bytes) -> None:
        """Every sector of ``got`` is allowed; unwritten sectors kept their bytes."""
        assert len(got) == len(before) == SIZE
        for sector in range(SIZE // SECTOR):
            at = sector * SECTOR
            now = got[at:at + SECTOR]
            if sector not in self.history:
                assert now == before[at:at + SECTOR], f"unwritten sector {sector} changed"
            else:
                assert now in self.allowed(sector, before[at:at + SECTOR]), \
                    f"sector {sector}: lost a durable write or holds garbage"


def _read_through_server(port: int) -> bytes:
    client = NbdClient.connect(port, "d")
    data = b"".join(client.read(offset, MiB) for offset in range(0, SIZE, MiB))
    client.close()
    return data


def serve_args(tmp_path, image: str, cache_tables: int | None) -> list[str]:
    """``d=IMAGE``, or a config whose tiny metadata cache (``cache_tables`` of the image's
    4 KiB L2 tables) makes evictions commit mid-write."""
    if cache_tables is None:
        return [f"d={image}"]
    config = tmp_path / "serve.toml"
    config.write_text(f'[server]\nmetadata_cache = {cache_tables * 4096}\n'
                      f'[exports.d]\npath = "{image}"\n')
    return ["--config", str(config)]


def crash_rounds(tmp_path, backing: bool, rounds: int, seed: int,
                 cache_tables: int | None = None) -> None:
    """``rounds`` × (serve, verify reads, write, kill -9, check, verify survivors)."""
    image, before = make_qcow1(tmp_path, backing, SIZE, seed)
    before = bytes(before)
    rnd = random.Random(seed)
    for round_no in range(rounds):
        with LoggedServer(*serve_args(tmp_path, image, cache_tables)) as server:
            assert _read_through_server(server.port) == before, "qcownbd and QEMU disagree"
            writer = PipelinedWriter(server.port, seed * 1000 + round_no,
                                     round_no * WINDOW % SIZE, can_trim=not backing)
            thread = threading.Thread(target=writer.run, daemon=True)
            thread.start()
            time.sleep(rnd.uniform(0.3, 1.5))
            server.kill9()
            thread.join(30)
            assert not thread.is_alive()
        assert "Traceback" not in server.stderr
        assert writer.failure is None, writer.failure
        assert writer.acked > 0 and writer.durable_writes > 0, "no heavy writes before the kill"
        assert writer.zeroed > 0, "no WRITE_ZEROES or TRIM before the kill"
        qcownbd_check(image)
        got = qemu_raw(image, tmp_path / "got.raw")
        writer.verify(got, before)
        before = got


KINDS = {"plain": (False, None), "backing": (True, None), "tiny-l2-cache": (False, 2)}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", KINDS)
def test_kill9_during_writes(tmp_path, kind):
    backing, cache_tables = KINDS[kind]
    crash_rounds(tmp_path, backing, rounds=3, seed=11 + backing, cache_tables=cache_tables)


@pytest.mark.long
@pytest.mark.timeout(900)
@pytest.mark.parametrize("kind", KINDS)
def test_kill9_during_writes_long(tmp_path, kind):
    backing, cache_tables = KINDS[kind]
    crash_rounds(tmp_path, backing, rounds=20, seed=101 + backing, cache_tables=cache_tables)
