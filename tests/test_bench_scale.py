"""``fae-pipe bench scale``: the 10k rehearsal through the real CLI, its invariants, and its table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fae_pipe.errors import UserError
from fae_pipe.phases import ENV, phase, read_phases
from fae_pipe.stages.bench_scale import check_invariants, growth, parse_sizes, table
from fae_pipe.stages.bench_scale_steps import layout, num_shards

FAE_PIPE = str(Path(sys.executable).with_name("fae-pipe"))


def test_layout_is_imagenet_at_1_28m_and_1000_per_class_below():
    assert layout(1_281_000) == (1000, 1281) and num_shards(1_281_000) == 1251
    assert layout(10_000) == (10, 1000) and layout(100_000) == (100, 1000) and layout(2_500) == (2, 1250)
    with pytest.raises(UserError, match="too small"):
        layout(3)
    with pytest.raises(UserError, match="--samples 'ten' is invalid"):
        parse_sizes("ten")
    assert parse_sizes("1e4,100000") == [10_000, 100_000]


def test_growth_per_10x_and_the_table():
    assert growth(1.0, 10.0, 10_000, 100_000) == "x10.0"  # linear
    assert growth(1.0, 100.0, 10_000, 100_000) == "x100.0"  # quadratic
    assert growth(2.0, 2.0, 100_000, 1_281_000) == "x1.0"  # constant
    assert growth(None, 2.0, 1, 10) == "-" and growth(0.0, 2.0, 1, 10) == "-"
    row = lambda s, rss: {"stage": "extract", "seconds": s, "peak_rss_mb": rss, "files": 3,  # noqa: E731
                          "plumbing_s": 0.5}
    text = table({"10000": {"samples": 10_000, "stages": [row(10.0, 100.0)]},
                  "100000": {"samples": 100_000, "stages": [row(100.0, 100.0)]}})
    lines = text.splitlines()
    assert lines[0].startswith("| stage | 10,000: wall s / RSS MB / files / outside-model s")
    assert lines[2] == "| extract | 10 / 100 / 3 / 0.5 | 100 / 100 / 3 / 0.5 | x10.0, x1.0 |"


def test_phases_are_recorded_only_when_asked(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    with phase("index: load"):
        pass
    path = tmp_path / "phases.jsonl"
    monkeypatch.setenv(ENV, str(path))
    for _ in range(2):
        with phase("index: load"):
            pass
    path.open("a").write('{"phase": "torn')  # a process killed mid-line
    got = read_phases(path)
    assert list(got) == ["index: load"] and got["index: load"]["count"] == 2 and got["index: load"]["processes"] == 1


@pytest.mark.slow
def test_10k_rehearsal_keeps_its_invariants(tmp_path):
    """10,000 samples (10 classes x 1,000) through every stage, SIGKILL + resume of extract, dvc no-op."""
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    out = subprocess.run([FAE_PIPE, "bench", "scale", "--samples", "10000", "--workdir", str(tmp_path), "--keep",
                          "--workers", "0", "--fae-steps", "4", "--sit-steps", "20"],
                         capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((tmp_path / "results.json").read_text())["10000"]
    stages = {s["stage"]: s for s in result["stages"]}
    assert list(stages) == ["generate folder", "prepare", "extract (killed)", "extract (resume)", "verify features",
                            "train-fae", "encode", "verify latents", "train-sit", "dvc commit", "dvc repro (no-op)",
                            "extract (re-check)"]
    assert stages["extract (killed)"]["note"] == "killed (SIGKILL)"
    checks = result["checks"]
    assert 1 <= checks["killed_with_records"] < 10 and checks["resume_bit_identical_shards"]
    assert all(checks[k] is True for k in ("ids_once", "labels_match_index", "dvc_repro_noop"))
    assert all(s["peak_rss_mb"] > 0 for name, s in stages.items() if name != "generate folder")
    assert stages["prepare"]["phases"]["index: write"]["count"] == 1
    assert "| extract (resume) |" in out.stdout

    # the invariants can fail: one wrong label in the latent store is caught
    from fae_pipe.cache import schema

    work = tmp_path / "10000"
    group = schema.open_group(work / "cache" / "latents.zarr", "r+")
    labels = group[schema.LABELS][:]
    group[schema.LABELS][:1024] = np.where(np.arange(1024) == 7, (labels[7] + 1) % 10, labels[:1024])
    with pytest.raises(UserError, match="latents.zarr labels differ from the index at 1 samples"):
        check_invariants(work, 10_000, [], [])
