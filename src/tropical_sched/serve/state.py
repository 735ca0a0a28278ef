"""The router's live view of its instances, turned into the snapshots the policy reads."""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field

from tropical_sched.core.request import Request
from tropical_sched.core.snapshot import DecodeBatch, PrefillState, WorkerRole, WorkerSnapshot
from tropical_sched.live_state import EngineLiveState, LiveDecode, LivePrefill, merge_live_state
from tropical_sched.policies.base import LocalScheduler
from tropical_sched.predictors.calibration import InstanceCalibration
from tropical_sched.predictors.profile import ServingOverheads
from tropical_sched.predictors.step_time import StepTimeModel
from tropical_sched.serve.config import InstanceConfig

__all__ = ["Instance", "Phase", "Tracked"]


class Phase(str, enum.Enum):
    """Where a request is."""

    ROUTING = "routing"
    """At the router, waiting for a prefill decision."""
    PREFILL = "prefill"
    """Sent to an instance; no token yet."""
    AWAITING_DECODE = "awaiting-decode"
    """Prefilled remotely; its KV cache is (being) moved to the decoding instance; no token yet."""
    DECODE = "decode"
    """Producing tokens."""


@dataclass(slots=True, eq=False)
class Tracked:
    """One request through the router.

    Attributes:
        request: the request as the policy sees it (``arrival_at_s`` on the router's clock).
        phase: where it is.
        instance: index of the instance it counts on, if any.
        route: how its prefill was routed (``prefill``, ``multiplex``, ``colocated``), "" until decided.
        prefill_done_at_s: when a remote prefill returned.
        first_token_at_s: when the client-visible first token arrived.
        last_token_at_s: when the latest token arrived.
        num_generated_tokens: tokens streamed so far.
        attempts: times it was routed (retries after failures that produced no token).
        predicted: what the router predicted for it when it chose its instances (``ttft_s``, ``tpot_s``), for the
            prediction-error histograms.
        sent_at_s: when the call that prefills it was sent (the P/D prefill, or the direct stream).
        sent_alone: whether that instance had nothing else to run when it was sent (no decode, no other prefill).
        sent_admissions: the instance's :attr:`Instance.num_admitted` then.
        prefill_instance: index of the instance that prefilled it remotely (P/D).
        decode_sent_at_s: when the decode half of a P/D request was sent.
        stream_instance: index of the instance whose streaming decodes count it.
        gap_epoch: the stream instance's ``prefill_epoch`` at its previous token.
        gap_s: sum of its inter-token gaps that no prefill on its instance could have lengthened, seconds.
        gap_steps: decode steps those gaps cover (tokens).
        gap_seq_steps: sum over those steps of the instance's streaming decodes.
        gap_context_steps: sum over those steps of their context tokens.
        routed_at_s: when its route was decided (its latest attempt's), for the decision log.
        reason: the policy's reason for that route.
        decision_predicted: the predicted figures behind it (``RouteDecision.predicted``).
        decode_placed_at_s: P/D: when its decode was placed.
        decode_reason: P/D: the policy's reason for that placement.
        decode_instance: P/D: index of the instance its decode was placed on.
    """

    request: Request
    phase: Phase = Phase.ROUTING
    instance: int | None = None
    route: str = ""
    prefill_done_at_s: float | None = None
    first_token_at_s: float | None = None
    last_token_at_s: float | None = None
    num_generated_tokens: int = 0
    attempts: int = 0
    predicted: dict[str, float] = field(default_factory=dict)
    sent_at_s: float | None = None
    sent_alone: bool = False
    sent_admissions: int = 0
    prefill_instance: int | None = None
    decode_sent_at_s: float | None = None
    stream_instance: int | None = None
    gap_epoch: int = 0
    gap_s: float = 0.0
    gap_steps: int = 0
    gap_seq_steps: int = 0
    gap_context_steps: int = 0
    routed_at_s: float | None = None
    reason: str = ""
    decision_predicted: dict[str, float] = field(default_factory=dict)
    decode_placed_at_s: float | None = None
    decode_reason: str = ""
    decode_instance: int | None = None


class Instance:
    """One engine instance as the router tracks it.

    Besides what it dispatched, it counts the decodes that stream from it (running totals, updated in O(1) per
    token) so that every token's gap can be set against the decode batch it came from, for the online calibration.

    Args:
        index: its worker id.
        config: its configuration.
        local: the engine-local scheduler of its role (orders its prefills in snapshots).
        num_kv_cache_tokens: its KV capacity.
        calibration: what is learned online about it (``None``: calibration off).
        serving: its profile's serving overheads (the P/D hop snapshots carry while calibration is off).
        step_time: its own profile's step-time model, when it has a profile other than the policy's (a
            heterogeneous cluster): snapshots carry it while calibration is off; ``None``: the policy's.
        prior_step_time: the step-time model of its profile (whichever it is), whose valid range a model that the
            engine reports in its live state takes; ``None``: reported models are not used.
    """

    def __init__(
        self,
        index: int,
        config: InstanceConfig,
        local: LocalScheduler,
        num_kv_cache_tokens: int,
        *,
        calibration: InstanceCalibration | None = None,
        serving: ServingOverheads | None = None,
        step_time: StepTimeModel | None = None,
        prior_step_time: StepTimeModel | None = None,
    ) -> None:
        self.index = index
        self.config = config
        self.url = config.url.rstrip("/")
        self.role: WorkerRole = config.role
        self.local = local
        self.capacity = num_kv_cache_tokens
        self.healthy = True
        self.prefills: dict[str, Tracked] = {}  # request id -> request without a token yet
        self.decodes: dict[str, Tracked] = {}  # request id -> request producing (or about to produce) tokens
        self.engine_kv_usage_fraction: float | None = None  # last value read from the engine's /metrics
        self.engine_num_requests: int | None = None  # running + waiting, as the engine reports
        self.live_state: EngineLiveState | None = None  # what the engine runs, all routers' requests (shared state)
        self.live_state_taken_at_s = 0.0  # when it was taken, router clock
        # Other routers' requests in the latest report (0 without reports, or with reports that carry no ids):
        self.foreign_num_prefills = 0
        self.foreign_num_decodes = 0
        self.foreign_context_tokens = 0  # their decodes' prompt + generated tokens
        self.live_state_has_ids = False  # the engine names requests by the router's ids (its report then holds
        # the other routers' requests only, once the router takes its own out)
        self.served_models: tuple[str, ...] = ()  # model ids its /v1/models lists (empty until read)
        self.max_model_len: int | None = None  # context limit its /v1/models reports, tokens
        self.calibration = calibration
        self.serving = serving
        self.profile_step_time = step_time
        self.prior_step_time = prior_step_time
        self.engine_step_time: StepTimeModel | None = None  # the model the engine's latest report carries
        # When its latest P/D prefill call returned, the one request then left waiting here (None: none, or
        # several), and num_admitted then: a request that waited alone behind a prefill ran alone right after it.
        self.last_prefill_return_at_s: float | None = None
        self._round_trips_s: deque[float] = deque(maxlen=8)  # its latest /health round trips
        self.round_trip_s = 0.0  # the least of them: the bare HTTP round trip, seconds
        self.sole_waiting_id: str | None = None
        self.admissions_at_last_return = 0
        self.prefill_epoch = 0  # prefills sent here so far (a token gap is clean while it stays put)
        self.num_admitted = 0  # requests counted here so far, prefills and decodes (a prefill ran alone while it
        # stayed put)
        self.num_streaming = 0  # decodes that have streamed a token from here and still run
        self.streaming_context_tokens = 0  # their prompt + generated tokens
        self.version = 0
        self._snapshot: WorkerSnapshot | None = None
        self._snapshot_version = -1

    @property
    def num_in_flight(self) -> int:
        """Requests counted on this instance."""
        return len(self.prefills) + len(self.decodes)

    def set_live_state(self, state: EngineLiveState | None, taken_at_s: float, own_prefix: str = "") -> None:
        """The engine's own report of what it runs (``None``: none to be had; the router's counts then stand alone),
        taken at ``taken_at_s`` on the router's clock. ``own_prefix``: what the router's request ids start with; a
        report that names requests by the routers' ids is kept without this router's own (it sees them more
        freshly)."""
        entries: list[LivePrefill | LiveDecode] = [
            *(state.prefills if state else ()),
            *(state.decodes if state else ()),
        ]
        if any(entry.request_id is not None for entry in entries):
            self.live_state_has_ids = True  # the engine reports ids: an empty report means nothing runs there
        if state is not None and self.live_state_has_ids:
            state = state.foreign(own_prefix)
            self.foreign_num_prefills = len(state.prefills)
            self.foreign_num_decodes = len(state.decodes)
            self.foreign_context_tokens = sum(d.num_context_tokens for d in state.decodes)
        else:
            self.foreign_num_prefills = self.foreign_num_decodes = self.foreign_context_tokens = 0
        self.live_state = state
        self.live_state_taken_at_s = taken_at_s
        reported = state.step_time if state is not None else None
        self.engine_step_time = (
            None
            if reported is None or self.prior_step_time is None
            else reported.model_kept(self.prior_step_time, self.engine_step_time)
        )
        self.version += 1

    def _sent_since_live_state(self, tracked: Tracked, *, decode: bool) -> bool:
        """Whether the engine's report cannot hold ``tracked``: the router sent it there after the report was
        taken, or has yet to send it."""
        sent_at_s = tracked.decode_sent_at_s if decode and tracked.route == "prefill" else tracked.sent_at_s
        return sent_at_s is None or sent_at_s > self.live_state_taken_at_s

    def add_prefill(self, tracked: Tracked) -> None:
        """Count a request whose prefill was sent here."""
        self.prefills[tracked.request.request_id] = tracked
        tracked.instance = self.index
        self.prefill_epoch += 1
        self.num_admitted += 1
        self.version += 1

    def note_round_trip(self, round_trip_s: float) -> None:
        """A ``/health`` round trip took ``round_trip_s``; the least of the last 8 is the bare HTTP round trip (the
        least, as the others waited for a busy event loop). Counted as 0 until 3 are in: the first probes of a
        router also open connections and load code, tens of milliseconds that no prefill should be docked."""
        self._round_trips_s.append(round_trip_s)
        self.round_trip_s = min(self._round_trips_s) if len(self._round_trips_s) >= 3 else 0.0

    @property
    def runs_alone(self) -> bool:
        """Whether only one request is counted here, no decode streams and no other router's request runs (its
        prefill would run alone)."""
        return (
            len(self.prefills) + len(self.decodes) <= 1
            and not self.num_streaming
            and not (self.foreign_num_prefills or self.foreign_num_decodes)
        )

    @property
    def no_other_work(self) -> bool:
        """Whether no decode runs here (this router's streams, other routers' requests) and no other router's
        prefill: what this router counts of prefills is all there is."""
        return not self.num_decoding and not self.foreign_num_prefills

    @property
    def num_decoding(self) -> int:
        """Decodes running here: those streaming through this router and, with live state, other routers'."""
        return self.num_streaming + self.foreign_num_decodes

    @property
    def decoding_context_tokens(self) -> int:
        """Their prompt + generated tokens."""
        return self.streaming_context_tokens + self.foreign_context_tokens

    def start_stream(self, tracked: Tracked) -> None:
        """A request's first token came from here: count it among the streaming decodes."""
        self.num_streaming += 1
        self.streaming_context_tokens += tracked.request.num_prompt_tokens + tracked.num_generated_tokens
        tracked.stream_instance = self.index
        tracked.gap_epoch = self.prefill_epoch

    def stream_tokens(self, tracked: Tracked, count: int, gap_s: float) -> None:
        """``count`` more tokens of a streaming request arrived ``gap_s`` after its previous ones (O(1)).

        The gap counts for calibration if no prefill was counted here during it (then it was made of decode-only
        steps, each giving this request one token).
        """
        self.streaming_context_tokens += count
        if self.prefills or self.foreign_num_prefills or tracked.gap_epoch != self.prefill_epoch:
            tracked.gap_epoch = self.prefill_epoch
            return
        tracked.gap_s += gap_s
        tracked.gap_steps += count
        tracked.gap_seq_steps += self.num_decoding * count
        tracked.gap_context_steps += self.decoding_context_tokens * count

    def add_decode(self, tracked: Tracked) -> None:
        """Count a request that decodes here (moved from prefills if it prefilled here)."""
        if self.prefills.pop(tracked.request.request_id, None) is None:
            self.num_admitted += 1
        self.decodes[tracked.request.request_id] = tracked
        tracked.instance = self.index
        self.version += 1

    def remove(self, tracked: Tracked) -> None:
        """Stop counting a request."""
        request_id = tracked.request.request_id
        self.prefills.pop(request_id, None)
        self.decodes.pop(request_id, None)
        if tracked.instance == self.index:
            tracked.instance = None
        if tracked.stream_instance == self.index:
            self.num_streaming -= 1
            self.streaming_context_tokens -= tracked.request.num_prompt_tokens + tracked.num_generated_tokens
            tracked.stream_instance = None
        self.version += 1

    def snapshot(self, now_s: float | None = None) -> WorkerSnapshot:
        """The instance as the policy sees it (cached until it changes).

        Prefills show no computed tokens (the router cannot see inside a prefill); decodes show the tokens
        streamed so far. KV usage is the router's count, or the engine's reported usage if that is higher (other
        clients, or the router's estimate drifting low). With the engine's live state (``set_live_state``), the
        engine's report plus what the router sent after it was taken, carried forward to ``now_s``
        (:func:`~tropical_sched.live_state.merge_live_state`). With calibration on, the snapshot carries the calibrated
        step-time model and the learned P/D hop as of its building; off, the model of the instance's own profile
        (none when it has the policy's: the policy's own) and the hop of the instance's profile, if it records one.
        A step-time model in the engine's live state (its own calibrated one) takes the place of either.
        """
        # A new calibration does not invalidate the cached snapshot by itself: the next change of the instance (or
        # the router's periodic refresh, every few milliseconds) picks it up, which spares a rebuild per observation.
        if self._snapshot is not None and self._snapshot_version == self.version:
            return self._snapshot
        calibration = self.calibration
        live = self.live_state
        own_prefills = list(self.prefills.values())
        decodes = list(self.decodes.values())
        if live is not None and not self.live_state_has_ids:  # the report holds what was there when taken
            own_prefills = [t for t in own_prefills if self._sent_since_live_state(t, decode=False)]
            decodes = [t for t in decodes if self._sent_since_live_state(t, decode=True)]
        prefills = sorted((PrefillState.from_request(t.request) for t in own_prefills), key=self.local.prefill_sort_key)
        generated = tuple(max(t.num_generated_tokens, 1) for t in decodes)
        context = tuple(t.request.num_prompt_tokens + g for t, g in zip(decodes, generated, strict=True))
        kv_used = sum(p.num_prompt_tokens for p in prefills) + sum(context)
        if live is None and self.engine_kv_usage_fraction is not None:
            kv_used = max(kv_used, int(self.engine_kv_usage_fraction * self.capacity))
        step_time: StepTimeModel | None
        if calibration is not None:
            step_time, hop_fixed_s, hop_per_token_s = (
                calibration.step_time,
                calibration.pd_hop_fixed_s,
                calibration.pd_hop_per_prompt_token_s,
            )
        else:
            serving = self.serving
            step_time = self.profile_step_time
            hop_fixed_s = serving.pd_hop_fixed_s if serving else 0.0
            hop_per_token_s = serving.pd_hop_per_prompt_token_s if serving else 0.0
        if self.engine_step_time is not None and live is not None:
            step_time = self.engine_step_time  # the engine's own (calibrated) model, from its live state
        batch = DecodeBatch(
            request_ids=tuple(t.request.request_id for t in decodes),
            first_token_at_s=tuple(
                t.first_token_at_s if t.first_token_at_s is not None else (t.prefill_done_at_s or 0.0) for t in decodes
            ),
            num_generated_tokens=generated,
            tpot_slo_s=tuple(t.request.slo.tpot_s for t in decodes),
            num_context_tokens=context,
        )
        all_prefills: tuple[PrefillState, ...] = tuple(prefills)
        if live is not None:
            taken_at_s = self.live_state_taken_at_s
            all_prefills, batch, kv_used = merge_live_state(
                live,
                taken_at_s,
                taken_at_s if now_s is None else now_s,
                prefills,
                batch,
                kv_used,
                sort_key=self.local.prefill_sort_key,
            )
        self._snapshot = WorkerSnapshot(
            worker_id=self.index,
            role=self.role,
            prefills=all_prefills,
            decodes=batch,
            num_kv_tokens_used=min(kv_used, self.capacity),
            num_kv_tokens_capacity=self.capacity,
            max_num_seqs=self.config.max_num_seqs,
            is_available=self.healthy,
            sees_step_in_flight=False,  # the router sees what it sent and the engine's reports, not its steps
            step_time=step_time,
            pd_hop_fixed_s=hop_fixed_s,
            pd_hop_per_prompt_token_s=hop_per_token_s,
        )
        self._snapshot_version = self.version
        return self._snapshot
