"""``distill``: recover what earlier passes lost by training the compressed IR to imitate the
original model on calibration data (knowledge distillation).

``distill{steps=200, lr=1e-4, batch=1, trainable=all|factors|matrices|norms, lora=0,
loss=auto|kl|mse|cosine, temperature=1, holdout=0.25, seed=0, scales=false, data=PATH}``

Why a pass and not a training script: pruning, low rank and sharing keep the model's structure
but move its function; a few hundred optimizer steps against the *original* model (the teacher,
the IR as it was before the pipeline's first pass, kept by the pass manager for passes that
declare :attr:`Distill.needs_original`) recover much of it, and the result is still one IR that
the backend lowers, verifies and builds like any other.

* **Student**: the IR's own graph, run with differentiable weights substituted into its weight
  placeholders (:func:`~slimc.passes.analysis.criteria.execution.run_with_grad`), so nothing is
  traced again and every architecture that runs trains. Only float32 *parameters* read by
  ordinary ATen ops train: quantized codes, their scales and zero points (read by slimc's
  int8/int4/fp16 ops, which have no gradient) and buffers (rotary tables) stay as they are, so a
  quantized grid is never silently broken. Put ``distill`` before ``quantize`` to train the
  weights the quantizer will then round. ``scales=true`` (after ``quantize``) also trains the
  float grids of the quantized weights, as a relative change ``s (1 + u)`` of each scale and
  float zero point / minimum: the codes stay, the values they stand for move, and the grids
  are stored back in their own dtype (fp16), so the artifact keeps its bytes.
* **What trains**: ``all`` (every such parameter), ``factors`` (only low-rank / shared factor
  matrices that ``lowrank`` / ``share`` created), ``matrices`` (2-D and larger tensors),
  ``norms`` (1-D tensors: norm scales and biases), ``factors+norms`` (both; on a factorized LM
  everything but the dense embedding table, whose Adam state alone is 2x its 28M weights).
  ``lora=R`` trains a rank-R update ``W + B·A`` of each selected matrix instead of the matrix
  (B starts at zero, so training starts from the compressed model); after training it is
  folded into ``W``, so the artifact has exactly the ops and parameter count it had before.
* **Loss** (``auto``): KL divergence of the softmax at ``temperature`` (times T², Hinton et al.)
  for logits; relative MSE (squared error over the teacher's mean square) for hidden states and
  anything else; ``cosine`` is 1 - cosine per position. Every floating output the student and
  teacher share in shape is matched, the mean of their losses is minimised.
* **Data**: the ``--calib`` batches, or ``data=PATH`` (read like ``--calib``): recovery
  after GPTQ then trains on other text than the Hessians came from, as the SmolLM2 harness
  (``benchmarks/smollm2_levers.py --recover-text``) does.
* **Held out**: the last ``holdout`` share of the training batches is never trained on; the
  loss there before and after training is recorded (``held_out_loss_before/after``,
  ``recovered``). When training did not lower it the weights are left as they were and the
  summary says so: a recovery pass never makes the model worse on data it did not see.
* **Deterministic**: the batch order and the adapters' initialisation come from ``seed``;
  AdamW with a linear warm-up over ``warmup`` of the steps (default 10%) and cosine decay,
  gradients clipped to norm 1. The warm-up never takes a full-``lr`` first step: Adam's first
  update is sign-like (every weight moves by ``lr``), which on a real LM threw the loss far up
  (SmolLM2, 19 steps at 5%: a 1-step warm-up, KL 0.43 -> 2.23 after step 1).
* **Recovery curve**: ``eval_every=N`` measures the held-out loss every N steps
  (``held_out_curve`` in the summary); a caller can put a callable under
  ``ctx.memo[PROBE_KEY]``, called at the same points as ``probe(step, run)`` where ``run(inputs)``
  runs the student with its current weights (e.g. to log a perplexity on other text).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, field_validator, model_validator
from slimc.passes.analysis.criteria.divergence import output_kind
from slimc.passes.analysis.criteria.execution import graph_values, user_outputs
from slimc.passes.lowrank.rewrite import FACTOR_NAME
from torch.export.graph_signature import InputKind
from torch.fx import Node

from slimc.errors import UsageError
from slimc.ir import IR, _storage_key
from slimc.passmanager import PassContext, PassOptions, PreservedAnalyses, TransformPass

#: Teacher outputs kept between steps up to this many bytes (else recomputed each time); kept
#: as float16 (a causal LM's logits are 50k floats per token: half the memory, and a target
#: rounded to 1e-3 relative changes nothing a few hundred steps can learn).
TEACHER_CACHE_BYTES = 1 << 29
#: Namespaces of ops autograd differentiates; anything else (slimc's quantized ops) is opaque.
DIFFERENTIABLE_NAMESPACES = frozenset({"aten", "prims"})
#: ``ctx.memo`` key of an optional ``probe(step, run)`` called where the held-out loss is
#: measured (``eval_every``): ``run(inputs)`` runs the student with its current weights.
PROBE_KEY = "distill.probe"


class DistillOptions(PassOptions):
    steps: int = Field(200, ge=1, le=1_000_000, description="Optimizer steps.")
    lr: float = Field(1e-4, gt=0, le=1, description="Peak learning rate (AdamW; linear "
                      "warm-up over `warmup` of the steps, then cosine decay).")
    warmup: float = Field(0.1, ge=0, lt=1, description="Share of the steps with a linear "
                          "warm-up of the learning rate (the first step gets at most "
                          "lr/2; 0: none).")
    eval_every: int = Field(0, ge=0, le=1_000_000, description="Measure the held-out loss "
                            "every this many steps (the summary's held_out_curve; 0: only "
                            "before and after).")
    batch: int = Field(1, ge=1, le=4096, description="Calibration batches per optimizer step "
                       "(their gradients are averaged).")
    trainable: Literal["all", "factors", "matrices", "norms", "factors+norms"] = Field(
        "all", description="Which float parameters train: all; factors (low-rank / shared "
        "factor matrices only); matrices (2-D and larger); norms (1-D: norm scales, biases); "
        "factors+norms (both: a factorized LM without its embedding table).")
    lora: int = Field(0, ge=0, le=4096, description="Train a rank-`lora` update W + B·A of "
                      "each selected matrix instead of the matrix itself, folded into W "
                      "afterwards (0: train the weights directly).")
    loss: Literal["auto", "kl", "mse", "cosine"] = Field(
        "auto", description="auto: KL at `temperature` for logits, relative MSE otherwise.")
    temperature: float = Field(1.0, gt=0, le=100, description="Softmax temperature of the "
                               "KL loss (the loss is scaled by T²).")
    holdout: float = Field(0.25, gt=0, lt=1, description="Share of the calibration batches "
                           "held out of training to measure the loss before and after.")
    seed: int = Field(0, ge=0, description="Seed of the batch order and adapter init.")
    scales: bool = Field(False, description="Also train the float grids of quantized "
                         "weights (int8/int4 scales, float zero points / minimums of int4 "
                         "`-fz` and int3/int2 groups, tied tables included): the codes stay, "
                         "the values they stand for move; stored back in their own dtype "
                         "(fp16), so no byte changes. Recovery after `quantize`.")

    data: str = Field("", description="Train on this file instead of --calib (text, "
                      ".npy/.npz or an image folder, read like --calib into batches of its "
                      "shape; `holdout` applies to it). --calib still feeds the passes before "
                      "(e.g. GPTQ's Hessians), so the codes and their recovery see different "
                      "text. Empty: the calibration batches.")
    data_batches: int = Field(64, ge=2, le=100_000, description="`data`: most batches to "
                              "read from it.")

    @field_validator("data")
    @classmethod
    def _data_exists(cls, value: str) -> str:
        from pathlib import Path

        if value and not Path(value).exists():
            raise ValueError(f"data={value!r} does not exist (give a text file, a .npy/.npz "
                             "file or a folder of images; leave it out to train on --calib)")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> DistillOptions:
        if self.lora and self.trainable == "norms":
            raise ValueError("lora adapts matrices; trainable=norms selects only 1-D tensors "
                             "(use lora=0, or trainable=all|matrices|factors)")
        return self


class Distill(TransformPass):
    """Knowledge distillation: train the float weights to match the original model on --calib.

    The remaining float32 parameters (or LoRA adapters, folded back into them) learn the
    original model's outputs; the loss on held-out calibration batches is recorded."""

    name = "distill"
    Options = DistillOptions
    #: The pass manager keeps a clone of the IR from before the pipeline (the teacher).
    needs_original: ClassVar[bool] = True

    def run(self, ir: IR, ctx: PassContext, options: PassOptions) -> PreservedAnalyses:
        assert isinstance(options, DistillOptions)
        summary = distill_ir(ir, ctx, options)
        ir.annotations[self.name] = summary
        ctx.log(f"distill: held-out loss {summary['held_out_loss_before']:.4g} -> "
                f"{summary['held_out_loss_after']:.4g} ({summary['trained_params']:,} trained "
                f"params, {summary['steps']} steps, {summary['seconds']:.1f}s)"
                + ("" if summary["kept"] else "; not better, weights left unchanged"))
        return PreservedAnalyses.none() if summary["kept"] else PreservedAnalyses.all()


def opaque_use(node: Node) -> bool:
    """True when ``node`` is an op autograd cannot differentiate (slimc's quantized ops)."""
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return target.namespace not in DIFFERENTIABLE_NAMESPACES
    return isinstance(target, torch._ops.HigherOrderOperator)


def grid_operand(node: Node) -> bool:
    """True when every use of placeholder ``node`` is as a float grid operand (scale, float
    zero point / minimum) of a slimc quantized op with a gradient for it."""
    from .gradients import GRID_OPERANDS, differentiable

    if not node.users:
        return False
    for user in node.users:
        op = getattr(user.target, "_opname", "")
        if (not opaque_use(user) or not differentiable(op)
                or not any(i < len(user.args) and user.args[i] is node
                           for i in GRID_OPERANDS.get(op, ()))
                or any(a is node for i, a in enumerate(user.args)
                       if i not in GRID_OPERANDS.get(op, ()))):
            return False
    return True


def select_trainable(ir: IR, which: str, scales: bool = False
                     ) -> tuple[list[list[str]], dict[str, int]]:
    """Groups of weight placeholder names (one group per distinct tensor: tied weights train
    once) that ``which`` selects (plus, with ``scales``, the float grids of quantized
    weights), and per reason the number of parameters left frozen."""
    nodes = {n.name: n for n in ir.nodes("placeholder")}
    upstream = _upstream_of_gradient_free_ops(ir)
    groups: dict[tuple, list[str]] = {}
    blocked: set[tuple] = set()
    frozen: dict[str, int] = {}

    def freeze(reason: str, value: torch.Tensor) -> None:
        frozen[reason] = frozen.get(reason, 0) + value.numel()

    for spec in ir.program.graph_signature.input_specs:
        if spec.kind == InputKind.USER_INPUT:
            continue
        name = spec.arg.name
        value = ir.get_weight(nodes[name])
        key = _storage_key(value)
        if spec.kind != InputKind.PARAMETER:
            continue  # buffers and constants (rotary tables, masks) are not model weights
        if (scales and value.is_floating_point() and value.device.type != "meta"
                and grid_operand(nodes[name])):
            groups.setdefault(key, []).append(name)
            continue
        if value.dtype != torch.float32 or value.device.type == "meta":
            freeze("not float32 (quantized codes, fp16/bf16 storage)", value)
            blocked.add(key)
            continue
        if any(opaque_use(user) for user in nodes[name].users):
            freeze("read by a quantized op (scales, zero points, biases of int8/int4 layers)",
                   value)
            blocked.add(key)
            continue
        if name in upstream:
            freeze("upstream of a quantized op with no gradient (quantized convolutions, "
                   "expert gathers): put distill before quantize", value)
            blocked.add(key)
            continue
        factor = bool(FACTOR_NAME.search(name))
        chosen = {"all": True, "factors": factor, "matrices": value.dim() >= 2,
                  "norms": value.dim() == 1,
                  "factors+norms": factor or value.dim() == 1}[which]
        if not chosen:
            freeze(f"not selected by trainable={which}", value)
            continue
        groups.setdefault(key, []).append(name)
    return [names for key, names in groups.items() if key not in blocked], frozen


def _upstream_of_gradient_free_ops(ir: IR) -> set[str]:
    """Placeholder names whose values reach an opaque op autograd cannot pass through."""
    from .gradients import differentiable

    stack = [n for n in ir.nodes("call_function") if opaque_use(n)
             and not differentiable(getattr(n.target, "_opname", ""))]
    seen: set[Node] = set()
    while stack:
        node = stack.pop()
        for source in node.all_input_nodes:
            if source not in seen:
                seen.add(source)
                stack.append(source)
    return {n.name for n in seen if n.op == "placeholder"}


def distill_loss(kinds: Sequence[str], outputs: Sequence[torch.Tensor],
                 teacher: Sequence[torch.Tensor], temperature: float) -> torch.Tensor:
    """Mean over the compared outputs of each output's loss (see the module docstring)."""
    total = outputs[0].new_zeros(())
    for kind, out, ref in zip(kinds, outputs, teacher, strict=True):
        if kind == "kl":
            log_p = torch.log_softmax(ref.float() / temperature, dim=-1)
            log_q = torch.log_softmax(out.float() / temperature, dim=-1)
            loss = (log_p.exp() * (log_p - log_q)).sum(-1).mean() * temperature ** 2
        elif kind == "cosine":
            cos = torch.nn.functional.cosine_similarity(out.float(), ref.float(), dim=-1,
                                                        eps=1e-12)
            loss = (1.0 - cos).mean()
        else:
            loss = (out.float() - ref.float()).pow(2).mean() / \
                ref.float().pow(2).mean().clamp_min(1e-12)
        total = total + loss
    return total / max(len(kinds), 1)


class _Teacher:
    """The original model's outputs per calibration batch, cached within a memory budget."""

    def __init__(self, original: IR, batches: Sequence[Sequence[torch.Tensor]]) -> None:
        self._ir = original
        self._batches = batches
        self._cache: dict[int, list[torch.Tensor]] = {}
        self._bytes = 0

    def __call__(self, index: int) -> list[torch.Tensor]:
        if index in self._cache:
            return self._cache[index]
        outputs = [o.detach() for o in self._ir.run(list(self._batches[index]))]
        stored = [o.half() if o.dtype == torch.float32 and o.abs().max() < 6e4 else o
                  for o in outputs]
        size = sum(o.numel() * o.element_size() for o in stored)
        if self._bytes + size <= TEACHER_CACHE_BYTES:
            self._cache[index] = stored
            self._bytes += size
            return stored
        return outputs


def _compared(ir: IR, student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor],
              loss: str) -> tuple[list[int], list[str]]:
    """Output positions both models produce as floats of one shape, and each one's loss."""
    positions, kinds = [], []
    for i, (out, ref) in enumerate(zip(student, teacher, strict=True)):
        if out.is_floating_point() and ref.is_floating_point() and out.shape == ref.shape:
            positions.append(i)
            if loss != "auto":
                kinds.append(loss)
            else:
                kinds.append("kl" if output_kind(ir.output_names[i]) == "logits" else "mse")
    return positions, kinds


def warmup_steps(steps: int, warmup: float) -> int:
    """Steps of linear warm-up: ``ceil(warmup * steps)`` (0 when ``warmup`` is 0)."""
    return math.ceil(warmup * steps) if warmup > 0 else 0


def lr_schedule(steps: int, warmup: float) -> Callable[[int], float]:
    """Learning-rate factor per step: linear warm-up to 1 over :func:`warmup_steps` steps,
    ``(step + 1) / (warm + 1)`` so the first step gets at most half the peak (a 1-step warm-up
    was a full-``lr`` first step), then cosine decay over all steps."""
    warm = warmup_steps(steps, warmup)

    def factor(step: int) -> float:
        ramp = (step + 1) / (warm + 1) if step < warm else 1.0
        return ramp * 0.5 * (1 + math.cos(math.pi * step / steps))

    return factor


def _training_batches(ctx: PassContext, options: DistillOptions) -> list[list[torch.Tensor]]:
    """The calibration batches, or with ``data`` that file's (``ctx.load_data``)."""
    if not options.data:
        return [list(b) for b in ctx.calibration_batches]
    from pathlib import Path

    if not Path(options.data).exists():
        raise UsageError(f"distill data={options.data!r} does not exist.",
                         hint="Give a text file, a .npy/.npz file or a folder of images, "
                         "or leave `data` out to train on --calib.")
    if ctx.load_data is None:
        raise UsageError("distill data=... needs the compiler to read the file (its "
                         "tokenizer and input shapes).",
                         hint="Run it through slimc compile --pipeline/--recipe, or put the "
                         "batches in the PassContext's calibration_batches.")
    return ctx.load_data(options.data, options.data_batches)


def distill_ir(ir: IR, ctx: PassContext, options: DistillOptions) -> dict[str, Any]:
    """Train ``ir``'s selected weights against ``ctx.original``; returns the summary."""
    start = time.perf_counter()
    original = ctx.original
    if original is None:
        raise UsageError("distill has no original model to learn from.",
                         hint="Run it through a pipeline (slimc compile --pipeline ...), whose "
                         "pass manager keeps the model as it was before the first pass.")
    batches = _training_batches(ctx, options)
    if len(batches) < 2 and options.data:
        raise UsageError(
            f"distill data={options.data!r} holds {len(batches)} batch of the model's input "
            "shape; it needs at least 2 (it trains on some and measures on the others).",
            hint="Give it more data (or a larger data_batches).")
    if len(batches) < 2:
        raise UsageError(
            f"distill needs at least 2 calibration batches (it trains on some and measures "
            f"on the others), got {len(batches)}.",
            hint="Give --calib a text file (or images / .npz) and --calib-batches 8 or more; "
            "distillation on the one example input would only memorise it.")
    held = max(1, round(options.holdout * len(batches)))
    held = min(held, len(batches) - 1)
    train_idx = list(range(len(batches) - held))
    held_idx = list(range(len(batches) - held, len(batches)))
    teacher = _Teacher(original, batches)

    first_student = ir.run(batches[held_idx[0]])
    positions, kinds = _compared(ir, first_student, teacher(held_idx[0]), options.loss)
    if not positions:
        raise UsageError("distill cannot compare this model with its original: no floating "
                         "output kept its shape (e.g. prune{outputs=prune} narrowed it).",
                         hint="Leave distill out, or prune without changing the outputs.")
    groups, frozen = select_trainable(ir, options.trainable, options.scales)
    if not groups:
        raise UsageError(f"distill found no float32 parameters to train with "
                         f"trainable={options.trainable} (frozen: "
                         + (", ".join(f"{n:,} {why}" for why, n in frozen.items()) or "none")
                         + ").", hint="Use trainable=all, or put distill before quantize.")
    weights = ir.weights()
    nodes = {n.name: n for n in ir.nodes("placeholder")}

    gen = torch.Generator().manual_seed(options.seed)
    bases, adapters, params = [], [], []
    dtypes = [weights[names[0]].dtype for names in groups]
    for names in groups:
        # float32 master copies (fp16 grids train in fp32 and are rounded back at the end)
        base = weights[names[0]].detach().to(torch.float32, copy=True)
        bases.append(base)
        adapter = None
        if grid_operand(nodes[names[0]]):
            # a relative change s (1 + u): one learning rate fits grids of any magnitude
            adapter = torch.zeros_like(base, requires_grad=True)
            params.append(adapter)
        elif not options.lora:
            params.append(base.requires_grad_(True))
        elif base.dim() == 2:
            rank = min(options.lora, *base.shape)
            a = torch.randn(rank, base.shape[1], generator=gen) / math.sqrt(base.shape[1])
            adapter = (a.requires_grad_(True), torch.zeros(base.shape[0], rank,
                                                           requires_grad=True))
            params += adapter
        else:
            reason = "not a matrix (lora adapts matrices)"
            frozen[reason] = frozen.get(reason, 0) + base.numel()
        adapters.append(adapter)
    if not params:
        raise UsageError("distill with lora found no weight matrices to adapt.",
                         hint="Use lora=0 to train the selected tensors directly.")

    def effective() -> list[torch.Tensor]:
        return [base if pair is None else base * (1 + pair) if isinstance(pair, torch.Tensor)
                else base + pair[1] @ pair[0] for base, pair in zip(bases, adapters, strict=True)]

    def overrides(values: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name: value for names, value in zip(groups, values, strict=True)
                for name in names}

    def held_out_loss() -> float:
        with torch.no_grad():
            values = overrides([v.detach() for v in effective()])
            total = 0.0
            for i in held_idx:
                outs = user_outputs(ir, ir.graph_module(*graph_values(ir, batches[i], values)))
                refs = teacher(i)
                total += float(distill_loss(kinds, [outs[p] for p in positions],
                                            [refs[p] for p in positions], 1.0))
            return total / len(held_idx)

    probe = ctx.memo.get(PROBE_KEY)

    def run_student(inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        with torch.no_grad():
            values = overrides([v.detach() for v in effective()])
            return user_outputs(ir, ir.graph_module(*graph_values(ir, list(inputs), values)))

    before = held_out_loss()
    held_curve: list[tuple[int, float]] = [(0, round(before, 6))]
    if probe is not None and options.eval_every:
        probe(0, run_student)
    optimizer = torch.optim.AdamW(params, lr=options.lr, weight_decay=0.0)
    schedule = lr_schedule(options.steps, options.warmup)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    order: list[int] = []
    curve: list[tuple[int, float]] = []
    report_every = max(1, options.steps // 10)
    loop_start = time.perf_counter()
    for step in range(options.steps):
        optimizer.zero_grad(set_to_none=True)
        step_loss = 0.0
        for _ in range(options.batch):
            if not order:
                order = [train_idx[i] for i in torch.randperm(len(train_idx), generator=gen)]
            index = order.pop()
            refs = teacher(index)
            with torch.enable_grad():
                outs = user_outputs(ir, ir.graph_module(
                    *graph_values(ir, batches[index], overrides(effective()))))
                loss = distill_loss(kinds, [outs[p] for p in positions],
                                    [refs[p] for p in positions], options.temperature)
                (loss / options.batch).backward()
            step_loss += float(loss.detach()) / options.batch
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        if step % report_every == 0 or step == options.steps - 1:
            curve.append((step, round(step_loss, 6)))
            ctx.log(f"distill: step {step + 1}/{options.steps}, train loss {step_loss:.4g}")
        done = step + 1
        if options.eval_every and done % options.eval_every == 0 and done < options.steps:
            held_curve.append((done, round(held_out_loss(), 6)))
            ctx.log(f"distill: step {done}, held-out loss {held_curve[-1][1]:.4g}")
            if probe is not None:
                probe(done, run_student)
    step_seconds = (time.perf_counter() - loop_start) / options.steps
    after = held_out_loss()
    held_curve.append((options.steps, round(after, 6)))
    if probe is not None and options.eval_every:
        probe(options.steps, run_student)
    kept = math.isfinite(after) and after < before
    if kept:
        with torch.no_grad():
            for names, value, dtype in zip(groups, effective(), dtypes, strict=True):
                final = value.detach().to(dtype, copy=True).contiguous()
                for name in names:
                    ir.set_weight(nodes[name], final)
    trained = sum(p.numel() for p in params)
    tokens = sum(batches[i][0].numel() for i in train_idx)
    return {
        "teacher": "the original model (the IR before the pipeline's first pass)",
        "steps": options.steps,
        "trainable": options.trainable,
        "scales": options.scales,
        "lora": options.lora,
        "trained_tensors": len(groups),
        "trained_params": trained,
        "folded": bool(options.lora),
        "frozen": frozen,
        "losses": {ir.output_names[p]: k for p, k in zip(positions, kinds, strict=True)},
        "temperature": options.temperature,
        "data": options.data or "--calib",
        "train_batches": len(train_idx),
        "held_out_batches": len(held_idx),
        "train_tokens_seen": options.steps * options.batch * (tokens // max(len(train_idx), 1)),
        "held_out_loss": "KL at T=1 for logits, relative MSE / 1-cosine otherwise; mean over "
                         "outputs and held-out batches",
        "held_out_loss_before": before,
        "held_out_loss_after": after,
        "recovered": (1.0 - after / before) if before > 0 else 0.0,
        "kept": kept,
        "train_curve": curve,
        "held_out_curve": held_curve,
        "warmup_steps": warmup_steps(options.steps, options.warmup),
        "lr": options.lr,
        "seconds": round(time.perf_counter() - start, 2),
        # what the budget search sizes its step count from (the first epoch's steps also
        # run the teacher, so a short probe over-estimates: the search stays within budget)
        "step_seconds": step_seconds,
    }
