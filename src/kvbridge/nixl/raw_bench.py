"""Raw NIXL READ throughput between two processes: the same-run baseline of ``kvbridge bench nixl``.

``run_raw_read`` spawns a target process (registers ``num_blocks`` blocks of ``block_bytes``) and a
reader process (registers as many, loads the target's agent metadata, then READs the chosen
blocks, ``descs_per_xfer`` block descriptors per transfer, all transfers posted back to back).
One iteration = make transfers + post + poll to DONE + release, so it costs what a connector's
read costs. ``probe_ucx_lanes`` reruns a small read with ``UCX_PROTO_INFO=y`` and reports which
UCX transports served it (the VRAM path can silently fall back to ``tcp``).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import re
import tempfile
import time
from collections.abc import Mapping, Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import msgspec

from kvbridge.nixl.transport import LOCAL_AGENT, NixlTransport, XferHandle

if TYPE_CHECKING:
    import torch


class RawReadResult(NamedTuple):
    """Timings of ``iters`` timed iterations, each reading ``bytes_per_iter`` bytes."""

    block_bytes: int
    num_blocks_read: int
    descs_per_xfer: int
    xfers_per_iter: int
    nixl_descs_per_iter: int  # descriptors NIXL actually used after merging contiguous ones
    bytes_per_iter: int
    seconds: tuple[float, ...]

    @property
    def gb_per_s(self) -> float:
        return self.bytes_per_iter * len(self.seconds) / sum(self.seconds) / 1e9

    @property
    def best_gb_per_s(self) -> float:
        return self.bytes_per_iter / min(self.seconds) / 1e9


class UcxLanes(NamedTuple):
    """UCX protocol choices seen by the reader: lanes per operation, and every table parsed."""

    read: tuple[str, ...]
    write: tuple[str, ...]
    tables: dict[str, list[tuple[str, str, str]]]  # title -> (size range, protocol, lanes)


class _TargetInfo(msgspec.Struct):
    agent_metadata: bytes
    base_addr: int


class _ReaderReport(msgspec.Struct):
    seconds: list[float]
    xfers_per_iter: int
    nixl_descs_per_iter: int
    error: str = ""


def run_raw_read(
    block_bytes: int,
    num_blocks: int,
    descs_per_xfer: int,
    iters: int,
    *,
    block_ids: Sequence[int] | None = None,
    warmup: int = 1,
    env: Mapping[str, str] | None = None,
    reader_env: Mapping[str, str] | None = None,
    capture_path: str | None = None,
    timeout_s: float = 300.0,
) -> RawReadResult:
    """Time ``iters`` READs of ``block_ids`` (default: all blocks) from one process into another.

    Block ``i`` of the target lands in block ``i`` of the reader. ``env`` is applied in both
    processes before NIXL starts (UCX reads its settings then), ``reader_env`` in the reader only;
    ``capture_path`` receives the reader's stdout/stderr (UCX logs there).
    """
    ids = list(range(num_blocks)) if block_ids is None else [int(b) for b in block_ids]
    _check_args(block_bytes, num_blocks, descs_per_xfer, iters, warmup, ids)
    ctx = mp.get_context("spawn")
    peer_a, peer_b = ctx.Pipe()
    report_rx, report_tx = ctx.Pipe(duplex=False)
    target_env = dict(env or {})
    target = ctx.Process(
        target=_target_main, args=(peer_a, block_bytes, num_blocks, target_env), daemon=True
    )
    reader = ctx.Process(
        target=_reader_main,
        args=(peer_b, report_tx, block_bytes, num_blocks, {**target_env, **(reader_env or {})}),
        kwargs={
            "ids": ids,
            "descs_per_xfer": descs_per_xfer,
            "iters": iters,
            "warmup": warmup,
            "capture_path": capture_path,
        },
        daemon=True,
    )
    target.start()
    reader.start()
    try:
        if not report_rx.poll(timeout_s):
            raise TimeoutError(f"raw NIXL read did not finish within {timeout_s} s")
        report = msgspec.msgpack.decode(report_rx.recv_bytes(), type=_ReaderReport)
    except EOFError as exc:
        raise RuntimeError(f"raw NIXL reader died (exit code {reader.exitcode})") from exc
    finally:
        for proc in (reader, target):
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
    if report.error:
        raise RuntimeError(f"raw NIXL read failed: {report.error}")
    return RawReadResult(
        block_bytes=block_bytes,
        num_blocks_read=len(ids),
        descs_per_xfer=descs_per_xfer,
        xfers_per_iter=report.xfers_per_iter,
        nixl_descs_per_iter=report.nixl_descs_per_iter,
        bytes_per_iter=len(ids) * block_bytes,
        seconds=tuple(report.seconds),
    )


def probe_ucx_lanes(
    block_bytes: int = 1 << 20, num_blocks: int = 8, env: Mapping[str, str] | None = None
) -> UcxLanes:
    """Which UCX lanes serve a two-process DRAM READ (``UCX_PROTO_INFO=y`` on the reader)."""
    with tempfile.TemporaryDirectory(prefix="kvbridge-ucx-") as tmp:
        log = Path(tmp) / "reader.log"
        run_raw_read(
            block_bytes,
            num_blocks,
            num_blocks,
            1,
            env=env,
            reader_env={"UCX_PROTO_INFO": "y"},
            capture_path=str(log),
        )
        return parse_ucx_proto_info(log.read_text(errors="replace"))


def _check_args(
    block_bytes: int, num_blocks: int, descs_per_xfer: int, iters: int, warmup: int, ids: list[int]
) -> None:
    for name, value in (
        ("block_bytes", block_bytes),
        ("num_blocks", num_blocks),
        ("descs_per_xfer", descs_per_xfer),
        ("iters", iters),
    ):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    if not ids or not all(0 <= b < num_blocks for b in ids):
        raise ValueError(f"block_ids must be a non-empty list of ids in [0, {num_blocks})")


_LOG_PREFIX = re.compile(r"^\[[^\]]*\]\s*\[[^\]]*\]\s*")


def parse_ucx_proto_info(text: str) -> UcxLanes:
    """Parse the protocol tables UCX prints with ``UCX_PROTO_INFO=y``."""
    tables: dict[str, list[tuple[str, str, str]]] = {}
    title: list[str] = []
    current: str | None = None
    last = ""
    for line in text.splitlines():
        body = _LOG_PREFIX.sub("", line).strip()
        if not body.startswith("|"):
            continue
        cells = [cell.strip() for cell in body.strip("|").split("|")]
        if len(cells) == 1:
            title = title if last == "title" else []
            title.append(cells[0])
            last = "title"
        elif cells == ["Range", "Description", "Config"]:
            current = " / ".join(title)
            tables.setdefault(current, [])
            last = "header"
        elif len(cells) == 3 and current is not None:
            tables[current].append((cells[0], cells[1], cells[2]))
            last = "row"

    def lanes(op: str) -> tuple[str, ...]:
        found = {row[2] for name, rows in tables.items() if op in name for row in rows}
        return tuple(sorted(found))

    return UcxLanes(lanes("remote memory read"), lanes("remote memory write"), tables)


# -- the two processes ---------------------------------------------------------------------------
def _target_main(peer: Connection, block_bytes: int, num_blocks: int, env: dict[str, str]) -> None:
    os.environ.update(env)
    from kvbridge.nixl.wrapper import NixlWrapper

    nixl = NixlWrapper("raw-bench-target")
    data = _pattern(block_bytes, range(num_blocks))
    reg = nixl.get_reg_descs([(data.data_ptr(), data.nbytes, 0)], "DRAM")
    nixl.register_memory(reg)
    peer.send_bytes(msgspec.msgpack.encode(_TargetInfo(nixl.get_agent_metadata(), data.data_ptr())))
    try:
        peer.recv_bytes()  # the reader is done (or gone: EOFError)
    except EOFError:
        pass
    nixl.deregister_memory(reg)
    nixl.close()


def _reader_main(
    peer: Connection,
    report: Connection,
    block_bytes: int,
    num_blocks: int,
    env: dict[str, str],
    *,
    ids: list[int],
    descs_per_xfer: int,
    iters: int,
    warmup: int,
    capture_path: str | None,
) -> None:
    os.environ.update(env)
    if capture_path:
        fd = os.open(capture_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
    try:
        result = _read_loop(peer, block_bytes, num_blocks, ids, descs_per_xfer, iters, warmup)
    except Exception as exc:  # reported to the parent, which raises it
        result = _ReaderReport([], 0, 0, error=f"{type(exc).__name__}: {exc}")
    report.send_bytes(msgspec.msgpack.encode(result))
    peer.send_bytes(b"done")


def _read_loop(
    peer: Connection,
    block_bytes: int,
    num_blocks: int,
    ids: list[int],
    descs_per_xfer: int,
    iters: int,
    warmup: int,
) -> _ReaderReport:
    import torch

    from kvbridge.nixl.wrapper import NixlWrapper

    nixl = NixlWrapper("raw-bench-reader")
    try:
        local = torch.zeros(num_blocks * block_bytes, dtype=torch.uint8)
        reg = nixl.get_reg_descs([(local.data_ptr(), local.nbytes, 0)], "DRAM")
        nixl.register_memory(reg)
        if not peer.poll(60):
            raise TimeoutError("target never published its metadata")
        info = msgspec.msgpack.decode(peer.recv_bytes(), type=_TargetInfo)
        remote_name = nixl.add_remote_agent(info.agent_metadata)
        far = [(info.base_addr + b * block_bytes, block_bytes, 0) for b in range(num_blocks)]
        near = [(local.data_ptr() + b * block_bytes, block_bytes, 0) for b in range(num_blocks)]
        remote_dl = nixl.prep_xfer_dlist(remote_name, nixl.get_xfer_descs(far, "DRAM"))
        local_dl = nixl.prep_xfer_dlist(LOCAL_AGENT, nixl.get_xfer_descs(near, "DRAM"))
        chunks = [ids[i : i + descs_per_xfer] for i in range(0, len(ids), descs_per_xfer)]

        seconds: list[float] = []
        nixl_descs = 0
        for it in range(warmup + iters):
            start = time.perf_counter()
            handles = [
                nixl.make_prepped_xfer("READ", local_dl, chunk, remote_dl, chunk)
                for chunk in chunks
            ]
            for handle in handles:
                if nixl.transfer(handle) == "ERR":
                    raise RuntimeError("transfer failed on post")
            _wait_all(nixl, handles)
            elapsed = time.perf_counter() - start
            if it == 0:
                telemetry = [nixl.get_xfer_telemetry(h) for h in handles]
                nixl_descs = sum(t.desc_count for t in telemetry if t is not None)
            for handle in handles:
                nixl.release_xfer_handle(handle)
            if it >= warmup:
                seconds.append(elapsed)

        if not torch.equal(local.view(num_blocks, block_bytes)[ids], _pattern(block_bytes, ids)):
            raise RuntimeError("bytes read differ from the target's pattern")
        nixl.release_dlist_handle(local_dl)
        nixl.release_dlist_handle(remote_dl)
        nixl.remove_remote_agent(remote_name)
        nixl.deregister_memory(reg)
        return _ReaderReport(seconds, len(chunks), nixl_descs)
    finally:
        nixl.close()


def _wait_all(nixl: NixlTransport, handles: list[XferHandle], timeout_s: float = 120.0) -> None:
    pending = list(handles)
    deadline = time.monotonic() + timeout_s
    while pending:
        state = nixl.check_xfer_state(pending[-1])
        if state == "ERR":
            raise RuntimeError("transfer ended in ERR")
        if state == "DONE":
            pending.pop()
        elif time.monotonic() > deadline:
            raise TimeoutError(f"{len(pending)} transfers still in flight after {timeout_s} s")


def _pattern(block_bytes: int, ids: Sequence[int]) -> torch.Tensor:
    """Blocks ``ids`` of the target's content: a byte ramp shifted by the block id."""
    import torch

    ramp = (torch.arange(block_bytes, dtype=torch.int32) % 251).to(torch.uint8)
    shift = (torch.tensor(list(ids), dtype=torch.int64) % 256).to(torch.uint8)
    return ramp.unsqueeze(0) + shift.unsqueeze(1)
