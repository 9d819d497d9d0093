"""``slimc compile --tune N`` / ``--tune-db``: real MetaSchedule tuning with a tiny budget.

No mocks: a two-layer MLP is tuned for a handful of trials (seconds), the records land in the
database folder, and later compiles apply them without tuning. Every artifact is verified
against the IR by ``slimc compile`` itself, so a wrongly applied record fails the compile.
No timing asserts.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

MODEL = "tests.test_tuning:tiny_mlp"
RECORDS = "database_tuning_record.json"


def tiny_mlp():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.ReLU(), torch.nn.Linear(96, 32))
    return net.eval(), (torch.randn(16, 64),)


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("SLIMC_CACHE_DIR", str(root))
    return root


def _compile(cli, out: Path, *args) -> dict:
    result = cli("compile", MODEL, "-o", out, "--threads", "2", "--json", "-q", *args)
    assert result.code == 0, result.err
    summary = json.loads(result.out)
    assert summary["verification"]["passed"] is True
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["tuning"] == summary["tuning"]
    return summary["tuning"]


def _lines(path: Path) -> int:
    return sum(1 for line in path.read_text().splitlines() if line.strip())


def test_tune_records_are_stored_and_reused(cli, tmp_path, cache, monkeypatch):
    # No database yet: a plain compile neither tunes nor applies anything.
    assert _compile(cli, tmp_path / "plain.slimc") is None

    # 16 trials over the two matmul kernels; the time cap stops it after the first batch.
    tuned = _compile(cli, tmp_path / "tuned.slimc", "--tune", "16", "--tune-minutes", "0.001")
    db = Path(tuned["database"])
    assert db.parent == cache / "tuning"  # default: per target under $SLIMC_CACHE_DIR
    assert {k["name"] for k in tuned["tuned_kernels"]} == {"fused_matmul_add_relu",
                                                           "fused_matmul1_add1"}
    assert 0 < tuned["trials"] < 16 and tuned["stopped_by"] == "time cap"
    assert tuned["records_written"] > 0 and _lines(db / RECORDS) == tuned["records_written"]
    assert tuned["baselines"] == 2  # slimc's schedules measured and recorded like trials
    # Per kernel, the fastest record wins: a MetaSchedule schedule is applied, slimc's own
    # schedule leaves the kernel to slimc's rules (which also pack its weights).
    assert tuned["records_applied"] + tuned["slimc_schedule_won"] == 2

    # Same target, no --tune: the default database is found and applied, nothing is tuned.
    before = _lines(db / RECORDS)
    reused = _compile(cli, tmp_path / "reused.slimc")
    assert reused["trials"] == 0 and reused["tuned_kernels"] == []
    assert reused["records_applied"] == tuned["records_applied"]
    assert reused["slimc_schedule_won"] == tuned["slimc_schedule_won"]
    assert _lines(db / RECORDS) == before

    # A copy of the folder (as checked into a repo) works through --tune-db, cache empty.
    repo_db = tmp_path / "repo" / "tuning"
    shutil.copytree(db, repo_db)
    monkeypatch.setenv("SLIMC_CACHE_DIR", str(tmp_path / "empty-cache"))
    copied = _compile(cli, tmp_path / "copied.slimc", "--tune-db", repo_db)
    assert copied["database"] == str(repo_db)
    assert copied["trials"] == 0 and copied["records_applied"] == tuned["records_applied"]
    assert not (tmp_path / "empty-cache").exists()


@pytest.mark.parametrize("args, message", [
    (["--tune", "-1"], "--tune -1"),
    (["--tune-minutes", "5"], "no tuning was requested"),
    (["--tune", "4", "--tune-minutes", "0"], "--tune-minutes 0"),
    (["--tune-db", "{missing}"], "does not exist"),
    (["--tune-db", "{file}"], "is a file"),
    (["--tune-db", "{corrupt}"], "cannot read database_tuning_record.json (line 2)"),
    (["--target", "arm", "--tune", "4"], "cannot run aarch64-linux-gnu code"),
    (["--tune-db", "{orphan}"], "not a record of one of the 0 workloads"),
])
def test_bad_tuning_options_are_usage_errors(cli, tmp_path, cache, args, message):
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "database_workload.json").write_text('["hash", "mod"]\n')
    (corrupt / RECORDS).write_text('[0, []]\n{"truncated": \n')
    (tmp_path / "file").write_text("not a folder")
    orphan = tmp_path / "orphan"  # records whose workloads file was lost
    orphan.mkdir()
    (orphan / RECORDS).write_text('[0, []]\n')
    paths = {"missing": tmp_path / "missing", "file": tmp_path / "file", "corrupt": corrupt,
             "orphan": orphan}
    args = [a.format(**paths) for a in args]
    result = cli("compile", MODEL, "-o", tmp_path / "out.slimc", "-q", *args)
    assert result.code == 2, result.err
    assert message in " ".join(result.err.split())
    assert not (tmp_path / "out.slimc").exists()
