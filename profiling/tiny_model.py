"""Build a tiny random-weight Llama and a byte-level BPE tokenizer trained locally (no download).

For engine tests and CPU demos: vLLM and SGLang load it like any Hugging Face checkpoint. Needs ``transformers``
and ``tokenizers`` (``pip install 'tropical-sched[tiny-model]'``; vLLM and SGLang bring them) and ``torch`` (the
build that fits the machine; it comes with the engine). From the command line::

    python -m tropical_sched.profiling.tiny_model --out ./tiny-llama [--hidden-size 128 --num-layers 2 ...]
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["MissingDependencyError", "build_tiny_llama", "main"]

_CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
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


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m tropical_sched.profiling.tiny_model --out DIR``: write the tiny model; prints its path."""
    parser = argparse.ArgumentParser(
        prog="python -m tropical_sched.profiling.tiny_model",
        description="Write a tiny random-weight Llama (bf16) and a locally trained tokenizer to a directory that "
        "vLLM and SGLang load as a model (no download). The defaults are the engine tests' model.",
    )
    parser.add_argument("--out", required=True, type=Path, help="directory to write (created if missing)")
    parser.add_argument("--hidden-size", type=int, default=128, help="hidden size (intermediate: twice it)")
    parser.add_argument("--num-layers", type=int, default=2, help="decoder layers")
    parser.add_argument("--num-heads", type=int, default=4, help="attention heads (must divide --hidden-size)")
    parser.add_argument("--num-kv-heads", type=int, default=2, help="KV heads (must divide --num-heads)")
    parser.add_argument("--max-position-embeddings", type=int, default=4096, help="longest context, tokens")
    parser.add_argument("--vocab-size", type=int, default=352, help="tokenizer vocabulary (byte-level BPE, >= 259)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    args = parser.parse_args(argv)
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
