"""One remote load's state in the consumer's ``KVReader``, and the reader's settings."""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Literal

from kvbridge.copy.backend import CopyHandle
from kvbridge.nixl import stats as keys
from kvbridge.nixl.board_reads import BoardCheck
from kvbridge.nixl.handshake import NixlAgentMetadata
from kvbridge.nixl.lease_proof import LeaseProof
from kvbridge.nixl.metadata import RecvSpec
from kvbridge.nixl.remotes import RemoteEngine
from kvbridge.nixl.transfers import ReadPlan
from kvbridge.nixl.transport import XferHandle

# "drain": failed, its READ not yet cancelled (a release failed); ends once it is
Phase = Literal["connect", "gate", "read", "confirm", "land", "drain"]
# phase -> (the stats key a failure in it counts, what it waited for)
TIMEOUT_KEYS: dict[Phase, tuple[str, str]] = {
    "connect": (keys.FAILED_HANDSHAKES, "handshake"),
    "gate": (keys.FAILED_CONFIRMS, "waiting for the producer to stage the blocks"),
    "read": (keys.FAILED_TRANSFERS, "READ"),
    "confirm": (keys.FAILED_CONFIRMS, "lease confirmation"),
}


@dataclass
class Load:
    """Runs in a consumer worker, one per load; what ``KVReader`` knows of it."""

    spec: RecvSpec
    deadline: float
    endpoint: tuple[str, int]  # the producer's side channel (this worker's rank)
    reader: str  # this load's name in its lease questions and its "done"
    phase: Phase = "connect"
    future: Future[NixlAgentMetadata] | None = None
    remote: RemoteEngine | None = None  # bound (counted in its inflight) in gate and read,
    # and in confirm while its board READ runs
    instance_id: str = ""  # the producer instance read from
    handle: XferHandle | None = None
    board: BoardCheck | None = None  # its board READ, after the READ (remote still bound)
    plan: ReadPlan | None = None
    posted_wall: float = 0.0
    in_post_s: float | None = None  # a READ that ended inside its post: the post's seconds
    phase_wall: float = 0.0  # perf_counter() when confirm / land began
    proof: LeaseProof = field(default_factory=LeaseProof)
    landing: CopyHandle | None = None
    aborted: bool = False
    report: bool = True  # an aborted load is still reported in finished_recving when it ends
    foreign: bool = False  # the producer's blocks are not this load's KV: never end its lease
    failure_counted: bool = False  # a failure of this load is in the stats (one per load)
    drain_reason: str = ""  # why a draining load failed (reported once its READ is cancelled)

    def question(self) -> dict[str, Any]:
        """``LeaseConfirmer.ask``'s arguments for this load's lease (but the key and time)."""
        spec = self.spec
        return {
            "endpoint": self.endpoint,
            "engine_id": spec.remote_engine_id,
            "instance_id": self.instance_id,
            "request_id": spec.remote_request_id,
            "prompt_hash": spec.prompt_hash,
            "reader": self.reader,
        }


@dataclass(frozen=True)
class ReaderConfig:
    """Timeout and merging switch of the consumer's reader."""

    transfer_timeout_s: float
    merge_contiguous_blocks: bool
    slow_transfer_s: float
