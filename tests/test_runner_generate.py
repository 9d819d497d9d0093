"""The bundled C runner generates from token ids (`slimc_run model.so --generate N ids...`):
greedy prefill (chunked, right-padded) + decode over its own KV cache, with no Python; its
tokens equal `slimc.load(OUT).generate`'s (host natively, aarch64 under qemu)."""

from __future__ import annotations

import subprocess

import slimc
from tests.test_generate import GEN, _save

#: Shorter than, equal to and spanning several prefill chunks (prefill length 8).
PROMPTS = ([5, 9], list(range(3, 11)), [5, 9, 17, 33] + list(range(40, 57)))
NEW_TOKENS = 8


def _compile(cli, tmp_path, *flags):
    model_dir = _save("llama", tmp_path / "llama")
    out = tmp_path / "out"
    result = cli("compile", model_dir, "--generate", "--max-length", str(GEN["max_length"]),
                 "--prefill-length", str(GEN["prefill_length"]), "--bundle", "-o", out, "-q",
                 *flags)
    assert result.code == 0, result.err
    return out


def _runner(prefix: list[str], out, args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([*prefix, str(out / "runtime" / "slimc_run"), str(out / "model.so"),
                           "--generate", *args], capture_output=True, text=True, env={},
                          timeout=600)


def _runner_tokens(prefix: list[str], out, prompt: list[int], *flags: str) -> list[int]:
    proc = _runner(prefix, out, [str(NEW_TOKENS), *flags, *map(str, prompt)])
    assert proc.returncode == 0, proc.stderr
    return [int(t) for t in proc.stdout.split()]


def test_host_runner_generates_like_slimc(cli, tmp_path):
    out = _compile(cli, tmp_path, "-t", "host")
    model = slimc.load(out)
    for prompt in PROMPTS:
        expected = model.generate(prompt, NEW_TOKENS, stop=False).tokens
        assert len(expected) == NEW_TOKENS
        assert _runner_tokens([], out, prompt, "--ignore-eos") == expected
        # with the model's stop ids, as `slimc generate` does by default
        assert _runner_tokens([], out, prompt) == model.generate(prompt, NEW_TOKENS).tokens
    for args in (["8", "500"], ["60", "1", "2"], ["0", "1"]):  # bad vocab id, too long, n=0
        proc = _runner([], out, args)
        assert proc.returncode == 2 and "slimc_run:" in proc.stderr


def test_aarch64_runner_generates_under_qemu_without_python(cli, tmp_path, aarch64_emulator):
    out = _compile(cli, tmp_path, "-t", "arm")
    model = slimc.load(out, emulate=True)
    prompt = PROMPTS[2]
    expected = model.generate(prompt, NEW_TOKENS, stop=False).tokens
    qemu = [str(aarch64_emulator.qemu), "-L", str(aarch64_emulator.sysroot)]
    assert _runner_tokens(qemu, out, prompt, "--ignore-eos") == expected
