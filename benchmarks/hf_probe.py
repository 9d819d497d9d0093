"""Probe Hugging Face architectures the way a new user would: save a tiny random model with
``save_pretrained``, ``slimc compile DIR --target x86 -O0``, then compare the artifact with the
eager model (the example inputs, and for a dynamic sequence a second, shorter length).

    python benchmarks/hf_probe.py --workdir /tmp/hunt19 [NAME ...] [--json out.json]

Every architecture runs in its own ``slimc`` process (a crash or a hang is one row, not the
end of the probe). Outcomes: ``ok``, ``usage`` (exit 2, a one-paragraph refusal), ``fail``
(exit 1: an internal error, a refused artifact), ``mismatch`` (built but disagrees with eager),
``timeout``, ``skip`` (the model cannot be built here).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

TEXT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            vocab_size=128, max_position_embeddings=64)
DEC = dict(TEXT, num_key_value_heads=2)
VISION = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
              image_size=32, patch_size=8)
AUDIO = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
             conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3),
             num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4, vocab_size=32)

#: name -> (config class, model class, config kwargs, extra CLI args)
SPECS: dict[str, tuple[str, str, dict, list[str]]] = {
    # --- text encoders
    "deberta_v2": ("DebertaV2Config", "DebertaV2Model",
                   dict(TEXT, relative_attention=True, pos_att_type=["p2c", "c2p"],
                        position_buckets=16, norm_rel_ebd="layer_norm", share_att_key=True,
                        position_biased_input=False, max_relative_positions=-1), []),
    "deberta": ("DebertaConfig", "DebertaModel",
                dict(TEXT, relative_attention=True, pos_att_type=["p2c", "c2p"]), []),
    "mpnet": ("MPNetConfig", "MPNetModel", dict(TEXT), []),
    "roberta": ("RobertaConfig", "RobertaModel", dict(TEXT, pad_token_id=1), []),
    "xlm_roberta": ("XLMRobertaConfig", "XLMRobertaModel", dict(TEXT, pad_token_id=1), []),
    "camembert": ("CamembertConfig", "CamembertModel", dict(TEXT, pad_token_id=1), []),
    "funnel": ("FunnelConfig", "FunnelModel",
               dict(d_model=32, n_head=4, d_head=8, d_inner=64, block_sizes=[1, 1],
                    num_decoder_layers=1, vocab_size=128), []),
    "convbert": ("ConvBertConfig", "ConvBertModel", dict(TEXT, embedding_size=32), []),
    "roformer": ("RoFormerConfig", "RoFormerModel", dict(TEXT, embedding_size=32), []),
    "nystromformer": ("NystromformerConfig", "NystromformerModel",
                      dict(TEXT, num_landmarks=8, segment_means_seq_len=64,
                           max_position_embeddings=130), []),
    "big_bird": ("BigBirdConfig", "BigBirdModel",
                 dict(TEXT, attention_type="original_full"), []),
    "layoutlm": ("LayoutLMConfig", "LayoutLMModel", dict(TEXT), []),
    "mobilebert": ("MobileBertConfig", "MobileBertModel",
                   dict(TEXT, embedding_size=16, intra_bottleneck_size=16,
                        true_hidden_size=16, num_feedforward_networks=2), []),
    "markuplm": ("MarkupLMConfig", "MarkupLMModel", dict(TEXT), []),
    "ernie": ("ErnieConfig", "ErnieModel", dict(TEXT), []),
    "rembert": ("RemBertConfig", "RemBertModel",
                dict(TEXT, input_embedding_size=16, output_embedding_size=16), []),
    "modernbert": ("ModernBertConfig", "ModernBertModel",
                   dict(TEXT, global_attn_every_n_layers=2, local_attention=16, pad_token_id=0,
                        bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2), []),
    "xlm": ("XLMConfig", "XLMModel", dict(emb_dim=32, n_layers=2, n_heads=4, vocab_size=128,
                                          max_position_embeddings=64), []),
    "canine": ("CanineConfig", "CanineModel", dict(TEXT, num_hash_buckets=64,
                                                   max_position_embeddings=256,
                                                   downsampling_rate=4), []),
    "luke": ("LukeConfig", "LukeModel", dict(TEXT, entity_vocab_size=16, entity_emb_size=16),
             []),
    "esm": ("EsmConfig", "EsmModel", dict(TEXT, pad_token_id=1, position_embedding_type="rotary"),
            []),
    # --- decoders (prefill)
    "opt": ("OPTConfig", "OPTForCausalLM",
            dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64,
                 vocab_size=128, max_position_embeddings=64, word_embed_proj_dim=32), []),
    "bloom": ("BloomConfig", "BloomForCausalLM",
              dict(hidden_size=32, n_layer=2, n_head=4, vocab_size=128), []),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(DEC, head_dim=8), []),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM",
               dict(DEC, head_dim=8, sliding_window=16), []),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM",
               dict(DEC, head_dim=8, sliding_window=16), []),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(DEC, pad_token_id=0), []),
    "stablelm": ("StableLmConfig", "StableLmForCausalLM", dict(DEC), []),
    "gptj": ("GPTJConfig", "GPTJForCausalLM",
             dict(n_embd=32, n_layer=2, n_head=4, rotary_dim=4, vocab_size=128,
                  n_positions=64), []),
    "codegen": ("CodeGenConfig", "CodeGenForCausalLM",
                dict(n_embd=32, n_layer=2, n_head=4, rotary_dim=4, vocab_size=128,
                     n_positions=64, n_ctx=64), []),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", dict(DEC), []),
    "cohere": ("CohereConfig", "CohereForCausalLM", dict(DEC), []),
    "granite": ("GraniteConfig", "GraniteForCausalLM", dict(DEC), []),
    "mpt": ("MptConfig", "MptForCausalLM",
            dict(d_model=32, n_layers=2, n_heads=4, vocab_size=128, max_seq_len=64,
                 expansion_ratio=2), []),
    "gpt_bigcode": ("GPTBigCodeConfig", "GPTBigCodeForCausalLM",
                    dict(n_embd=32, n_layer=2, n_head=4, vocab_size=128, n_positions=64,
                         multi_query=True), []),
    "starcoder2": ("Starcoder2Config", "Starcoder2ForCausalLM", dict(DEC, sliding_window=16),
                   []),
    "gpt_neo": ("GPTNeoConfig", "GPTNeoForCausalLM",
                dict(hidden_size=32, num_layers=2, num_heads=4, vocab_size=128,
                     max_position_embeddings=64, attention_types=[[["global", "local"], 1]],
                     window_size=16), []),
    "xglm": ("XGLMConfig", "XGLMForCausalLM",
             dict(d_model=32, num_layers=2, attention_heads=4, ffn_dim=64, vocab_size=128,
                  max_position_embeddings=64), []),
    "biogpt": ("BioGptConfig", "BioGptForCausalLM", dict(TEXT), []),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(DEC, moe_intermediate_size=32, shared_expert_intermediate_size=32,
                       num_experts=4, num_experts_per_tok=2), []),
    # --- vision
    "yolos": ("YolosConfig", "YolosModel", dict(VISION, num_detection_tokens=4,
                                                image_size=[32, 32]), []),
    "data2vec_vision": ("Data2VecVisionConfig", "Data2VecVisionModel",
                        dict(VISION, use_relative_position_bias=True), []),
    "pvt_v2": ("PvtV2Config", "PvtV2Model",
               dict(image_size=32, hidden_sizes=[8, 16], depths=[1, 1], num_encoder_blocks=2,
                    num_attention_heads=[1, 2], sr_ratios=[2, 1], patch_sizes=[7, 3],
                    strides=[4, 2], mlp_ratios=[2, 2]), []),
    "hiera": ("HieraConfig", "HieraModel",
              dict(image_size=[64, 64], embed_dim=8, num_heads=[1, 2], depths=[1, 1],
                   query_stride=[2, 2], masked_unit_size=[8, 8], masked_unit_attention=[True,
                                                                                        False],
                   embed_dim_multiplier=2.0, num_query_pool=1), []),
    "bit": ("BitConfig", "BitModel", dict(embedding_size=32, hidden_sizes=[32, 64],
                                          depths=[1, 1], num_groups=8), []),
    "cvt": ("CvtConfig", "CvtModel",
            dict(embed_dim=[8, 16, 24], num_heads=[1, 2, 3], depth=[1, 2, 3],
                 drop_path_rate=[0.0, 0.0, 0.0]), []),
    "convnext_ls": ("ConvNextConfig", "ConvNextModel",
                    dict(hidden_sizes=[8, 16], depths=[1, 1], layer_scale_init_value=1e-6,
                         num_stages=2, image_size=32), []),
    "focalnet": ("FocalNetConfig", "FocalNetModel",
                 dict(embed_dim=8, depths=[1, 1], focal_levels=[2, 2], focal_windows=[3, 3],
                      image_size=32, patch_size=4, use_layerscale=True), []),
    "swinv2": ("Swinv2Config", "Swinv2Model",
               dict(embed_dim=8, depths=[1, 1], num_heads=[1, 2], window_size=4,
                    image_size=32, patch_size=4), []),
    "glpn": ("GLPNConfig", "GLPNModel",
             dict(hidden_sizes=[8, 16], depths=[1, 1], num_encoder_blocks=2,
                  num_attention_heads=[1, 2], sr_ratios=[2, 1], patch_sizes=[7, 3],
                  strides=[4, 2], mlp_ratios=[2, 2], image_size=32), []),
    "mobilevitv2": ("MobileViTV2Config", "MobileViTV2Model",
                    dict(image_size=64, width_multiplier=0.5), []),
    "swiftformer": ("SwiftFormerConfig", "SwiftFormerModel",
                    dict(depths=[1, 1, 1, 1], embed_dims=[8, 16, 24, 32], image_size=64), []),
    "vit_msn": ("ViTMSNConfig", "ViTMSNModel", dict(VISION), []),
    "dinov2_reg": ("Dinov2WithRegistersConfig", "Dinov2WithRegistersModel",
                   dict(VISION, num_register_tokens=2), []),
    "siglip_vision": ("SiglipVisionConfig", "SiglipVisionModel", dict(VISION), []),
    "pvt": ("PvtConfig", "PvtModel",
            dict(image_size=32, hidden_sizes=[8, 16], depths=[1, 1], num_encoder_blocks=2,
                 num_attention_heads=[1, 2], sequence_reduction_ratios=[2, 1],
                 patch_sizes=[4, 2], strides=[4, 2], mlp_ratios=[2, 2]), []),
    "dpt": ("DPTConfig", "DPTModel", dict(VISION, image_size=32), []),
    # --- audio
    "hubert": ("HubertConfig", "HubertModel", dict(AUDIO),
               ["--input", "input_values=1x1600:float32"]),
    "sew": ("SEWConfig", "SEWModel", dict(AUDIO, squeeze_factor=2),
            ["--input", "input_values=1x1600:float32"]),
    "sew_d": ("SEWDConfig", "SEWDModel", dict(AUDIO, squeeze_factor=2, position_buckets=16,
                                                max_position_embeddings=64),
              ["--input", "input_values=1x1600:float32"]),
    "wavlm": ("WavLMConfig", "WavLMModel", dict(AUDIO, num_buckets=16, max_bucket_distance=64),
              ["--input", "input_values=1x1600:float32"]),
    "w2v2_conformer": ("Wav2Vec2ConformerConfig", "Wav2Vec2ConformerModel",
                       dict(AUDIO, position_embeddings_type="rotary",
                            conv_depthwise_kernel_size=7),
                       ["--input", "input_values=1x1600:float32"]),
    "data2vec_audio": ("Data2VecAudioConfig", "Data2VecAudioModel",
                       dict(AUDIO, conv_pos_kernel_size=5, num_conv_pos_embeddings=5),
                       ["--input", "input_values=1x1600:float32"]),
    "ast": ("ASTConfig", "ASTModel",
            dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=64, num_mel_bins=32, max_length=64, patch_size=16,
                 frequency_stride=8, time_stride=8),
            ["--input", "input_values=1x64x32:float32"]),
    "speech2text": ("Speech2TextConfig", "Speech2TextModel",
                    dict(d_model=32, encoder_layers=1, decoder_layers=1,
                         encoder_attention_heads=4, decoder_attention_heads=4,
                         encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=128,
                         input_feat_per_channel=16, conv_channels=16,
                         max_source_positions=64, max_target_positions=32),
                    ["--input", "input_features=1x40x16:float32",
                     "--input", "decoder_input_ids=1x8:int64"]),
    # --- added by wt/hunt22
    "electra": ("ElectraConfig", "ElectraModel", dict(TEXT, embedding_size=16), []),
    "longformer": ("LongformerConfig", "LongformerModel",
                   dict(TEXT, attention_window=[8, 8], pad_token_id=1), []),
    "squeezebert": ("SqueezeBertConfig", "SqueezeBertModel", dict(TEXT, embedding_size=32), []),
    "xlnet": ("XLNetConfig", "XLNetModel",
              dict(d_model=32, n_layer=2, n_head=4, d_inner=64, vocab_size=128), []),
    "clip_text": ("CLIPTextConfig", "CLIPTextModel", dict(TEXT), []),
    "clip_vision": ("CLIPVisionConfig", "CLIPVisionModel", dict(VISION), []),
    "deit": ("DeiTConfig", "DeiTModel", dict(VISION), []),
    "beit": ("BeitConfig", "BeitModel", dict(VISION, use_relative_position_bias=True), []),
    "swin": ("SwinConfig", "SwinModel",
             dict(embed_dim=8, depths=[1, 1], num_heads=[1, 2], window_size=4,
                  image_size=32, patch_size=4), []),
    "segformer": ("SegformerConfig", "SegformerModel",
                  dict(hidden_sizes=[8, 16], depths=[1, 1], num_encoder_blocks=2,
                       num_attention_heads=[1, 2], sr_ratios=[2, 1], patch_sizes=[7, 3],
                       strides=[4, 2], mlp_ratios=[2, 2], image_size=32), []),
    "levit": ("LevitConfig", "LevitModel",
              dict(image_size=32, hidden_sizes=[16, 32], num_attention_heads=[1, 2],
                   depths=[1, 1], key_dim=[8, 8], drop_path_rate=0, mlp_ratio=[2, 2],
                   attention_ratio=[2, 2], down_ops=[["Subsample", 8, 1, 2, 2, 2]]), []),
    "convnextv2": ("ConvNextV2Config", "ConvNextV2Model",
                   dict(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, image_size=32), []),
    "dinov2": ("Dinov2Config", "Dinov2Model", dict(VISION), []),
    "stablelm_partial": ("StableLmConfig", "StableLmForCausalLM",
                         dict(DEC, partial_rotary_factor=0.25, use_qkv_bias=True,
                              qk_layernorm=True), []),
    "persimmon": ("PersimmonConfig", "PersimmonForCausalLM", dict(TEXT, qk_layernorm=True),
                  []),
    "gpt_neox_parallel": ("GPTNeoXConfig", "GPTNeoXForCausalLM",
                          dict(TEXT, rotary_pct=0.5, use_parallel_residual=False), []),
    "falcon_new": ("FalconConfig", "FalconForCausalLM",
                   dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        vocab_size=128, new_decoder_architecture=True, num_kv_heads=2,
                        alibi=False), []),
    "bloom_alibi": ("BloomConfig", "BloomForCausalLM",
                    dict(hidden_size=32, n_layer=2, n_head=4, vocab_size=128), []),
    # --- added by wt/hunt24
    "mistral_sliding": ("MistralConfig", "MistralForCausalLM",
                        dict(DEC, sliding_window=4, head_dim=8), []),
    "phi": ("PhiConfig", "PhiForCausalLM", dict(TEXT, partial_rotary_factor=0.5), []),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(DEC, head_dim=8), []),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(TEXT), []),
    "falcon_alibi": ("FalconConfig", "FalconForCausalLM",
                     dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                          vocab_size=128, alibi=True), []),
    "regnet": ("RegNetConfig", "RegNetModel",
               dict(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], groups_width=4,
                    image_size=32), []),
    "mobilevit": ("MobileViTConfig", "MobileViTModel",
                  dict(image_size=32, patch_size=2, hidden_sizes=[16, 24, 32],
                       neck_hidden_sizes=[8, 8, 16, 16, 24, 32, 64], num_attention_heads=2),
                  []),
    "data2vec_text": ("Data2VecTextConfig", "Data2VecTextModel", dict(TEXT, pad_token_id=1),
                      []),
    # --- encoder-decoder text
    "bart": ("BartConfig", "BartModel",
             dict(d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                  decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                  vocab_size=128, max_position_embeddings=64), []),
    "pegasus": ("PegasusConfig", "PegasusModel",
                dict(d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                     decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                     vocab_size=128, max_position_embeddings=64), []),
    "mt5": ("MT5Config", "MT5Model",
            dict(d_model=32, d_ff=64, num_layers=1, num_heads=4, vocab_size=128, d_kv=8), []),
}


def build(name: str):
    import torch
    import transformers as T

    cfg_cls, model_cls, kwargs, _ = SPECS[name]
    torch.manual_seed(0)
    config = getattr(T, cfg_cls)(**kwargs)
    config.architectures = [model_cls]
    return getattr(T, model_cls)(config).eval()


def rel_l2(got: np.ndarray, want: np.ndarray) -> float:
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def compare(name: str, model_dir: Path, out: Path) -> dict:
    """Artifact vs eager on the example inputs (and a shorter sequence when dynamic)."""
    import torch
    import transformers as T

    import slimc

    compiled = slimc.load(out)
    model = getattr(T, SPECS[name][1]).from_pretrained(model_dir).eval()
    feeds = [compiled.example_inputs()]
    dyn = [s for s in compiled.inputs if any(isinstance(d, dict) for d in s.get("dims", []))]
    if dyn and "input_ids" in feeds[0]:
        n = 5
        feeds.append({k: (v[:, :n] if v.ndim >= 2 else v) for k, v in feeds[0].items()})
    errs = []
    for feed in feeds:
        got = compiled(**feed)
        with torch.no_grad():
            kw = {k: torch.from_numpy(v) for k, v in feed.items()}
            try:
                ref = model(**kw, use_cache=False, return_dict=True)
            except TypeError:
                ref = model(**kw, return_dict=True)
        ref = {k: v for k, v in ref.items() if isinstance(v, torch.Tensor)}
        for i, (k, v) in enumerate(got.items()):
            want = ref.get(k, list(ref.values())[i] if i < len(ref) else None)
            if want is None:
                continue
            errs.append(rel_l2(v, want.numpy()))
    return {"rel_l2": max(errs) if errs else None, "lengths": len(feeds)}


def probe(name: str, workdir: Path, timeout: float) -> dict:
    model_dir = workdir / "models" / name
    out = workdir / "out" / name
    row: dict = {"name": name, "class": SPECS[name][1]}
    try:
        if not (model_dir / "config.json").exists():
            build(name).save_pretrained(model_dir)
    except Exception as exc:  # noqa: BLE001 - a probe row, not a crash
        row.update(outcome="skip", error=f"{type(exc).__name__}: {exc}"[:300])
        return row
    cmd = [sys.executable, "-m", "slimc", "compile", str(model_dir), "--target", "x86", "-O0",
           "-o", str(out), "--json", "-q", "--force", *SPECS[name][3]]
    start = time.time()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        row.update(outcome="timeout", seconds=round(time.time() - start))
        return row
    row["seconds"] = round(time.time() - start)
    row["exit"] = proc.returncode
    if proc.returncode != 0:
        row["outcome"] = "usage" if proc.returncode == 2 else "fail"
        try:
            err = json.loads(proc.stdout)
            row["error"] = (err.get("error", "") + " | " + (err.get("hint") or ""))[:600]
        except (json.JSONDecodeError, AttributeError):
            row["error"] = (proc.stderr or proc.stdout)[-1500:]
        return row
    summary = json.loads(proc.stdout)
    row["verify"] = summary.get("verification", {}).get("max_rel_error",
                                                         summary.get("verification"))
    try:
        row.update(compare(name, model_dir, out))
        row["outcome"] = "ok" if (row["rel_l2"] or 0) < 1e-3 else "mismatch"
    except Exception as exc:  # noqa: BLE001
        row.update(outcome="compare-error", error=f"{type(exc).__name__}: {exc}"[:600])
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/hf_probe"))
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    names = args.names or list(SPECS)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rows = []
    for name in names:
        row = probe(name, args.workdir, args.timeout)
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.json:
            args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
