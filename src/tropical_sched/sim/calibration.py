"""The router's online calibration, run inside the simulator.

Each worker gets the :class:`~tropical_sched.predictors.calibration.InstanceCalibration` the router would give its
instance (prior: the profile the policies predict with, serving overheads folded in), fed with the same three kinds
of observation the router makes of a served engine:

* a finished request's **decode stream**: the steps it saw on its decode worker that ran only decodes (a prefill
  chunk in a step would spoil a gap as the router sees it), their total duration and their mean batch (sequences
  and context tokens);
* a **prefill that ran alone**: every step of it ran its chunk and nothing else; its duration and prompt length;
* a **P/D hop**: from a P/D prefill's end to its KV cache landing on the decoding worker (the KV transfer and the
  engine's hop), charged to the prefill worker as the router charges it.

The simulator knows these exactly, where the router estimates them from HTTP timings (less round trips, less the
decoding instance's first step); which prefills count differs in one way: the router needs a lone prefill to have
been sent to an idle instance, the simulator also takes one that queued before running alone. After every
observation the worker's snapshot carries the calibrated step-time model and hop, and its engine-local scheduler
predicts with the calibrated model (:meth:`~tropical_sched.policies.base.LocalScheduler.with_step_time`).
"""

from __future__ import annotations

from collections.abc import Sequence

from tropical_sched.predictors.calibration import CalibrationConfig, InstanceCalibration
from tropical_sched.predictors.profile import Profile
from tropical_sched.sim.worker import Job, SimWorker, StepOutcome

__all__ = ["SimCalibration"]


class SimCalibration:
    """One :class:`InstanceCalibration` per simulated worker, fed from what the simulated engines did.

    Args:
        workers: the cluster's workers, by worker id.
        profile: the profile the policies predict with (every calibration's prior), or one per worker (each
            worker's prior: its instance's profile).
        config: the calibration's limits and rates.
    """

    def __init__(
        self, workers: Sequence[SimWorker], profile: Profile | Sequence[Profile], config: CalibrationConfig
    ) -> None:
        self.workers = list(workers)
        priors = [profile] * len(self.workers) if isinstance(profile, Profile) else list(profile)
        self.instances = [
            InstanceCalibration.from_profile(
                prior,
                config,
                max_chunk_tokens=w.settings.max_num_batched_tokens if w.settings.enable_chunked_prefill else None,
            )
            for w, prior in zip(self.workers, priors, strict=True)
        ]
        # Per worker, running totals over its decode-only steps: steps, seconds, sequence-steps, context-steps.
        self._clean: list[list[float]] = [[0, 0.0, 0, 0] for _ in self.workers]
        self._marks: dict[Job, tuple[int, tuple[float, ...]]] = {}  # job -> (decode worker, its totals at join)
        self._alone_s: dict[Job, float] = {}  # job -> seconds of its prefill so far, every step of it alone
        self._lone_in_flight: list[Job | None] = [None] * len(self.workers)  # worker -> job of its lone step
        for worker in self.workers:
            self._publish(worker)

    def _publish(self, worker: SimWorker) -> None:
        """Put the worker's calibrated model and hop where the policy and its local scheduler read them."""
        calibration = self.instances[worker.worker_id]
        model = calibration.step_time
        hop = (calibration.pd_hop_fixed_s, calibration.pd_hop_per_prompt_token_s)
        if model is worker.predicted_step_time and hop == (
            worker.predicted_pd_hop_fixed_s,
            worker.predicted_pd_hop_per_prompt_token_s,
        ):
            return
        if model is not worker.predicted_step_time:
            worker.local = worker.local.with_step_time(model)
        worker.set_predictions(model, *hop)

    def on_step_start(self, worker: SimWorker, duration_s: float) -> None:
        """``worker`` started a step of ``duration_s`` seconds: note what the router could learn from it."""
        index = worker.worker_id
        chunks = worker.chunks_in_flight
        num_decodes = worker.num_decodes_in_flight
        self._lone_in_flight[index] = None
        if not chunks:
            totals = self._clean[index]
            totals[0] += 1
            totals[1] += duration_s
            totals[2] += num_decodes
            totals[3] += worker.decode_context_tokens_in_flight
            return
        if len(chunks) == 1 and not num_decodes:
            job = chunks[0][0]
            if job.num_computed == 0:
                self._alone_s[job] = duration_s
            elif job in self._alone_s:
                self._alone_s[job] += duration_s
            self._lone_in_flight[index] = job
            return
        for job, _ in chunks:  # a shared step: these prefills did not run alone
            self._alone_s.pop(job, None)

    def on_step_end(self, worker: SimWorker, outcome: StepOutcome) -> None:
        """``worker``'s step ended with ``outcome`` (before the simulator hands anything over): observe a lone
        prefill that completed, the decode streams of the requests that finished, and mark where new decodes
        start their stream."""
        index = worker.worker_id
        calibration = self.instances[index]
        observed = False
        job = self._lone_in_flight[index]
        if job is not None and job.num_computed >= job.prefill_target:
            alone_s = self._alone_s.pop(job, None)
            if alone_s is not None and job.num_preemptions == 0:  # a recompute is no prefill the router sees
                calibration.observe_prefill(num_prompt_tokens=job.prefill_target, duration_s=alone_s)
                observed = True
        if worker.role.runs_decodes:
            for first in outcome.first_tokens:
                if first.decode_worker_id == index and first not in self._marks:
                    self._marks[first] = (index, tuple(self._clean[index]))
        for done in outcome.finished:
            mark = self._marks.pop(done, None)
            if mark is None or mark[0] != done.decode_worker_id:
                continue
            decoder = mark[0]
            steps, duration_s, seq_steps, context_steps = (
                now - then for now, then in zip(self._clean[decoder], mark[1], strict=True)
            )
            if steps >= 1:
                self.instances[decoder].observe_decode_stream(
                    num_steps=int(steps),
                    duration_s=duration_s,
                    mean_num_decode_seqs=seq_steps / steps,
                    mean_num_decode_context_tokens=context_steps / steps,
                )
                self._publish(self.workers[decoder])
        if observed:
            self._publish(worker)

    def on_transfer_done(self, job: Job, prefill_worker: SimWorker, destination: SimWorker, hop_s: float) -> None:
        """The KV cache of ``job`` landed on ``destination`` ``hop_s`` seconds after its transfer began (the end of
        its prefill, or its placement if later): the prefill worker's P/D hop; the request's decode stream starts
        here."""
        self.instances[prefill_worker.worker_id].observe_pd_hop(
            num_prompt_tokens=job.request.num_prompt_tokens, hop_s=hop_s
        )
        self._publish(prefill_worker)
        self._marks[job] = (destination.worker_id, tuple(self._clean[destination.worker_id]))
