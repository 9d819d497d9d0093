"""Where SmolLM2-135M's W8A8 perplexity goes: activation scales fake-quantized in PyTorch.

Every linear's weight rounded to per-row int8 (the tied head's table with it); the inputs as
float, with one static scale per layer (its calibration maximum), per token (each row's own
maximum), or per token after SmoothQuant's migration (alpha 0.5 / 0.8; the tied head none; once
with the down projections weight-only). Perplexity on the same 32 windows of 128 tokens of
John as the SmolLM2 tables (calibration: Genesis 1-10):

    .venv/bin/python benchmarks/w8a8_token_scales_study.py SMOLLM2_DIR GENESIS.txt JOHN.txt

Session 29's numbers: docs/benchmarks.md, "Per-token (dynamic) activation scales".
"""

from __future__ import annotations

import argparse

import torch
import transformers as T

WINDOWS, LENGTH, BATCH = 32, 128, 4


def windows(tokenizer, path: str) -> list[torch.Tensor]:
    ids = tokenizer(open(path).read(), return_tensors="pt").input_ids[0]
    return [ids[i * LENGTH:(i + 1) * LENGTH] for i in range(WINDOWS)]


def perplexity(model, held_out: list[torch.Tensor]) -> float:
    nll, count = 0.0, 0
    with torch.no_grad():
        for b in range(0, len(held_out), BATCH):
            x = torch.stack(held_out[b:b + BATCH])
            logits = model(input_ids=x, use_cache=False).logits[:, :-1]
            nll += float(torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum"))
            count += x[:, 1:].numel()
    return float(torch.exp(torch.tensor(nll / count)))


def int8_rows(w: torch.Tensor) -> torch.Tensor:
    scale = w.abs().amax(1, keepdim=True) / 127
    return (w / scale).round().clamp(-127, 127) * scale


def input_maxima(model, linears, calibration) -> dict[str, torch.Tensor]:
    """Per-channel max |x| entering each linear on the calibration windows."""
    maxima: dict[str, torch.Tensor] = {}

    def hook(name):
        def record(module, args):
            seen = args[0].abs().reshape(-1, args[0].shape[-1]).amax(0)
            maxima[name] = torch.maximum(maxima.get(name, seen), seen)
        return record

    handles = [m.register_forward_pre_hook(hook(name)) for name, m in linears]
    with torch.no_grad():
        for b in range(0, len(calibration), BATCH):
            model(input_ids=torch.stack(calibration[b:b + BATCH]), use_cache=False)
    for h in handles:
        h.remove()
    return maxima


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("calibration")
    ap.add_argument("held_out")
    args = ap.parse_args()
    torch.set_num_threads(2)
    tokenizer = T.AutoTokenizer.from_pretrained(args.model)
    model = T.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    held_out, calibration = windows(tokenizer, args.held_out), windows(tokenizer, args.calibration)
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    original = {n: m.weight.data.clone() for n, m in linears}
    print("fp32", perplexity(model, held_out), flush=True)
    maxima = input_maxima(model, linears, calibration)
    setting = {"mode": "float", "skip": (), "smooth": {}}

    def quantize_input(name):
        def pre(module, inputs):
            x, mode = inputs[0], setting["mode"]
            if mode == "float" or name in setting["skip"]:
                return None
            if mode == "static":
                step = float(maxima[name].max()) / 127
                return ((x / step).round().clamp(-128, 127) * step,)
            smooth = setting["smooth"].get(name, 1.0)
            scaled = x / smooth
            step = scaled.abs().amax(-1, keepdim=True).clamp_min(1e-8) / 127
            return ((scaled / step).round().clamp(-127, 127) * step * smooth,)
        return pre

    for name, m in linears:
        m.register_forward_pre_hook(quantize_input(name))

    def weights(alpha: float, skip=()) -> None:
        """int8 weights after migrating ``alpha`` of each input channel's range into them."""
        setting["smooth"], setting["skip"] = {}, skip
        for name, m in linears:
            w = original[name]
            if alpha and name != "lm_head" and name not in skip:
                smooth = (maxima[name].clamp_min(1e-5) ** alpha
                          / w.abs().amax(0).clamp_min(1e-5) ** (1 - alpha)).clamp(1e-4, 1e4)
                setting["smooth"][name] = smooth
                m.weight.data = int8_rows(w * smooth) / smooth
            else:
                m.weight.data = int8_rows(w)

    weights(0.0)
    for mode in ("float", "static", "token"):
        setting["mode"] = mode
        print(mode, perplexity(model, held_out), flush=True)
    setting["mode"] = "token"
    for alpha in (0.5, 0.8):
        weights(alpha)
        print("token + SmoothQuant", alpha, perplexity(model, held_out), flush=True)
    weights(0.5, skip=tuple(n for n, _ in linears if "down_proj" in n))
    print("token + SmoothQuant 0.5, down_proj weight-only", perplexity(model, held_out),
          flush=True)


if __name__ == "__main__":
    main()
