"""KVReader: the consumer's remote loads, from handshake to blocks the engine may use.

Per request, the phases of ``Load.phase`` (``load_state``)::

    connect  handshake in the background, attach the remote engine (once per engine)
    gate     (the producer stages through host memory) wait for its lease to be "held"
    read     one READ, polled, while asking the producer how long its lease stays held:
             DONE -> "done" notification, then land if the lease was proven held until
             the READ was seen done, else confirm; ERR -> fail
    confirm  ask the producer (again) whether its lease was held when the READ ended:
             "held" or "done" -> land; anything else, or no answer in time -> fail
    land     (this engine stages through host memory) copy host -> cache blocks
    => finished_recving; a failed load also reports its blocks as load errors

The question asked with the READ (or the gate's) usually settles it: its answer "held for at
least R more seconds" covers the READ, so the confirmation costs no round trip of its own.
Which answers prove what is ``LeaseProof``'s to decide.

Each of connect, gate, read and confirm is bounded by ``transfer_timeout_s`` (connect to
read from the load's start, confirm from the READ's end); a producer found gone fails its
loads at once. An abort (the request ended) is reported in finished_recving, without load
errors, once nothing writes into its blocks. Every path releases its transfer handle.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from kvbridge.connector.stats import KVConnectorStats
from kvbridge.connector.types import IntegrityError
from kvbridge.nixl import stats as keys
from kvbridge.nixl.lease_confirm import NOT_OURS, LeaseConfirmer, Settled
from kvbridge.nixl.load_results import LoadResults
from kvbridge.nixl.load_state import TIMEOUT_KEYS, Load, ReaderConfig
from kvbridge.nixl.metadata import RecvSpec, reader_token
from kvbridge.nixl.read_stats import record_read
from kvbridge.nixl.read_xfers import ReadXfers
from kvbridge.nixl.remotes import TRANSPORT_ERRORS, RemoteEngine, RemoteEngines
from kvbridge.nixl.staging import HostStaging
from kvbridge.nixl.transfers import KVRegions, plan_read
from kvbridge.nixl.transport import DlistHandle, NixlTransport, XferState

logger = logging.getLogger(__name__)


class KVReader:
    """Runs in a consumer worker; owns the in-flight loads: their READs and copies."""

    def __init__(
        self,
        transport: NixlTransport,
        local: KVRegions,
        local_dlist: DlistHandle,
        group_layers: list[list[int]],
        engines: RemoteEngines,
        config: ReaderConfig,
        stats: KVConnectorStats,
        confirmer: LeaseConfirmer,
        staging: HostStaging | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._t = transport
        self._clock = clock  # the clock of the ``now`` passed to ``add`` and ``poll``
        self._local = local  # the host buffer's blocks when ``staging``
        self._xfers = ReadXfers(transport, local_dlist)
        self._group_layers = group_layers
        self.engines = engines
        self._cfg = config
        self._stats = stats
        self.confirmer = confirmer
        self._staging = staging
        self._recvs: dict[str, Load] = {}  # request id -> load in progress
        self.results = LoadResults()

    # -- inputs ---------------------------------------------------------------------------------
    def add(self, spec: RecvSpec, now: float) -> None:
        if spec.request_id in self._recvs:
            logger.warning("load of %s requested twice; ignoring the second", spec.request_id)
            return
        endpoint = self.engines.endpoint(spec.remote_host, spec.remote_port)
        reader = reader_token(self._t.agent_name, spec.request_id)
        recv = Load(spec, now + self._cfg.transfer_timeout_s, endpoint, reader)
        self._recvs[spec.request_id] = recv
        if spec.fail_reason is not None:
            self._fail(recv, spec.fail_reason)

    def abort(self, request_id: str, *, report: bool = True) -> None:
        """Stop loading into the request's blocks; with ``report`` it is reported in
        finished_recving once nothing writes into them (the engine frees them then)."""
        recv = self._recvs.get(request_id)
        if recv is None:
            if report:
                self.results.ended(request_id)
            return
        recv.aborted, recv.report = True, report
        if recv.phase in ("connect", "gate"):
            self._notify_release(recv)
            self._end(recv)
        elif recv.phase == "confirm":
            self._end(recv)
        # read / land: ends when the READ / copy does

    # -- progress -------------------------------------------------------------------------------
    def poll(self, now: float) -> None:
        for freed in self._xfers.retry_zombies():
            self.engines.unbind(freed)
        self._fail_gone()
        self._detach_stale()
        answers = self.confirmer.collect(now)
        ready: list[tuple[Load, RemoteEngine]] = []  # to post, asking first (one query)
        for recv in list(self._recvs.values()):
            answer = answers.get(recv.spec.request_id)
            if recv.phase == "connect":
                remote = self._advance(recv, now)
                if remote is not None:
                    ready.append((recv, remote))
            elif recv.phase == "read":
                if answer is not None:
                    if self._not_ours(recv, answer):
                        continue
                    recv.proof.note(answer)
                if recv.handle is not None:
                    self._on_state(recv, self._xfers.state(recv.handle, recv.spec.request_id), now)
            elif recv.phase == "land":
                self._land(recv, now)
            elif answer is not None:
                self._settle(recv, answer, now)
        if ready:
            for recv, _ in ready:  # ask before posting: the answer comes while the READs run
                self._ask(recv, now)
            self.confirmer.send_due(max(now, self._clock()))  # stamped as late as is true
            for recv, remote in ready:
                self._post(recv, remote, now)
        for recv in list(self._recvs.values()):
            if recv.phase != "land" and now > recv.deadline:
                key, what = TIMEOUT_KEYS[recv.phase]
                if recv.phase == "read" and recv.remote is not None:
                    recv.remote.stale = True
                self._stats.incr(key)
                self._fail(recv, f"timed out after {self._cfg.transfer_timeout_s:g}s ({what})")
        bound = [r.spec for r in self._recvs.values() if r.remote is not None and not r.aborted]
        self.engines.heartbeat(now, [(s.remote_engine_id, s.remote_request_id) for s in bound])
        self.confirmer.send_due(now)
        self._detach_stale()  # a producer whose READ failed above is released in this step

    def _detach_stale(self) -> None:
        """Release stale producers nobody reads from (their connecting loads handshake afresh)."""
        for engine_id in self.engines.detach_idle_stale():
            for recv in self._recvs.values():
                if recv.spec.remote_engine_id == engine_id and recv.phase == "connect":
                    recv.future = None

    def _fail_gone(self) -> None:
        """Fail at once the loads that read (or confirm with) a producer instance found gone;
        loads still connecting to its engine handshake afresh."""
        for (engine_id, instance_id), why in self.engines.take_gone().items():
            for recv in list(self._recvs.values()):
                if recv.spec.remote_engine_id != engine_id or recv.aborted:
                    continue
                if recv.phase == "connect":
                    recv.future = None
                elif recv.phase != "land" and recv.instance_id == instance_id:
                    self._stats.incr(TIMEOUT_KEYS[recv.phase][0])
                    self._fail(recv, f"engine {engine_id} is gone ({why})")

    def _advance(self, recv: Load, now: float) -> RemoteEngine | None:
        """Connect; returns the remote engine once a READ may be posted from it."""
        connecting = self.engines.connect(recv.spec, recv.future)
        recv.future = connecting.future
        if connecting.error is not None:
            self._fail(recv, connecting.error)
            return None
        remote = connecting.remote
        if remote is None:
            return None
        recv.remote, recv.instance_id = remote, remote.instance_id  # bound by ``connect``
        recv.proof.bind()
        if remote.staged:
            recv.phase = "gate"
            self._ask(recv, now)
            return None
        return remote

    def _ask(self, recv: Load, now: float, *, after_read: bool = False) -> None:
        """Ask about the load's lease; ``after_read``: answers to the question asked with the
        READ no longer count."""
        if after_read:
            recv.proof.ask_after_read()
        self.confirmer.ask(recv.spec.request_id, now=now, **recv.question())

    def _not_ours(self, recv: Load, answer: Settled) -> bool:
        """Fail a load told that the blocks are not its KV (another prompt's, or spent by
        another reader); it never ends that lease, which is not its own. (A "restarted"
        producer's agent is gone: detached once idle, handshaken afresh.)"""
        if answer.verdict == "restarted":
            self.engines.mark_stale(recv.spec.remote_engine_id, recv.instance_id)
        if answer.verdict not in NOT_OURS:
            return False
        rid, engine = recv.spec.remote_request_id, recv.spec.remote_engine_id
        recv.foreign = True
        self._stats.incr(keys.FAILED_CONFIRMS)
        self._fail(recv, f"engine {engine}'s blocks for {rid} {NOT_OURS[answer.verdict]}")
        return True

    def _settle(self, recv: Load, answer: Settled, now: float) -> None:
        rid, engine = recv.spec.remote_request_id, recv.spec.remote_engine_id
        verdict = answer.verdict
        if self._not_ours(recv, answer):
            return
        if recv.phase == "gate":
            if verdict == "held" and recv.remote is not None:
                recv.proof.note(answer)
                if recv.remote.stale:  # another READ failed meanwhile: handshake afresh
                    self._unbind(recv)
                    recv.phase = "connect"
                else:
                    self._post(recv, recv.remote, now)
                return
            self._stats.incr(keys.FAILED_CONFIRMS)
            self._fail(recv, f"engine {engine} holds no staged blocks for {rid} ({verdict})")
            return
        with_read = verdict == "held" and not recv.proof.asked_after_read
        decision = recv.proof.judge(answer)
        if decision == "ask_after_read":  # the promise does not cover the READ
            self._ask(recv, now, after_read=True)
            return
        self._stats.observe(keys.CONFIRM_TIME, time.perf_counter() - recv.phase_wall)
        if decision == "land":
            if with_read:
                self._stats.incr(keys.CONFIRMS_WITH_READ)
            self._land(recv, now)
            return
        self._stats.incr(keys.FAILED_CONFIRMS)
        self._fail(
            recv,
            f"engine {engine}'s lease on {rid} was {verdict} when the READ ended: the blocks "
            "read may have been reused",
        )

    def _post(self, recv: Load, remote: RemoteEngine, now: float) -> None:
        spec = recv.spec
        try:
            plan = plan_read(
                self._local,
                remote.regions,
                self._group_layers,
                spec.local_block_ids,
                spec.remote_block_ids,
                merge=self._cfg.merge_contiguous_blocks,
            )
        except ValueError as e:
            self._fail(recv, f"bad block ids: {e}")
            return
        if plan.num_block_layers == 0:
            self._notify_done(recv)
            self._end(recv)
            return
        recv.phase, recv.plan = "read", plan
        start = time.perf_counter()
        try:
            posted = self._xfers.post(plan, remote)
        except TRANSPORT_ERRORS as e:
            # The producer may have crashed or restarted: handshake afresh next time.
            remote.stale = True
            self._stats.incr(keys.FAILED_TRANSFERS)
            self._fail(recv, f"posting the READ failed: {e}")
            return
        self._stats.observe(keys.POST_TIME, time.perf_counter() - start)
        recv.handle, recv.posted_wall = posted.handle, posted.posted_wall
        self._on_state(recv, posted.state, now)

    def _on_state(self, recv: Load, state: XferState, now: float) -> None:
        if state == "DONE":
            recv.proof.read_seen_done(self._clock())  # the READ ended before this
            self._read_done(recv, now)
        elif state == "ERR":
            if recv.remote is not None:
                recv.remote.stale = True
            self._stats.incr(keys.FAILED_TRANSFERS)
            self._fail(recv, f"READ from engine {recv.spec.remote_engine_id} ended in ERR")

    def _read_done(self, recv: Load, now: float) -> None:
        if recv.plan is None or recv.handle is None:
            raise RuntimeError(f"READ of {recv.spec.request_id} completed without a plan")
        record_read(
            self._stats,
            self._t,
            recv.handle,
            recv.plan,
            posted_wall=recv.posted_wall,
            slow_s=self._cfg.slow_transfer_s,
            request_id=recv.spec.request_id,
        )
        self._release_transfer(recv)
        self._unbind(recv)
        self._notify_done(recv)
        if recv.aborted:
            self._end(recv)
            return
        recv.phase, recv.phase_wall = "confirm", time.perf_counter()
        recv.deadline = now + self._cfg.transfer_timeout_s
        if recv.proof.covers_read:
            self._stats.incr(keys.CONFIRMS_WITH_READ)
            self.confirmer.cancel(recv.spec.request_id)
            self._land(recv, now)
        elif not self.confirmer.is_open(recv.spec.request_id):  # else the one asked with it is
            self._ask(recv, now, after_read=True)  # still out

    def _land(self, recv: Load, now: float) -> None:
        """Copy host -> cache blocks (host-staged; started once): the load ends when done."""
        if self._staging is None:
            self._end(recv)
            return
        try:
            if recv.landing is None:
                recv.phase, recv.phase_wall = "land", time.perf_counter()
                recv.landing = self._staging.stage_in(recv.spec.local_block_ids)
            done = recv.landing.done()
        except Exception as e:
            recv.landing = None
            self._fail(recv, f"copying the blocks from the host buffer failed: {e}")
            return
        if done:
            recv.landing = None
            self._stats.observe(keys.STAGE_IN_TIME, time.perf_counter() - recv.phase_wall)
            self._end(recv)

    # -- endings --------------------------------------------------------------------------------
    def _fail(self, recv: Load, reason: str) -> None:
        if not recv.aborted:
            self.results.failed(recv.spec, reason)
        if recv.phase in ("connect", "gate", "read"):  # after a READ, its "done" went out
            self._notify_release(recv)
        self._end(recv)

    def _notify_release(self, recv: Load) -> None:
        if not recv.foreign:
            spec = recv.spec
            self.engines.notify(spec.remote_engine_id, "release", [spec.remote_request_id])

    def _notify_done(self, recv: Load) -> None:
        spec = recv.spec
        self.engines.notify(
            spec.remote_engine_id, "done", [spec.remote_request_id], reader=recv.reader
        )

    def _end(self, recv: Load) -> None:
        """Release what the load holds and report it (as aborted or as received)."""
        self._release_transfer(recv)
        self._unbind(recv)
        self.confirmer.cancel(recv.spec.request_id)
        self._recvs.pop(recv.spec.request_id, None)
        if not recv.aborted or recv.report:
            self.results.ended(recv.spec.request_id)

    def _unbind(self, recv: Load) -> None:
        if recv.remote is not None:
            self.engines.unbind(recv.remote)
            recv.remote = None

    def _release_transfer(self, recv: Load) -> None:
        handle, recv.handle = recv.handle, None
        if handle is not None and not self._xfers.release(handle, recv.remote):
            recv.remote = None  # the unreleased handle keeps the remote bound

    # -- introspection and shutdown --------------------------------------------------------------
    @property
    def num_inflight(self) -> int:
        return len(self._recvs)

    def check_integrity(self) -> None:
        for remote in self.engines:
            users = sum(1 for r in self._recvs.values() if r.remote is remote)
            users += self._xfers.bound(remote)
            if users != remote.inflight:
                raise IntegrityError(
                    f"KVReader: engine {remote.engine_id} counts {remote.inflight} users, "
                    f"{users} hold it"
                )
        asking = {rid for rid, r in self._recvs.items() if r.phase in ("gate", "read", "confirm")}
        if self.confirmer.num_open > len(asking):
            raise IntegrityError("KVReader: lease questions open for loads that ended")

    def close(self) -> None:
        """Release every handle, dlist and remote agent; idempotent."""
        for recv in list(self._recvs.values()):
            if recv.landing is not None:
                try:
                    recv.landing.wait()
                except Exception as e:  # shutting down: nothing left to recover
                    logger.error("a landing copy of %s failed: %s", recv.spec.request_id, e)
            recv.aborted = True
            self._end(recv)
        for remote in self._xfers.retry_zombies():
            self.engines.unbind(remote)
        self.confirmer.close()
        self.engines.close()
        self.results.clear()
