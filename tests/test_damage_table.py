"""The budget search's fast damage table (slimc/search/damage.py): local output error per
choice, scaled per layer by end-to-end anchors, checked against measuring every choice end to
end on tiny random HF models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from slimc.passes.quantize.formats import parse_format

from slimc.capture import capture, load_model
from slimc.jobs import single_threaded
from slimc.loaders.base import parse_overrides
from slimc.lowbit import grid
from slimc.passmanager import AnalysisManager, PassContext, PassManager
from slimc.plugins import get_registry
from slimc.search.damage import interpolate
from slimc.search.space import Techniques, build_space


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one torch thread is faster (and steadier on a busy machine)."""
    with single_threaded():
        yield


def _space(model_dir: str, method: str):
    registry = get_registry()
    ir, example = capture(load_model(model_dir, parse_overrides([]), registry))
    ctx = PassContext(example_inputs=example)
    ctx.analyses = AnalysisManager(ir, ctx, PassManager(registry.passes).lookup)
    techniques = Techniques(formats=("int8", "int4-g32", "int3-g64", "int2-g64"),
                            lowrank_keeps=(0.5,), lowrank_formats=("int8",))
    return build_space(ir, ctx, techniques, None, 2, method)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_local_table_ranks_like_end_to_end_with_fewer_forwards(hf_dir, arch):
    """Llama: linears, an embedding gather and an untied LM head (KL of logits); GPT-2:
    Conv1D weights read as ``x @ W`` and a table tied to the LM head (a gather and a matmul
    of one tensor)."""
    fast = _space(hf_dir(arch), "local")
    slow = _space(hf_dir(arch), "end-to-end")
    assert fast.info["damage_local_layers"] == len(fast.layers) > 0
    assert fast.info["damage_forwards"] < slow.info["damage_forwards"] / 2
    live = np.isfinite(slow.damage) & (slow.damage > 0)
    assert np.array_equal(np.isfinite(fast.damage), np.isfinite(slow.damage))
    assert (fast.damage[:, 0] == 0).all()  # fp32 changes nothing
    rho = spearmanr(fast.damage[live], slow.damage[live]).statistic
    assert rho > 0.9, rho
    # Each layer's anchors are measured end to end, so some entries agree to rounding.
    close = np.isclose(fast.damage[live], slow.damage[live], rtol=1e-6)
    assert close.sum() >= len(fast.layers)


def test_interpolation_is_exact_at_anchors_and_monotone():
    errors = np.array([0.0, 1e-4, 1e-3, 1e-2, 1e-1])
    damage = interpolate(errors, {2: 0.01, 4: 0.5})
    assert damage[0] == 0.0
    assert damage[2] == pytest.approx(0.01) and damage[4] == pytest.approx(0.5)
    assert all(np.diff(damage) > 0)
    # beyond the anchors: the fitted slope (here log(50)/log(100) = 0.85) continues
    assert damage[1] == pytest.approx(0.01 * 0.1 ** (np.log(50) / np.log(100)))


def test_lowbit_grid_is_cached_by_content_not_identity(monkeypatch):
    from slimc import lowbit

    monkeypatch.setattr(lowbit, "_GRIDS", type(lowbit._GRIDS)())  # start empty
    searched = []
    real_search = lowbit._search_grid
    monkeypatch.setattr(lowbit, "_search_grid",
                        lambda *a: searched.append(a[1:]) or real_search(*a))
    torch.manual_seed(0)
    w = torch.randn(64, 96)
    first = grid(w, 3, 32)
    again = grid(w.clone(), 3, 32)  # another tensor, same values: same grid, from the cache
    assert searched == [(3, 32)]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    first[0].zero_()  # a caller's edit does not reach the cache
    assert torch.equal(grid(w, 3, 32)[0], again[0])
    other = w.clone()
    other[5, 7] += 3.0
    assert not torch.equal(grid(other, 3, 32)[0], again[0])
    assert searched == [(3, 32), (3, 32)]  # only the changed weight was searched again


def test_activation_rows_give_the_gram_matrix_errors_for_less_memory():
    """Few calibration rows (M <= K): X is kept instead of its K x K Gram matrix, and the
    local errors are the Gram matrix's (issue 18); past K rows it switches to the Gram."""
    from slimc.search.damage import ViewStats

    torch.manual_seed(0)
    k, n = 96, 40
    batches = [torch.randn(30, k, dtype=torch.float64) for _ in range(3)]
    w = torch.randn(n, k, dtype=torch.float64)
    d = torch.randn(n, k, dtype=torch.float64) * 1e-2
    few = ViewStats()
    for x in batches:
        few.add_rows("x", x)
    assert "x" in few.xs and "x" not in few.grams and few.xs["x"].shape == (90, k)
    gram = sum(x.t() @ x for x in batches)
    for m in (w, d):
        assert few.energy("x", m) == pytest.approx(float(((m @ gram) * m).sum()), rel=1e-10)
    many = ViewStats()
    for x in [*batches, torch.randn(30, k, dtype=torch.float64)]:
        many.add_rows("x", x)
    assert "x" in many.grams and "x" not in many.xs and many.grams["x"].shape == (k, k)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_suffix_forwards_give_the_table_whole_forwards_give(hf_dir, arch):
    """End-to-end damage runs the graph from the changed layer's first use on (issue 18: the
    anchors' forwards were most of SmolLM2's -O2 search); the table is the same number for
    number as with whole forwards, tied GPT-2 table and Llama embedding included."""
    from slimc.search.space import measure

    registry = get_registry()
    ir, example = capture(load_model(hf_dir(arch), parse_overrides([]), registry))
    ctx = PassContext(example_inputs=example)
    ctx.analyses = AnalysisManager(ir, ctx, PassManager(registry.passes).lookup)
    techniques = Techniques(formats=("int8", "int4-g32", "int2-g64"), lowrank_keeps=())
    space = build_space(ir, ctx, techniques, None, 2, "local")
    for method in ("local", "end-to-end"):
        tables = [measure(ir, ctx, space.layers, {}, space.damage.shape[1], 2, method,
                          suffix=suffix) for suffix in (True, False)]
        assert np.array_equal(tables[0], tables[1]), method


def test_measure_holds_one_approximation_of_a_layer_at_a_time(hf_dir, monkeypatch):
    """Each choice's fake-quantized weight is made, scored and dropped before the next (issue
    18: SmolLM2's tied 49152 x 576 table held its nine approximations at once, ~1 GB); the
    anchors' weights are made again when measured (for layers above the size whose
    approximations are kept: here every layer)."""
    import weakref

    from slimc.search import space as space_module

    monkeypatch.setattr(space_module, "KEEP_APPROXIMATIONS_BYTES", 0)
    monkeypatch.setattr(space_module, "STACK_ANCHORS_BYTES", -1)  # anchors one at a time

    made: list[weakref.ref] = []
    most = 0
    real = space_module.approximate_matrix

    def tracked(*args, **kwargs):
        nonlocal most
        matrix = real(*args, **kwargs)
        made.append(weakref.ref(matrix))
        most = max(most, sum(ref() is not None for ref in made))
        return matrix

    monkeypatch.setattr(space_module, "approximate_matrix", tracked)
    registry = get_registry()
    ir, example = capture(load_model(hf_dir("gpt2"), parse_overrides([]), registry))
    ctx = PassContext(example_inputs=example)
    ctx.analyses = AnalysisManager(ir, ctx, PassManager(registry.passes).lookup)
    techniques = Techniques(formats=("int8", "int4-g32", "int2-g64"), lowrank_keeps=())
    space = build_space(ir, ctx, techniques, None, 2, "local")
    assert np.isfinite(space.damage).all() and (space.damage[:, 1:] > 0).all()
    assert len(made) > 3 * len(space.layers)  # every choice, then the anchors again
    assert most == 1


def test_precision_level_searches_int8_and_int4_only():
    """-O2 ("per-layer precision (int8/int4/fp32)"): no int3/int2 choices, whose grid searches
    were a quarter of SmolLM2's damage table (issue 18); -Os/-O3 keep them."""
    precision = [parse_format(f) for f in Techniques.named("precision").formats]
    assert {f.kind for f in precision} == {"int8", "int4"}
    assert any(parse_format(f).lowbit for f in Techniques.named("all").formats)


def test_small_layers_keep_their_approximations_and_two_workers_give_the_same_table(
        hf_dir, monkeypatch):
    """A small layer's approximations are made once (kept for its anchors' forwards), and
    the layers measured on two threads (one per core, single-threaded ops) give the table
    the one-at-a-time, make-again path gives, number for number (issue 18: SmolLM2's -O2
    damage table ran on one core)."""
    from slimc.jobs import compile_jobs
    from slimc.search import space as space_module
    from slimc.search.space import measure

    registry = get_registry()
    ir, example = capture(load_model(hf_dir("llama"), parse_overrides([]), registry))
    ctx = PassContext(example_inputs=example)
    ctx.analyses = AnalysisManager(ir, ctx, PassManager(registry.passes).lookup)
    techniques = Techniques(formats=("int8", "int4-g32", "int4-g32-fz", "int4-g128-fz"),
                            lowrank_keeps=())
    space = build_space(ir, ctx, techniques, None, 2, "local")
    width = space.damage.shape[1]
    calls = []
    real = space_module.approximate_matrix
    monkeypatch.setattr(space_module, "approximate_matrix",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    kept = measure(ir, ctx, space.layers, {}, width, 2)
    changed = sum(len(c.options) - 1 for c in space.layers)
    assert len(calls) == changed  # no anchor made twice
    monkeypatch.setattr(space_module, "KEEP_APPROXIMATIONS_BYTES", 0)
    monkeypatch.setattr(space_module, "STACK_ANCHORS_BYTES", -1)  # anchors one at a time
    again = measure(ir, ctx, space.layers, {}, width, 2)
    assert len(calls) > 2 * changed
    with compile_jobs(2):
        two = measure(ir, ctx, space.layers, {}, width, 2)
    assert np.array_equal(kept, again) and np.array_equal(kept, two)
    assert np.array_equal(kept, space.damage)


def test_row_chunked_fake_quantization_is_the_whole_round_trip():
    """The damage table fake-quantizes large weights a block of rows at a time (SmolLM2's
    113 MB table held ~0.5 GB of temporaries per int4 round trip, issue 18): the same values
    for every format, and the searched (-fz) grid cached under the whole weight's key."""
    from slimc.passes.quantize.formats import fake_quantize, fake_quantize_rows

    torch.manual_seed(0)
    weight = torch.randn(1000, 96)
    for name in ("int8", "int4-g32", "int4-g32-fz", "int4-g128-fz", "int4-g64-sym", "fp16",
                 "int3-g64"):
        fmt = parse_format(name)
        assert torch.equal(fake_quantize_rows(weight, fmt, rows=300),
                           fake_quantize(weight, fmt)), name


def test_divergence_against_a_fixed_reference_is_the_divergence():
    """The table's KL with the reference's side computed once (a dot product and a
    logsumexp per output, 3x less CPU on SmolLM2's 64 x 49152 logits, issue 18) is the KL of
    :func:`divergence` to rounding, zero for the reference itself; other kinds unchanged."""
    from slimc.passes.analysis.criteria.divergence import divergence, divergence_from

    torch.manual_seed(0)
    for shape in [(1, 16, 300), (300,), (2, 5, 40)]:
        ref = torch.randn(*shape) * 3
        kl = divergence_from("logits", ref)
        assert kl(ref) == 0.0
        for scale in (1e-3, 1e-1, 1.0):
            out = ref + scale * torch.randn_like(ref)
            assert kl(out) == pytest.approx(divergence("logits", ref, out), rel=1e-6)
        for kind in ("embedding", "other"):
            out = ref + 0.1 * torch.randn_like(ref)
            assert divergence_from(kind, ref)(out) == divergence(kind, ref, out)


def test_depth_sharing_anchors_first_last_and_every_fourth_block():
    """Roles in >= 8 blocks share lines; the first and last block and every 4th are anchored;
    a role in fewer blocks and a name without a block keep their own anchors."""
    from slimc.search.damage import depth_shared, role_and_block

    assert role_and_block("model.layers.7.mlp.up_proj") == ("model.layers.*.mlp.up_proj", 7)
    assert role_and_block("lm_head") is None
    names = [f"model.layers.{b}.mlp.up_proj" for b in range(10)]
    names += [f"enc.{b}.fc" for b in range(5)] + ["model.embed_tokens", None]
    shared = depth_shared(names)
    assert sorted(shared) == [1, 2, 3, 5, 6, 7]  # blocks 0, 4, 8, 9 anchored
    assert shared[1] == (0, 4, 0.25) and shared[7] == (4, 8, 0.75)


@pytest.mark.parametrize("mode", [True, None])
def test_depth_shared_lines_rank_like_every_layers_own_anchors(tmp_path, monkeypatch, mode):
    """A 10-block Llama: 7 roles x 6 blocks take their propagation line (True) or by default
    (None: ``SHARE_DEPTH = "slope"``) its slope from the anchored blocks around them (issue
    18: the anchors' forwards were most of -O2's search); the anchored layers' rows are
    unchanged, and the table ranks like every layer's own anchors."""
    import transformers as T

    import slimc.search.space as space_module
    from slimc.search.space import measure

    torch.manual_seed(0)
    config = T.LlamaConfig(hidden_size=32, num_hidden_layers=10, num_attention_heads=4,
                           num_key_value_heads=2, intermediate_size=64, vocab_size=128,
                           max_position_embeddings=64)
    config.architectures = ["LlamaForCausalLM"]
    T.LlamaForCausalLM(config).eval().save_pretrained(tmp_path / "llama10")
    registry = get_registry()
    ir, example = capture(load_model(str(tmp_path / "llama10"), parse_overrides([]), registry))
    ctx = PassContext(example_inputs=example)
    ctx.analyses = AnalysisManager(ir, ctx, PassManager(registry.passes).lookup)
    techniques = Techniques(formats=("int8", "int4-g128", "int4-g32", "int4-g32-fz"),
                            lowrank_keeps=())
    assert space_module.SHARE_DEPTH == "slope"  # the default (docs/budget.md)
    with monkeypatch.context() as patch:
        patch.setattr(space_module, "SHARE_DEPTH", False)  # every layer its own anchors
        space = build_space(ir, ctx, techniques, None, 2, "local")
    width = space.damage.shape[1]
    assert space.info["damage_shared_layers"] == 0
    own = space.damage
    info: dict = {}
    shared = measure(ir, ctx, space.layers, {}, width, 2, info=info, share_depth=mode)
    assert info["damage_shared_layers"] == 7 * 6
    ratio = info["damage_forwards"] / space.info["damage_forwards"]
    # "slope": one own anchor per shared layer instead of two; True: none of its own
    assert 0.5 < ratio < 0.75 if mode is None else ratio < 0.5, ratio
    same = [i for i in range(len(own)) if np.array_equal(own[i], shared[i])]
    assert len(same) >= len(own) - 7 * 6
    live = np.isfinite(own) & (own > 0)
    assert np.array_equal(np.isfinite(own), np.isfinite(shared))
    rho = spearmanr(shared[live], own[live]).statistic
    assert rho > 0.9, rho


def test_stacked_anchors_give_the_separate_forwards_table(hf_dir, monkeypatch):
    """A layer's anchors run as one vmapped batch (issue 18): the table equals the one made
    with one forward per anchor up to the matrix products' summation order."""
    import slimc.search.space as space

    stacked = _space(hf_dir("llama"), "local")
    monkeypatch.setattr(space, "STACK_ANCHORS_BYTES", -1)
    monkeypatch.setattr(space, "KEEP_APPROXIMATIONS_BYTES", -1)
    separate = _space(hf_dir("llama"), "local")
    assert stacked.info["damage_forwards"] == separate.info["damage_forwards"] > 0
    assert np.array_equal(np.isfinite(stacked.damage), np.isfinite(separate.damage))
    live = np.isfinite(separate.damage)
    np.testing.assert_allclose(stacked.damage[live], separate.damage[live], rtol=1e-5,
                               atol=1e-12)


def test_run_stacked_batches_or_falls_back_to_one_value_at_a_time():
    """``run_stacked`` equals the separate runs, through vmap or, for an op vmap cannot batch
    (``.item()``), one value at a time."""
    from slimc.search.space import run_stacked

    x = torch.randn(5, 3)
    values = [torch.randn(4, 3) for _ in range(3)]

    def linear(overrides):
        return [x @ overrides["w"].T]

    def data_dependent(overrides):
        return [x @ overrides["w"].T * overrides["w"].sum().item()]

    for run in (linear, data_dependent):
        stacked = run_stacked(run, "w", values)
        assert len(stacked) == len(values)
        for got, v in zip(stacked, values, strict=True):
            torch.testing.assert_close(got[0], run({"w": v})[0])


def test_stacked_anchors_through_attention_print_no_torch_warning():
    """CPU flash attention has no vmap batching rule: vmap runs it once per anchor and torch's
    C++ layer prints a "performance drop" warning straight to stderr, which reached -O2's
    console on every attention model. The stacked run keeps the same values, silently."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent("""
        import torch, torch.nn.functional as F
        from concurrent.futures import ThreadPoolExecutor
        from slimc.search.space import run_stacked
        q = torch.randn(1, 2, 64, 16)
        def run(d):
            return [F.scaled_dot_product_attention(q * d["w"].sum(), q, q)]
        values = [torch.ones(3), torch.full((3,), 2.0)]
        out = run_stacked(run, "w", values)
        assert all(torch.allclose(a[0], run({"w": v})[0]) for a, v in zip(out, values))
        # layers run on a thread pool: one thread leaving must not re-enable the warning
        # while another is inside vmap
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda i: run_stacked(run, "w", values), range(200)))
        print("same")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "same"
    assert "Warning" not in result.stderr, result.stderr
