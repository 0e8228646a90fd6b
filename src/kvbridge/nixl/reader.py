"""KVReader: the consumer's remote loads, from handshake to blocks the engine may use.

Per request, the phases of ``Load.phase`` (``load_state``)::

    connect  handshake in the background, attach the remote engine (once per engine)
    gate     (the producer stages through host memory) wait for its lease to be "held"
    read     one READ, polled, while asking the producer how long its lease stays held:
             DONE -> land if the answer in hand proves the lease held until the READ was
             seen done, else confirm; ERR -> fail
    confirm  READ the producer's lease board (``lease_board``): its word there -> land; else
             (or no board) wait for the answer to the question asked with the READ, or ask
             again: "held" or "done" -> land; anything else, or no answer in time -> fail.
             "done" goes to the producer once nothing reads it for the load any more
    land     (this engine stages through host memory) copy host -> cache blocks
    => finished_recving; a failed load also reports its blocks as load errors

The question asked with the READ (or the gate's) usually settles it: its answer "held for at
least R more seconds" covers the READ, so the confirmation costs no round trip of its own.
When it has not come yet (a READ shorter than the round trip), the board READ settles it
without waiting. A load from a producer with a board asks right after posting its READ, not
before (the question's socket and send would delay the READ), and not at all when the READ
ended inside its post and the board READ after it found the load's word. Which answers prove
what is ``LeaseProof``'s to decide; what a board word proves, ``lease_board``'s.

Each of connect, gate, read and confirm is bounded by ``transfer_timeout_s`` (connect to
read from the load's start, confirm from the READ's end); a producer found gone fails its
loads at once. An abort (the request ended) is reported in finished_recving, without load
errors, once nothing writes into its blocks. Every path releases its transfer handle.
"""

from __future__ import annotations

import logging
import time

from kvbridge.nixl import stats as keys
from kvbridge.nixl.board_reads import BoardCheck
from kvbridge.nixl.lease_board import BoardVerdict, board_verdict, bucket_of, lease_word
from kvbridge.nixl.lease_confirm import NOT_OURS, Settled
from kvbridge.nixl.load_book import LoadBook
from kvbridge.nixl.load_state import TIMEOUT_KEYS, Load
from kvbridge.nixl.metadata import RecvSpec, reader_token
from kvbridge.nixl.read_stats import record_read
from kvbridge.nixl.remotes import TRANSPORT_ERRORS, RemoteEngine
from kvbridge.nixl.transport import XferState

logger = logging.getLogger(__name__)


class KVReader(LoadBook):
    """Runs in a consumer worker; owns the in-flight loads: their READs and copies."""

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
        if recv.phase in ("connect", "gate") or (recv.phase == "read" and not report):
            # preempted mid-READ: the engine freed the blocks (and may reuse them at once), so
            # the READ is cancelled now, not awaited
            self._fail(recv, "aborted")
        elif recv.phase == "confirm":
            self._end(recv)
        # read / land / drain: ends when the READ / copy does (or is cancelled)

    # -- progress -------------------------------------------------------------------------------
    def poll(self, now: float) -> None:
        for freed in self._xfers.retry_zombies():
            self.engines.unbind(freed)
        self._fail_gone()
        self._detach_stale()
        if not self._recvs:  # no load: no question open, nothing to post, time or renew
            return
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
            elif recv.phase == "drain":
                self.retry_drain(recv)
            else:  # gate, confirm: the answer first (it may be to the question asked with
                if answer is not None:  # the READ, which a question asked now would outdate)
                    self._settle(recv, answer, now)
                if recv.board is not None:
                    self._on_board(recv, self._xfers.state(recv.board.handle, "board"), now)
        if ready:
            self._post_ready(ready, now)
        for recv in list(self._recvs.values()):
            if recv.phase not in ("land", "drain") and now > recv.deadline:
                key, what = TIMEOUT_KEYS[recv.phase]
                if recv.phase == "read" and recv.remote is not None:
                    recv.remote.stale = True
                self._count_failure(recv, key)
                self._fail(recv, f"timed out after {self._cfg.transfer_timeout_s:g}s ({what})")
        bound = [r.spec for r in self._recvs.values() if r.remote is not None and not r.aborted]
        self.engines.heartbeat(now, [(s.remote_engine_id, s.remote_request_id) for s in bound])
        self.confirmer.send_due(now)
        self._detach_stale()  # a producer whose READ failed above is released in this step

    def _post_ready(self, ready: list[tuple[Load, RemoteEngine]], now: float) -> None:
        """Post the READs, asking about their leases first (the answer comes while they run),
        except for loads a board READ may settle: asked right after the post, unless the
        READ ended inside it and the board READ landed the load already (no question)."""
        first = [recv for recv, remote in ready if not self._board_for(recv, remote)]
        for recv in first:
            self._ask(recv, now)
        if first:
            self.confirmer.send_due(max(now, self._clock()))  # stamped as late as is true
        for recv, remote in ready:
            self._post(recv, remote, now)
        late = [
            recv
            for recv, _ in ready
            if recv not in first
            and self._recvs.get(recv.spec.request_id) is recv
            and recv.phase in ("read", "confirm")
            and not self.confirmer.is_open(recv.spec.request_id)
        ]
        for recv in late:  # a board READ still running: its READ is over, asked after it
            self._ask(recv, now, after_read=recv.phase == "confirm")
        if late:
            self.confirmer.send_due(max(now, self._clock()))

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
                elif recv.phase not in ("land", "drain") and recv.instance_id == instance_id:
                    self._count_failure(recv, TIMEOUT_KEYS[recv.phase][0])
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
        self._count_failure(recv, keys.FAILED_CONFIRMS)
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
            self._count_failure(recv, keys.FAILED_CONFIRMS)
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
            self._end_board(recv)  # the answer settled it first
            self._land(recv, now)
            return
        self._count_failure(recv, keys.FAILED_CONFIRMS)
        self._fail(
            recv,
            f"engine {engine}'s lease on {rid} was {verdict} when the READ ended: the blocks "
            "read may have been reused",
        )

    def _post(self, recv: Load, remote: RemoteEngine, now: float) -> None:
        spec = recv.spec
        try:
            plan = remote.plans.plan(
                self._local,
                remote.regions,
                self._group_layers,
                spec.local_block_ids,
                spec.remote_block_ids,
                merge=self._cfg.merge_contiguous_blocks,
            )
        except ValueError as e:
            self._count_failure(recv, keys.FAILED_TRANSFERS)
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
            self._count_failure(recv, keys.FAILED_TRANSFERS)
            self._fail(recv, f"posting the READ failed: {e}")
            return
        self._stats.observe(keys.POST_TIME, time.perf_counter() - start)
        recv.handle, recv.posted_wall = posted.handle, posted.posted_wall
        if posted.state == "DONE":
            recv.in_post_s = posted.post_s
        self._on_state(recv, posted.state, now)

    def _on_state(self, recv: Load, state: XferState, now: float) -> None:
        if state == "DONE":
            recv.proof.read_seen_done(self._clock())  # the READ ended before this
            self._read_done(recv, now)
        elif state == "ERR":
            if recv.remote is not None:
                recv.remote.stale = True
            self._count_failure(recv, keys.FAILED_TRANSFERS)
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
            in_post_s=recv.in_post_s,
            slow_s=self._cfg.slow_transfer_s,
            request_id=recv.spec.request_id,
        )
        self._release_transfer(recv)
        recv.phase, recv.phase_wall = "confirm", time.perf_counter()
        recv.deadline = now + self._cfg.transfer_timeout_s
        if recv.aborted or recv.proof.covers_read or not self._post_board(recv, now):
            self._read_over(recv, now)

    def _read_over(self, recv: Load, now: float, verdict: BoardVerdict | None = None) -> None:
        """Nothing reads the producer for the load any more: unbind it and say "done"; land if
        the board's ``verdict`` or the answer in hand proves the lease held, else wait for an
        answer (asking again if the one asked with the READ is not still out)."""
        self._unbind(recv)
        self._notify_done(recv)
        if recv.aborted:
            self._end(recv)
        elif verdict == "mine" or recv.proof.covers_read:
            self._stats.incr(keys.BOARD_CONFIRMS if verdict == "mine" else keys.CONFIRMS_WITH_READ)
            self.confirmer.cancel(recv.spec.request_id)
            self._land(recv, now)
        elif not self.confirmer.is_open(recv.spec.request_id):
            self._ask(recv, now, after_read=True)

    def _board_for(self, recv: Load, remote: RemoteEngine | None) -> bool:
        """Whether a board READ can settle the load (the producer has a board we read)."""
        board = None if remote is None else remote.board
        return (
            board is not None and self.boards is not None and bool(recv.spec.remote_blocks_digest)
        )

    def _post_board(self, recv: Load, now: float) -> bool:
        """READ the load's bucket of the producer's lease board (remote still bound); False
        when there is no board to read (no board, no window free, or the post failed)."""
        remote, spec = recv.remote, recv.spec
        board = None if remote is None else remote.board
        if board is None or self.boards is None or not self._board_for(recv, remote):
            return False
        window = self.boards.take()
        if window is None:
            return False
        word = lease_word(
            board.info.salt,
            recv.instance_id,
            spec.remote_request_id,
            spec.prompt_hash,
            spec.remote_blocks_digest,
        )
        bucket = bucket_of(word, board.info.num_slots)
        try:
            posted = self._xfers.post_indices(self.boards.dlist, [window], board.dlist, [bucket])
        except TRANSPORT_ERRORS as e:
            logger.warning("board READ for %s not posted: %s", spec.request_id, e)
            self.boards.give_back(window)
            self._board_failed(recv)
            return False
        recv.board = BoardCheck(posted.handle, window, word, posted.posted_wall)
        self._on_board(recv, posted.state, now)
        return True

    def _on_board(self, recv: Load, state: XferState, now: float) -> None:
        """The board READ's state: once it ended, its verdict decides or the answer will."""
        check = recv.board
        if check is None or self.boards is None or state == "PROC":
            return
        bucket = self.boards.bucket(check.window) if state == "DONE" else None
        verdict = board_verdict(bucket, check.word)
        self._stats.observe(keys.BOARD_READ_TIME, time.perf_counter() - check.posted_wall)
        if state == "ERR":  # before the drop: a handle not released there unbinds recv.remote
            self._board_failed(recv)
        elif verdict != "mine":
            self._stats.incr(keys.BOARD_MISSES)
            logger.debug("lease board: %s for %s; waiting for the answer", verdict, recv.reader)
        self._drop_board(recv)
        self._read_over(recv, now, verdict)

    def _count_failure(self, recv: Load, key: str) -> None:
        """Count a load's failure under ``key``, once per load: a board READ that failed
        and the load failing after it (its producer gone) are one failed load."""
        if not recv.failure_counted:
            recv.failure_counted = True
            self._stats.incr(key)

    def _board_failed(self, recv: Load) -> None:
        """A board READ failed as a data READ can: a failed transfer, a producer handshaken
        afresh once idle; the load waits for the answer."""
        if recv.remote is not None:
            recv.remote.stale = True
        self._count_failure(recv, keys.FAILED_TRANSFERS)
        self._stats.incr(keys.BOARD_MISSES)

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
            self._count_failure(recv, keys.FAILED_TRANSFERS)
            self._fail(recv, f"copying the blocks from the host buffer failed: {e}")
            return
        if done:
            recv.landing = None
            self._stats.observe(keys.STAGE_IN_TIME, time.perf_counter() - recv.phase_wall)
            self._end(recv)
