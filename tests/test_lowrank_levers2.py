"""The pieces of ``benchmarks/lowrank_levers2.py`` that its SmolLM2 numbers rest on: the
measured-damage knapsack meets the parameter budget at the least summed damage (dense is an
option), and a closed-form refit of ``U`` on the Grams the whitened SVD used changes nothing
(real torch on a small random layer with correlated inputs)."""

from __future__ import annotations

import itertools

import torch

from benchmarks.lowrank_levers2 import knapsack, lsq_refit_change


def test_knapsack_meets_the_budget_at_the_least_damage():
    options = {  # (keep, removed params, damage)
        "cheap": [(1.0, 0, 0.0), (0.5, 100, 0.01), (0.7, 60, 0.005)],
        "costly": [(1.0, 0, 0.0), (0.5, 100, 0.5), (0.7, 60, 0.3)],
        "mid": [(1.0, 0, 0.0), (0.5, 100, 0.1), (0.7, 60, 0.02)],
    }
    chosen = knapsack(options, 150)
    assert sum(c[1] for c in chosen.values()) >= 150
    best = min((combo for combo in itertools.product(*options.values())
                if sum(c[1] for c in combo) >= 150), key=lambda combo: sum(c[2] for c in combo))
    assert sum(c[2] for c in chosen.values()) <= sum(c[2] for c in best) + 1e-12
    assert chosen["costly"][0] == 1.0  # the sensitive group stays dense


class _Fz:
    """The two attributes of ``Factorizer`` that ``lsq_refit_change`` reads."""

    def __init__(self, weight, gram):
        from slimc.passes.lowrank.factorize import whitened

        sp = whitened(weight, gram)
        self.dense = {"l": weight}
        self.spec = {"l": (sp.u, sp.s, sp.vh)}


def test_closed_form_refit_of_u_on_the_whitening_grams_is_a_no_op():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(512, 48, generator=gen, dtype=torch.float64) @ torch.randn(
        48, 48, generator=gen, dtype=torch.float64)
    weight = torch.randn(32, 48, generator=gen, dtype=torch.float64)
    gram = x.T @ x
    out = lsq_refit_change(_Fz(weight, gram), {"l": gram}, "l", 12)
    assert out["loss_svd"] > 0
    assert abs(out["rel_change"]) < 1e-6, out
