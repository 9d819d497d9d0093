"""Tiny factories for the reliability and security tests (``tests.reliability_models:NAME``)."""

from __future__ import annotations

import torch


class _Embed(torch.nn.Module):
    def __init__(self, vocab: int = 256, dim: int = 8) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim)
        self.head = torch.nn.Linear(dim, 4)

    def forward(self, input_ids):
        return self.head(self.embed(input_ids))


def embedding256():
    """A 256-entry embedding table fed by int64 token ids (the out-of-vocabulary cases)."""
    torch.manual_seed(0)
    return _Embed().eval(), (torch.randint(0, 256, (1, 8)),)


def tiny_linear():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU()).eval(), \
        (torch.randn(2, 8),)


def nan_weights():
    net, example = tiny_linear()
    with torch.no_grad():
        net[0].weight[1, 2] = float("nan")
    return net, example


def returns_string():
    return "not a model", ()


def non_tensor_output():
    class Net(torch.nn.Module):
        def forward(self, x):
            return {"value": x * 2, "label": "cat"}

    return Net().eval(), (torch.randn(2, 3),)
