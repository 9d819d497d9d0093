"""Third-party plugins: the example package installs, registers through the `slimc`
entry-point group, and its pass runs in a pipeline; a broken plugin is reported by name."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PLUGIN = ROOT / "plugins" / "slimc-fold-batchnorm"


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory) -> Path:
    """Install the example plugin with pip into a private folder (not the test environment)."""
    import shutil

    site = tmp_path_factory.mktemp("site")
    source = tmp_path_factory.mktemp("src") / PLUGIN.name  # setuptools builds in-tree
    shutil.copytree(PLUGIN, source, ignore=shutil.ignore_patterns("build", "*.egg-info"))
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                    "--no-build-isolation", "--target", str(site), str(source)],
                   check=True, capture_output=True, text=True)
    return site


def _slimc(site: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)])}
    return subprocess.run([sys.executable, "-m", "slimc.cli", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


def test_installed_plugin_pass_is_listed_and_runs(plugin_site, tmp_path):
    listing = _slimc(plugin_site, "passes", "--json")
    assert listing.returncode == 0, listing.stderr
    passes = {p["name"]: p for p in json.loads(listing.stdout)["passes"]}
    fold = passes["fold-batchnorm"]
    assert fold["plugin"] == "fold_batchnorm"
    assert fold["options"][0]["name"] == "min_channels"

    out = tmp_path / "cnn"
    result = _slimc(plugin_site, "compile", "tests.models:small_cnn", "-o", str(out),
                    "--pipeline", "fold-batchnorm,eliminate-dead-code", "--json", "-q")
    assert result.returncode == 0, result.stderr
    manifest = json.loads(result.stdout)
    fold_record = manifest["pipeline"][0]
    # Three BatchNorms (4 x 16 floats each) fold into conv weights/biases; the stem conv had no
    # bias, so one bias of 16 is added: 3*64 - 16 parameters fewer.
    assert manifest["params_before"] - manifest["params_after"] == 3 * 64 - 16
    assert fold_record["fidelity"]["relative_l2_vs_previous"] < 1e-5
    assert manifest["verification"]["passed"] is True
    assert manifest["fidelity"]["relative_l2"] < 1e-4


def test_bad_plugin_option_is_a_usage_error(plugin_site):
    result = _slimc(plugin_site, "compile", "tests.models:small_cnn",
                    "--pipeline", "fold-batchnorm{min_channels=0}")
    assert result.returncode == 2
    assert "greater than or equal to 1" in result.stderr
    assert "Traceback" not in result.stderr


def test_broken_plugin_is_reported_and_slimc_keeps_working(plugin_site, tmp_path):
    dist = tmp_path / "broken_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[slimc]\nbroken = broken_plugin_mod\n")
    (tmp_path / "broken_plugin_mod.py").write_text("raise RuntimeError('boom at import')\n")
    raising = tmp_path / "raising_plugin-1.0.dist-info"
    raising.mkdir()
    (raising / "METADATA").write_text("Metadata-Version: 2.1\nName: raising-plugin\n"
                                      "Version: 1.0\n")
    (raising / "entry_points.txt").write_text("[slimc]\nraising = raising_plugin_mod\n")
    (tmp_path / "raising_plugin_mod.py").write_text(
        "import slimc\n@slimc.hookimpl\ndef slimc_register_passes():\n"
        "    raise ValueError('bad registration')\n")
    env_site = Path(f"{plugin_site}{os.pathsep}{tmp_path}")
    result = _slimc(env_site, "passes")
    assert result.returncode == 0
    assert "fold-batchnorm" in result.stdout and "eliminate-dead-code" in result.stdout
    assert "plugin 'broken' is disabled" in result.stderr
    assert "boom at import" in result.stderr
    assert "plugin 'raising' is disabled" in result.stderr
    assert "bad registration" in result.stderr
