"""The disk tier's record files: round trips, and every damaged record read as corrupt (never
loaded), a writer killed mid-write leaving no record, the start-up scan and LRU capacity."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kvbridge.offload.disk import io as disk_io
from kvbridge.offload.disk.index import DiskIndex, scan
from kvbridge.offload.disk.io import RecordIO, probe_direct
from kvbridge.offload.disk.record import CorruptRecord, record_path, record_size
from kvbridge.offload.disk.worker import _write_namespace_file

NS = bytes(range(16))
ALIGN = 4096


def payload(n_parts: int, part_bytes: int, seed: int) -> list[memoryview]:
    rng = np.random.default_rng(seed)
    return [memoryview(rng.integers(0, 256, part_bytes, dtype=np.uint8)) for _ in range(n_parts)]


def empty_like(parts: list[memoryview]) -> list[memoryview]:
    return [memoryview(np.zeros(len(p), dtype=np.uint8)) for p in parts]


@pytest.fixture(params=["direct", "buffered"])
def io(request: pytest.FixtureRequest, tmp_path: Path) -> RecordIO:
    direct = request.param == "direct"
    if direct and probe_direct(tmp_path, ALIGN) is not None:
        pytest.skip(f"O_DIRECT refused on {tmp_path}")
    return RecordIO(NS, ALIGN, direct, max_payload=4 * 8192)


@pytest.mark.parametrize("part_bytes", [8192, 100])  # in place (aligned) and staged (padded)
def test_round_trip(io: RecordIO, tmp_path: Path, part_bytes: int) -> None:
    parts = payload(3, part_bytes, seed=1)
    path = record_path(tmp_path, 0, b"\xab" * 16)
    size = io.write(path, 0, b"\xab" * 16, parts)
    assert size == os.path.getsize(path) == record_size(3 * part_bytes, ALIGN)
    out = empty_like(parts)
    assert io.read(path, 0, b"\xab" * 16, out) == size
    assert [bytes(p) for p in out] == [bytes(p) for p in parts]
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


def _written(io: RecordIO, tmp_path: Path) -> tuple[Path, list[memoryview]]:
    parts = payload(2, 8192, seed=2)
    path = record_path(tmp_path, 1, b"\x01" * 16)
    io.write(path, 1, b"\x01" * 16, parts)
    return path, parts


@pytest.mark.parametrize("offset", [0, 20, 50, ALIGN + 5, ALIGN + 8191, ALIGN + 16383])
def test_flipped_byte_is_corrupt(io: RecordIO, tmp_path: Path, offset: int) -> None:
    path, parts = _written(io, tmp_path)
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptRecord):
        io.read(path, 1, b"\x01" * 16, empty_like(parts))


@pytest.mark.parametrize("keep", [0, 100, ALIGN, ALIGN + 8192])
def test_truncated_record_is_corrupt(io: RecordIO, tmp_path: Path, keep: int) -> None:
    path, parts = _written(io, tmp_path)
    os.truncate(path, keep)
    with pytest.raises(CorruptRecord):
        io.read(path, 1, b"\x01" * 16, empty_like(parts))


def test_record_of_another_block_namespace_or_size_is_corrupt(io: RecordIO, tmp_path: Path) -> None:
    path, parts = _written(io, tmp_path)
    other = record_path(tmp_path, 1, b"\x02" * 16)
    other.parent.mkdir(parents=True, exist_ok=True)
    other.write_bytes(path.read_bytes())  # a record copied under another block's name
    with pytest.raises(CorruptRecord, match="another block"):
        io.read(other, 1, b"\x02" * 16, empty_like(parts))
    stranger = RecordIO(bytes(16), ALIGN, io.direct, 4 * 8192)
    with pytest.raises(CorruptRecord, match="namespace"):
        stranger.read(path, 1, b"\x01" * 16, empty_like(parts))
    with pytest.raises(CorruptRecord):  # this spec's blocks have another size
        io.read(path, 1, b"\x01" * 16, empty_like(payload(3, 8192, seed=0)))
    with pytest.raises(FileNotFoundError):
        io.read(record_path(tmp_path, 0, b"\x09" * 16), 0, b"\x09" * 16, empty_like(parts))


def test_writer_killed_mid_write_leaves_no_record(tmp_path: Path) -> None:
    """A writer process SIGKILLed inside its write: readers see no record, only a temporary
    file, which the start-up scan removes once stale."""
    code = textwrap.dedent(
        f"""
        import os, sys, time
        import numpy as np
        from pathlib import Path
        from kvbridge.offload.disk.io import RecordIO
        from kvbridge.offload.disk.record import record_path
        real = os.pwritev
        def slow(fd, bufs, offset):
            n = os.pwrite(fd, bufs[0], offset)  # the header only, then hang
            print("writing", flush=True)
            time.sleep(60)
        os.pwritev = slow
        io = RecordIO({NS!r}, {ALIGN}, False, 16384)
        path = record_path(Path({str(tmp_path)!r}), 0, b"\\x07" * 16)
        io.write(path, 0, b"\\x07" * 16, [memoryview(np.ones(16384, dtype=np.uint8))])
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "writing"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    path = record_path(tmp_path, 0, b"\x07" * 16)
    assert not path.exists()
    tmps = [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    assert len(tmps) == 1
    sizes = [record_size(16384, ALIGN)]
    found = scan(tmp_path, sizes)
    assert found.entries == [] and found.stale_tmp == []  # fresh: maybe a live writer's
    old = time.time() - 7200
    os.utime(tmps[0], (old, old))
    assert scan(tmp_path, sizes).stale_tmp == tmps


def test_scan_finds_records_oldest_first_and_flags_wrong_sizes(tmp_path: Path) -> None:
    io = RecordIO(NS, ALIGN, False, 8192)
    keys = [(0, bytes([i]) * 16) for i in range(3)]
    for i, (g, h) in enumerate(keys):
        path = record_path(tmp_path, g, h)
        io.write(path, g, h, payload(1, 8192, seed=i))
        os.utime(path, (1000 + 10 * (3 - i), 1000 + 10 * (3 - i)))  # newest first
    os.truncate(record_path(tmp_path, *keys[1]), 5000)
    (tmp_path / "ab").mkdir(exist_ok=True)
    (tmp_path / "ab" / "not-a-record.txt").write_text("x")
    found = scan(tmp_path, [record_size(8192, ALIGN)])
    assert [k for k, _, _ in found.entries] == [keys[2], keys[0]]
    assert found.wrong_size == [keys[1]]


def test_index_lru_capacity_pins_and_writes() -> None:
    index = DiskIndex(capacity_bytes=300)
    a, b, c, d = ((0, bytes([i])) for i in range(4))
    assert index.reserve(a, 100) == [] and not index.has(a)
    index.commit(a)
    assert index.add_ready(b, 100) == [] and index.has(b)
    assert index.reserve(c, 100) == []  # full now; c is being written
    index.touch(a)  # b is the oldest use
    index.pin(a)
    assert index.reserve(d, 100) == [b]
    assert index.reserve((0, b"e"), 100) is None  # a pinned, c and d writing: no room
    index.unpin(a)
    index.commit(c)
    assert index.reserve((0, b"e"), 150) == [c, a]  # c was reserved before a was used
    index.check_integrity()
    assert index.used_bytes == 250


def test_reader_never_sees_a_torn_record_while_another_writer_replaces_it(tmp_path: Path) -> None:
    """Two servers on one directory: one rewrites a record (two payloads in turn) while the
    other reads it; every read is one payload whole, never torn, never an error."""
    writer = RecordIO(NS, ALIGN, False, 4 * 8192)
    reader = RecordIO(NS, ALIGN, False, 4 * 8192)
    key = b"\x05" * 16
    path = record_path(tmp_path, 0, key)
    versions = [payload(4, 8192, seed=s) for s in (1, 2)]
    writer.write(path, 0, key, versions[0])
    stop = threading.Event()

    def rewrite() -> None:
        i = 0
        while not stop.is_set():
            writer.write(path, 0, key, versions[i % 2])
            i += 1

    thread = threading.Thread(target=rewrite)
    thread.start()
    seen = set()
    try:
        for _ in range(300):
            out = empty_like(versions[0])
            reader.read(path, 0, key, out)
            got = b"".join(bytes(p) for p in out)
            assert got in {b"".join(bytes(p) for p in v) for v in versions}
            seen.add(got[:8])
    finally:
        stop.set()
        thread.join()
    assert len(seen) == 2  # both versions were read while the writer replaced the file


def test_a_removed_directory_is_made_again_on_the_next_write(tmp_path: Path) -> None:
    io = RecordIO(NS, ALIGN, False, 8192)
    parts = payload(1, 8192, seed=3)
    first = record_path(tmp_path / "ns", 0, b"\x0a" * 16)
    io.write(first, 0, b"\x0a" * 16, parts)
    shutil.rmtree(tmp_path / "ns")  # an operator cleaned the cache directory
    io.write(first, 0, b"\x0a" * 16, parts)
    out = empty_like(parts)
    io.read(first, 0, b"\x0a" * 16, out)
    assert bytes(out[0]) == bytes(parts[0])


def test_records_are_readable_by_their_owner_only(tmp_path: Path) -> None:
    io = RecordIO(NS, ALIGN, False, 8192)
    path = record_path(tmp_path, 0, b"\x0b" * 16)
    io.write(path, 0, b"\x0b" * 16, payload(1, 8192, seed=4))
    assert path.stat().st_mode & 0o777 == 0o600


def test_scan_indexes_a_record_only_where_its_name_puts_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Stray copies (another shard, a non-canonical group number) are skipped with one
    warning: indexed twice, a key made the start-up's ``reserve`` raise."""
    io = RecordIO(NS, ALIGN, False, 8192)
    key = (1, b"\xab" * 16)
    path = record_path(tmp_path, *key)
    io.write(path, *key, payload(1, 8192, seed=5))
    (tmp_path / "zz").mkdir()
    shutil.copy(path, tmp_path / "zz" / path.name)
    shutil.copy(path, path.parent / path.name.replace(".g1.", ".g01."))
    with caplog.at_level("WARNING", logger="kvbridge.offload.disk.index"):
        found = scan(tmp_path, [1, record_size(8192, ALIGN)])
    assert [k for k, _, _ in found.entries] == [key] and found.wrong_size == []
    warnings = [r for r in caplog.records if "not where their name puts them" in r.message]
    assert len(warnings) == 1 and "2 record file(s)" in warnings[0].message


def test_two_writers_with_one_pid_and_thread_id_never_share_a_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Servers in two containers may run with the same pid and thread id: one writing the
    same record in the middle of the other's write must not take its temporary file (the
    first write's rename would then fail)."""
    first, second = RecordIO(NS, ALIGN, False, 8192), RecordIO(NS, ALIGN, False, 8192)
    key = b"\x0c" * 16
    path = record_path(tmp_path, 0, key)
    versions = [payload(1, 8192, seed=s) for s in (6, 7)]
    real = os.pwritev
    nested = []

    def pwritev(fd: int, bufs: Sequence[memoryview], offset: int) -> int:
        if not nested:  # the first write is under way: the other server writes it whole
            nested.append(1)
            second.write(path, 0, key, versions[1])
        return real(fd, bufs, offset)

    monkeypatch.setattr(disk_io.os, "pwritev", pwritev)
    first.write(path, 0, key, versions[0])
    out = empty_like(versions[0])
    first.read(path, 0, key, out)
    assert bytes(out[0]) == bytes(versions[0][0])
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


def test_namespace_file_survives_another_server_writing_it_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two servers (one pid, in two containers) write namespace.json at once, or the other
    one wins the rename: start-up never fails, and the file is whole."""
    fields: dict[str, object] = {"model_name": "m", "format": 1}
    real = json.dump
    nested = []

    def dump(obj: object, f: Any, **kw: Any) -> None:
        if not nested:  # mid-write, the other server writes the file whole
            nested.append(1)
            _write_namespace_file(tmp_path, fields)
        real(obj, f, **kw)

    real_replace, renamed = os.replace, []

    def spy(src: str, dst: str) -> None:
        renamed.append(src)
        real_replace(src, dst)

    monkeypatch.setattr(json, "dump", dump)
    monkeypatch.setattr(os, "replace", spy)
    _write_namespace_file(tmp_path, fields)
    assert json.loads((tmp_path / "namespace.json").read_text()) == fields
    assert len(set(renamed)) == 2  # each writer its own temporary file
    monkeypatch.setattr(json, "dump", real)
    (tmp_path / "namespace.json").unlink()

    def replace(src: str, dst: str) -> None:  # the other server renamed first, ours is gone
        Path(dst).write_text(json.dumps(fields))
        os.unlink(src)
        raise FileNotFoundError(src)

    monkeypatch.setattr(os, "replace", replace)
    _write_namespace_file(tmp_path, fields)
    assert json.loads((tmp_path / "namespace.json").read_text()) == fields
    assert [p.name for p in tmp_path.iterdir()] == ["namespace.json"]
