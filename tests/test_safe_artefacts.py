"""Artefacts load without executing code (issue #15 §1).

Exports are safetensors + JSON metadata (readable with ``safetensors`` and ``json``
alone), checkpoints load with ``weights_only=True``, old pickled exports convert once
through ``fae-pipe convert-export``, and a crafted pickle (whose ``__reduce__`` would
create a file) placed where a checkpoint or an export is expected is refused with one
line, the file never created.
"""

import json
import pickle
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors import safe_open

from fae_pipe.artifacts import EXPORT_KEY, file_fingerprint, read_export
from fae_pipe.cli import main
from fae_pipe.errors import UserError
from fae_pipe.fae.autoencoder import (DECODER_FORMAT, FAE_FORMAT, FeatureAutoencoder, load_decoder_file,
                                      load_fae_file)
from fae_pipe.sampling.generator import ImageGenerator
from fae_pipe.training import sit_export
from fae_pipe.training.checkpoint import capture_rng, load_checkpoint, restore_rng
from test_sharded_loader import make_latent_store
from tiny_checkpoints import paths_section, write_fae, write_runs, write_sit

PACKAGE = Path(__file__).resolve().parents[1]


class MakesAFile:
    """Unpickling this calls ``open(marker, "w")``: the file appears iff the pickle was executed."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def crafted(path: Path, marker: Path, how: str = "torch") -> Path:
    """A pickle at ``path`` that would create ``marker`` when loaded with full unpickling."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": "fae-pipe/fae-v1", "step": 1, "models": {}, "optimizers": {}, "schedulers": {},
               "rng": MakesAFile(marker)}
    if how == "torch":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload))
    return path


def one_line_error(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as exc:
        main(list(argv))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fae-pipe: error: ") and "\n" not in err, err
    return err


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield


def test_the_crafted_pickle_really_runs_code_when_fully_unpickled(tmp_path):
    """The control: without the guards, loading it creates the file."""
    path = crafted(tmp_path / "x.pt", tmp_path / "control", how="pickle")
    pickle.loads(path.read_bytes())
    assert (tmp_path / "control").exists()


def test_no_full_unpickling_anywhere_in_the_package():
    hits = [f"{p.relative_to(PACKAGE)}:{i}" for d in ("pipeline", "stages") for p in sorted((PACKAGE / d).rglob("*.py"))
            for i, line in enumerate(p.read_text().splitlines(), 1) if re.search(r"weights_only\s*=\s*False", line)]
    assert not hits, f"weights_only=False in {hits}"


@pytest.mark.parametrize("how", ["torch", "pickle"])
def test_a_crafted_pickle_as_the_resume_checkpoint_is_refused(tmp_path, capsys, how):
    store = tmp_path / "latents.zarr"
    make_latent_store(store, n=16)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({
        "paths": {"latents": str(store), "sit_run": str(tmp_path / "run"), "metrics": str(tmp_path / "m")},
        "sit": {"model": "sit_tiny", "eval_samples": 0, "train": {"steps": 2, "batch_size": 4, "precision": "no",
                                               "memory_budget_gb": 0.0, "log_with": "none"}}}))
    marker = tmp_path / "PWNED"
    ck = crafted(tmp_path / "evil" / "step-000000001.pt", marker, how)
    err = one_line_error(capsys, "train-sit", "--config", str(cfg), "--resume", str(ck))
    assert str(ck) in err and "refused" in err
    assert not marker.exists()
    assert not (tmp_path / "run" / sit_export.SIT_FILE).exists()


@pytest.mark.parametrize("how", ["torch", "pickle"])
def test_a_crafted_pickle_as_the_sit_export_is_refused_by_sample(tmp_path, capsys, how):
    root = tmp_path / "runs"
    write_runs(root)
    marker = tmp_path / "PWNED"
    sit = crafted(root / "sit" / sit_export.SIT_FILE, marker, how)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"paths": dict(paths_section(root), samples=str(tmp_path / "samples")),
                                   "sample": {"num_samples": 2, "batch_size": 2, "steps": 2, "device": "cpu"}}))
    err = one_line_error(capsys, "sample", "--config", str(cfg))
    assert str(sit) in err and "convert-export" in err
    assert not marker.exists()


def test_a_crafted_pickle_as_an_fae_export_or_given_to_convert_export_is_refused(tmp_path, capsys):
    marker = tmp_path / "PWNED"
    fae = crafted(tmp_path / "fae" / "fae.safetensors", marker)
    with pytest.raises(UserError) as e:
        FeatureAutoencoder.load(fae)
    assert "convert-export" in str(e.value) and "\n" not in str(e.value)
    before = fae.read_bytes()
    old = crafted(tmp_path / "fae" / "fae.pt", marker, how="pickle")
    err = one_line_error(capsys, "convert-export", str(old))
    assert str(old) in err and "refused" in err
    assert not marker.exists() and fae.read_bytes() == before  # nothing written over fae.safetensors


def test_every_export_reads_with_plain_safetensors_and_json(tmp_path):
    files = write_runs(tmp_path)
    expected = {"fae": (FAE_FORMAT, {"encoder", "feature_decoder"}), "decoder": (DECODER_FORMAT, {"state_dict"}),
                "sit": (sit_export.FORMAT, {"state_dict", "ema_state_dict"})}
    for kind, path in files.items():
        assert path.suffix == ".safetensors"
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads(f.metadata()["fae_pipe"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        fmt, groups = expected[kind]
        assert meta["format"] == fmt and {k.split("/")[0] for k in tensors} == groups == set(meta["groups"])
        if kind == "fae":
            enc = {k[len("encoder/"):]: v for k, v in tensors.items() if k.startswith("encoder/")}
    fae = load_fae_file(files["fae"])
    assert fae["grid"] == [8, 8] and fae["models"]["encoder"] == "fae_tiny.encoder"
    assert enc.keys() == fae["encoder"].keys() and all(torch.equal(fae["encoder"][k], v) for k, v in enc.items())
    assert read_export(files["fae"])[1]["family"] == "fae_tiny"
    assert load_decoder_file(files["decoder"])["model"] == "fae_tiny.pixel_decoder"
    sit = sit_export.load_sit_export(files["sit"])
    assert sit["version"] == sit_export.VERSION and sit["fae_fingerprint"] == file_fingerprint(files["fae"])
    model = sit_export.build_sit_from_export(sit)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in sit["ema_state_dict"].items())
    assert EXPORT_KEY == "fae_pipe"


def test_a_sit_export_without_ema_round_trips(tmp_path):
    fae, _ = write_fae(tmp_path)
    export = sit_export.load_sit_export(write_sit(tmp_path, fae, ema=False))
    assert export["ema_state_dict"] is None and export["state_dict"]


def test_exports_of_other_kinds_are_one_line_errors(tmp_path):
    files = write_runs(tmp_path)
    with pytest.raises(UserError, match="not 'fae-pipe/fae-v2'"):
        load_fae_file(files["decoder"])
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    with pytest.raises(UserError, match="not a fae-pipe safetensors export") as e:
        sit_export.load_sit_export(tmp_path / "junk.safetensors")
    assert "\n" not in str(e.value)


def old_exports(root: Path) -> dict[str, Path]:
    """fae.pt, decoder.pt and sit.pt exactly as the pickled releases wrote them (torch.save of a dict)."""
    files = write_runs(root / "new")
    fae = load_fae_file(files["fae"])
    dec = load_decoder_file(files["decoder"])
    sit = sit_export.load_sit_export(files["sit"])
    old = {"fae": root / "fae" / "fae.pt", "decoder": root / "decoder" / "decoder.pt", "sit": root / "sit" / "sit.pt"}
    for p in old.values():
        p.parent.mkdir(parents=True)
    torch.save({**{k: v for k, v in fae.items() if k != "groups"}, "format": "fae-pipe/fae-v1"}, old["fae"])
    torch.save({**{k: v for k, v in dec.items() if k != "groups"}, "format": "fae-pipe/pixel-decoder-v1"},
               old["decoder"])
    fp = file_fingerprint(old["fae"])
    torch.save({**{k: v for k, v in sit.items() if k != "groups"}, "version": 1, "fae_fingerprint": fp,
                "latent_stats": {**sit["latent_stats"], "fae_fingerprint": fp}}, old["sit"])
    return old


def test_old_pickled_exports_are_pointed_at_convert_export_then_load(tmp_path, capsys):
    old = old_exports(tmp_path)
    for load, path in ((load_fae_file, old["fae"]), (load_decoder_file, old["decoder"]),
                       (sit_export.load_sit_export, old["sit"])):
        with pytest.raises(UserError, match=f"convert-export {re.escape(str(path))}") as e:
            load(path)
        assert "\n" not in str(e.value)
    for kind, path in old.items():
        main(["convert-export", str(path)])
        out = capsys.readouterr().out
        assert f"{path} -> {path.with_suffix('.safetensors')}" in out, out
    new = {k: p.with_suffix(".safetensors") for k, p in old.items()}
    fae = load_fae_file(new["fae"])
    before = torch.load(old["fae"], weights_only=True)
    assert fae["format"] == FAE_FORMAT and fae["converted_from"] == file_fingerprint(old["fae"])
    assert all(torch.equal(fae["encoder"][k], v) for k, v in before["encoder"].items())
    assert sit_export.load_sit_export(new["sit"])["version"] == sit_export.VERSION
    # the SiT records the old fae.pt's fingerprint: the converted file answers to it
    gen = ImageGenerator.load(new["sit"], new["fae"], new["decoder"])
    assert gen.generate(range(2), [0, 1], seed=0, steps=2).shape == (2, 64, 64, 3)
    other = tmp_path / "elsewhere.safetensors"
    main(["convert-export", str(old["fae"]), "--out", str(other)])
    assert load_fae_file(other)["converted_from"] == fae["converted_from"]


def test_convert_export_refuses_a_file_of_another_kind(tmp_path, capsys):
    path = tmp_path / "x.pt"
    torch.save({"format": "something-else", "w": torch.ones(1)}, path)
    assert "nothing to convert" in one_line_error(capsys, "convert-export", str(path))
    assert "not found" in one_line_error(capsys, "convert-export", str(tmp_path / "missing.pt"))


def test_rng_states_are_tensors_and_plain_types_and_restore_exactly():
    np.random.seed(1)
    random.seed(2)
    torch.manual_seed(3)
    state = capture_rng()
    assert isinstance(state["numpy"]["key"], torch.Tensor) and state["numpy"]["key"].dtype == torch.uint32
    assert isinstance(state["python"]["internal"], list)
    draws = (np.random.rand(4), np.random.randn(), random.random(), torch.rand(3))
    restore_rng(state)
    again = (np.random.rand(4), np.random.randn(), random.random(), torch.rand(3))
    assert np.array_equal(draws[0], again[0]) and draws[1:3] == again[1:3] and torch.equal(draws[3], again[3])


def test_a_real_trainer_checkpoint_loads_with_weights_only_and_resumes(tmp_path):
    from fae_pipe.config import load_config
    from fae_pipe.training.trainer import Trainer
    from test_training_utils import tiny_trainer

    run, model = tiny_trainer(tmp_path, steps=4, checkpoint_every=2, log_every=1, ema_decay=0.5, warmup=1)
    x = torch.ones(2, 3)
    for _ in run.steps():
        loss = model(x).pow(2).mean()
        run.backward(loss)
        run.update("model", loss)
        run.log(loss=loss)
    run.finish()
    path = tmp_path / "run" / "checkpoints" / "step-000000002.pt"
    torch.load(path, weights_only=True)  # tensors and plain types only
    ck = load_checkpoint(path)
    assert set(ck) >= {"models", "ema", "optimizers", "schedulers", "rng", "config", "extra", "step"}
    assert ck["ema"]["model"] and ck["optimizers"]["model"]["state"] and ck["schedulers"]["model"]
    sets = {"paths.sit_run": str(tmp_path / "run"), "paths.metrics": str(tmp_path / "m"), "sit.train.batch_size": 2,
            "sit.train.precision": "fp32", "sit.train.log_with": "none", "sit.train.ema_decay": 0.5,
            "sit.train.steps": 4, "sit.train.checkpoint_every": 2, "sit.train.log_every": 1, "sit.train.warmup": 1}
    again = Trainer("train-x", load_config(None, sets), "sit", tmp_path / "run", str(path), log_fields=["loss"])
    restored, _ = again.prepare({"model": torch.nn.Linear(3, 1)})
    assert again.start == 2
    assert all(torch.equal(restored.state_dict()[k], v) for k, v in ck["models"]["model"].items())
    assert again.scheduler.state_dict()["last_epoch"] == ck["schedulers"]["model"]["last_epoch"]


def test_a_checkpoint_with_pickled_numpy_rng_state_is_refused_with_the_way_out(tmp_path):
    """Checkpoints of earlier releases held ``np.random.get_state()`` (a numpy array): not loadable safely."""
    path = tmp_path / "step-000000002.pt"
    torch.save({"step": 2, "models": {}, "optimizers": {}, "schedulers": {},
                "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}},
               path)
    with pytest.raises(UserError, match="start a fresh run without --resume") as e:
        load_checkpoint(path)
    assert "refused" in str(e.value) and "\n" not in str(e.value)
