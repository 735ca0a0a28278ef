"""Python decides, a gateway carries the bytes (issue 17, item 4): the deciding half of that split, for
``benchmarks/router_split.py``.

``POST /decide`` takes the client's OpenAI completion body and headers, as a gateway would forward them before
it picks a worker, and answers ``{"worker_url": ...}``: the same validation, prompt count and SLO headers as
``tropical serve`` and the Ray ingress, and the same policy object deciding over the engines' live state
(:class:`tropical_sched.integrations.replica_routing.ReplicaRouting`, which Ray Serve's router uses), read from
each engine's ``/v1/tropical/state`` every ``--stats-period`` seconds. No bytes of the answer pass through it: the
gateway (sglang-router, pinned by ``x-smg-target-worker``) carries them, so this process never sees a token; the
engines' live state is what tells it how loaded they are.

Usage: python benchmarks/split_decider.py PORT CONFIG_JSON [--stats-period 0.1]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import time
from pathlib import Path
from typing import Any

import aiohttp
import uvloop
from aiohttp import web

from tropical_sched.integrations.replica_routing import ReplicaRouting, RequestFacts, replica_stats
from tropical_sched.live_state import LIVE_STATE_PATH, EngineLiveState
from tropical_sched.policies.base import PolicyContext
from tropical_sched.policies.registry import make_policy
from tropical_sched.predictors.profile import load_profile
from tropical_sched.serve.app import request_slo
from tropical_sched.serve.config import RouterConfig
from tropical_sched.serve.openai import BadRequest, error_body, parse_json_body, prompt_token_count, validate_body


class Decider:
    """One deciding process over the cluster ``config`` describes (``tropical serve``'s cluster file)."""

    def __init__(self, config: RouterConfig, stats_period_s: float) -> None:
        self.config = config
        profile = load_profile(config.profile)
        self.profile = profile
        context = PolicyContext(step_time=profile.step_time, max_model_len=profile.max_model_len)
        policy = make_policy(config.policy, context, config.policy_options)
        self.routing = ReplicaRouting(policy, profile.num_kv_cache_tokens)
        self.slo_spec = config.slo.spec()
        self.urls = [instance.url for instance in config.instances]
        self.roles = [instance.role for instance in config.instances]
        self.stats: list[tuple[str, dict[str, Any]]] = [(url, {}) for url in self.urls]
        self.stats_period_s = stats_period_s
        self.id_prefix = f"split-{secrets.token_hex(4)}-"
        self.next_id = 0

    async def poll(self) -> None:
        """Read every engine's live state each period (an engine that does not answer keeps its last report)."""
        async with aiohttp.ClientSession() as session:
            while True:
                for index, url in enumerate(self.urls):
                    try:
                        async with session.get(url + LIVE_STATE_PATH, timeout=aiohttp.ClientTimeout(total=1)) as r:
                            state = EngineLiveState.model_validate_json(await r.read())
                        self.stats[index] = (url, replica_stats(self.roles[index], state, time.time()))
                    except (aiohttp.ClientError, TimeoutError, ValueError):
                        pass
                await asyncio.sleep(self.stats_period_s)

    async def decide(self, http: web.Request) -> web.Response:
        try:
            body = parse_json_body(await http.read())
            validate_body(body, chat=False)
            num_prompt_tokens, _ = prompt_token_count(body, chat=False, chars_per_token=self.config.chars_per_token)
            slo = request_slo(self.slo_spec, self.profile.step_time, num_prompt_tokens, http.headers)
        except BadRequest as exc:
            return web.json_response(error_body(str(exc), exc.kind, exc.status), status=exc.status)
        self.next_id += 1
        now_s = time.time()
        facts = RequestFacts(
            request_id=f"{self.id_prefix}{self.next_id}",
            num_prompt_tokens=num_prompt_tokens,
            ttft_slo_s=slo.ttft_s,
            tpot_slo_s=slo.tpot_s,
            arrival_at_unix_s=now_s,
        )
        chosen = self.routing.choose(self.stats, facts, now_s)
        if not chosen:
            return web.json_response(error_body("no engine can take it", "ServiceUnavailable", 503), status=503)
        return web.json_response({"worker_url": self.urls[chosen[0]]})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("port", type=int)
    parser.add_argument("config", help="the cluster description, JSON")
    parser.add_argument("--stats-period", type=float, default=0.1, help="seconds between live-state reads")
    args = parser.parse_args()
    decider = Decider(RouterConfig.model_validate(json.loads(Path(args.config).read_text())), args.stats_period)
    app = web.Application()
    app.add_routes([web.post("/decide", decider.decide)])

    async def start_polling(app: web.Application) -> None:
        app["poller"] = asyncio.get_running_loop().create_task(decider.poll())

    app.on_startup.append(start_polling)
    web.run_app(app, host="127.0.0.1", port=args.port, print=None, access_log=None, loop=uvloop.new_event_loop())


if __name__ == "__main__":
    main()
