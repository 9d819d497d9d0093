"""Library bytes vs weight bytes of a tied one-layer Llama (vocab 8192, width 64) per pipeline:
a tied table stored twice shows as a library about one table over the weights.

    .venv/bin/python benchmarks/tied_table_sizes.py "quantize{weights=int8}" \\
        "gen:quantize{weights=int4,group_size=32}"        # gen: a --generate artifact

Session 29's numbers: docs/benchmarks.md, "A tied embedding table was stored twice".
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch
import transformers as T

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from slimc.compiler import CompileOptions, compile_model  # noqa: E402


def tied_llama(directory: Path) -> Path:
    torch.manual_seed(0)
    config = T.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                           num_attention_heads=4, num_key_value_heads=2, vocab_size=8192,
                           max_position_embeddings=64, tie_word_embeddings=True)
    config.architectures = ["LlamaForCausalLM"]
    path = directory / "model"
    T.LlamaForCausalLM(config).eval().save_pretrained(path)
    return path


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="tied-sizes-"))
    model = tied_llama(work)
    for i, request in enumerate(sys.argv[1:]):
        generate = request.startswith("gen:")
        out = compile_model(str(model), CompileOptions(
            pipeline=request.removeprefix("gen:"), output=work / f"{i}.slimc", threads=2,
            cache=False, generate=generate, max_length=32, prefill_length=8,
            inputs=[] if generate else ["input_ids=1x16:int64"])).output
        m = json.loads((out / "manifest.json").read_text())
        weights, library = m["weight_bytes_after"], m["library_bytes"]
        print(request, weights, library, round(library / weights, 3),
              m["verification"]["passed"], flush=True)


if __name__ == "__main__":
    main()
