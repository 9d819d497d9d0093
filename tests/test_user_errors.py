"""Bad input: one clear paragraph naming the problem and the fix, exit code 2, no traceback,
and never a partial or lost artifact."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


def _assert_clean_error(result, *fragments: str) -> None:
    assert result.code == 2, (result.code, result.err)
    assert "Traceback" not in result.err
    for fragment in fragments:
        assert fragment in result.err, result.err


def test_untraceable_model_names_the_line_and_what_to_try(cli, tmp_path):
    result = cli("compile", "tests.models:untraceable", "-o", tmp_path / "x", "-q")
    _assert_clean_error(result, "Could not capture", "tests/models.py:", "x.sum() > 0",
                        "torch.where/torch.cond")
    assert not (tmp_path / "x").exists()


def test_unknown_target_lists_valid_ones(cli):
    result = cli("compile", "tests.models:small_cnn", "--target", "sparc")
    _assert_clean_error(result, "Unknown target 'sparc'", "llvm", "arm", "raspberry-pi/4b-aarch64")


def test_bad_input_spec(cli, hf_dir):
    result = cli("compile", hf_dir("bert"), "--input", "input_ids=1xfoo")
    _assert_clean_error(result, "NAME=SHAPE:DTYPE", "input_ids=1x128:int64")
    result = cli("compile", hf_dir("bert"), "--input", "input_ids=1x8:complex")
    _assert_clean_error(result, "unknown dtype 'complex'")
    result = cli("compile", hf_dir("bert"), "--input", "pixels=1x8:int64", "-q")
    _assert_clean_error(result, "no input of that name", "input_ids, attention_mask")


def test_unknown_model_form(cli, tmp_path):
    result = cli("compile", str(tmp_path / "nothing-here"))
    _assert_clean_error(result, "does not know how to load", "huggingface", "factory", "pt2",
                        "does not exist")
    (tmp_path / "empty").mkdir()
    _assert_clean_error(cli("compile", str(tmp_path / "empty")), "has no config.json")
    (tmp_path / "notes.txt").write_text("not a model")
    _assert_clean_error(cli("compile", str(tmp_path / "notes.txt")),
                        ".txt is not a model format")


def test_corrupt_weights_name_the_file(cli, hf_dir, tmp_path):
    import shutil

    broken = tmp_path / "broken-bert"
    shutil.copytree(hf_dir("bert"), broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated download
    result = cli("compile", broken, "-q")
    _assert_clean_error(result, "Could not load the weights", str(broken), "truncated")


def test_missing_weights_and_bad_config(cli, tmp_path):
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    _assert_clean_error(cli("compile", tmp_path / "noweights"), "no weights")
    (tmp_path / "badjson").mkdir()
    (tmp_path / "badjson" / "config.json").write_text("{not json")
    _assert_clean_error(cli("compile", tmp_path / "badjson"), "not valid JSON")


def test_corrupt_pt2_file(cli, tmp_path):
    bad = tmp_path / "model.pt2"
    bad.write_bytes(b"not a zip archive")
    _assert_clean_error(cli("compile", bad), "not a readable torch.export archive")


def test_unknown_cli_option_exits_2(cli):
    result = cli("compile", "x", "--frobnicate")
    assert result.code == 2
    assert "No such option" in result.err


def test_failed_compile_keeps_the_previous_artifact(cli, tmp_path):
    out = tmp_path / "cnn.slimc"
    assert cli("compile", "tests.models:small_cnn", "-o", out, "-q").code == 0
    before = (out / "manifest.json").read_text()
    result = cli("compile", "tests.models:untraceable", "-o", out, "-q")
    assert result.code == 2
    assert (out / "manifest.json").read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["cnn.slimc"]  # no stray staging folders


def test_refuses_to_overwrite_a_non_artifact_directory(cli, tmp_path):
    precious = tmp_path / "mydata"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    result = cli("compile", "tests.models:small_cnn", "-o", precious, "-q")
    _assert_clean_error(result, "is not a slimc artifact", "Choose another -o")
    assert (precious / "notes.txt").read_text() == "keep me"


@pytest.fixture
def cnn_artifact(tmp_path_factory):
    import slimc

    out = Path(tmp_path_factory.mktemp("art")) / "cnn"
    slimc.compile_model("tests.models:small_cnn", slimc.CompileOptions(output=out))
    return out


def test_run_rejects_wrong_shapes_and_corrupt_libraries(cli, cnn_artifact, tmp_path):
    import numpy as np

    np.save(tmp_path / "small.npy", np.zeros((1, 3, 8, 8), np.float32))
    result = cli("run", cnn_artifact, "--input", f"image={tmp_path / 'small.npy'}")
    _assert_clean_error(result, "shape [1, 3, 8, 8]", "compiled for shape [2, 3, 16, 16]",
                        "--input image=1x3x8x8:float32")
    result = cli("run", cnn_artifact, "--input", f"picture={tmp_path / 'small.npy'}")
    _assert_clean_error(result, "Unknown input 'picture'", "image")
    result = cli("run", tmp_path)
    _assert_clean_error(result, "not a slimc artifact")

    # files that are not .npy arrays: an empty one used to exit 130 without a word (click read
    # its EOFError as Ctrl-D), a text one was answered with numpy's "allow_pickle" advice
    (tmp_path / "empty.npy").write_bytes(b"")
    (tmp_path / "ids.txt").write_text("1 2 3\n")
    np.save(tmp_path / "objects.npy", np.array([1, "a", None], dtype=object), allow_pickle=True)
    for name, fragment in (("empty.npy", "is empty (0 bytes)"), ("ids.txt", "not a .npy file"),
                           ("objects.npy", "never loads"), (".", "is a directory")):
        result = cli("run", cnn_artifact, "--input", f"image={tmp_path / name}")
        _assert_clean_error(result, fragment, "numpy.save")
        assert "allow_pickle" not in result.err

    # Corrupt a copy: the original library is mapped into this process by the runs above, and
    # rewriting a loaded .so in place would crash the interpreter at exit.
    import shutil

    damaged = tmp_path / "damaged"
    shutil.copytree(cnn_artifact, damaged)
    lib = damaged / "model.so"
    data = bytearray(lib.read_bytes())
    data[-100] ^= 0xFF
    lib.write_bytes(bytes(data))
    _assert_clean_error(cli("run", damaged), "does not match the sha256", "Recompile")


def test_artifact_that_disagrees_with_the_ir_is_not_written(cli, tmp_path):
    """A zero tolerance turns float rounding into a 'wrong artifact': the compile must fail
    (exit 1, it is slimc's fault, not the user's) and leave no output behind."""
    out = tmp_path / "strict"
    result = cli("compile", "tests.models:small_cnn", "-o", out, "--verify-tol", "0", "-q")
    assert result.code == 1
    assert "disagrees with the IR" in result.err and "No artifact was written" in result.err
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_a_data_folder_that_cannot_be_read_is_a_usage_error(tmp_path):
    """A label folder that vanishes (or is a file) while --eval-data / --calib is scanned names
    the folder instead of raising from ``iterdir``."""
    from slimc.calibration import folder_entries
    from slimc.errors import UsageError

    (tmp_path / "a-file").write_text("x")
    for folder in (tmp_path / "vanished", tmp_path / "a-file"):
        with pytest.raises(UsageError, match="cannot read the folder") as info:
            folder_entries(folder, "--eval-data")
        assert str(folder) in str(info.value)


def test_an_output_folder_that_cannot_be_created_fails_before_the_compile(cli):
    """``os.access`` says yes to root on /proc; the compile must still stop at once with exit 2
    (before it used to run whole and then fail with an internal error at the final write)."""
    result = cli("compile", "tests.models:small_cnn", "-o", "/proc/slimc-test.slimc", "-q")
    _assert_clean_error(result, "cannot create folders in /proc")


def test_explore_refuses_an_unwritable_output_before_capturing(tmp_path, cli):
    """``slimc explore -o`` on a file (or under one) is exit 2 at once, not after the search;
    the file is left as it was."""
    blocker = tmp_path / "notes.txt"
    blocker.write_text("keep me")
    for out in (blocker, blocker / "sub"):
        res = cli("explore", "tests.models:this_factory_does_not_exist", "-o", out, "-q")
        assert res.code == 2, res.err
        assert str(blocker) in res.err and "Traceback" not in res.err
    assert blocker.read_text() == "keep me"


def test_an_input_shape_too_large_for_memory_is_a_usage_error(cli):
    """``--input image=99999999x3x1000x1000`` (a typo) used to reach torch's allocator and end
    in an internal-error traceback; the size is checked when the option is parsed."""
    result = cli("compile", "tests.models:small_cnn", "--input",
                 "image=99999999x3x1000x1000:float32")
    _assert_clean_error(result, "GiB", "this machine's memory", "smaller shape")



def test_compile_inputs_reach_an_in_memory_module_and_are_refused_for_a_program():
    """``slimc.compile(module, example, inputs=[...])`` ignored ``inputs`` (a fixed-size
    artifact without a word); a range now makes the dimension dynamic, as ``--input`` does for
    a factory, and an ExportedProgram (shapes fixed at export) refuses it."""
    import pytest
    import torch

    import slimc
    from slimc.api import _loaded
    from slimc.compiler import _with_overrides
    from slimc.errors import UsageError
    from slimc.loaders.base import parse_overrides

    module = torch.nn.Linear(4, 2)
    loaded = _with_overrides(_loaded(module, (torch.randn(1, 4),), None),
                             parse_overrides(["input=1..8x4:float32"]))
    assert tuple(loaded.example_inputs["input"].shape) == (2, 4)
    assert loaded.dynamic["input"][0].max == 8
    program = torch.export.export(module, (torch.randn(2, 4),))
    with pytest.raises(UsageError, match="does not apply to an ExportedProgram"):
        slimc.compile(program, inputs=["x=2x4:float32"])
