"""The ``tropical-profile`` command: measure an engine, import published tables, show a profile.

    tropical-profile vllm --model PATH [--tp N] [--dtype D] [--quick] --out profile.json      # in-process
    tropical-profile vllm --endpoint URL --model PATH --served-model-name NAME --out ...      # from outside
    tropical-profile sglang --endpoint URL --model PATH --served-model-name NAME --out ...
    tropical-profile import {splitwise,distserve} FILE ... --out profile.json
    tropical-profile import aiconfigurator --model HF_ID --system h200_sxm --backend vllm --tp N --out ...
    tropical-profile show profile.json [--plot fit.png]
    tropical-profile save --url ROUTER [--instance URL] --out profile.json             # a router's live profile

Every command writes or reads the versioned profile file that ``tropical simulate`` and ``tropical serve`` load
(``--profile PATH``). Errors in arguments or files exit with status 2 and a message naming the field.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from tropical_sched._version import __version__
from tropical_sched.adapters.vllm.version import UnsupportedVllmError
from tropical_sched.cli._common import (
    OneLineErrorParser,
    check_output_path,
    fraction,
    http_url,
    positive_float,
    require_matplotlib,
    write_output,
)
from tropical_sched.core.errors import ConfigError, TropicalError
from tropical_sched.predictors.profile import ProfileFile, ServingOverheads, load_profile, write_profile_file
from tropical_sched.profiling.pinning import OMP_BIND_VARIABLE, parse_cpu_list, pin_process, resolve_cpus

__all__ = ["build_parser", "main"]


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for the docs and tests); its errors are one line, as ``tropical``'s."""
    parser = OneLineErrorParser(
        prog="tropical-profile", description="Measure an engine, import published tables, or show a profile."
    )
    parser.add_argument("--version", action="version", version=f"tropical-profile (tropical-sched {__version__})")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=OneLineErrorParser)

    def sweep_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--out", required=True, help="profile file to write (JSON)")
        p.add_argument("--name", help="the profile's name (default: the file name without .json)")
        p.add_argument("--quick", action="store_true", help="coarse grid: about a fifth of the steps")
        p.add_argument("--repetitions", type=_positive_int, default=3, help="runs of each scenario (default 3)")
        p.add_argument("--max-num-seqs", type=_positive_int, default=64, help="largest decode batch (default 64)")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")
        p.add_argument(
            "--endpoint", type=http_url, help="profile a running OpenAI-compatible server at this URL instead"
        )
        p.add_argument("--served-model-name", help="with --endpoint: the model name the server expects")
        p.add_argument(
            "--in-process-profile",
            help="with --endpoint: the in-process profile of the same engine on the same cores (name or file); "
            "writes that profile plus a `serving` section, what the server adds to its steps (per step, per streamed "
            "token, per request), measured as the endpoint's times minus the profile's",
        )
        p.add_argument(
            "--kv-cache-tokens",
            type=_positive_int,
            help="with --endpoint: KV-cache capacity, if the server does not report it",
        )
        p.add_argument(
            "--cpus",
            help="run on these cores only, a CPU list as taskset's (1, 0-3, 0,2-3): in-process, the engine (at --tp "
            f"1; default: the cores {OMP_BIND_VARIABLE} names, if it names any), with as many threads; with "
            "--endpoint, this client (keep it off the server's cores)",
        )
        p.add_argument(
            "--interconnect-bandwidth-gbps",
            type=positive_float,
            help="worker-to-worker KV bandwidth to record, GB/s (default by device type)",
        )

    vllm = commands.add_parser("vllm", help="profile vLLM in-process (or a vLLM server with --endpoint)")
    vllm.add_argument("--model", required=True, help="Hugging Face checkpoint directory")
    vllm.add_argument("--tp", type=_positive_int, default=1, help="tensor parallel size")
    vllm.add_argument("--dtype", default="auto", help="vLLM dtype (default auto)")
    vllm.add_argument("--max-model-len", type=_positive_int, help="context length (default: the model's)")
    vllm.add_argument(
        "--kv-cache-memory-gib",
        type=positive_float,
        help="KV-cache size in GiB (needed on CPU; default: --gpu-memory-utilization)",
    )
    vllm.add_argument(
        "--gpu-memory-utilization", type=fraction, default=0.9, help="fraction of GPU memory vLLM may use (default 0.9)"
    )
    vllm.add_argument("--load-format", default="auto", help="'dummy': random weights at the real architecture's size")
    vllm.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs (faster start, slower decode)")
    sweep_options(vllm)

    sglang = commands.add_parser("sglang", help="profile a running SGLang server (--endpoint is required)")
    sglang.add_argument("--model", required=True, help="Hugging Face checkpoint directory (its config.json)")
    sweep_options(sglang)

    imp = commands.add_parser(
        "import", help="turn a published table, or AIConfigurator's kernel tables, into a profile"
    )
    imp.add_argument("source", choices=["splitwise", "distserve", "aiconfigurator"])
    imp.add_argument(
        "files",
        nargs="*",
        help="splitwise: perf_model.csv; distserve: profiler JSON, max_num_tokens.csv; aiconfigurator: none",
    )
    imp.add_argument(
        "--model",
        required=True,
        help="splitwise/distserve: model name as in the table (llama2-70b, opt-13b); aiconfigurator: a Hugging "
        "Face id it ships a config for (meta-llama/Meta-Llama-3.1-70B, Qwen/Qwen3-32B) or a config.json",
    )
    imp.add_argument("--hardware", default="a100-80gb", help="splitwise: a100-80gb or h100-80gb")
    imp.add_argument("--system", help="aiconfigurator: its system name (a100_sxm, h100_sxm, h200_sxm, b200_sxm, ...)")
    imp.add_argument("--backend", choices=["vllm", "sglang"], help="aiconfigurator: the engine of the tables")
    imp.add_argument("--backend-version", help="aiconfigurator: the tables' engine version (default: its current)")
    imp.add_argument(
        "--max-model-len", type=_positive_int, help="aiconfigurator: longest sequence (default: the model's context)"
    )
    imp.add_argument("--tp", type=_positive_int, required=True, help="tensor parallel size")
    imp.add_argument("--out", required=True)
    imp.add_argument("--name")

    save = commands.add_parser(
        "save", help="save the profile a running router predicts with (calibrated online) as a profile file"
    )
    save.add_argument("--url", required=True, type=http_url, help="the router's base URL (tropical serve)")
    save.add_argument(
        "--instance",
        type=http_url,
        help="the profile of this instance, its URL as in the router's cluster file (default: the router's own)",
    )
    save.add_argument("--out", required=True, help="profile file to write (JSON)")

    show = commands.add_parser("show", help="the fit against the samples, by kind of step")
    show.add_argument("profile", help="profile file or bundled name")
    show.add_argument("--plot", help="write a figure of measured vs predicted step times (PNG; needs matplotlib)")
    # Without a command, the error lists the commands rather than naming the internal 'command' destination.
    commands.metavar = "{" + ",".join(commands.choices) + "}"
    return parser


def _name(args: argparse.Namespace) -> str:
    return args.name or Path(args.out).name.removesuffix(".json")


def _write(profile: ProfileFile, out: str) -> None:
    write_output("--out", out, lambda: write_profile_file(profile, out))
    fit = profile.fit
    print(
        f"wrote {out}: {fit.num_samples_fitted} steps fitted ({fit.num_samples_excluded} excluded), R^2 {fit.r2:.4f}, "
        f"median relative error {fit.median_relative_error:.1%}, max {fit.max_relative_error:.1%}; "
        f"KV cache {profile.kv_cache.num_tokens} tokens"
    )
    if profile.serving is not None:
        print(_serving_line(profile.serving))


def _serving_line(serving: ServingOverheads) -> str:
    return (
        f"serving overheads: {serving.per_request_s * 1e3:.2f} ms per request, {serving.per_step_s * 1e3:.2f} ms "
        f"per step, {serving.per_streamed_token_s * 1e3:.3f} ms per streamed token; P/D hop "
        f"{serving.pd_hop_fixed_s * 1e3:.1f} ms + {serving.pd_hop_per_prompt_token_s * 1e6:.2f} us per prompt "
        f"token ({serving.source})"
    )


def _bandwidth(args: argparse.Namespace) -> float | None:
    return args.interconnect_bandwidth_gbps * 1e9 if args.interconnect_bandwidth_gbps else None


def _run_sweep(args: argparse.Namespace) -> None:
    if args.endpoint:
        from tropical_sched.profiling.endpoint import profile_endpoint

        if not args.served_model_name:
            raise ConfigError("--served-model-name is required with --endpoint")
        # Before the sweep: a wrong name must not cost one.
        engine = load_profile(args.in_process_profile).file if args.in_process_profile else None
        if args.cpus is not None:
            # The client: its timing of the streams must not wait for the server's cores (or share them).
            pin_process(parse_cpu_list(args.cpus))
        profile = profile_endpoint(
            args.endpoint,
            model_dir=args.model,
            served_model_name=args.served_model_name,
            out_name=_name(args),
            engine_name=args.command,
            num_kv_cache_tokens=args.kv_cache_tokens,
            max_num_seqs=args.max_num_seqs,
            quick=args.quick,
            repetitions=args.repetitions,
            interconnect_bandwidth_bytes_per_s=_bandwidth(args) or 32e9,
            progress=not args.no_progress,
        )
        if engine is not None:
            from tropical_sched.profiling.endpoint import with_serving_overheads

            profile = with_serving_overheads(engine, profile, name=_name(args))
    elif args.in_process_profile:
        raise ConfigError("--in-process-profile needs --endpoint URL (the served engine to compare it with)")
    elif args.command == "sglang":
        raise ConfigError("tropical-profile sglang needs --endpoint URL (SGLang is profiled from outside)")
    else:
        from tropical_sched.profiling.vllm_inprocess import profile_vllm

        cpus = resolve_cpus(args.cpus, tensor_parallel_size=args.tp, environ=os.environ)
        profile = profile_vllm(
            args.model,
            out_name=_name(args),
            tensor_parallel_size=args.tp,
            dtype=args.dtype,
            max_model_len=args.max_model_len,
            max_num_seqs=args.max_num_seqs,
            kv_cache_memory_bytes=int(args.kv_cache_memory_gib * (1 << 30)) if args.kv_cache_memory_gib else None,
            gpu_memory_utilization=args.gpu_memory_utilization,
            load_format=args.load_format,
            enforce_eager=args.enforce_eager,
            quick=args.quick,
            repetitions=args.repetitions,
            interconnect_bandwidth_bytes_per_s=_bandwidth(args),
            cpus=cpus,
            progress=not args.no_progress,
        )
    _write(profile, args.out)


def _import(args: argparse.Namespace) -> None:
    from tropical_sched.predictors.importers import import_distserve, import_splitwise

    if args.source == "aiconfigurator":
        _import_aiconfigurator(args)
        return
    expected = {"splitwise": "one file (perf_model.csv)", "distserve": "two files (profiler JSON, max_num_tokens.csv)"}
    if len(args.files) != (1 if args.source == "splitwise" else 2):
        raise ConfigError(f"import {args.source} takes {expected[args.source]}, got {len(args.files)}")
    for name in args.files:
        if not Path(name).is_file():
            raise ConfigError(f"import {args.source}: no such file: {name}")
    if args.source == "splitwise":
        profile = import_splitwise(
            args.files[0], model=args.model, hardware=args.hardware, tensor_parallel_size=args.tp, name=args.name
        )
    else:
        profile = import_distserve(
            args.files[0], args.files[1], model=args.model, tensor_parallel_size=args.tp, name=args.name
        )
    _write(profile, args.out)


def _import_aiconfigurator(args: argparse.Namespace) -> None:
    import time

    from tropical_sched.profiling.aiconfigurator import fit_error_by_context_band, import_aiconfigurator

    if args.files:
        raise ConfigError(f"import aiconfigurator takes no files, got {len(args.files)}: {' '.join(args.files)}")
    for option in ("system", "backend"):
        if getattr(args, option) is None:
            raise ConfigError(f"import aiconfigurator needs --{option}")
    started_s = time.perf_counter()
    profile = import_aiconfigurator(
        args.model,
        system=args.system,
        backend=args.backend,
        tensor_parallel_size=args.tp,
        backend_version=args.backend_version,
        max_model_len=args.max_model_len,
        name=args.name,
    )
    elapsed_s = time.perf_counter() - started_s
    fit = profile.fit
    print(
        f"tropical-profile: {len(profile.samples)} AIConfigurator samples in {elapsed_s:.1f} s; fit R^2 {fit.r2:.4f}, "
        f"median rel. error {fit.median_relative_error:.1%}, max {fit.max_relative_error:.1%}",
        file=sys.stderr,
    )
    for band in fit_error_by_context_band(profile):
        upper = f"{min(band.upper_tokens, profile.metadata.model.max_model_len):,}"
        print(
            f"  context {band.lower_tokens:,}-{upper} tokens: {band.num_samples} samples, median rel. error "
            f"{band.median_relative_error:.1%}, max {band.max_relative_error:.1%}",
            file=sys.stderr,
        )
    _write(profile, args.out)


def _save(args: argparse.Namespace) -> None:
    """Fetch ``GET {url}/v1/tropical/profile[?instance=URL]``, check it as a profile file, write it."""
    import httpx

    from tropical_sched.predictors.profile import profile_from_json

    endpoint = args.url.rstrip("/") + "/v1/tropical/profile"
    try:
        response = httpx.get(endpoint, params={"instance": args.instance} if args.instance else None, timeout=30.0)
    except httpx.HTTPError as exc:
        raise ConfigError(f"--url {args.url}: cannot fetch {endpoint}: {exc!r}") from None
    source = str(response.url)
    if response.status_code != 200:
        try:
            detail = str(response.json()["error"]["message"])
        except (ValueError, KeyError, TypeError):  # not the router's error object: a proxy's page, another server
            detail = response.text[:300]
        raise ConfigError(f"{source}: HTTP {response.status_code}: {detail}")
    # ProfileFormatError names the URL and the field (the router's answer is one line of JSON)
    profile = profile_from_json(response.text, source)
    _write(profile.file, args.out)


def _show(args: argparse.Namespace) -> None:
    from tropical_sched.profiling.show import fit_table, plot_fit

    profile = load_profile(args.profile)
    print(profile.describe())
    environment = profile.file.metadata.environment
    if environment:
        print("environment: " + ", ".join(f"{k}={v}" for k, v in environment.items()))
    print(fit_table(profile))
    if profile.file.serving is not None:
        print(_serving_line(profile.file.serving))
    if args.plot:
        write_output("--plot", args.plot, lambda: plot_fit(profile, args.plot))
        print(f"wrote {args.plot}")


def _check_outputs(args: argparse.Namespace) -> None:
    """Before any work (a sweep takes minutes to hours): the output file can be written, matplotlib is there."""
    if getattr(args, "out", None) is not None:
        check_output_path("--out", args.out)
    if getattr(args, "plot", None) is not None:
        check_output_path("--plot", args.plot, create_directory=True)  # as tropical goodput --plot
        require_matplotlib("--plot")


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``tropical-profile``; returns the exit status (2 on bad arguments or files)."""
    args = build_parser().parse_args(argv)
    try:
        _check_outputs(args)
        if args.command in ("vllm", "sglang"):
            _run_sweep(args)
        elif args.command == "import":
            _import(args)
        elif args.command == "save":
            _save(args)
        else:
            _show(args)
    except (TropicalError, UnsupportedVllmError) as exc:
        print(f"tropical-profile: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
