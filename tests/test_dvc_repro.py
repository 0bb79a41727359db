"""The real `dvc repro` of the whole pipeline on configs/ci.yaml in a temporary git repo.

Checks every stage's artefacts, that a second `dvc repro` is a no-op, that
`dvc exp run -S sit.train.steps=...` re-runs only train-sit and what follows it, and that
`dvc metrics show` lists the FAE, decoder, SiT and evaluation numbers.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

from fae_pipe.data.index import read_index

pytestmark = pytest.mark.slow  # real subprocess runs: minutes, not seconds

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _run(args, cwd, timeout=600) -> str:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "DVC_NO_ANALYTICS": "1",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    out = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{' '.join(args)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout if args[:2] == ["fae-pipe", "config"] else out.stdout + out.stderr


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("dvcproj")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for d in ("pipeline", "stages"):
        shutil.copytree(REPO / d, root / d, ignore=ignore)
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    shutil.copytree(REPO / "compare", root / "compare", ignore=ignore)
    # params.yaml holds every key (dvc.yaml interpolates paths.*): the resolved ci config.
    (root / "params.yaml").write_text(_run(["fae-pipe", "config", "--config", str(REPO / "configs/ci.yaml")], root))
    _run(["git", "init", "-q"], root)
    _run(["dvc", "init", "-q"], root)
    _run(["dvc", "config", "core.analytics", "false"], root)
    _run(["git", "add", "-A"], root)
    _run(["git", "commit", "-qm", "init"], root)
    log = _run(["dvc", "repro"], root)
    return root, log


def test_every_stage_leaves_its_artefacts(project):
    root, log = project
    assert "RANDOM" in log  # the run says plainly that the encoder weights are random
    assert len(read_index(root / "cache/index.npz")) == 30
    for store, kind in (("cache/features.zarr", "features"), ("cache/latents.zarr", "latents")):
        assert zarr.open_group(str(root / store), mode="r").attrs["kind"] == kind
        _run(["fae-pipe", "verify", store], root)
    for f in ("runs/fae/fae.safetensors", "runs/decoder/decoder.safetensors", "runs/sit/sit.safetensors",
              "runs/fae/loss.csv", "runs/decoder/loss.csv", "runs/sit/loss.csv",
              "runs/decoder/recon_grid.png", "samples/grid.png"):
        assert (root / f).is_file() and (root / f).stat().st_size > 0, f
    npz = np.load(root / "samples/samples.npz")
    assert npz["arr_0"].shape == (12, 64, 64, 3) and npz["arr_0"].dtype == np.uint8
    metrics = {name: json.loads((root / f"metrics/{name}.json").read_text())
               for name in ("fae", "decoder", "sit", "eval", "probe")}
    assert all(metrics.values())


def test_second_repro_is_a_noop_and_metrics_show(project):
    root, _ = project
    out = _run(["dvc", "repro"], root)
    assert "Running stage" not in out
    shown = _run(["dvc", "metrics", "show"], root)
    for name in ("fae.json", "decoder.json", "sit.json", "eval.json", "probe.json"):
        assert name in shown


def test_the_comparison_runs_from_the_same_cache_in_one_command(project):
    """compare/dvc.yaml: four generators on the main pipeline's caches (nothing upstream re-runs),
    one table and the two FD-DINOv2 plots (against steps, against training seconds)."""
    root, _ = project
    out = _run(["dvc", "repro", "compare/dvc.yaml"], root)
    ran = {name.removeprefix("compare/dvc.yaml:") for name in _ran(out)}
    assert ran == {"train@fae", "train@rae", "train@fae_repa", "train@rae_repa", "report"}, out[-2000:]
    table = json.loads((root / "metrics/compare.json").read_text())
    assert set(table) == {"fae", "rae", "fae_repa", "rae_repa"}
    assert {v["input"] for v in table.values()} == {"latents", "features"}
    assert all(np.isfinite(v["fd_dinov2_final"]) and v["steps"] == 8 for v in table.values())
    assert table["fae_repa"]["repa_weight"] == 0.5 and table["rae"]["repa_weight"] == 0.0
    _run(["dvc", "plots", "show", "compare/dvc.yaml", "-o", "compare_plots"], root)
    page = (root / "compare_plots" / "index.html").read_text()
    assert "fd_vs_steps" in page and "fd_vs_seconds" in page and "train_seconds" in page
    assert "Running stage" not in _run(["dvc", "repro", "compare/dvc.yaml"], root)  # a no-op the second time


def test_exp_run_with_a_sit_setting_reruns_only_sit_and_after(project):
    root, _ = project
    out = _run(["dvc", "exp", "run", "-S", "sit.train.steps=10"], root)
    ran = {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")}
    assert ran == {"train-sit", "sample", "evaluate"}, out[-2000:]
    assert json.loads((root / "metrics/sit.json").read_text())["steps"] == 10


def _ran(out: str) -> set[str]:
    return {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")}


def test_a_code_edit_that_changes_no_weights_keeps_the_fae_and_everything_pinned_to_it(project):
    root, _ = project
    fae, decoder = root / "runs/fae/fae.safetensors", root / "runs/decoder/decoder.safetensors"
    before = fae.read_bytes(), decoder.read_bytes()
    with open(root / "pipeline/fae/losses.py", "a") as f:
        f.write("\n# an edit that changes no computation\n")
    ran = _ran(_run(["dvc", "repro"], root))
    # encode runs too (it imports pipeline/fae) but finds its store complete under the same
    # config hash, so the latents do not change; both exports keep their bytes, so SiT (whose
    # quality curve decodes with them) is not retrained
    assert {"train-fae", "train-decoder"} <= ran and "train-sit" not in ran, ran
    assert (fae.read_bytes(), decoder.read_bytes()) == before


def test_exp_run_with_an_fae_setting_rebuilds_the_latents_and_retrains_sit(project):
    from fae_pipe.artifacts import file_fingerprint

    root, _ = project
    ran = _ran(_run(["dvc", "exp", "run", "-S", "fae.train.steps=10"], root))
    assert {"train-fae", "encode", "train-sit", "sample", "evaluate"} <= ran, ran
    latents = zarr.open_group(str(root / "cache/latents.zarr"), mode="r")
    assert latents.attrs["fae_fingerprint"] == file_fingerprint(root / "runs/fae/fae.safetensors")
    assert json.loads((root / "metrics/fae.json").read_text())["steps"] == 10


def test_the_latent_source_is_a_param_of_encode_and_of_nothing_upstream(project):
    """encode.source / vae.* changes mark exactly `encode` changed (nothing upstream: extract, train-fae and
    train-decoder stay pinned); train-sit, sample and evaluate follow through the latent store it rewrites."""
    import yaml

    root, _ = project
    params = root / "params.yaml"
    before = params.read_text()

    def changed() -> dict:
        out = subprocess.run(["dvc", "status", "--json", "dvc.yaml"], cwd=root, capture_output=True, text=True, timeout=300,
                             env={**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                                  "DVC_NO_ANALYTICS": "1"})
        assert out.returncode == 0, out.stderr[-2000:]
        return json.loads(out.stdout or "{}")

    assert changed() == {}
    for key, value in (("source", "sdvae"), ("weights", "a-vae-directory")):
        cfg = yaml.safe_load(before)
        cfg["encode" if key == "source" else "vae"][key] = value
        params.write_text(yaml.safe_dump(cfg, sort_keys=False))
        try:
            status = changed()
        finally:
            params.write_text(before)
        assert set(status) == {"encode"}, status
        params_changed = status["encode"][0]["changed deps"]["params.yaml"]
        assert params_changed in ({"encode.source": "modified"}, {"vae": "modified"}), status  # dvc names a section
