"""Host side of ``slimc generate`` / ``CompiledModel.generate``: tokenize, run, stream text.

Host artifacts run the loop (:mod:`slimc.generation.loop`) in this process; cross-compiled ones
run the same file inside qemu, which prints one JSON line per token that is streamed back here.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slimc.errors import UsageError
from slimc.generation.loop import Sampling

_LOOP = Path(__file__).with_name("loop.py")


@dataclass
class GenerationResult:
    text: str | None
    tokens: list[int]
    stats: dict[str, Any]
    #: Logits of the first generated position (the prompt's last token).
    first_logits: list[float]


class _TextStream:
    """Decode tokens incrementally: emit only the new suffix of the decoded text."""

    def __init__(self, tokenizer, on_text: Callable[[str], None]) -> None:
        self.tokenizer, self.on_text, self.tokens, self.shown = tokenizer, on_text, [], ""

    def __call__(self, token: int) -> None:
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the rest
            return
        self.on_text(text[len(self.shown):])
        self.shown = text


def generate(model, prompt: str | Sequence[int], max_new_tokens: int = 32, *,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             seed: int | None = None, stop: bool = True,
             on_text: Callable[[str], None] | None = None,
             on_token: Callable[[int], None] | None = None) -> GenerationResult:
    """Generate from a loaded generation artifact (``slimc.load(OUT)``)."""
    spec = model.manifest.get("generation")
    if not spec:
        raise UsageError(f"{model.directory} was not compiled for generation.",
                         hint="Compile the causal LM with `slimc compile MODEL --generate`.")
    if max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be at least 1, not {max_new_tokens}.")
    if temperature < 0 or top_k < 0 or not 0 < top_p <= 1:
        raise UsageError("Sampling needs temperature >= 0, top-k >= 0 and 0 < top-p <= 1.")
    tokenizer = model.tokenizer() if isinstance(prompt, str) or on_text else None
    ids = list(tokenizer(prompt)["input_ids"]) if isinstance(prompt, str) else \
        [int(t) for t in prompt]
    if not ids:
        raise UsageError("The prompt is empty.", hint="Give at least one token of text.")
    if len(ids) + max_new_tokens > spec["max_length"]:
        raise UsageError(f"The prompt ({len(ids)} tokens) plus --max-new-tokens "
                         f"{max_new_tokens} exceeds the artifact's cache of "
                         f"{spec['max_length']} positions.",
                         hint="Shorten the prompt or generate fewer tokens, or recompile with a "
                         "larger --max-length.")
    vocab = spec["vocab"]
    if any(not 0 <= t < vocab for t in ids):
        raise UsageError(f"Token ids must lie in [0, {vocab}).")
    sampling = Sampling(temperature, top_k, top_p, seed)
    stop_ids = spec["stop_ids"] if stop else []
    callbacks = [c for c in (on_token, _TextStream(tokenizer, on_text) if on_text else None)
                 if c is not None]

    def emit(token: int) -> None:
        for callback in callbacks:
            callback(token)

    if model.cross_triple:
        tokens, stats, first = _generate_emulated(model, spec, ids, max_new_tokens, sampling,
                                                  stop_ids, emit)
    else:
        generator = model.generator()
        tokens, run_stats = generator.generate(ids, max_new_tokens, sampling, stop_ids, emit)
        stats, first = run_stats.to_json(), run_stats.first_logits
    text = tokenizer.decode(tokens, skip_special_tokens=True) if tokenizer else None
    return GenerationResult(text, tokens, stats, first)


def _generate_emulated(model, spec, ids, max_new_tokens, sampling: Sampling, stop_ids, emit):
    from slimc.backends.tvm.emulation import EmulationError, find_emulator

    emulator = find_emulator(model.cross_triple)
    request = {"spec": spec, "prompt": ids, "max_new_tokens": max_new_tokens,
               "sampling": vars(sampling), "stop_ids": stop_ids}
    env = {"TVM_NUM_THREADS": str(model.threads)} if model.threads else {}
    host_env = {k: v for k, v in os.environ.items()
                if k not in ("PYTHONHOME", "PYTHONPATH", "PYTHONSTARTUP", "LD_PRELOAD",
                             "LD_LIBRARY_PATH")}
    with tempfile.TemporaryDirectory(prefix="slimc-gen-") as tmp:
        path = Path(tmp, "request.json")
        path.write_text(json.dumps(request))
        cmd = emulator.command(str(_LOOP), str(model.library.resolve()), str(path), env=env)
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=host_env)
        final = None
        assert proc.stdout is not None
        for line in proc.stdout:
            message = json.loads(line)
            if "token" in message:
                emit(int(message["token"]))
            elif "done" in message:
                final = message
        stderr = proc.stderr.read() if proc.stderr else ""
        if proc.wait() != 0 or final is None:
            raise EmulationError(f"generation under qemu failed (exit {proc.returncode}):\n"
                                 f"{stderr.strip()[-3000:]}")
    return final["done"], final["stats"], final["first_logits"]
