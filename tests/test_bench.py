"""`slimc bench OUT`: times forward artifacts on the host and over TVM RPC, and generation
artifacts as prefill + decode."""

from __future__ import annotations

import json

from tests.test_rpc_run import _free_port, rpc_server  # noqa: F401 - the fixture


def test_bench_host_and_rpc(cli, tmp_path, rpc_server):  # noqa: F811
    out = tmp_path / "m"
    assert cli("compile", "tests.models:two_inputs_two_outputs", "-t", "host", "-o", out,
               "-q").code == 0
    for extra in ((), ("--rpc", rpc_server)):
        result = cli("bench", out, "--runs", "5", "--warmup", "1", "--json", *extra)
        assert result.code == 0, result.err
        report = json.loads(result.out)["forward"]
        assert len(report["runs_ms"]) == 5 and all(ms > 0 for ms in report["runs_ms"])
        assert report["p10_ms"] <= report["median_ms"] <= report["p90_ms"]
    text = cli("bench", out, "--runs", "3")
    assert text.code == 0 and "median" in text.out and "p90" in text.out


def test_bench_errors_are_usage_errors(cli, tmp_path):
    out = tmp_path / "m"
    assert cli("compile", "tests.models:two_inputs_two_outputs", "-t", "host", "-o", out,
               "-q").code == 0
    result = cli("bench", out, "--rpc", f"127.0.0.1:{_free_port()}", "--json")
    assert result.code == 2 and json.loads(result.out)["hint"]
    assert cli("bench", tmp_path / "missing", "--json").code == 2


def test_bench_generation_reports_prefill_and_decode(cli, tmp_path):
    from tests.test_generate import GEN, _save

    model_dir = _save("llama", tmp_path / "llama")
    out = tmp_path / "gen"
    assert cli("compile", model_dir, "--generate", "--max-length", str(GEN["max_length"]),
               "--prefill-length", str(GEN["prefill_length"]), "-o", out, "-q").code == 0
    result = cli("bench", out, "--runs", "3", "--warmup", "1", "--json")
    assert result.code == 0, result.err
    g = json.loads(result.out)["generation"]
    assert len(g["prefill"]["runs_ms"]) == 3 and g["prefill"]["median_ms"] > 0
    assert g["decode_tokens_per_s"] and g["decode_tokens_per_s"] > 0
