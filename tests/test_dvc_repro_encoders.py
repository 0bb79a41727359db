"""An FAE trains on a SigLIP-shaped store end to end through the real `dvc repro`, and an encoder param
marks exactly the stages that read it (`dvc status`; downstream stages follow the store they read).

SigLIP-shaped: the SigLIP2 architecture (``vit_so400m_patch16_siglip_256.v2_webli``: patch 16, no cls or
register tokens, the attention-pool head as the pooled vector, 0.5/0.5 normalisation) made tiny with
``image_encoder.model_args`` (width 384, 2 blocks) at 128 px: an 8x8 grid of 384-wide tokens, the shape
fae_tiny takes. Random weights, the ci config's sizes otherwise.
"""

from __future__ import annotations

import json
import re
import shutil

import pytest
import zarr

from test_dvc_repro import REPO, _run

from fae_pipe.fae.autoencoder import load_fae_file

pytestmark = pytest.mark.slow  # real subprocess runs

SIGLIP = ["--set", "image_encoder.name=vit_so400m_patch16_siglip_256.v2_webli", "--set", "image_encoder.input_size=128",
          "--set", "image_encoder.model_args=[embed_dim=384,depth=2,num_heads=6]"]


def _ran(log: str) -> set[str]:
    return set(re.findall(r"Running stage '([\w-]+)'", log))


def test_fae_trains_on_a_siglip_store_through_dvc_repro(tmp_path):
    root = tmp_path
    shutil.copytree(REPO / "pipeline", root / "pipeline", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copytree(REPO / "stages", root / "stages", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    params = _run(["fae-pipe", "config", "--config", str(REPO / "configs/ci.yaml"), *SIGLIP], root)
    (root / "params.yaml").write_text(params)
    for args in (["git", "init", "-q"], ["dvc", "init", "-q"], ["dvc", "config", "core.analytics", "false"],
                 ["git", "add", "-A"], ["git", "commit", "-qm", "init"]):
        _run(args, root)
    log = _run(["dvc", "repro", "train-fae"], root)
    assert _ran(log) == {"prepare", "extract", "train-fae"}, log[-2000:]
    group = zarr.open_group(str(root / "cache/features.zarr"), mode="r")
    rec = group.attrs["encoder"]
    assert (rec["family"], rec["pooled"], rec["num_prefix_tokens"], rec["patch_size"]) == \
        ("siglip2", "attention_pool", 0, 16)
    assert rec["preprocessing"]["mean"] == [0.5] * 3 and rec["random_weights"] is True
    assert group["features"].shape[2:] == (64, 384) and list(group.attrs["grid"]) == [8, 8]
    fae = json.loads((root / "metrics/fae.json").read_text())
    assert fae and (root / "runs/fae/fae.safetensors").stat().st_size > 0
    export = load_fae_file(root / "runs/fae/fae.safetensors")
    assert export["feature_dim"] == 384 and export["grid"] == [8, 8] and export["family"] == "fae_tiny"
    assert export["feature_decoder"]["head.weight"].shape == (384, 128)  # rebuilds the store's 384-wide tokens
    # an encoder param is a param of extract, not of prepare or train-fae (which follows extract's outs); the
    # stages that never ran here have no lock entry to compare, so only the three that did are looked at
    text = (root / "params.yaml").read_text()
    assert text.count("  layer: 0\n") >= 1
    (root / "params.yaml").write_text(text.replace("  layer: 0\n", "  layer: 1\n", 1))
    status = json.loads(_run(["dvc", "status", "--json"], root).strip().splitlines()[-1])
    ran = {"prepare", "extract", "train-fae"}
    moved = {stage for stage, changes in status.items() if stage in ran and "image_encoder" in json.dumps(changes)}
    assert moved == {"extract"} and "prepare" not in status, status
    assert _ran(_run(["dvc", "repro", "extract"], root)) == {"extract"}
    assert zarr.open_group(str(root / "cache/features.zarr"), mode="r").attrs["encoder"]["pooled"] == "token_mean"
    assert "train-fae" in json.loads(_run(["dvc", "status", "--json"], root).strip().splitlines()[-1])
