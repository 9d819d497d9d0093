"""`slimc analyze`: files written, JSON summary, and bad input exits 2 with a clear message."""

from __future__ import annotations

import json

from PIL import Image


def test_analyze_writes_json_report_and_plots(cli, hf_dir, tmp_path):
    out = tmp_path / "analysis"
    result = cli("analyze", hf_dir("bert"), "--target", "rpi4", "-o", out, "--json",
                 "--criteria", "magnitude,perturbation", "--bits", "8,4", "--keep-ratios", "0.5",
                 "--rank-ratios", "0.5", "--seq-len", "16", "--batch-size", "2")
    assert result.code == 0, result.err
    summary = json.loads(result.out)
    assert summary["hardware"] == "cortex-a72" and summary["compress_first"]
    analysis = json.loads((out / "analysis.json").read_text())
    assert analysis["calibration"]["synthetic"] is True
    layer = analysis["layers"]["encoder.layer.0.intermediate.dense"]
    assert layer["macs"] == 2 * 16 * 32 * 64 and set(layer["sensitivity"]) == {
        "magnitude", "perturbation"}
    assert set(analysis["sensitivity"]["perturbation"]["settings"]) == {
        "q8", "q4", "keep0.5", "rank0.5"}
    report = (out / "report.md").read_text()
    assert "## Compress first" in report and "encoder.layer" in report
    for png in ("sensitivity_vs_cost.png", "latency_by_op.png"):
        with Image.open(out / png) as image:
            assert image.format == "PNG" and image.size[0] > 300
    assert "synthetic" in result.err


def test_bad_input_exits_2(cli, hf_dir, tmp_path):
    cases = [("--hardware", "pdp-11", "Unknown hardware"),
             ("--criteria", "magnitude,fisherman", "Unknown sensitivity criterion"),
             ("--calib", str(tmp_path / "missing.txt"), "does not exist"),
             ("--target", "no-such-target", "Unknown target"),
             ("--perturbation", "some", "--perturbation 'some'")]
    for option, value, message in cases:
        result = cli("analyze", hf_dir("bert"), option, value, "-o", tmp_path / "x")
        assert result.code == 2, (option, result.err)
        assert message in result.err
    assert not (tmp_path / "x").exists()


def test_analyze_shows_groups(cli, hf_dir, tmp_path):
    """Group curves in the output, analysis.json and report.md (--measure itself: see
    test_analysis_measure.py; building kernels here would double this test's time)."""
    out = tmp_path / "groups"
    result = cli("analyze", hf_dir("llama"), "-o", out, "--criteria", "magnitude,perturbation",
                 "--bits", "4", "--keep-ratios", "", "--rank-ratios", "", "--seq-len", "8",
                 "--batch-size", "1", "--max-batches", "1")
    assert result.code == 0, result.err
    assert "prunable groups" in result.out and "model.layers.0:block" in result.out
    assert "model.layers.1.mlp:mlp-channel" in result.out
    analysis = json.loads((out / "analysis.json").read_text())
    assert analysis["cost"]["measured"] is None
    groups = analysis["groups"]
    curve = groups["model.layers.0.mlp:mlp-channel"]["sensitivity"]["perturbation"]
    assert set(curve) == {"keep0.75", "keep0.5", "keep0.25"}
    assert set(groups["model.layers.0:block"]["sensitivity"]["magnitude"]) == {"keep0"}
    assert "## Prunable groups" in (out / "report.md").read_text()
    cross = cli("analyze", hf_dir("llama"), "--target", "rpi4", "--measure", "-o",
                tmp_path / "cross", "--criteria", "magnitude")
    assert cross.code == 2 and "--rpc" in cross.err
