"""Real run on SGLang's CPU engine with a tiny local model (issue 6): a bundled trace replayed through Tropical's
router on a prefill + multiplexing worker pair, beside the same two engines, stock, behind ``sglang-router`` in PD
mode.

1. Build the tiny Llama unless ``--model`` exists; profile a stock colocated SGLang server from outside
   (``tropical-profile sglang --endpoint``) unless ``--profile`` exists.
2. Baseline: a stock prefill server and a stock decode server (P/D over ``mooncake_tcp``) behind
   ``sglang-router --pd-disaggregation`` (``--policy round_robin``); ``tropical replay`` of the trace.
3. Tropical: the same two servers with the plug-in (roles prefill and multiplexing, the profile from step 1)
   behind ``tropical serve``; the same replay.

Both runs send the same text prompts (``--prompt-format text``: sglang-router takes no token ids) and use the
same engine flags (the decode side runs ``--disable-overlap-schedule`` in both, as the
multiplexing worker needs it) and the same requests with the same SLOs (TTFT 5x the profile's isolated prefill,
TPOT 5x its isolated decode step). Every process shares this machine's cores: the figures are this machine's.

Run it with the Python of the environment where SGLang 0.5.23 and tropical-sched[serve] are installed (see
docs/sglang.md, "SGLang on a CPU"), and sglang-router 0.3.2 installed anywhere:

    /path/to/sglang-venv/bin/python benchmarks/sglang_cpu_real_run.py \\
        --sglang-router "/path/to/bin/sglang-router launch"
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

from tropical_sched.serve.testing import ServerProcess, free_port

SHIM = Path(__file__).resolve().parent.parent / "tests" / "engines" / "sglang_cpu_shim"
ENV = {
    "SGLANG_USE_CPU_ENGINE": "1",
    "SGLANG_HOST_IP": "127.0.0.1",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "TROPICAL_SGLANG_CPU_PD_FIX": "1",
    "PYTHONPATH": str(SHIM),
}
START_TIMEOUT_S = 900  # an engine start on 2 busy cores
ENGINE_FLAGS = [
    "--device", "cpu", "--attention-backend", "torch_native", "--sampling-backend", "pytorch",
    "--disable-cuda-graph", "--max-total-tokens", "16384", "--mem-fraction-static", "0.1",
    "--served-model-name", "tiny", "--enable-metrics", "--log-level", "warning",
]  # fmt: skip


def server_process(command: list[str], log: Path, env: dict[str, str] | None = None) -> ServerProcess:
    return ServerProcess(command, log, {**ENV, **(env or {})})


def sglang(model: Path, workdir: Path, name: str, flags: list[str], tropical: dict | None) -> tuple[ServerProcess, str]:
    port = free_port()
    command = [sys.executable, "-m", "sglang.launch_server", "--model-path", str(model), "--host", "127.0.0.1"]
    command += ["--port", str(port), *ENGINE_FLAGS, *flags]
    env = {"TROPICAL_SGLANG_CONFIG": json.dumps(tropical)} if tropical else {"TROPICAL_SGLANG_CONFIG": ""}
    return server_process(command, workdir / f"{name}.log", env), f"http://127.0.0.1:{port}"


def pd_pair(
    model: Path, workdir: Path, label: str, bootstrap_port: int, profile: Path | None
) -> list[tuple[ServerProcess, str]]:
    prefill_flags = ["--disaggregation-mode", "prefill", "--disaggregation-transfer-backend", "mooncake_tcp"]
    prefill_flags += ["--disaggregation-bootstrap-port", str(bootstrap_port), "--disable-radix-cache"]
    decode_flags = ["--disaggregation-mode", "decode", "--disaggregation-transfer-backend", "mooncake_tcp"]
    decode_flags += ["--disaggregation-decode-retraction-backup", "cpu_tensor", "--disable-overlap-schedule"]
    roles = ({"role": "prefill", "profile": str(profile)}, {"role": "multiplexing", "profile": str(profile)})
    return [
        sglang(model, workdir, f"{label}-prefill", prefill_flags, roles[0] if profile else None),
        sglang(model, workdir, f"{label}-decode", decode_flags, roles[1] if profile else None),
    ]


def replay(args: argparse.Namespace, url: str, profile: Path, label: str, path: Path) -> dict:
    command = [sys.executable, "-m", "tropical_sched.cli.main", "replay", "--url", url, "--label", label]
    command += ["--trace", args.trace, "--profile", str(profile), "--rate", f"{args.rate:g}", "--arrival", "poisson"]
    command += ["--num-requests", str(args.num_requests)]
    command += ["--ttft-slo-ms", f"{args.ttft_slo_ms:g}"] if args.ttft_slo_ms else ["--ttft-slo-scale", "5"]
    command += ["--tpot-slo-ms", f"{args.tpot_slo_ms:g}"] if args.tpot_slo_ms else ["--tpot-slo-scale", "5"]
    # Text prompts: sglang-router takes no token-id prompts. The tiny tokenizer makes about one token per
    # character of the replay's words, so --chars-per-token 1 keeps prompt lengths those of the trace.
    command += ["--prompt-format", "text", "--chars-per-token", "1", "--model", "tiny", "--max-model-len", "4000"]
    command += ["--no-progress"]
    command += ["--json", str(path)]
    subprocess.run(command, check=True)
    return json.loads(path.read_text())


def replay_behind(
    args: argparse.Namespace,
    pair: list[tuple[ServerProcess, str]],
    router: ServerProcess,
    router_port: int,
    profile: Path,
    label: str,
    path: Path,
) -> dict:
    """Wait for the engines and their router, replay the trace through the router, then stop them all."""
    try:
        for process, url in pair:
            process.wait_healthy(url, START_TIMEOUT_S)
        router.wait_healthy(f"http://127.0.0.1:{router_port}", START_TIMEOUT_S)
        return replay(args, f"http://127.0.0.1:{router_port}", profile, label, path)
    finally:
        router.stop()
        for process, _ in pair:
            process.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="/tmp/tiny-llama", help="tiny model directory (built if missing)")
    parser.add_argument("--profile", default="/tmp/cpu-tiny-llama-sglang.json", help="profile (measured if missing)")
    parser.add_argument("--sglang-router", default="sglang-router launch", help="the sglang-router command")
    parser.add_argument("--trace", default="azure-conv-2023")
    parser.add_argument("--num-requests", type=int, default=100)
    parser.add_argument("--rate", type=float, default=1.5, help="Poisson request rate, req/s")
    parser.add_argument("--ttft-slo-ms", type=float, help="absolute TTFT SLO (default 5x the profile's prefill)")
    parser.add_argument("--tpot-slo-ms", type=float, help="absolute TPOT SLO (default 5x the profile's step)")
    parser.add_argument("--out", default="benchmarks/results/sglang-cpu", help="folder for the JSON results")
    args = parser.parse_args()
    model, profile, out = Path(args.model), Path(args.profile), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="sglang-real-run-"))
    if not (model / "config.json").exists():
        from tropical_sched.profiling.tiny_model import build_tiny_llama

        build_tiny_llama(model)
    if not profile.exists():
        process, url = sglang(model, workdir, "profiled", [], None)
        try:
            process.wait_healthy(url, START_TIMEOUT_S)
            subprocess.run(
                [sys.executable, "-m", "tropical_sched.profiling.cli", "sglang", "--endpoint", url, "--model",
                 str(model), "--served-model-name", "tiny", "--quick", "--out", str(profile), "--no-progress"],
                check=True,
            )  # fmt: skip
        finally:
            process.stop()

    results = {}
    bootstrap_port = free_port()
    pair = pd_pair(model, workdir, "stock", bootstrap_port, None)
    router_port = free_port()
    router = server_process(
        [*shlex.split(args.sglang_router), "--pd-disaggregation", "--prefill", pair[0][1], str(bootstrap_port),
         "--decode", pair[1][1], "--host", "127.0.0.1", "--port", str(router_port), "--policy", "round_robin"],
        workdir / "sglang-router.log",
    )  # fmt: skip
    label = "sglang-router PD (stock P + D)"
    results[label] = replay_behind(args, pair, router, router_port, profile, label, out / "sglang-router-pd.json")

    bootstrap_port = free_port()
    pair = pd_pair(model, workdir, "tropical", bootstrap_port, profile)
    router_port = free_port()
    config = workdir / "cluster.yaml"
    config.write_text(
        json.dumps(
            {
                "policy": "tropical",
                "model": "tiny",
                "profile": str(profile),
                "chars_per_token": 1.0,
                "instances": [
                    {"url": pair[0][1], "role": "prefill", "engine": "sglang", "bootstrap_port": bootstrap_port},
                    {"url": pair[1][1], "role": "multiplexing", "engine": "sglang"},
                ],
            }
        )
    )
    router = server_process(
        [sys.executable, "-m", "tropical_sched.cli.main", "serve", "--config", str(config), "--port",
         str(router_port), "--log-level", "warning"],
        workdir / "tropical-router.log",
    )  # fmt: skip
    label = "tropical router (P + M)"
    results[label] = replay_behind(args, pair, router, router_port, profile, label, out / "tropical-router.json")
    header = f"{'run':<32} {'joint':>6} {'TTFT ok':>7} {'TPOT ok':>7} {'TTFT P50/P90 s':>15} {'TPOT P50/P90 ms':>16}"
    print("\n" + header)
    for label, result in results.items():
        s = result["policies"][label]
        tpot_ms = (s["tpot_p50_s"] * 1e3, s["tpot_p90_s"] * 1e3)
        print(
            f"{label:<32} {s['slo_attainment']:>6.1%} {s['ttft_attainment']:>7.1%} {s['tpot_attainment']:>7.1%} "
            f"{s['ttft_p50_s']:>7.3f}/{s['ttft_p90_s']:<7.3f} {tpot_ms[0]:>8.1f}/{tpot_ms[1]:<7.1f}"
        )
    print(f"results in {out}; logs in {workdir}")


if __name__ == "__main__":
    main()
