"""Text generation artifacts (`slimc compile --generate`): prefill + decode over a KV cache.

Greedy tokens of the compiled artifact must equal transformers' greedy ``generate`` (same stop
tokens) for each architecture family, with prompts shorter than, equal to a few and spanning
several prefill chunks; quantized artifacts must match their own IR on the first token.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
import transformers as T

import slimc
from slimc.compiler import CompileOptions, compile_model

TEXT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            vocab_size=128, max_position_embeddings=64, num_key_value_heads=2)

#: Architectures generation must support: GQA (Llama, Qwen2, Gemma3, Phi3), a sliding window on
#: alternating layers (Gemma3, window 4 < the prompts), learned positions + Conv1D (GPT-2).
ARCHS = {
    "llama": (T.LlamaConfig, T.LlamaForCausalLM, TEXT),
    "qwen2": (T.Qwen2Config, T.Qwen2ForCausalLM, TEXT),
    "gemma3": (T.Gemma3TextConfig, T.Gemma3ForCausalLM,
               dict(TEXT, head_dim=8, sliding_window=4,
                    layer_types=["sliding_attention", "full_attention"])),
    "phi3": (T.Phi3Config, T.Phi3ForCausalLM, dict(TEXT, pad_token_id=0, eos_token_id=1)),
    "gpt2": (T.GPT2Config, T.GPT2LMHeadModel,
             dict(n_embd=32, n_layer=2, n_head=4, n_positions=64, vocab_size=128,
                  bos_token_id=0, eos_token_id=0, initializer_range=0.2)),
    # Partial rotary + parallel residual; learned positions offset by 2; fused QKV split.
    "gpt_neox": (T.GPTNeoXConfig, T.GPTNeoXForCausalLM,
                 dict(TEXT, num_key_value_heads=None, eos_token_id=1, initializer_range=0.2)),
    "opt": (T.OPTConfig, T.OPTForCausalLM,
            dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64,
                 vocab_size=128, max_position_embeddings=64, word_embed_proj_dim=32,
                 eos_token_id=1, init_std=0.2)),
    "falcon": (T.FalconConfig, T.FalconForCausalLM,
               dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, vocab_size=128,
                    max_position_embeddings=64, eos_token_id=1, initializer_range=0.2)),
}
PROMPT_LENGTHS = (2, 9, 21)  # one chunk, two, three (prefill length 8)
NEW_TOKENS = 8
GEN = dict(max_length=48, prefill_length=8)


def _save(arch: str, path) -> str:
    config_cls, model_cls, kwargs = ARCHS[arch]
    torch.manual_seed(0)
    config = config_cls(**kwargs)
    config.architectures = [model_cls.__name__]
    model_cls(config).eval().save_pretrained(path)
    return str(path)


def _word_tokenizer(path) -> None:
    """A 128-word tokenizer ("w0".."w127") so the CLI can take text prompts."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(128)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w3"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    T.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w3").save_pretrained(path)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """arch -> (HF model dir, compiled fp32 host artifact); built on first use."""
    built: dict[str, tuple[str, str]] = {}

    def get(arch: str) -> tuple[str, str]:
        if arch not in built:
            root = tmp_path_factory.mktemp(arch)
            model_dir = _save(arch, root / "model")
            if arch == "llama":
                _word_tokenizer(model_dir)
            out = compile_model(model_dir, CompileOptions(
                generate=True, output=root / "out.slimc", threads=2, **GEN)).output
            built[arch] = (model_dir, str(out))
        return built[arch]

    return get


def _reference(model_dir: str, prompt: list[int]) -> list[int]:
    model = T.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=NEW_TOKENS, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def _prompt(length: int, seed: int) -> list[int]:
    return torch.randint(4, 128, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("arch", list(ARCHS))
def test_greedy_tokens_equal_transformers(artifacts, arch):
    model_dir, out = artifacts(arch)
    model = slimc.load(out)
    generated = []
    for length in PROMPT_LENGTHS:
        prompt = _prompt(length, seed=length)
        result = model.generate(prompt, NEW_TOKENS)
        assert result.tokens == _reference(model_dir, prompt), (arch, length)
        generated += result.tokens
    assert len(set(generated)) > 3  # a real sequence, not one token repeated
    spec = model.manifest["generation"]
    assert spec["kv_cache_bytes"] == 2 * 2 * spec["kv_heads"] * 48 * spec["head_dim"] * 4


def test_cli_generate_streams_text_and_reports_speed(artifacts, cli):
    _, out = artifacts("llama")
    result = cli("generate", out, "--prompt", "w5 w9 w17 w33", "--max-new-tokens", "6",
                 "--ignore-eos")
    assert result.code == 0, result.err
    words = result.out.split()
    assert len(words) == 6 and all(w.startswith("w") for w in words)
    assert re.search(r"prefill: \d+ tokens in .* ms .*decode: 6 tokens, [\d.]+ tokens/s",
                     result.err), result.err
    as_json = cli("generate", out, "--prompt", "w5 w9 w17 w33", "-n", "6", "--ignore-eos",
                  "--json")
    data = json.loads(as_json.out)
    assert data["text"].split() == words and len(data["tokens"]) == 6
    assert data["stats"]["decode_tokens_per_s"] > 0


def test_cli_generate_takes_token_ids(artifacts, cli):
    """--prompt-ids: what a model without a tokenizer needs on the command line; the same
    greedy tokens as the Python API, printed as ids."""
    _, out = artifacts("llama")
    prompt = _prompt(5, seed=3)
    result = cli("generate", out, "--prompt-ids", ",".join(map(str, prompt)), "-n", "6",
                 "--ignore-eos")
    assert result.code == 0, result.err
    expected = slimc.load(out).generate(prompt, 6, stop=False).tokens
    assert [int(t) for t in result.out.split()] == expected
    for bad in (["--prompt-ids", "1,x"], ["--prompt-ids", "1,2", "--prompt", "w1"], []):
        refused = cli("generate", out, *bad, "-n", "2")
        assert refused.code == 2 and "prompt" in refused.err and "Traceback" not in refused.err


def test_sampling_is_seeded_and_respects_top_k(artifacts):
    _, out = artifacts("llama")
    model = slimc.load(out)
    prompt = _prompt(5, seed=1)
    a = model.generate(prompt, 8, temperature=1.5, top_k=5, seed=7, stop=False)
    b = model.generate(prompt, 8, temperature=1.5, top_k=5, seed=7, stop=False)
    assert a.tokens == b.tokens
    first = np.asarray(a.first_logits)
    assert a.tokens[0] in np.argsort(-first)[:5]


def test_generation_errors_are_usage_errors(artifacts, cli, hf_dir, tmp_path):
    _, out = artifacts("llama")
    too_long = cli("generate", out, "--prompt", " ".join(["w7"] * 45), "-n", "8")
    assert too_long.code == 2 and "cache" in too_long.err
    with pytest.raises(slimc.errors.UsageError, match="generation artifact"):
        slimc.load(out)(np.zeros((1, 8), np.int64))
    encoder = cli("compile", hf_dir("bert"), "--generate", "-o", tmp_path / "bert")
    assert encoder.code == 2 and "causal language model" in encoder.err


def test_arm_artifact_generates_under_qemu(artifacts, aarch64_emulator, tmp_path):
    model_dir, _ = artifacts("qwen2")
    out = compile_model(model_dir, CompileOptions(
        target="arm", generate=True, output=tmp_path / "arm", emulate="require", threads=2,
        **GEN)).output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["verification"]["ran_on"].startswith("qemu")
    prompt = _prompt(9, seed=9)
    result = slimc.load(out, emulate=True).generate(prompt, NEW_TOKENS)
    assert result.tokens == _reference(model_dir, prompt)


@pytest.mark.parametrize("weights", ["int8", "int4", "int4,group_size=32,zero_point=float,"
                                                    "embedding_weights=int8"])
def test_quantized_artifacts_generate_and_match_their_ir(artifacts, weights, tmp_path):
    model_dir, _ = artifacts("llama")
    out = compile_model(model_dir, CompileOptions(
        generate=True, pipeline=f"quantize{{weights={weights}}}", output=tmp_path / "out",
        save_ir=True, threads=2, **GEN)).output
    model = slimc.load(out)
    assert model.manifest["weight_bytes_after"] < model.manifest["weight_bytes_before"] / 3
    formats = {k: v["format"] for k, v in
               model.manifest["pipeline"][0]["summary"]["per_layer"].items()}
    if "zero_point=float" in weights:  # the Q4_1 grid for layers, int8 for the embedding
        assert {f for k, f in formats.items() if "embed" in k} == {"int8"}
        assert {f for k, f in formats.items() if "embed" not in k} == {"int4-g32-fz"}
    prompt = _prompt(9, seed=3)
    result = model.generate(prompt, NEW_TOKENS, stop=False)
    assert len(result.tokens) == NEW_TOKENS
    # The quantized IR (the combined graph) on the same prompt: first-token logits agree.
    ir = slimc.IR.load(out / "ir.pt2")
    spec = model.manifest["generation"]
    ids = torch.zeros(1, spec["prefill_length"], dtype=torch.int64)
    ids[0, :8] = torch.tensor(prompt[:8])
    caches = [torch.zeros(1, spec["kv_heads"], spec["max_length"], spec["head_dim"])
              for _ in range(2 * spec["layers"])]
    first_chunk = ir.run([ids, torch.tensor([0]), torch.tensor([7]), torch.tensor([[0]]),
                          torch.tensor([8]), *caches])
    # Feed the ninth token through the IR's decode half with the chunk's rows in the cache.
    for cache, rows in zip(caches, first_chunk[1:1 + len(caches)], strict=True):
        cache[:, :, :8] = rows
    step = ir.run([ids, torch.tensor([0]), torch.tensor([7]), torch.tensor([[prompt[8]]]),
                   torch.tensor([8]), *caches])
    expected = step[1 + len(caches)].numpy().reshape(-1)
    got = np.asarray(result.first_logits)
    tolerance = model.manifest["verification"]["tolerance"]
    assert np.linalg.norm(got - expected) / np.linalg.norm(expected) <= tolerance
