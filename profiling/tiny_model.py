"""Build a small random-weight Llama and a byte-level BPE tokenizer trained locally (no download).

For engine tests, CPU demos and real-engine benchmarks: vLLM and SGLang load it like any Hugging Face checkpoint.
Two shapes are named (:data:`PRESETS`):

* ``tiny`` (the default): 2 layers, hidden 128, 0.4M parameters. The engine tests' model: it starts in seconds,
  but its steps (about 1 ms for a decode on one CPU core) are as short as what serving adds to them (4-10 ms per
  request, 0.5-1.5 ms per streamed token), and its tokens reach clients in bursts.
* ``served``: 32 layers, hidden 256, 4 heads and 2 KV heads, 19M parameters. On one pinned core of this project's
  CPU machine a decode step takes 7.6-10 ms at batch 1 and 17-42 ms at batch 32 (short to 1,100-token contexts), a
  1,024-token prefill 210 ms, and its OpenAI server adds about 2 ms per step and 4 ms per request (measured:
  docs/profiling.md, bundled as ``cpu-served-llama``), so tokens stream one by one and serving costs are a few
  percent of a step, as on a GPU deployment. The real-engine benchmarks and the fidelity validation use it.

Needs ``transformers`` and ``tokenizers`` (``pip install 'tropical-sched[tiny-model]'``; vLLM and SGLang bring
them) and ``torch`` (the build that fits the machine; it comes with the engine). From the command line::

    python -m tropical_sched.profiling.tiny_model --out ./tiny-llama
    python -m tropical_sched.profiling.tiny_model --preset served --out ./served-llama
    python -m tropical_sched.profiling.tiny_model --out ./other --hidden-size 64 --num-layers 3 ...
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from tropical_sched.core.errors import UnknownNameError

__all__ = ["PRESETS", "MissingDependencyError", "ModelPreset", "build_preset", "build_tiny_llama", "main"]

_CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelPreset:
    """A named model shape (the intermediate size is twice the hidden size; the vocabulary is 352 tokens).

    Attributes:
        hidden_size: hidden size.
        num_layers: decoder layers.
        num_heads: attention heads.
        num_kv_heads: KV heads (grouped-query attention).
        purpose: what it is for, one line.
    """

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    purpose: str

    def sizes(self) -> dict[str, int]:
        """The keyword arguments of :func:`build_tiny_llama` that give this shape."""
        return {
            "hidden_size": self.hidden_size,
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "num_kv_heads": self.num_kv_heads,
        }


# name -> shape (see the module docstring for the step times they give)
PRESETS: Mapping[str, ModelPreset] = MappingProxyType(
    {
        "tiny": ModelPreset(
            hidden_size=128,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            purpose="the engine tests' model: starts in seconds, decode steps of about 1 ms on a CPU core",
        ),
        "served": ModelPreset(
            hidden_size=256,
            num_layers=32,
            num_heads=4,
            num_kv_heads=2,
            purpose="real-engine benchmarks: 19M parameters, decode steps of 8-10 ms at batch 1 on a CPU core, "
            "prefill 210 ms per 1,024 tokens",
        ),
    }
)


class MissingDependencyError(ImportError):
    """``torch``, ``transformers`` or ``tokenizers`` is not installed (the message says how to install it)."""


def _check_dependencies() -> None:
    """Raise :class:`MissingDependencyError` naming every missing package and how to get it, in one line."""
    # find_spec looks without importing (transformers without torch prints a warning of its own); an installed
    # but broken package fails later, in the import, with its own error.
    missing = [name for name in ("transformers", "tokenizers", "torch") if importlib.util.find_spec(name) is None]
    if not missing:
        return
    hints = []
    if hf := [name for name in missing if name != "torch"]:
        hints.append(f"{' and '.join(hf)}: pip install 'tropical-sched[tiny-model]'")
    if "torch" in missing:
        hints.append(
            "torch: install the build that fits this machine (it comes with vLLM and SGLang; CPU only: "
            "pip install torch --index-url https://download.pytorch.org/whl/cpu)"
        )
    raise MissingDependencyError(f"the tiny model needs {'; '.join(hints)}")


def build_tiny_llama(
    path: str | Path,
    *,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    max_position_embeddings: int = 4096,
    vocab_size: int = 352,
    seed: int = 0,
) -> Path:
    """Write a tiny Llama (bf16, random weights) and its tokenizer to ``path``; returns ``path``.

    The tokenizer is a byte-level BPE trained on a fixed built-in text, so the same call gives the same files.
    Token ids 0-2 are the special tokens ``<unk>``, ``<s>``, ``</s>``.

    Raises:
        MissingDependencyError: ``torch``, ``transformers`` or ``tokenizers`` is missing (the message names them).
    """
    _check_dependencies()
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    corpus = [
        "the quick brown fox jumps over the lazy dog " * 4,
        "serving large language models with prefill and decode workers under latency objectives " * 4,
        "time to first token and time per output token are the two service level objectives " * 4,
    ]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.chat_template = _CHAT_TEMPLATE
    fast.save_pretrained(path)
    config = LlamaConfig(
        vocab_size=tokenizer.get_vocab_size(),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=1,
        eos_token_id=2,
        torch_dtype="bfloat16",
    )
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(path)
    return path


def build_preset(path: str | Path, preset: str, *, seed: int = 0) -> Path:
    """Write the model of a named shape (:data:`PRESETS`, e.g. ``served``) to ``path``; returns ``path``.

    Raises:
        UnknownNameError: no preset of that name (the known ones are listed).
        MissingDependencyError: ``torch``, ``transformers`` or ``tokenizers`` is missing.
    """
    if preset not in PRESETS:
        raise UnknownNameError("model preset", preset, list(PRESETS))
    return build_tiny_llama(path, **PRESETS[preset].sizes(), seed=seed)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m tropical_sched.profiling.tiny_model --out DIR [--preset NAME]``: write the model; prints its
    path."""
    parser = argparse.ArgumentParser(
        prog="python -m tropical_sched.profiling.tiny_model",
        description="Write a small random-weight Llama (bf16) and a locally trained tokenizer to a directory that "
        "vLLM and SGLang load as a model (no download). The default is the engine tests' tiny model; "
        "--preset served is the real-engine benchmarks' model; a size option overrides the preset's.",
    )
    parser.add_argument("--out", required=True, type=Path, help="directory to write (created if missing)")
    parser.add_argument(
        "--preset",
        choices=list(PRESETS),
        default="tiny",
        help="; ".join(
            f"{name}: {p.num_layers} layers, hidden {p.hidden_size} ({p.purpose})" for name, p in PRESETS.items()
        )
        + " (default tiny)",
    )
    parser.add_argument("--hidden-size", type=int, help="hidden size (intermediate: twice it)")
    parser.add_argument("--num-layers", type=int, help="decoder layers")
    parser.add_argument("--num-heads", type=int, help="attention heads (must divide --hidden-size)")
    parser.add_argument("--num-kv-heads", type=int, help="KV heads (must divide --num-heads)")
    parser.add_argument("--max-position-embeddings", type=int, default=4096, help="longest context, tokens")
    parser.add_argument("--vocab-size", type=int, default=352, help="tokenizer vocabulary (byte-level BPE, >= 259)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    args = parser.parse_args(argv)
    for name, value in PRESETS[args.preset].sizes().items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for name in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "max_position_embeddings"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.hidden_size % args.num_heads:
        parser.error(f"--num-heads {args.num_heads} must divide --hidden-size {args.hidden_size}")
    if args.num_heads % args.num_kv_heads:
        parser.error(f"--num-kv-heads {args.num_kv_heads} must divide --num-heads {args.num_heads}")
    if args.vocab_size < 259:  # the 256 byte symbols and the 3 special tokens
        parser.error(f"--vocab-size must be at least 259, got {args.vocab_size}")
    try:
        path = build_tiny_llama(
            args.out,
            hidden_size=args.hidden_size,
            num_layers=args.num_layers,
            num_heads=args.num_heads,
            num_kv_heads=args.num_kv_heads,
            max_position_embeddings=args.max_position_embeddings,
            vocab_size=args.vocab_size,
            seed=args.seed,
        )
    except MissingDependencyError as exc:
        print(f"{parser.prog}: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
