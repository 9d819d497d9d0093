"""Tiny models built in the tests (random weights, real classes), and the factory form."""

from __future__ import annotations

import torch
import transformers as T

TEXT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            vocab_size=128, max_position_embeddings=64)

#: name -> (config class, model class, config overrides). Llama-family entries use
#: grouped-query attention (4 query heads sharing 2 KV heads).
HF_ARCHS = {
    "bert": (T.BertConfig, T.BertModel, {}),
    "gpt2": (T.GPT2Config, T.GPT2LMHeadModel,
             dict(n_embd=32, n_layer=2, n_head=4, n_positions=64, vocab_size=128,
                  bos_token_id=0, eos_token_id=0)),
    "llama": (T.LlamaConfig, T.LlamaForCausalLM, dict(num_key_value_heads=2)),
    "qwen2": (T.Qwen2Config, T.Qwen2ForCausalLM, dict(num_key_value_heads=2)),
    "mistral": (T.MistralConfig, T.MistralForCausalLM, dict(num_key_value_heads=2)),
    "gemma": (T.GemmaConfig, T.GemmaForCausalLM, dict(num_key_value_heads=2, head_dim=8)),
    "phi": (T.PhiConfig, T.PhiForCausalLM, {}),
    "gpt_neox": (T.GPTNeoXConfig, T.GPTNeoXForCausalLM, {}),
}


#: Architectures whose configs do not take the common text fields; full kwargs given. These
#: caught real lowering bugs: Falcon's fused-QKV split indexes x[:, :, idx] (TVM indexed the
#: wrong axis, a silently wrong library); T5/Whisper are encoder-decoders whose stacks keep
#: their own config (and KV cache) copies; Whisper takes float audio features; Mixtral's
#: mixture-of-experts routing needs transformers' static batched_mm experts path.
FULL_CONFIG_ARCHS = {
    "falcon": (T.FalconConfig, T.FalconForCausalLM,
               dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, vocab_size=128)),
    "t5": (T.T5Config, T.T5ForConditionalGeneration,
           dict(d_model=32, d_ff=64, num_layers=2, num_heads=4, vocab_size=128, d_kv=8)),
    "whisper": (T.WhisperConfig, T.WhisperModel,
                dict(d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                     decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                     vocab_size=128, num_mel_bins=16, max_source_positions=16,
                     max_target_positions=32, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                     decoder_start_token_id=1)),
    "vit": (T.ViTConfig, T.ViTForImageClassification,
            dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=64, image_size=32, patch_size=8, num_labels=5)),
    "mixtral": (T.MixtralConfig, T.MixtralForCausalLM,
                dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, intermediate_size=64, vocab_size=128,
                     num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64)),
    "resnet": (T.ResNetConfig, T.ResNetForImageClassification,
               dict(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=5)),
}


def build_hf(arch: str, seed: int = 0) -> torch.nn.Module:
    if arch in FULL_CONFIG_ARCHS:
        config_cls, model_cls, kwargs = FULL_CONFIG_ARCHS[arch]
    else:
        config_cls, model_cls, extra = HF_ARCHS[arch]
        kwargs = dict(extra) if arch == "gpt2" else {**TEXT, **extra}
    torch.manual_seed(seed)
    config = config_cls(**kwargs)
    config.architectures = [model_cls.__name__]
    return model_cls(config).eval()


def save_hf(arch: str, path) -> str:
    model = build_hf(arch)
    model.save_pretrained(path)
    return str(path)


class SmallCNN(torch.nn.Module):
    """Conv-BN-ReLU stages with a residual add, depthwise conv and a classifier."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(16)
        self.dw = torch.nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.bn2 = torch.nn.BatchNorm2d(16)
        self.pw = torch.nn.Conv2d(16, 16, 1)
        self.bn3 = torch.nn.BatchNorm2d(16)
        self.head = torch.nn.Linear(16, classes)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.stem(image)))
        y = torch.relu(self.bn2(self.dw(x)))
        x = torch.relu(self.bn3(self.pw(y)) + x)
        return self.head(torch.nn.functional.adaptive_avg_pool2d(x, 1).flatten(1))


def small_cnn():
    """Factory form for `slimc compile tests.models:small_cnn` (BN statistics randomised)."""
    torch.manual_seed(0)
    net = SmallCNN().eval()
    for bn in (net.bn1, net.bn2, net.bn3):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.2, 0.2)
    return net, (torch.randn(2, 3, 16, 16),)


class DataDependent(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # branches on a value: torch.export cannot capture this
            return x * 2
        return x - 1


def untraceable():
    return DataDependent(), (torch.randn(4),)


def mlp_64mb():
    """Four 2048x2048 fp32 layers: 64 MB of weights, for memory measurements of a load."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(*[torch.nn.Linear(2048, 2048) for _ in range(4)]).eval()
    return net, (torch.randn(4, 2048),)


def two_inputs_two_outputs():
    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(8, 4)

        def forward(self, a: torch.Tensor, b: torch.Tensor):
            h = self.proj(a)
            return h.softmax(-1), (h * b).sum(-1)

    torch.manual_seed(0)
    return Net().eval(), {"a": torch.randn(3, 8), "b": torch.randn(3, 4)}


def _causal_lm_without_mask(arch: str):
    """HF causal LM called with input_ids only: position ids then come from a cumsum over a
    boolean mask inside transformers, the path TVM's codegen used to reject."""
    model = build_hf(arch)
    model.config.use_cache = False
    ids = torch.randint(0, TEXT["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(1))
    return model, {"input_ids": ids}


def llama_no_mask():
    return _causal_lm_without_mask("llama")


def qwen2_no_mask():
    return _causal_lm_without_mask("qwen2")


def mistral_no_mask():
    return _causal_lm_without_mask("mistral")


def gemma_no_mask():
    return _causal_lm_without_mask("gemma")


def phi_no_mask():
    return _causal_lm_without_mask("phi")


def gpt_neox_no_mask():
    return _causal_lm_without_mask("gpt_neox")


def analysis_manager(ir, batches):
    """An :class:`~slimc.passmanager.AnalysisManager` over ``ir`` with ``batches`` as the
    calibration data (the first as the example), as ``slimc analyze`` builds it."""
    from slimc.analyze import AnalysisContext
    from slimc.passmanager import AnalysisManager, PassManager
    from slimc.plugins import get_registry

    ctx = AnalysisContext(example_inputs=batches[0], calibration_batches=batches)
    ctx.analyses = AnalysisManager(ir, ctx, PassManager(get_registry().passes).lookup)
    return ctx.analyses
