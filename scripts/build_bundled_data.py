"""Rebuild the data bundled in the wheel (profiles and traces) from the upstream files.

Maintainer tool, run by hand when upstream data or the importers change; the package never reads the upstream
folder at run time. Usage:

    python scripts/build_bundled_data.py /path/to/shared/data

Profiles are built with the same importers that ``tropical-profile import`` exposes; the AIConfigurator profiles
need ``aiconfigurator-core`` installed (``pip install '.[aiconfigurator]'``), not the shared folder. Traces are
copied byte-for-byte and gzip-compressed (mtime 0, so rebuilds are reproducible).
"""

from __future__ import annotations

import gzip
import shutil
import sys
from pathlib import Path

from tropical_sched.predictors.importers import import_distserve, import_splitwise
from tropical_sched.predictors.profile import write_profile_file
from tropical_sched.profiling.aiconfigurator import import_aiconfigurator

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "src" / "tropical_sched" / "data"

TRACES = {
    # bundled name -> path under shared/data
    "azure-conv-2023.csv.gz": "traces/azure-llm-2023/data/AzureLLMInferenceTrace_conv.csv",
    "mooncake-conversation.jsonl.gz": "traces/mooncake/FAST25-release/traces/conversation_trace.jsonl",
    "arxiv-summarization.csv.gz": "traces/vidur/data/processed_traces/"
    "arxiv_summarization_stats_llama2_tokenizer_filtered_v2.csv",
    "sharegpt.csv.gz": "traces/sarathi-serve/data/processed_traces/sharegpt_8k_filtered_stats_llama2_tokenizer.csv",
}

AICONFIGURATOR_PROFILES = (
    # (model, AIConfigurator system, backend, TP): current long-context models on current GPUs
    ("meta-llama/Meta-Llama-3.1-70B", "a100_sxm", "vllm", 4),
    ("meta-llama/Meta-Llama-3.1-70B", "h100_sxm", "vllm", 4),
    ("meta-llama/Meta-Llama-3.1-70B", "h200_sxm", "vllm", 4),
    ("meta-llama/Meta-Llama-3.1-8B", "h100_sxm", "vllm", 1),
    ("meta-llama/Meta-Llama-3.1-8B", "h200_sxm", "vllm", 1),
    ("Qwen/Qwen3-32B", "h200_sxm", "vllm", 2),
    ("Qwen/Qwen3-32B", "h200_sxm", "sglang", 2),
)

LICENSES = {
    "splitwise-sim-LICENSE": "profiles/splitwise-sim/LICENSE",
    "distserve-LICENSE": "profiles/distserve/LICENSE",
    # the aiconfigurator-core wheel ships no licence file; its METADATA says Apache-2.0, whose text this is
    "aiconfigurator-core-LICENSE": "profiles/distserve/LICENSE",
    "azure-llm-2023-LICENSE": "traces/azure-llm-2023/LICENSE",
    "mooncake-LICENSE": "traces/mooncake/LICENSE-APACHE",
    "vidur-LICENSE": "traces/vidur/LICENSE",
    "sarathi-serve-LICENSE": "traces/sarathi-serve/LICENSE",
}


def main(shared_data: Path) -> None:
    profiles = DATA / "profiles"
    profiles.mkdir(parents=True, exist_ok=True)
    perf_model = shared_data / "profiles/splitwise-sim/data/perf_model.csv"
    for hardware in ("a100-80gb", "h100-80gb"):
        for tp in (2, 4, 8):
            profile = import_splitwise(perf_model, model="llama2-70b", hardware=hardware, tensor_parallel_size=tp)
            write_profile_file(profile, profiles / f"{profile.metadata.name}.json")
            print(
                f"{profile.metadata.name}: R^2 {profile.fit.r2:.4f}, max rel err {profile.fit.max_relative_error:.3f}"
            )
    distserve = shared_data / "profiles/distserve/simdistserve/estimators/profile_data"
    for model, tp in (("opt-13b", 1), ("opt-66b", 4)):
        profile = import_distserve(
            distserve / "profiler-a100-80g.vllm.json",
            distserve / "max_num_tokens.csv",
            model=model,
            tensor_parallel_size=tp,
        )
        write_profile_file(profile, profiles / f"{profile.metadata.name}.json")
        print(f"{profile.metadata.name}: R^2 {profile.fit.r2:.4f}, max rel err {profile.fit.max_relative_error:.3f}")
    for model, system, backend, tp in AICONFIGURATOR_PROFILES:
        profile = import_aiconfigurator(model, system=system, backend=backend, tensor_parallel_size=tp)
        write_profile_file(profile, profiles / f"{profile.metadata.name}.json")
        print(f"{profile.metadata.name}: R^2 {profile.fit.r2:.4f}, max rel err {profile.fit.max_relative_error:.3f}")

    traces = DATA / "traces"
    traces.mkdir(parents=True, exist_ok=True)
    for name, relative in TRACES.items():
        with (
            open(shared_data / relative, "rb") as src,
            open(traces / name, "wb") as raw,
            gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9) as dst,
        ):
            shutil.copyfileobj(src, dst)
        print(f"{name}: {(traces / name).stat().st_size / 1e3:.0f} kB")

    licenses = DATA / "licenses"
    licenses.mkdir(parents=True, exist_ok=True)
    for name, relative in LICENSES.items():
        shutil.copyfile(shared_data / relative, licenses / name)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(Path(sys.argv[1]))
