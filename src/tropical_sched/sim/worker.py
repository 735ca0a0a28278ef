"""A simulated engine instance: iteration-level continuous batching with chunked prefill and preemption.

Unifying idea (as in vLLM v1): there are no prefill and decode phases inside the engine; each request has tokens
computed and a target, and each step gives some requests new tokens within a token budget. A decode is a request
whose prompt is computed; it gains one token per step it runs in.

Decodes are kept with lazy counters so a decode step costs O(1) however large the batch: every decode runs in
every decode step, so a request's generated tokens are ``gen_base + num_decode_steps`` and its context
``context_base + num_decode_steps``; finishing steps sit in a heap keyed by the step count at which each request
reaches its output length. A local scheduler that selects decodes (SCORPIO's credit-based batching) makes a step
cost O(B): a decode that sits a step out has its bases moved back by one and its finish entry pushed one step
later.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import math
import random
from dataclasses import dataclass, field

from tropical_sched.core.errors import SimulationError
from tropical_sched.core.request import Request
from tropical_sched.core.snapshot import DecodeBatch, PrefillState, WorkerRole, WorkerSnapshot
from tropical_sched.policies.base import EngineSettings, LocalScheduler
from tropical_sched.predictors.profile import ServingOverheads
from tropical_sched.predictors.step_time import StepTimeModel

__all__ = ["Job", "SimWorker", "StepComposition", "StepOutcome"]


class Job:
    """One request inside the simulator (mutable; the policy only ever sees snapshots of it)."""

    __slots__ = (
        "aborted",
        "context_base",
        "decode_destination",
        "decode_worker_id",
        "epoch",
        "finished_at_s",
        "first_scheduled_at_s",
        "first_token_at_s",
        "gen_base",
        "multiplexed",
        "num_computed",
        "num_generated",
        "num_output_tokens",
        "num_preemptions",
        "placed_at_s",
        "prefill_state",
        "prefill_target",
        "prefill_worker_id",
        "queue_sequence",
        "reject_reason",
        "rejected",
        "request",
        "sort_key",
    )

    def __init__(self, request: Request, num_output_tokens: int) -> None:
        self.request = request
        self.num_output_tokens = num_output_tokens  # ground truth from the trace; the policy never sees it
        self.prefill_target = request.num_prompt_tokens  # tokens to prefill (prompt + generated after a recompute)
        self.num_computed = 0
        self.num_generated = 0
        self.first_token_at_s: float | None = None
        self.first_scheduled_at_s: float | None = None
        self.finished_at_s: float | None = None
        self.prefill_worker_id: int | None = None
        self.decode_worker_id: int | None = None
        self.decode_destination: SimWorker | None = None  # chosen before the prefill (at-route placement)
        self.placed_at_s = 0.0  # when its decode worker was chosen
        self.multiplexed = False
        self.rejected = False
        self.reject_reason = ""
        self.num_preemptions = 0
        self.gen_base = 0
        self.context_base = 0
        self.epoch = 0
        self.sort_key = 0.0
        self.queue_sequence = 0  # tie-break among equal sort keys in its worker's prefill queue (enqueue order)
        self.prefill_state: PrefillState | None = None
        self.aborted = False

    def make_prefill_state(self) -> PrefillState:
        """The job as a queued prefill (cached until its computed tokens change)."""
        state = self.prefill_state
        if (
            state is None
            or state.num_computed_tokens != self.num_computed
            or state.num_prompt_tokens != self.prefill_target
        ):
            request = self.request
            state = PrefillState(
                request_id=request.request_id,
                arrival_at_s=request.arrival_at_s,
                num_prompt_tokens=self.prefill_target,
                num_computed_tokens=self.num_computed,
                ttft_slo_s=request.slo.ttft_s,
                tpot_slo_s=request.slo.tpot_s,
            )
            self.prefill_state = state
        return state


@dataclass(slots=True)
class StepOutcome:
    """What a finished step produced.

    Attributes:
        first_tokens: jobs that produced their first token in this step.
        finished: jobs that produced their last token in this step.
        handoffs: jobs whose prefill finished on a prefill worker and now need a decode worker.
        changed: whether routing-relevant state changed (a prefill or a request finished).
        tokens: every job that produced a token in this step; filled only by workers made with
            ``report_tokens=True`` (a real-time engine needs it, the simulator does not).
    """

    first_tokens: list[Job]
    finished: list[Job]
    handoffs: list[Job]
    changed: bool
    tokens: list[Job] = field(default_factory=list)


@dataclass(frozen=True, slots=True, kw_only=True)
class StepComposition:
    """What one engine step runs, in the step-time model's terms (:meth:`StepTimeModel.step_time_s`).

    Attributes:
        num_decode_seqs: decodes in the step.
        num_decode_context_tokens: sum of their context tokens.
        prefill_chunks: ``(num_prefix_tokens, num_chunk_tokens)`` per prefill chunk, in queue order.
    """

    num_decode_seqs: int
    num_decode_context_tokens: int
    prefill_chunks: tuple[tuple[int, int], ...]


class SimWorker:
    """One simulated worker.

    Args:
        worker_id: index in the cluster.
        role: what the router sends it.
        settings: engine settings (batching mode and budgets).
        local: engine-local scheduler (prefill order and per-step cap).
        step_time: the engine's step times (what its steps really take, before serving overheads).
        num_kv_cache_tokens: KV capacity, tokens.
        max_num_seqs: most sequences per step (running decodes + prefills).
        report_tokens: list the jobs that produced a token in every :class:`StepOutcome` (costs O(batch) per
            step; for real-time use such as the fake engine).
        serving: what serving the engine adds to each step (``ServingOverheads``: ``per_step_s`` to every step,
            ``per_streamed_token_s`` per token the step produces, ``per_request_s`` in the step that schedules a
            request's first chunk); its P/D hop is the simulator's business. ``None``: nothing.
        step_noise: the spread of its step times around the model's, the standard deviation of the log of a
            mean-1 log-normal factor, >= 0 (``ClusterConfig.engine_step_noise``; 0: none).
        step_noise_correlation: the factor's AR(1) coefficient from step to step, in [0, 1).
        noise_seed: seed of its noise (combined with ``worker_id``).
    """

    def __init__(
        self,
        *,
        worker_id: int,
        role: WorkerRole,
        settings: EngineSettings,
        local: LocalScheduler,
        step_time: StepTimeModel,
        num_kv_cache_tokens: int,
        max_num_seqs: int,
        report_tokens: bool = False,
        serving: ServingOverheads | None = None,
        step_noise: float = 0.0,
        step_noise_correlation: float = 0.0,
        noise_seed: int = 0,
    ) -> None:
        self.worker_id = worker_id
        # Step-time noise (ClusterConfig.engine_step_noise): log factor x_t = rho x_{t-1} + sqrt(1 - rho^2) sigma z_t,
        # stationary N(0, sigma^2); the step is multiplied by exp(x_t - sigma^2 / 2), whose mean is 1.
        self._noise_sigma = step_noise
        self._noise_rho = step_noise_correlation
        self._noise_innovation = step_noise * math.sqrt(1.0 - step_noise_correlation**2)
        self._noise_log = 0.0
        self._noise_rng = random.Random(f"{noise_seed}/{worker_id}") if step_noise else None
        if self._noise_rng is not None:  # start from the stationary distribution, not from the mean
            self._noise_log = self._noise_rng.gauss(0.0, step_noise)
        self._report_tokens = report_tokens
        self._step_decode_jobs: list[Job] = []
        self._aborted: list[Job] = []
        self.role = role
        self.settings = settings
        self.local = local
        self.step_time = step_time
        self.kv_capacity = num_kv_cache_tokens
        self.max_num_seqs = max_num_seqs
        self._keeps_decodes = role.runs_decodes
        (self._c0, self._cn, self._cp, self._ca, self._cd, self._cc) = step_time.coefficients.as_tuple()
        vr = step_time.valid_range
        self._max_b, self._max_ctx, self._max_prompt = (
            vr.max_num_decode_seqs,
            vr.max_decode_context_tokens_per_seq,
            vr.max_num_prompt_tokens,
        )
        # A served engine's steps also carry its server's work (measured by tropical-profile --endpoint as the
        # served step minus the engine's own): charged as engine time, as on an engine that shares its cores
        # with its server, so that it delays every request behind it. Zero for a profile of the engine alone.
        self._per_step_s = serving.per_step_s if serving is not None else 0.0
        self._per_token_s = serving.per_streamed_token_s if serving is not None else 0.0
        self._per_request_s = serving.per_request_s if serving is not None else 0.0
        self._served = bool(self._per_step_s or self._per_token_s or self._per_request_s)

        # What the snapshots tell the policy about this worker (the router's online calibration, when it runs):
        # its step-time model (None: the policy's own) and the P/D hop of the requests it prefills.
        self.predicted_step_time: StepTimeModel | None = None
        self.predicted_pd_hop_fixed_s = 0.0
        self.predicted_pd_hop_per_prompt_token_s = 0.0

        self._sequence = itertools.count()
        self.prefills: list[tuple[float, int, Job]] = []  # sorted by (local sort key, enqueue sequence)
        self.num_partial_prefills = 0  # prefills that hold KV but are not complete
        self.decodes: dict[str, Job] = {}  # request_id -> job, in admission order
        self.ready: list[Job] = []  # KV arrived; join the decodes at the next step start
        self.incoming: dict[str, Job] = {}  # request_id -> job whose KV is in flight to this worker
        self.num_decode_steps = 0
        self.decode_context_tokens = 0  # sum of the decodes' context tokens
        self._finish_heap: list[tuple[int, int, Job, int]] = []  # (finish step, seq, job, epoch)
        # Decodes that joined without a first token (KV from a prefill worker, first token counted after the hop):
        # their first decode step here produces it.
        self._first_pending: list[Job] = []
        self.kv_used = 0  # tokens: decodes, partial prefills, KV held for transfer, reserved for incoming
        self.max_kv_used = 0
        self.busy = False
        self.step_ends_at_s = 0.0
        self.version = 0
        self._snapshot: WorkerSnapshot | None = None
        self._decode_set_version = 0  # changes when a decode joins or leaves (not at every step)
        self._columns_version = -1
        self._columns: tuple[tuple[str, ...], tuple[float, ...], tuple[float, ...], list[int], list[int]] = (
            (),
            (),
            (),
            [],
            [],
        )
        self._snapshot_version = -1

        # The step in flight.
        self._step_decodes = 0
        self._step_context = 0  # its decodes' context tokens
        self._step_chunks: list[tuple[Job, int]] = []
        self._step_skipped: list[Job] = []  # decodes sitting this step out (local.selects_decodes)
        self.num_decode_skips = 0

        self.num_steps = 0
        self.num_preemptions = 0
        self.busy_s = 0.0

    # -- queue management ---------------------------------------------------------------------------------------

    def enqueue_prefill(self, job: Job, *, keep_place: bool = False) -> None:
        """Add a prefill to the queue (a routed request, or a preempted one to recompute).

        Args:
            job: the prefill.
            keep_place: re-queue a prefill that just ran a chunk here ahead of the prefills whose key equals its
                fresh one, as before its chunk. A started prefill that fell behind an equal one would be preempted
                to let it start (when sequence slots are short), which would then fall behind in turn: the two
                would take turns forever, each losing its progress.
        """
        job.sort_key = self.local.prefill_sort_key(job.make_prefill_state())
        if not keep_place:
            job.queue_sequence = next(self._sequence)
        bisect.insort(self.prefills, (job.sort_key, job.queue_sequence, job))
        self.version += 1

    def reserve_incoming(self, job: Job) -> None:
        """Reserve KV for a decode whose KV cache is about to be transferred here."""
        self.incoming[job.request.request_id] = job
        self.kv_used += job.prefill_target
        self._note_kv()
        self.version += 1

    def receive(self, job: Job) -> None:
        """The KV cache of ``job`` arrived: it joins the decodes at the next step."""
        del self.incoming[job.request.request_id]
        self.ready.append(job)
        self.version += 1

    def cancel_incoming(self, job: Job) -> None:
        """Drop the KV reserved for ``job``, whose KV cache will never be transferred here (it finished on its
        prefill worker: its first token was its last)."""
        del self.incoming[job.request.request_id]
        self.kv_used -= job.prefill_target
        self.version += 1

    def release_held(self, job: Job) -> None:
        """The KV cache held for ``job`` has been transferred away."""
        self.kv_used -= job.prefill_target
        self.version += 1

    def _note_kv(self) -> None:
        if self.kv_used > self.max_kv_used:
            self.max_kv_used = self.kv_used
            if self.kv_used > self.kv_capacity:
                raise SimulationError(
                    f"worker {self.worker_id}: KV usage {self.kv_used} exceeds capacity {self.kv_capacity}"
                )

    def abort(self, job: Job) -> None:
        """Stop ``job`` (a client went away): it produces no more tokens and its KV is freed at the next step."""
        if not job.aborted:
            job.aborted = True
            self._aborted.append(job)
            self.version += 1

    def _purge_aborted(self) -> None:
        steps = self.num_decode_steps
        for job in self._aborted:
            request_id = job.request.request_id
            if self.decodes.get(request_id) is job:
                context = job.context_base + steps
                del self.decodes[request_id]
                self._decode_set_version += 1
                self.decode_context_tokens -= context
                self.kv_used -= context
                job.epoch += 1  # its finish-heap entry goes stale
            elif job in self.ready:
                self.ready.remove(job)
                self.kv_used -= job.prefill_target
            else:
                for index, (_, _, queued) in enumerate(self.prefills):
                    if queued is job:
                        del self.prefills[index]
                        self.kv_used -= job.num_computed
                        if job.num_computed:
                            self.num_partial_prefills -= 1
                        break
        self._aborted.clear()

    def has_work(self) -> bool:
        """Whether a step could run now (the step itself may still find nothing schedulable)."""
        return bool(self.decodes or self.ready or self.prefills)

    # -- decodes ------------------------------------------------------------------------------------------------

    def _join_decode(self, job: Job) -> None:
        steps = self.num_decode_steps
        job.gen_base = job.num_generated - steps
        job.context_base = job.prefill_target - steps
        job.decode_worker_id = self.worker_id
        self.decodes[job.request.request_id] = job
        self._decode_set_version += 1
        self.decode_context_tokens += job.prefill_target
        finish_step = steps + job.num_output_tokens - job.num_generated
        heapq.heappush(self._finish_heap, (finish_step, next(self._sequence), job, job.epoch))
        if job.first_token_at_s is None:
            self._first_pending.append(job)

    def _preempt_last_decode(self) -> None:
        """Preempt the most recently admitted decode (vLLM's recompute preemption)."""
        _request_id, job = self.decodes.popitem()
        self._decode_set_version += 1
        steps = self.num_decode_steps
        context = job.context_base + steps
        job.num_generated = job.gen_base + steps
        self.decode_context_tokens -= context
        self.kv_used -= context
        job.epoch += 1
        job.num_preemptions += 1
        self.num_preemptions += 1
        job.prefill_target = job.request.num_prompt_tokens + job.num_generated
        job.num_computed = 0
        self.enqueue_prefill(job)

    def _preempt_last_partial_prefill(self, *, include_head: bool = False) -> bool:
        """Free the KV of the last started prefill in the queue, behind its head unless ``include_head``; returns
        whether one was found."""
        for index in range(len(self.prefills) - 1, -1 if include_head else 0, -1):
            job = self.prefills[index][2]
            if job.num_computed:
                del self.prefills[index]
                self.kv_used -= job.num_computed
                self.num_partial_prefills -= 1
                job.num_computed = 0
                job.num_preemptions += 1
                self.num_preemptions += 1
                self.enqueue_prefill(job)
                return True
        return False

    # -- stepping -----------------------------------------------------------------------------------------------

    def start_step(self, now_s: float) -> float | None:
        """Plan the next step. Returns its duration in seconds, or ``None`` if nothing can run."""
        self.version += 1
        if self._aborted:
            self._purge_aborted()
        if self.ready:
            room = self.max_num_seqs - len(self.decodes) - self.num_partial_prefills
            joining, self.ready = self.ready[: max(room, 0)], self.ready[max(room, 0) :]
            for job in joining:
                self._join_decode(job)

        settings = self.settings
        chunks: list[tuple[Job, int]] = []
        num_decodes = len(self.decodes)
        if self.prefills and not settings.enable_chunked_prefill:
            chunks = self._plan_whole_prefills()
            if chunks:
                num_decodes = 0  # prefill-prioritised: the decodes stall for this step
        if num_decodes:
            while self.kv_used + len(self.decodes) > self.kv_capacity and self.decodes:
                self._preempt_last_decode()
            num_decodes = len(self.decodes)
        skipped_context = 0
        if num_decodes and self.local.selects_decodes:
            skipped_context = self._select_decodes(now_s)
            num_decodes -= len(self._step_skipped)
        if settings.enable_chunked_prefill and self.prefills:
            chunks = self._plan_chunks(now_s, num_decodes)
            # Partial prefills can fill the KV cache with no decode left to preempt (a queue order that lets
            # newcomers overtake started prefills): preempt the lowest-priority partial ones, as vLLM does.
            while not chunks and not num_decodes and self._preempt_last_partial_prefill():
                chunks = self._plan_chunks(now_s, 0)
        if not num_decodes and not chunks and self._step_skipped:
            # Nothing else would run: a step with every decode beats an idle engine.
            self._step_skipped = []
            num_decodes, skipped_context = len(self.decodes), 0
        # Decodes whose KV arrived hold KV but no sequence slot, while the started prefills filling the slots wait
        # for KV: neither can move, and no event would wake the worker. The ready decodes go first (their KV was
        # transferred here; a started prefill is recomputed from scratch): join them if a slot is free (the
        # preemptions above may have freed one), else free one by preempting a started prefill, the head too.
        if (
            not num_decodes
            and not chunks
            and self.ready
            and (self._seq_room() > 0 or self._preempt_last_partial_prefill(include_head=True))
        ):
            return self.start_step(now_s)  # bounded: each retry joins a ready decode or preempts a prefill
        if not num_decodes and not chunks:
            self._step_decodes = 0
            self._step_chunks = []
            return None

        # Allocate KV for this step and price it: StepTimeModel.step_time_s inlined (it runs for every simulated
        # step); tests/test_prediction_consistency.py checks the two agree.
        duration_s = self._c0
        context = 0
        if num_decodes:
            context = self.decode_context_tokens - skipped_context
            self.kv_used += num_decodes
            duration_s += (self._cn + self._cd) * num_decodes + self._cc * context
            if num_decodes > self._max_b or context > num_decodes * self._max_ctx:
                self.step_time.check_decode_range(num_decodes, context)
        num_new_requests = 0
        if chunks:
            num_tokens = 0
            pairs = 0.0
            for job, chunk in chunks:
                prefix = job.num_computed
                num_tokens += chunk
                pairs += chunk * prefix + chunk * (chunk + 1) / 2
                if prefix + chunk > self._max_prompt:
                    self.step_time.warn_if_out_of_range("prompt length (tokens)", prefix + chunk, self._max_prompt)
                if job.first_scheduled_at_s is None:
                    job.first_scheduled_at_s = now_s
                    num_new_requests += 1
                if prefix == 0:
                    self.num_partial_prefills += 1
                job.prefill_worker_id = self.worker_id
            self.kv_used += num_tokens
            duration_s += self._cn * num_tokens + self._cp * len(chunks) + self._ca * pairs
        if self._served:
            # Every decode in the step streams a token, and so does every prefill it completes; a request pays
            # its own cost once, when it is first scheduled (a recompute after preemption does not).
            num_completed = sum(1 for job, chunk in chunks if job.num_computed + chunk >= job.prefill_target)
            duration_s += (
                self._per_step_s
                + self._per_token_s * (num_decodes + num_completed)
                + self._per_request_s * num_new_requests
            )
        if self._noise_rng is not None:
            self._noise_log = self._noise_rho * self._noise_log + self._noise_rng.gauss(0.0, self._noise_innovation)
            duration_s *= math.exp(self._noise_log - 0.5 * self._noise_sigma**2)
        self._note_kv()
        # The chunks are always a prefix of the queue (planning stops at the first prefill it cannot take); they
        # leave the queue while they run and partial ones are re-queued with a fresh key when the step ends.
        del self.prefills[: len(chunks)]
        if self._report_tokens:
            skipped = set(map(id, self._step_skipped))
            self._step_decode_jobs = [j for j in self.decodes.values() if id(j) not in skipped] if num_decodes else []
        self._step_decodes = num_decodes
        self._step_context = context
        self._step_chunks = chunks
        self.busy = True
        self.step_ends_at_s = now_s + duration_s
        self.num_steps += 1
        self.busy_s += duration_s
        return duration_s

    @property
    def step_in_flight(self) -> StepComposition:
        """What the step in flight runs (from :meth:`start_step` to :meth:`finish_step`); empty when idle."""
        if not self.busy:
            return StepComposition(num_decode_seqs=0, num_decode_context_tokens=0, prefill_chunks=())
        return StepComposition(
            num_decode_seqs=self._step_decodes,
            num_decode_context_tokens=self._step_context if self._step_decodes else 0,
            prefill_chunks=tuple((job.num_computed, chunk) for job, chunk in self._step_chunks),
        )

    @property
    def num_decodes_in_flight(self) -> int:
        """Decodes in the step in flight (0 when idle)."""
        return self._step_decodes if self.busy else 0

    @property
    def decode_context_tokens_in_flight(self) -> int:
        """Their context tokens, summed (0 when idle)."""
        return self._step_context if self.busy and self._step_decodes else 0

    @property
    def chunks_in_flight(self) -> list[tuple[Job, int]]:
        """The prefill chunks of the step in flight, ``(job, chunk tokens)`` in queue order, empty when idle; the
        worker's own list, not to be changed."""
        return self._step_chunks if self.busy else []

    def _select_decodes(self, now_s: float) -> int:
        """Ask the local scheduler which decodes run; keep the others in ``_step_skipped``.

        Returns:
            The skipped decodes' context tokens.
        """
        flags = self.local.select_decodes(
            now_s=now_s, decodes=self._decode_batch(include_pending=False), num_waiting_prefills=len(self.prefills)
        )
        steps = self.num_decode_steps
        skipped = [job for job, runs in zip(self.decodes.values(), flags, strict=True) if not runs]
        self._step_skipped = skipped
        return sum(job.context_base + steps for job in skipped)

    def _seq_room(self) -> int:
        return self.max_num_seqs - len(self.decodes) - self.num_partial_prefills

    def _plan_whole_prefills(self) -> list[tuple[Job, int]]:
        """Prefill-prioritised batching without chunking: whole remaining prompts, in queue order."""
        budget = self.settings.max_num_batched_tokens
        max_seqs = self.settings.max_num_prefill_seqs or self.max_num_seqs
        seq_room = self._seq_room() if self._keeps_decodes else max_seqs
        kv_free = self.kv_capacity - self.kv_used
        chunks: list[tuple[Job, int]] = []
        used = 0
        for _, _, job in self.prefills:
            tokens = job.prefill_target - job.num_computed
            new_seq = job.num_computed == 0
            if len(chunks) >= max_seqs or (new_seq and seq_room <= 0):
                break
            if (chunks and used + tokens > budget) or tokens > kv_free:
                break
            chunks.append((job, tokens))
            used += tokens
            kv_free -= tokens
            if new_seq:
                seq_room -= 1
        return chunks

    def _plan_chunks(self, now_s: float, num_decodes: int) -> list[tuple[Job, int]]:
        """Stall-free batching: what the decodes leave of the token budget goes to prefill chunks in order."""
        settings = self.settings
        budget = settings.max_num_batched_tokens - num_decodes
        if num_decodes and self.local.caps_prefill_tokens:
            first = self.prefills[0][2]
            cap = self.local.prefill_token_cap(
                now_s=now_s,
                decodes=self._decode_batch(include_pending=False),
                num_prefix_tokens=first.num_computed,
                prefill=first.make_prefill_state(),
            )
            if cap is not None:
                budget = min(budget, cap)
        max_seqs = settings.max_num_prefill_seqs or self.max_num_seqs
        seq_room = self._seq_room() if self._keeps_decodes else max_seqs
        kv_free = self.kv_capacity - self.kv_used - num_decodes
        chunks: list[tuple[Job, int]] = []
        for _, _, job in self.prefills:
            if budget <= 0 or len(chunks) >= max_seqs or kv_free <= 0:
                break
            new_seq = job.num_computed == 0
            if new_seq and seq_room <= 0:
                break
            chunk = min(job.prefill_target - job.num_computed, budget, kv_free)
            chunks.append((job, chunk))
            budget -= chunk
            kv_free -= chunk
            if new_seq:
                seq_room -= 1
        return chunks

    def finish_step(self, now_s: float) -> StepOutcome:
        """Apply the step that just ended at ``now_s``."""
        self.busy = False
        self.version += 1
        first_tokens: list[Job] = []
        finished: list[Job] = []
        handoffs: list[Job] = []
        changed = False

        num_decodes = self._step_decodes
        if self._step_skipped and num_decodes:
            # A skipped decode neither generates nor grows while the step count advances: move its bases back
            # by one and its finish one step later (the old heap entry goes stale).
            self.num_decode_skips += len(self._step_skipped)
            for job in self._step_skipped:
                job.gen_base -= 1
                job.context_base -= 1
                job.epoch += 1
                heapq.heappush(
                    self._finish_heap, (job.num_output_tokens - job.gen_base, next(self._sequence), job, job.epoch)
                )
            self._decode_set_version += 1
        self._step_skipped = []
        if num_decodes:
            self.num_decode_steps += 1
            steps = self.num_decode_steps
            self.decode_context_tokens += num_decodes
            heap = self._finish_heap
            while heap and heap[0][0] <= steps:
                _, _, job, epoch = heapq.heappop(heap)
                if epoch != job.epoch:
                    continue  # stale entry of a preempted job
                job.num_generated = job.gen_base + steps
                context = job.context_base + steps
                del self.decodes[job.request.request_id]
                self._decode_set_version += 1
                self.decode_context_tokens -= context
                self.kv_used -= context
                job.finished_at_s = now_s
                finished.append(job)
                changed = True
            if self._first_pending:
                self._first_decode_tokens(now_s, first_tokens)
                changed = True

        if self._step_chunks:
            for job, chunk in self._step_chunks:
                job.num_computed += chunk
                if job.num_computed < job.prefill_target:
                    self.enqueue_prefill(job, keep_place=True)  # re-keyed: its remaining tokens changed
                    continue
                self.num_partial_prefills -= 1
                changed = True
                if job.first_token_at_s is None:
                    job.first_token_at_s = now_s
                    job.num_generated = 1
                    first_tokens.append(job)
                else:
                    job.num_generated += 1  # a recompute ends by sampling the next token
                if job.num_generated >= job.num_output_tokens:
                    self.kv_used -= job.prefill_target
                    job.decode_worker_id = self.worker_id
                    job.finished_at_s = now_s
                    finished.append(job)
                elif self._keeps_decodes:
                    self._join_decode(job)
                else:
                    handoffs.append(job)  # KV stays allocated here until it is transferred
        tokens: list[Job] = []
        if self._report_tokens:
            completed = [job for job, _ in self._step_chunks if job.num_computed >= job.prefill_target]
            tokens = self._step_decode_jobs + completed
            self._step_decode_jobs = []
        self._step_decodes = 0
        self._step_chunks = []
        return StepOutcome(first_tokens, finished, handoffs, changed, tokens)

    def _first_decode_tokens(self, now_s: float, first_tokens: list[Job]) -> None:
        """The decodes waiting for their first token that ran in the step ending at ``now_s`` produced it."""
        steps = self.num_decode_steps
        waiting: list[Job] = []
        for job in self._first_pending:
            if job.first_token_at_s is not None:
                continue  # preempted before its first step here: its recompute produced it
            if job.finished_at_s is not None or (
                self.decodes.get(job.request.request_id) is job and job.gen_base + steps >= 1
            ):
                job.first_token_at_s = now_s
                first_tokens.append(job)
            elif self.decodes.get(job.request.request_id) is job:
                waiting.append(job)  # sat this step out (a local scheduler that selects decodes)
        self._first_pending = waiting
        self._decode_set_version += 1  # the batch columns hold first-token times

    def set_predictions(
        self, step_time: StepTimeModel | None, pd_hop_fixed_s: float, pd_hop_per_prompt_token_s: float
    ) -> None:
        """What the snapshots tell the policy about this worker from now on: its step-time model (``None``: the
        policy's own) and the P/D hop of the requests it prefills, seconds and seconds per prompt token."""
        self.predicted_step_time = step_time
        self.predicted_pd_hop_fixed_s = pd_hop_fixed_s
        self.predicted_pd_hop_per_prompt_token_s = pd_hop_per_prompt_token_s
        self.version += 1

    # -- snapshots ----------------------------------------------------------------------------------------------

    def _decode_batch(self, *, include_pending: bool) -> DecodeBatch:
        """The decodes as a batch; with ``include_pending``, also those whose KV is in flight or waiting to join
        (a router counts them: they are committed to this worker)."""
        if self._columns_version != self._decode_set_version:
            jobs = list(self.decodes.values())
            self._columns = (
                tuple(self.decodes),
                # A decode waiting for its first token here (counted after the P/D hop) counts its TPOT from
                # when its decode worker was chosen, as the router counts it from its prefill's end.
                tuple([j.first_token_at_s if j.first_token_at_s is not None else j.placed_at_s for j in jobs]),
                tuple([j.request.slo.tpot_s for j in jobs]),
                [j.gen_base for j in jobs],
                [j.context_base for j in jobs],
            )
            self._columns_version = self._decode_set_version
        ids, first_token_at_s, tpot_slo_s, gen_bases, context_bases = self._columns
        steps = self.num_decode_steps
        num_generated = tuple([g + steps for g in gen_bases])
        num_context = tuple([c + steps for c in context_bases])
        extra = list(self.incoming.values()) + self.ready if include_pending else []
        if extra:
            ids = ids + tuple(j.request.request_id for j in extra)
            # A decode placed before its prefill (at-route placement) has no first token yet: its TPOT clock is
            # counted from when it was placed, as the router does.
            first_token_at_s = first_token_at_s + tuple(
                j.first_token_at_s if j.first_token_at_s is not None else j.placed_at_s for j in extra
            )
            tpot_slo_s = tpot_slo_s + tuple(j.request.slo.tpot_s for j in extra)
            num_generated = num_generated + tuple(max(j.num_generated, 1) for j in extra)
            num_context = num_context + tuple(j.prefill_target for j in extra)
        return DecodeBatch(
            request_ids=ids,
            first_token_at_s=first_token_at_s,
            num_generated_tokens=num_generated,
            tpot_slo_s=tpot_slo_s,
            num_context_tokens=num_context,
        )

    def snapshot(self) -> WorkerSnapshot:
        """The worker as a policy sees it (cached until the worker changes)."""
        if self._snapshot is None or self._snapshot_version != self.version:
            self._snapshot = WorkerSnapshot(
                worker_id=self.worker_id,
                role=self.role,
                prefills=tuple(_after_step(job, chunk) for job, chunk in self._step_chunks)
                + tuple(job.make_prefill_state() for _, _, job in self.prefills),
                decodes=self._decode_batch(include_pending=True),
                num_kv_tokens_used=self.kv_used,
                num_kv_tokens_capacity=self.kv_capacity,
                max_num_seqs=self.max_num_seqs,
                busy_until_s=self.step_ends_at_s if self.busy else None,
                step_time=self.predicted_step_time,
                pd_hop_fixed_s=self.predicted_pd_hop_fixed_s,
                pd_hop_per_prompt_token_s=self.predicted_pd_hop_per_prompt_token_s,
            )
            self._snapshot_version = self.version
        return self._snapshot


def _after_step(job: Job, chunk: int) -> PrefillState:
    """A prefill in the step in flight: ``chunk`` of its tokens are being computed."""
    state = job.make_prefill_state()
    return PrefillState(
        request_id=state.request_id,
        arrival_at_s=state.arrival_at_s,
        num_prompt_tokens=state.num_prompt_tokens,
        num_computed_tokens=state.num_computed_tokens,
        ttft_slo_s=state.ttft_slo_s,
        num_scheduled_tokens=chunk,
        tpot_slo_s=state.tpot_slo_s,
    )
