"""Small CNN families with the layer types of the real ones, random weights, built in the tests.

torchvision cannot be installed beside slimc's torch, so DenseNet and SqueezeNet are written
here with the same structure as torchvision's (pre-activation dense layers and concatenation;
fire modules and a convolutional classifier); ResNet, MobileNetV2, EfficientNet and RegNet are
transformers' own classes with small configs. Widths are small but not degenerate (reduction
sizes of 64 and more), as in the real models, where per-channel scales are a small overhead.
"""

from __future__ import annotations

import torch
import transformers as T
from torch import nn


def _randomize_batchnorms(model: nn.Module) -> nn.Module:
    """Trained-looking batch-norm statistics (fresh ones are the identity)."""
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            n = module.num_features
            module.running_mean.copy_(torch.rand(n, generator=generator) - 0.5)
            module.running_var.copy_(torch.rand(n, generator=generator) * 1.5 + 0.5)
            module.weight.data.copy_(torch.rand(n, generator=generator) + 0.5)
            module.bias.data.copy_((torch.rand(n, generator=generator) - 0.5) * 0.4)
    return model.eval()


class DenseLayer(nn.Module):
    def __init__(self, channels: int, growth: int) -> None:
        super().__init__()
        self.norm1, self.conv1 = nn.BatchNorm2d(channels), nn.Conv2d(channels, 4 * growth, 1,
                                                                     bias=False)
        self.norm2 = nn.BatchNorm2d(4 * growth)
        self.conv2 = nn.Conv2d(4 * growth, growth, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv1(torch.relu(self.norm1(x)))
        y = self.conv2(torch.relu(self.norm2(y)))
        return torch.cat([x, y], 1)


class DenseNet(nn.Module):
    """torchvision's DenseNet layout: stem, dense blocks (concat), transitions, classifier."""

    def __init__(self, growth: int = 32, blocks: tuple[int, ...] = (2, 2), classes: int = 10):
        super().__init__()
        channels = 2 * growth
        layers: list[nn.Module] = [nn.Conv2d(3, channels, 3, padding=1, bias=False),
                                   nn.BatchNorm2d(channels), nn.ReLU()]
        for i, count in enumerate(blocks):
            for _ in range(count):
                layers.append(DenseLayer(channels, growth))
                channels += growth
            if i < len(blocks) - 1:
                layers += [nn.BatchNorm2d(channels), nn.ReLU(),
                           nn.Conv2d(channels, channels // 2, 1, bias=False), nn.AvgPool2d(2)]
                channels //= 2
        layers += [nn.BatchNorm2d(channels), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(channels, classes)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = nn.functional.adaptive_avg_pool2d(self.features(image), 1).flatten(1)
        return self.classifier(x)


class Fire(nn.Module):
    def __init__(self, channels: int, squeeze: int, expand: int) -> None:
        super().__init__()
        self.squeeze = nn.Conv2d(channels, squeeze, 1)
        self.expand1x1 = nn.Conv2d(squeeze, expand, 1)
        self.expand3x3 = nn.Conv2d(squeeze, expand, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.relu(self.squeeze(x))
        return torch.cat([torch.relu(self.expand1x1(s)), torch.relu(self.expand3x3(s))], 1)


class SqueezeNet(nn.Module):
    """SqueezeNet 1.1's layout: fire modules (squeeze 1x1, expand 1x1 + 3x3, concat), no batch
    norm, and a 1x1 convolution as the classifier."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, 3, stride=2), nn.ReLU(), nn.MaxPool2d(3, 2, ceil_mode=True),
            Fire(64, 16, 64), Fire(128, 16, 64), nn.MaxPool2d(3, 2, ceil_mode=True),
            Fire(128, 32, 128))
        self.classifier = nn.Sequential(nn.Conv2d(256, classes, 1), nn.ReLU(),
                                        nn.AdaptiveAvgPool2d(1))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(image)).flatten(1)


class AudioFrontEnd(nn.Module):
    """1-D convolutions as in speech front ends: strided, grouped and depthwise conv1d + BN."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(16, 128, 5, stride=2, padding=2, bias=False)
        self.bn1 = nn.BatchNorm1d(128)
        self.depthwise = nn.Conv1d(128, 128, 3, padding=1, groups=128)
        self.grouped = nn.Conv1d(128, 256, 4, padding="same", groups=2)
        self.head = nn.Linear(256, 8)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(features)))
        x = torch.relu(self.grouped(self.depthwise(x)))
        return self.head(x.mean(-1))


def densenet():
    torch.manual_seed(0)
    return _randomize_batchnorms(DenseNet()), (torch.randn(1, 3, 16, 16),)


def squeezenet():
    torch.manual_seed(0)
    return SqueezeNet().eval(), (torch.randn(1, 3, 32, 32),)


def audio_front_end():
    torch.manual_seed(0)
    return _randomize_batchnorms(AudioFrontEnd()), (torch.randn(1, 16, 40),)


#: transformers vision classes with small configs: name -> (config class, model class, kwargs).
HF_VISION = {
    "resnet": (T.ResNetConfig, T.ResNetForImageClassification,
               dict(embedding_size=32, hidden_sizes=[64, 128], depths=[1, 1], num_labels=10)),
    "mobilenet_v2": (T.MobileNetV2Config, T.MobileNetV2ForImageClassification,
                     dict(image_size=32, depth_multiplier=0.35, num_labels=10)),
    "efficientnet": (T.EfficientNetConfig, T.EfficientNetForImageClassification,
                     dict(image_size=32, width_coefficient=0.5, depth_coefficient=0.2,
                          hidden_dim=640, num_labels=10)),
    "regnet": (T.RegNetConfig, T.RegNetForImageClassification,
               dict(embedding_size=32, hidden_sizes=[64, 128], depths=[1, 1], groups_width=16,
                    num_labels=10)),
}

#: Text models whose weights quantize used to miss: Falcon's ``x @ W.T``, Mixtral's 3-D experts.
HF_TEXT = {
    "falcon": (T.FalconConfig, T.FalconForCausalLM,
               dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=256)),
    "mixtral": (T.MixtralConfig, T.MixtralForCausalLM,
                dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, intermediate_size=128, vocab_size=256,
                     num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64)),
}


def save_hf_model(name: str, path) -> str:
    config_cls, model_cls, kwargs = {**HF_VISION, **HF_TEXT}[name]
    torch.manual_seed(0)
    config = config_cls(**kwargs)
    config.architectures = [model_cls.__name__]
    model = model_cls(config).eval()
    if name in HF_VISION:
        _randomize_batchnorms(model)
    model.save_pretrained(path)
    return str(path)
