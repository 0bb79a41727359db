"""``fae-pipe embed-text``: a tiny captioned index through a tiny text encoder written to disk, into text.zarr.

The index has several captions per sample, a blank caption and one sample without any
caption; storage shards of 3 samples (the last one short). The encoder is a tiny random
T5 with a tokenizer trained on the captions (``write_random_text_encoder``), loaded
through the same ``FrozenTextEncoder`` path a user's real directory takes. Torch threads
are pinned to 1 (``embed_text.threads``): other test processes share the two cores.
"""

from __future__ import annotations

import json
import os
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import yaml
import zarr

from helpers_extract import cli, kill_after_first_record, popen

from fae_pipe.cache import schema
from fae_pipe.cache.inspect import inspect_store
from fae_pipe.cache.inspect import verify_store as verify_with
from fae_pipe.cli import main
from fae_pipe.config import load_config
from fae_pipe.data.index import DatasetIndex, read_index, write_index
from fae_pipe.encoders.text import FrozenTextEncoder, write_random_text_encoder
from fae_pipe.errors import UserError
from fae_pipe.stages import embed_text
from fae_pipe.tasks.text import EmbedTextTask

verify_store = partial(verify_with, read_index=read_index)

CAPTIONS = [
    ["two red circles on a blue background", "red circles, two of them"],
    ["one green square on a black background"],
    ["", "a cyan ring on white"],  # a blank caption is an empty slot, not a caption
    ["three yellow triangles", "yellow triangles on grey", "three of them, yellow"],
    [],  # no caption at all: an invalid row, recorded
    ["a magenta star on a blue background"],
    ["two green rings", "green rings on black"],
    ["one red square"],
    ["four blue circles on a white background", "blue circles", "four circles"],
    ["a grey triangle"],
]
N = len(CAPTIONS)
ARRAYS = ("tokens", "lengths", "sample_ids", "valid", "empty_tokens")


def write_project(root: Path, captions=CAPTIONS, name: str = "c.yaml", **sections) -> Path:
    """A captioned index (no images: embed-text reads only captions) and a config for it."""
    (root / "cache").mkdir(parents=True, exist_ok=True)
    write_index(DatasetIndex(root="images", classes=["image"], paths=[f"{i:03d}.png" for i in range(len(captions))],
                             labels=[0] * len(captions), captions=captions), root / "cache/index.npz")
    cfg = {"paths": {"index": "cache/index.npz", "text": "cache/text.zarr", "metrics": "metrics"},
           "text_encoder": {"weights": "random", "max_length": 10, "batch_size": 3, "device": "cpu",
                            "random_width": 32, "random_layers": 1},
           "embed_text": {"shards": 2, "shard_samples": 3, "chunk_samples": 3, "threads": 1}}
    for section, values in sections.items():
        cfg[section].update(values)
    (root / name).write_text(yaml.safe_dump(cfg))
    return root / name


def load(root: Path, name: str = "c.yaml", **overrides):
    cwd = os.getcwd()
    os.chdir(root)  # the config's paths are relative to the project, as under dvc
    try:
        return load_config(name, overrides)
    finally:
        os.chdir(cwd)


def run_in(root: Path, cfg, overwrite: bool = False) -> None:
    cwd = os.getcwd()
    os.chdir(root)
    try:
        embed_text.run(cfg, overwrite=overwrite)
    finally:
        os.chdir(cwd)


def read_arrays(store: Path) -> dict[str, np.ndarray]:
    group = zarr.open_group(str(store), mode="r")
    return {name: group[name][...] for name in ARRAYS}


def assert_same_bits(a: dict, b: dict) -> None:
    for name in ARRAYS:
        x, y = np.asarray(a[name]), np.asarray(b[name])
        if x.dtype == np.float16:
            x, y = x.view(np.uint16), y.view(np.uint16)
        assert x.shape == y.shape and np.array_equal(x, y), f"{name} differs"


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """The project and the reference store, written in-process with the random tower of the config."""
    root = tmp_path_factory.mktemp("embed")
    write_project(root)
    run_in(root, load(root))
    return root


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    """A tiny T5 + tokenizer written to disk: what a user's directory looks like to the loader."""
    return write_random_text_encoder(tmp_path_factory.mktemp("t5") / "tiny-t5", [c for caps in CAPTIONS for c in caps
                                                                                 if c], width=32, layers=1)


def test_store_holds_the_encoders_embedding_of_every_caption(tmp_path, t5_dir, capsys):
    write_project(tmp_path, text_encoder={"weights": str(t5_dir), "batch_size": 1})
    run_in(tmp_path, load(tmp_path))
    err = capsys.readouterr().err
    assert "embed-text: 10 samples, 15 captions" in err and "1 without a caption" in err and "RANDOM" in err
    group = zarr.open_group(str(tmp_path / "cache/text.zarr"), mode="r")
    enc = FrozenTextEncoder(t5_dir, max_length=10, device="cpu")
    tokens, lengths = group["tokens"][...], group["lengths"][...]
    assert tokens.shape == (N, 3, 10, 32) and tokens.dtype == np.float16 and lengths.dtype == np.int32
    assert group["tokens"].shards == (3, 3, 10, 32) and "pooled" not in group
    for i, caps in enumerate(CAPTIONS):
        for j in range(3):
            if j < len(caps) and caps[j]:
                want, length, _ = enc.encode([caps[j]])  # batch_size 1: the very same forward
                assert np.array_equal(tokens[i, j].view(np.uint16), want[0].numpy().astype(np.float16).view(np.uint16))
                assert lengths[i, j] == int(length[0]) == len(caps[j].replace(",", " ,").split()) + 1
            else:
                assert lengths[i, j] == 0 and not tokens[i, j].any()
    empty, empty_len, _ = enc.encode([""])
    assert np.array_equal(group["empty_tokens"][...], empty[0].numpy().astype(np.float16))
    attrs = dict(group.attrs)
    assert attrs["empty_length"] == int(empty_len[0]) == 1 and attrs["max_length"] == 10
    assert attrs["text_encoder"]["fingerprint"] == enc.fingerprint and attrs["text_encoder"]["random"] is True
    assert attrs["text_encoder"]["precision"] == "fp32" and attrs["captions_per_sample"] == 3
    assert attrs["dataset_fingerprint"] == read_index(tmp_path / "cache/index.npz").fingerprint
    assert attrs["complete"] is True and attrs["failures"] == [{"sample": 4, "file": "004.png",
                                                                "reason": "no caption in the index"}]
    assert np.array_equal(group["valid"][...], [bool(any(c for c in caps)) for caps in CAPTIONS])
    assert np.array_equal(group["sample_ids"][...], np.arange(N))
    metrics = json.loads((tmp_path / "metrics/embed_text.json").read_text())
    assert metrics["samples"] == N and metrics["captions"] == 15 and metrics["shards_written"] == 4
    assert metrics["text_bytes_per_sample"] > 3 * 10 * 32 * 2


def test_a_clip_tower_stores_pooled_vectors_and_the_empty_pooled_one(tmp_path, t5_dir):
    import torch
    from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel

    tok = AutoTokenizer.from_pretrained(str(t5_dir))
    torch.manual_seed(0)
    CLIPTextModel(CLIPTextConfig(vocab_size=tok.vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, max_position_embeddings=12, eos_token_id=tok.eos_token_id,
                                 pad_token_id=tok.pad_token_id)).save_pretrained(str(tmp_path / "clip"))
    tok.save_pretrained(str(tmp_path / "clip"))
    write_project(tmp_path, text_encoder={"weights": str(tmp_path / "clip"), "max_length": 16})
    with pytest.raises(UserError, match=r"max_length = 16 is invalid .* 12 positions") as err:
        run_in(tmp_path, load(tmp_path))
    assert "\n" not in str(err.value)
    run_in(tmp_path, load(tmp_path, **{"text_encoder.max_length": 12}))
    group = zarr.open_group(str(tmp_path / "cache/text.zarr"), mode="r")
    pooled, lengths = group["pooled"][...], group["lengths"][...]
    assert pooled.shape == (N, 3, 16) and group["empty_pooled"].shape == (16,)
    assert (np.abs(pooled).sum(-1) > 0).tolist() == (lengths > 0).tolist()
    assert group.attrs["text_encoder"]["random"] is False and group.attrs["text_encoder"]["pooled_dim"] == 16
    assert verify_store(tmp_path / "cache/text.zarr") == []


def test_verify_and_inspect_read_the_text_store(work, tmp_path):
    store = work / "cache/text.zarr"
    assert verify_store(store) == []
    text = inspect_store(store)
    assert "kind: text" in text and "tokens: shape (10, 3, 10, 32) float16" in text
    assert "text encoder: t5 from cache/text_encoder_random (sha256:" in text and "RANDOM WEIGHTS" in text
    assert "empty_tokens: shape (10, 32) float16" in text and "empty caption: 1 token(s)" in text
    assert "captions: 3 slots per sample x 10 tokens" in text
    # damage a copy: a value past a caption's length, a length beyond max_length, a missing record
    import shutil

    bad = tmp_path / "text.zarr"
    shutil.copytree(store, bad)
    group = zarr.open_group(str(bad), mode="r+")
    tokens = group["tokens"][0:3]
    tokens[1, 0, 9, 0] = 1.0  # sample 1 caption 0 has 8 tokens
    group["tokens"][0:3] = tokens
    lengths = group["lengths"][3:6]
    lengths[0, 0] = 11
    group["lengths"][3:6] = lengths
    (bad / ".fae/done/shard-00003.json").unlink()
    defects = verify_store(bad)
    assert any("shard 0" in d and "tokens non-zero past their caption's length" in d for d in defects), defects
    assert any("shard 1" in d and "lengths outside 0..10" in d for d in defects), defects
    assert any("shard 3" in d and "no completion record" in d for d in defects), defects


def test_a_changed_caption_is_refused_then_rebuilt_with_overwrite(tmp_path):
    write_project(tmp_path)
    run_in(tmp_path, load(tmp_path))
    edited = [list(caps) for caps in CAPTIONS]
    edited[7] = ["one blue square"]
    write_project(tmp_path, captions=edited)
    with pytest.raises(UserError, match="was made with a different config .* pass --overwrite") as err:
        run_in(tmp_path, load(tmp_path))
    assert "\n" not in str(err.value)
    assert zarr.open_group(str(tmp_path / "cache/text.zarr"), mode="r").attrs["complete"] is True  # untouched
    run_in(tmp_path, load(tmp_path), overwrite=True)
    group = zarr.open_group(str(tmp_path / "cache/text.zarr"), mode="r")
    assert group.attrs["dataset_fingerprint"] == read_index(tmp_path / "cache/index.npz").fingerprint
    assert verify_store(tmp_path / "cache/text.zarr") == []


def test_uncaptioned_index_and_bad_settings_are_one_line_errors(tmp_path, capsys):
    (tmp_path / "cache").mkdir()
    write_index(DatasetIndex(root="r", classes=["a", "b"], paths=["x.png", "y.png"], labels=[0, 1]),
                tmp_path / "cache/index.npz")
    (tmp_path / "u.yaml").write_text(yaml.safe_dump({"paths": {"index": str(tmp_path / "cache/index.npz"),
                                                               "text": str(tmp_path / "text.zarr")},
                                                     "text_encoder": {"weights": "random"}}))
    with pytest.raises(SystemExit) as exc:  # the real command line, in-process
        main(["embed-text", "--config", str(tmp_path / "u.yaml")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("fae-pipe: error: embed-text: paths.index = ") and "has no captions" in lines[0]
    write_project(tmp_path, captions=[["a b"], ["c"]], name="c.yaml")
    with pytest.raises(UserError, match="text_encoder.weights is empty"):
        run_in(tmp_path, load(tmp_path, **{"text_encoder.weights": ""}))
    with pytest.raises(UserError, match="embed_text.chunk_samples = 2 is invalid: it must divide "
                                        "embed_text.shard_samples = 3"):
        run_in(tmp_path, load(tmp_path, **{"embed_text.chunk_samples": 2}))
    with pytest.raises(UserError, match="random_width = 30 is invalid: expected a multiple of 4"):
        load(tmp_path, **{"text_encoder.random_width": 30})


def test_the_task_pickles_without_its_model(work):
    import pickle

    cfg = load(work)
    index = read_index(work / "cache/index.npz")
    task = EmbedTextTask(str(work / "cache/index.npz"), index.fingerprint,
                         {"directory": str(work / "cache/text_encoder_random"), "fingerprint": "x", "max_length": 10,
                          "precision": "fp32", "device": "cpu"}, cfg.text_encoder.batch_size, 3)
    task.adopt(object())
    clone = pickle.loads(pickle.dumps(task))
    assert clone.encoder is None and clone.cache_key == task.cache_key
    with pytest.raises(UserError, match="changed while the store was being written"):
        clone.setup()  # the directory's fingerprint is not "x"


@pytest.mark.slow
def test_sigkill_then_resume_through_the_cli_is_bit_identical(tmp_path):
    """Many one-sample shards, so the kill lands after the first record and before the last."""
    many = CAPTIONS * 4
    write_project(tmp_path, captions=many, embed_text={"shard_samples": 1, "chunk_samples": 1, "shards": 4},
                  text_encoder={"batch_size": 1, "max_length": 24, "random_width": 64, "random_layers": 2})
    run_in(tmp_path, load(tmp_path, **{"paths.text": "cache/ref.zarr"}))
    store, total = tmp_path / "cache/text.zarr", len(many)
    proc = popen(tmp_path, "embed-text", "--config", "c.yaml")
    finished = kill_after_first_record(proc, store)
    assert 1 <= finished < total, "the kill must land mid-run"
    assert zarr.open_group(str(store), mode="r").attrs["complete"] is False
    resumed = cli(tmp_path, "embed-text", "--config", "c.yaml")
    assert resumed.returncode == 0, resumed.stderr
    assert f"left by dead pid {proc.pid}" in resumed.stderr
    assert f"resumed, {total - finished} shards written, {finished} skipped" in resumed.stderr
    assert_same_bits(read_arrays(store), read_arrays(tmp_path / "cache/ref.zarr"))
    assert zarr.open_group(str(store), mode="r").attrs["complete"] is True
    assert verify_store(store) == []
    print(f"killed after {finished} of {total} shards")


@pytest.mark.slow
def test_dask_local_cluster_matches_in_process(work):
    done = cli(work, "embed-text", "--config", "c.yaml", "--set", "paths.text=cache/dask.zarr", "--workers", "2",
               "--shards", "4")
    assert done.returncode == 0, done.stderr
    assert_same_bits(read_arrays(work / "cache/dask.zarr"), read_arrays(work / "cache/text.zarr"))
