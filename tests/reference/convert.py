"""Run transformers 4.28.1's own ``convert_llama_weights_to_hf.py`` on a tiny checkpoint.

The converter is imported from the pinned wheel and run through its own ``main()``. Tiny models need
exactly two things it does not offer as flags, supplied by wrapping (not editing) two names in its
module namespace:

- ``LlamaConfig(...)`` is called without ``vocab_size`` (so 32000); the wrapper adds the row count of
  the checkpoint's ``tok_embeddings.weight``, which is what the real 32000-row LLaMA gets.
- ``model.save_pretrained(path)`` uses the 10GB default shard size; the wrapper passes
  ``max_shard_size`` so tiny models are split into several shards as real ones are.

    python -m reference.convert --input_dir LLAMA --model_size 13B --output_dir OUT [--max_shard_size 60KB]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def vocab_rows(meta_folder: Path) -> int:
    """Rows of tok_embeddings in shard 00 (the embedding is split on columns, so every shard has all)."""
    import torch

    return int(torch.load(meta_folder / "consolidated.00.pth")["tok_embeddings.weight"].shape[0])


def run(input_dir: Path, model_size: str, output_dir: Path, max_shard_size: str = "10GB") -> None:
    """Convert in this process; importing torch/transformers is the caller's cost."""
    import transformers.models.llama.convert_llama_weights_to_hf as conv

    rows = vocab_rows(Path(input_dir) / model_size)
    real_config, real_model = conv.LlamaConfig, conv.LlamaForCausalLM

    def config_with_vocab(**kwargs: object) -> object:
        return real_config(vocab_size=rows, **kwargs)

    class ModelWithShardSize:
        @staticmethod
        def from_pretrained(*args: object, **kwargs: object) -> object:
            model = real_model.from_pretrained(*args, **kwargs)
            save = model.save_pretrained
            model.save_pretrained = lambda path, **kw: save(path, max_shard_size=max_shard_size, **kw)
            return model

    argv = sys.argv
    conv.LlamaConfig, conv.LlamaForCausalLM = config_with_vocab, ModelWithShardSize
    sys.argv = [
        "convert_llama_weights_to_hf.py",
        "--input_dir",
        str(input_dir),
        "--model_size",
        model_size,
        "--output_dir",
        str(output_dir),
    ]
    try:
        conv.main()
    finally:
        conv.LlamaConfig, conv.LlamaForCausalLM, sys.argv = real_config, real_model, argv


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--input_dir", type=Path, required=True)
    ap.add_argument("--model_size", required=True)
    ap.add_argument("--output_dir", type=Path, required=True)
    ap.add_argument("--max_shard_size", default="10GB")
    a = ap.parse_args()
    run(a.input_dir, a.model_size, a.output_dir, a.max_shard_size)
    print(json.dumps(sorted(p.name for p in a.output_dir.iterdir())))


if __name__ == "__main__":
    main()
