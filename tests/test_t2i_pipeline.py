"""The whole text-to-image chain through the real CLI, on tiny settings, once per module.

prepare (the caption demo: 60 scenes at 64 px) -> extract (a random DINOv2-S file at 112 px,
``tiny_pipeline.write_test_encoder``) -> train-fae -> train-decoder -> encode -> embed-text
(the random tiny T5) -> train-t2i (mmdit_tiny, a few steps) -> sample --prompts (the demo's
prompts.jsonl) and sample --prompt -> evaluate (without and with a local tiny CLIP). Every stage
is ``fae_pipe.cli.main`` in this process (the user's command line without a Python start per
stage), as tests/tiny_pipeline.py does for the class pipeline. What is checked is the chain's
plumbing and its artefacts (prompt numbering, prompt attributes, grid rows, the text-to-image
block of eval.json); what the generator learns is tests/test_train_t2i.py's and the demo's.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from fae_pipe.cli import main
from fae_pipe.sampling.grid import PAD
from test_t2i_eval import _tiny_clip
from tiny_pipeline import ENCODER_FILE, session_pipeline, tiny_config, write_test_encoder

pytestmark = pytest.mark.slow

IMAGES, SIZE = 60, 64
ONE_PROMPT = "two red circles on a black background"
STAGES = ("prepare", "extract", "train-fae", "train-decoder", "encode", "embed-text", "train-t2i")


def t2i_config(root: Path) -> dict:
    """tiny_pipeline's settings with the caption demo as data and the text-to-image sections added."""
    cfg = tiny_config(root)
    for key in ("sit", "probe"):
        cfg.pop(key)
    cfg["paths"].update(index=str(root / "index.npz"), text=str(root / "text.zarr"), t2i_run=str(root / "t2i"))
    cfg["data"] = {"root": str(root / "demo"), "source": "manifest", "caption_demo": True,
                   "caption_demo_images": IMAGES, "demo_size": SIZE, "image_size": SIZE, "holdout_fraction": 0.0,
                   "decode_workers": 0}
    cfg["text_encoder"] = {"weights": "random", "max_length": 16, "precision": "fp32", "batch_size": 64,
                           "device": "cpu", "random_width": 32, "random_layers": 1}
    cfg["embed_text"] = {"shards": 1, "shard_samples": 32, "chunk_samples": 8}
    cfg["t2i"] = {"model": "mmdit_tiny", "patch_size": 2, "caption_dropout": 0.1,
                  "train": {"steps": 4, "batch_size": 12, "lr": 1e-3, "warmup": 1, "ema_decay": 0.9,
                            "checkpoint_every": 4, "precision": "fp32", "memory_budget_gb": 1.0}}
    cfg["sample"] = {"method": "euler", "steps": 3, "num_samples": 36, "batch_size": 36, "grid_per_class": 1,
                     "guidance": [[0.0, 0.9, 2.0]], "device": "cpu"}
    cfg["evaluate"].update(recon_images=4)
    return cfg


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    root = tmp_path_factory.mktemp("t2i_chain")
    write_test_encoder(root / ENCODER_FILE)
    cfg_path = root / "t2i.yaml"
    cfg_path.write_text(yaml.safe_dump(t2i_config(root)))
    c = ["--config", str(cfg_path)]
    for stage in STAGES:
        main([stage, *c])
    export = str(root / "t2i" / "t2i.safetensors")
    prompts = root / "demo" / "prompts.jsonl"
    main(["sample", *c, "--export", export, "--prompts", str(prompts)])
    main(["sample", *c, "--export", export, "--prompt", ONE_PROMPT, "--set", f"paths.samples={root / 'one'}",
          "--set", "sample.num_samples=3", "--set", "sample.grid_per_class=3"])
    main(["evaluate", *c])
    plain = json.loads((root / "metrics" / "eval.json").read_text())
    _tiny_clip(root / "clip")
    main(["evaluate", *c, "--set", f"evaluate.clip_weights={root / 'clip'}",
          "--set", f"paths.metrics={root / 'metrics_clip'}"])
    clip = json.loads((root / "metrics_clip" / "eval.json").read_text())
    return root, [json.loads(line) for line in prompts.read_text().splitlines()], plain, clip


def test_sample_numbers_and_lists_the_prompts_with_one_grid_row_each(chain):
    root, prompts, _, _ = chain
    assert len(prompts) == 36 and sum(p["heldout"] for p in prompts) == 12
    with np.load(root / "samples" / "samples.npz") as npz:
        images, ids = npz["arr_0"], npz["arr_1"]
    assert images.shape == (36, SIZE, SIZE, 3) and images.dtype == np.uint8
    assert sorted(ids.tolist()) == list(range(36))  # one image per prompt, numbered by prompt
    meta = json.loads((root / "samples" / "samples.json").read_text())
    assert meta["generator"] == "t2i" and meta["prompts"] == prompts  # with colour, shape, count, heldout
    with Image.open(root / "samples" / "grid.png") as grid:
        assert grid.height == 36 * (SIZE + PAD) + PAD
    with np.load(root / "one" / "samples.npz") as npz:
        assert npz["arr_0"].shape[0] == 3 and set(npz["arr_1"].tolist()) == {0}
    one = json.loads((root / "one" / "samples.json").read_text())
    assert one["prompts"] == [{"prompt": ONE_PROMPT}]
    with Image.open(root / "one" / "grid.png") as grid:
        assert grid.height == 1 * (SIZE + PAD) + PAD


def test_evaluate_reports_the_text_to_image_block(chain):
    _, _, plain, clip = chain
    t = plain["text_to_image"]
    assert (t["prompts"], t["heldout_prompts"], t["heldout_samples"]) == (36, 12, 12)
    assert isinstance(t["fd_dinov2_heldout"], float) and np.isfinite(t["fd_dinov2_heldout"])
    assert isinstance(t["fd_dinov2_seen"], float)
    assert t["heldout_reference"] >= 2 and t["heldout_reference"] + t["seen_reference"] == IMAGES
    assert (t["oracle"]["seen"]["images"], t["oracle"]["heldout"]["images"]) == (24, 12)
    assert all(0.0 <= t["oracle"][s][k] <= 1.0 for s in ("seen", "heldout") for k in ("colour", "shape", "count"))
    assert t["clip_score"] is None and t["clip_status"].startswith("unavailable")
    c = clip["text_to_image"]
    assert c["clip_status"] == "ok" and isinstance(c["clip_score"], float)
    assert isinstance(c["clip_score_heldout"], float) and isinstance(c["clip_score_seen"], float)
    assert c["fd_dinov2_heldout"] == t["fd_dinov2_heldout"]  # the same samples, the same reference


def test_prompt_on_a_class_export_names_sample_classes(tmp_path_factory, capsys):
    cfg = session_pipeline(tmp_path_factory)
    capsys.readouterr()  # the shared build's own output, when this test is the one that builds it
    with pytest.raises(SystemExit) as e:
        main(["sample", "--config", str(cfg), "--prompt", ONE_PROMPT])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code != 0 and len(err) == 1 and "class-conditional" in err[0] and "sample.classes" in err[0]
