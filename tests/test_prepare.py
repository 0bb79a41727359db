"""Stage `prepare`: demo set + index in-process, and the real CLI's exit codes and messages."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from fae_pipe.config import load_config
from fae_pipe.data.index import read_index
from fae_pipe.stages import prepare

REPO = Path(__file__).resolve().parents[1]


def demo_config(tmp_path: Path, **extra):
    overrides = {"data.root": str(tmp_path / "demo"), "data.demo_classes": 3, "data.demo_per_class": 8,
                 "data.demo_size": 32, "data.holdout_fraction": 0.25, "paths.index": str(tmp_path / "index.json")}
    overrides.update(extra)
    return load_config(REPO / "configs" / "demo.yaml", overrides)


def test_prepare_demo_writes_index_and_is_idempotent(tmp_path, capsys):
    cfg = demo_config(tmp_path)
    prepare.run(cfg)
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"prepare: demo set written in {tmp_path / 'demo'}")
    assert out[-1].startswith(f"prepare: 24 images, 3 classes, 6 held out, 0 failures -> {tmp_path / 'index.json'}")
    index = read_index(tmp_path / "index.json")
    assert len(index) == 24 and index.classes[0] == "00_red_circle"
    assert f"(fingerprint {index.fingerprint[:8]})" in out[-1]
    prepare.run(cfg)
    out = capsys.readouterr().out.splitlines()
    assert "demo set already present" in out[0]
    assert read_index(tmp_path / "index.json").fingerprint == index.fingerprint


def test_prepare_lists_at_most_twenty_failures(tmp_path, capsys):
    root = tmp_path / "data"
    (root / "cls").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "cls" / "ok.png")
    for i in range(25):
        (root / "cls" / f"bad{i:02d}.png").write_bytes(b"")
    cfg = demo_config(tmp_path, **{"data.demo": False, "data.root": str(root), "data.holdout_fraction": 0.0})
    prepare.run(cfg)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "skipped cls/bad00.png: zero-byte file"
    assert sum(line.startswith("skipped ") for line in lines) == 20
    assert lines[20].startswith("... and 5 more")
    assert lines[-1].startswith("prepare: 1 images, 1 classes, 0 held out, 25 failures")
    assert len(read_index(tmp_path / "index.json").failures) == 25


def run_cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, "-m", "fae_pipe.cli", "prepare", *args], cwd=tmp_path,
                          capture_output=True, text=True, env=env, timeout=120)


def test_cli_exit_codes_for_fail_and_skip(tmp_path):
    root = tmp_path / "images"
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        Image.fromarray(np.full((8, 8, 3), 90, np.uint8)).save(root / name / "x.png")
    (root / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(
        {"data": {"root": "images", "on_error": "fail"}, "paths": {"index": "cache/index.json"}}))

    failed = run_cli(tmp_path, "--config", "cfg.yaml")
    assert failed.returncode == 2, failed.stderr
    err = failed.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fae-pipe: error: image '") and "broken.png" in err[0]
    assert not (tmp_path / "cache" / "index.json").exists()

    ok = run_cli(tmp_path, "--config", "cfg.yaml", "--set", "data.on_error=skip")
    assert ok.returncode == 0, ok.stderr
    lines = ok.stdout.strip().splitlines()
    assert lines[0].startswith("skipped b/broken.png: ")
    assert lines[-1].startswith("prepare: 2 images, 2 classes, 0 held out, 1 failures -> cache/index.json")
    assert read_index(tmp_path / "cache" / "index.json").paths == ["a/x.png", "b/x.png"]
