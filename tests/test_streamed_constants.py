"""Weights written to the library once, outside TVM's in-memory serialization (issue 18: peak
memory of real-size compiles), and a tied embedding stored once."""

from __future__ import annotations

import io

import numpy as np
import torch
from slimc.backends.tvm import streamed_constants
from slimc.backends.tvm.streamed_constants import StreamedConstants


def _executable(mod, streamed: StreamedConstants | None):
    import tvm
    from slimc.backends.tvm.schedules import cpu_pipeline
    from tvm import relax

    from slimc.targets import resolve_target

    target = resolve_target("llvm").tvm_target()
    pipeline = cpu_pipeline(target)
    with tvm.transform.PassContext(opt_level=3):
        return relax.build(mod, target=target, relax_pipeline=(
            streamed.wrap_pipeline(pipeline) if streamed else pipeline))


def test_streamed_blob_is_tvms_blob_byte_for_byte():
    """The blob written from stubs + tensors equals what TVM serializes with the weights in."""
    import tvm
    from slimc.backends.tvm.lower import lower_to_relax

    from slimc.capture import capture
    from slimc.loaders.base import LoadedModel

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.ReLU(),
                                torch.nn.Linear(512, 128)).eval()
    ir, _ = capture(LoadedModel("mlp", model, {"x": torch.randn(4, 256)}))
    pack = tvm.get_global_func("runtime.ModulePackImportsToTensor")

    plain = bytes(pack(_executable(lower_to_relax(ir), None).mod).numpy())
    streamed = StreamedConstants()
    stubbed = _executable(lower_to_relax(ir), streamed)
    small = bytes(pack(stubbed.mod).numpy())
    weights = sum(np.from_dlpack(t).nbytes for t in streamed.tensors)
    assert len(streamed.tensors) == 2 and weights >= 256 * 512 * 4
    assert len(small) < len(plain) - weights + 1024  # the weights are not serialized by TVM
    out = io.BytesIO()
    written = streamed.write_blob(small, out)
    assert written == len(plain)
    assert out.getvalue() == plain


def test_changed_record_format_fails_loudly():
    streamed = StreamedConstants()
    streamed.tensors.append(None)
    try:
        streamed.write_blob(b"\0" * 64, io.BytesIO())
    except streamed_constants.StreamError as exc:
        assert "stub 0" in str(exc)
    else:
        raise AssertionError("a blob without the stub's record was written")


def test_tied_embedding_is_stored_once(tmp_path):
    """A tied 32768-token vocabulary: the library holds the table once, and it is verified."""
    import transformers

    import slimc

    config = transformers.LlamaConfig(
        vocab_size=32768, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).eval().save_pretrained(tmp_path / "tied")
    result = slimc.compile_model(str(tmp_path / "tied"), slimc.CompileOptions(
        output=tmp_path / "out", threads=1, cache=False,
        inputs=("input_ids=1x16:int64", "attention_mask=1x16:int64")))
    assert result.manifest["verification"]["passed"]
    table = 32768 * 64 * 4
    others = (result.manifest["params_before"] - 32768 * 64) * 4
    library = (result.output / "model.so").stat().st_size
    assert table + others <= library < 1.5 * table + others + 2_000_000
