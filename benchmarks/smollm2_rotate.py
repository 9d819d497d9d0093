"""Rotate an HF Llama-family model's residual stream in place (issue 17's rotation lever).

Computational invariance (QuaRot / SliceGPT): every RMSNorm's weight is folded into the
linears that read it (q/k/v, gate/up), the residual stream is multiplied by an orthogonal
``Q`` (the embedding ``E -> E Q``, the readers ``W -> W Q``, the writers o_proj / down_proj
``W -> Q^T W``), and a weightless RMSNorm commutes with ``Q``. The model computes the same
function; only the weights the quantizer sees change.

The tied table is the one catch: the embedding needs ``E Q`` and the head needs
``E diag(g) Q`` (``g`` the final norm's weight). The table stays tied (``E Q``) and the final
norm becomes a weightless RMSNorm followed by the 576 x 576 ``mix = Q^T diag(g) Q``, a new
linear (``model.norm.mix``) whose bytes are counted like any other matrix's.
"""

from __future__ import annotations

import torch

from passes.rotate.orthogonal import rotation

#: parameters the rotation adds (not in the fp32 model: left out of the fp32 byte count)
ADDED = ("model.norm.mix.weight",)


class NormThenMix(torch.nn.Module):
    """The final RMSNorm (weight ones) followed by ``mix``: ``Q^T diag(g) Q``."""

    def __init__(self, norm: torch.nn.Module, mix: torch.Tensor) -> None:
        super().__init__()
        self.norm = norm
        self.mix = torch.nn.Linear(mix.shape[1], mix.shape[0], bias=False)
        self.mix.weight.data.copy_(mix)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mix(self.norm(x))


@torch.no_grad()
def rotate_llama(model, kind: str, seed: int = 0) -> torch.Tensor:
    """Fold the norms and rotate ``model`` (a ``LlamaForCausalLM``-shaped HF model) in place;
    returns ``Q`` (float64)."""
    inner = model.model
    hidden = inner.embed_tokens.weight.shape[1]
    q = rotation(kind, hidden, seed)

    def set_(lin: torch.nn.Linear, w: torch.Tensor) -> None:
        lin.weight.data.copy_(w.to(lin.weight.dtype))

    def read(lins, norm) -> None:
        g = norm.weight.double()
        for lin in lins:
            set_(lin, (lin.weight.double() * g) @ q)
        norm.weight.data.fill_(1.0)

    def write(lin) -> None:
        assert lin.bias is None, "a bias on a residual writer would need Q too"
        set_(lin, q.t() @ lin.weight.double())

    for layer in inner.layers:
        at, mlp = layer.self_attn, layer.mlp
        read([at.q_proj, at.k_proj, at.v_proj], layer.input_layernorm)
        write(at.o_proj)
        read([mlp.gate_proj, mlp.up_proj], layer.post_attention_layernorm)
        write(mlp.down_proj)
    inner.embed_tokens.weight.data.copy_((inner.embed_tokens.weight.double() @ q).float())
    g = inner.norm.weight.double()
    inner.norm.weight.data.fill_(1.0)
    inner.norm = NormThenMix(inner.norm, (q.t() * g) @ q)
    return q
