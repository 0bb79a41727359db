"""Issue #15 section 2: every failure a user can meet is one line (exit 2), and nothing is lost.

Through the real CLI (``fae_pipe.cli.main``, in process, like ``tiny_pipeline``): damaged
stores met by each reading stage, a full disk / read-only directory during writes, and
the image files users really have.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
import zarr

from fae_pipe import artifacts
from fae_pipe.cache import schema
from fae_pipe.cli import main
from fae_pipe.errors import UserError
from tiny_pipeline import session_pipeline


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return session_pipeline(tmp_path_factory)


def run_cli(capsys, *args) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``fae-pipe ARGS`` run in this process."""
    capsys.readouterr()
    try:
        main(list(args))
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def one_line(code: int, err: str) -> str:
    assert code == 2, (code, err[-2000:])
    lines = [ln for ln in err.splitlines() if ln.startswith("fae-pipe: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    return lines[0]


def copy_config(tiny: Path, work: Path, **paths) -> Path:
    """The tiny pipeline's config with outputs under ``work`` and ``paths`` replaced."""
    cfg = yaml.safe_load(tiny.read_text())
    for key in ("sit_run", "samples", "metrics"):
        cfg["paths"][key] = str(work / key)
    cfg["paths"].update({k: str(v) for k, v in paths.items()})
    path = work / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def damaged_copy(src: Path, dst: Path, array: str, shard: int, how: str) -> Path:
    shutil.copytree(src, dst)
    g = zarr.open_group(str(dst), mode="r")
    f = schema.shard_file(dst, g, array, shard)
    if how == "truncate":
        with open(f, "r+b") as fh:
            fh.truncate(f.stat().st_size // 2)
    elif how == "flip":  # flipped bytes in the shard index (the checksummed part)
        data = bytearray(f.read_bytes())
        data[-6] ^= 0xFF
        f.write_bytes(bytes(data))
    elif how == "delete":
        f.unlink()
    elif how == "version":
        meta = json.loads((dst / "zarr.json").read_text())
        meta["attributes"]["schema_version"] = 99
        (dst / "zarr.json").write_text(json.dumps(meta))
    return dst


def assert_names_store(line: str, store: Path, array: str, shard: int = 0):
    assert str(store) in line and f"shard {shard} of '{array}' is damaged" in line, line
    assert f"fae-pipe verify {store}" in line and "--overwrite" in line, line
    assert "Stored and computed checksum" not in line  # zarr's own words never reach the user


# ---- damaged stores -----------------------------------------------------------------

@pytest.mark.parametrize("how", ["truncate", "flip", "delete"])
@pytest.mark.parametrize("budget", [1.0, 0.0])
def test_train_sit_on_a_damaged_latent_shard_is_one_line(tiny, tmp_path, capsys, how, budget):
    store = damaged_copy(tiny.parent / "latents.zarr", tmp_path / "latents.zarr", schema.LATENTS, 0, how)
    cfg = copy_config(tiny, tmp_path, latents=store)
    # budget 0: the streaming loader (memory maps) must find the damage before mapping
    code, _, err = run_cli(capsys, "train-sit", "--config", str(cfg), "--set", f"sit.train.memory_budget_gb={budget}")
    line = one_line(code, err)
    assert_names_store(line, store, schema.LATENTS)
    assert "fae-pipe encode --overwrite" in line


def test_train_sit_on_a_damaged_labels_shard_is_one_line(tiny, tmp_path, capsys):
    store = damaged_copy(tiny.parent / "latents.zarr", tmp_path / "latents.zarr", schema.LABELS, 1, "truncate")
    code, _, err = run_cli(capsys, "train-sit", "--config", str(copy_config(tiny, tmp_path, latents=store)))
    assert_names_store(one_line(code, err), store, schema.LABELS, 1)


@pytest.mark.parametrize("stage", ["train-sit", "inspect"])  # sample reads only sit.pt (class names optional)
def test_a_latent_store_of_another_schema_version_is_refused(tiny, tmp_path, capsys, stage):
    store = damaged_copy(tiny.parent / "latents.zarr", tmp_path / "latents.zarr", schema.LATENTS, 0, "version")
    cfg = copy_config(tiny, tmp_path, latents=store)
    if stage == "inspect":
        code, _, err = run_cli(capsys, "inspect", str(store))
    else:
        code, _, err = run_cli(capsys, stage, "--config", str(cfg))
    line = one_line(code, err)
    assert str(store) in line and "schema_version 99" in line and "--overwrite" in line, line


@pytest.mark.parametrize("stage,how", [("train-fae", "truncate"), ("train-fae", "delete"), ("encode", "truncate"),
                                       ("encode", "flip"), ("train-decoder", "truncate"), ("probe", "truncate"),
                                       ("evaluate", "truncate")])
def test_stages_reading_a_damaged_feature_shard_fail_in_one_line(tiny, tmp_path, capsys, stage, how):
    store = damaged_copy(tiny.parent / "features.zarr", tmp_path / "features.zarr", schema.FEATURES, 0, how)
    extra = {"latents": tmp_path / "latents.zarr", "fae_run": tmp_path / "fae", "decoder_run": tmp_path / "decoder"}
    if stage in ("train-decoder", "probe", "evaluate"):
        shutil.copytree(tiny.parent / "fae", tmp_path / "fae")
    if stage == "evaluate":
        shutil.copytree(tiny.parent / "decoder", tmp_path / "decoder")
        shutil.copytree(tiny.parent / "sit", tmp_path / "sit_run")
        shutil.copytree(tiny.parent / "samples", tmp_path / "samples")
    if stage == "encode":
        shutil.copytree(tiny.parent / "fae", tmp_path / "fae")
    cfg = copy_config(tiny, tmp_path, features=store, **extra)
    code, _, err = run_cli(capsys, stage, "--config", str(cfg))
    line = one_line(code, err)
    assert_names_store(line, store, schema.FEATURES)
    assert "fae-pipe extract --overwrite" in line


def test_a_feature_store_of_another_schema_version_is_refused_by_train_fae(tiny, tmp_path, capsys):
    store = damaged_copy(tiny.parent / "features.zarr", tmp_path / "features.zarr", schema.FEATURES, 0, "version")
    code, _, err = run_cli(capsys, "train-fae", "--config",
                           str(copy_config(tiny, tmp_path, features=store, fae_run=tmp_path / "fae")))
    assert "schema_version 99" in one_line(code, err)


def test_verify_still_reports_the_damage_as_defects(tiny, tmp_path, capsys):
    store = damaged_copy(tiny.parent / "latents.zarr", tmp_path / "latents.zarr", schema.LATENTS, 0, "truncate")
    code, out, err = run_cli(capsys, "verify", str(store))
    assert code in (1, 2) and "Traceback" not in err, err
    assert "DEFECT" in out or "damaged" in err


# ---- the images users really have ---------------------------------------------------

def _solid(color, size=(32, 32), mode="RGB"):
    from PIL import Image

    return Image.new(mode, size, color)


def write_odd_folder(root: Path) -> dict:
    """root/a, root/b with every odd kind of file; returns {name: expected outcome}."""
    from PIL import Image

    a, b = root / "a", root / "b"
    a.mkdir(parents=True)
    b.mkdir()
    for i in range(3):
        _solid((200, 10 * i, 10)).save(a / f"red{i}.png")
        _solid((10, 10 * i, 200)).save(b / f"blue{i}.png")
    _solid((255, 0, 0, 0), mode="CMYK").save(a / "cmyk.jpg", quality=95)  # cyan ink
    Image.fromarray(np.full((32, 32), 0xC000, np.uint16)).save(a / "gray16.png")  # mode I;16
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW to view
    _solid((0, 200, 0), size=(48, 32)).save(a / "exif.jpg", exif=exif)
    frames = [_solid((250, 0, 0)), _solid((0, 0, 250))]
    frames[0].save(a / "anim.gif", save_all=True, append_images=frames[1:], duration=50, loop=0)
    _solid((1, 2, 3), size=(64, 64)).save(b / "bomb.png")  # above the test's lowered pixel limit
    _solid((9, 9, 9)).save(os.fsencode(b) + b"/bad\xff name.png")
    os.symlink(a / "red0.png", b / "link.png")
    os.symlink(root / "missing.png", b / "dangling.png")
    os.symlink(b, b / "loop")  # a directory symlink loop must not hang the scan
    return {"ok": ["a/red0.png", "a/cmyk.jpg", "a/gray16.png", "a/exif.jpg", "a/anim.gif", "b/link.png"],
            "skipped": {"b/bomb.png": "image too large", "b/bad\\xff name.png": "not valid UTF-8",
                        "b/dangling.png": "dangling symlink"}}


def odd_config(work: Path, check: str = "full", on_error: str = "skip") -> Path:
    cfg = {
        "paths": {"index": str(work / "index.json"), "features": str(work / "features.zarr")},
        "data": {"root": str(work / "images"), "demo": False, "image_size": 32, "check": check,
                 "on_error": on_error, "holdout_fraction": 0.0, "decode_workers": 0},
        "image_encoder": {"name": "vit_small_patch14_dinov2", "weights": "random", "input_size": 28,
                          "precision": "bf16", "batch_size": 4, "device": "cpu"},
        "extract": {"shards": 1, "shard_samples": 8, "chunk_samples": 4, "threads": 1},
    }
    path = work / f"odd-{check}-{on_error}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture
def low_pixel_limit(monkeypatch):
    from PIL import Image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1500)  # 64x64 > 2 x 1500: a "bomb"; 32x48 only warns


@pytest.mark.parametrize("check", ["full", "header"])
def test_prepare_and_extract_handle_the_images_users_have(tmp_path, capsys, low_pixel_limit, check):
    expected = write_odd_folder(tmp_path / "images")
    cfg = odd_config(tmp_path, check)
    code, out, err = run_cli(capsys, "prepare", "--config", str(cfg))
    assert code == 0, err
    index = json.loads((tmp_path / "index.json").read_text())
    reasons = {f["path"]: f["reason"] for f in index["failures"]}
    assert set(reasons) == set(expected["skipped"]), reasons
    for path, why in expected["skipped"].items():
        assert why in reasons[path], (path, reasons[path])
        assert f"skipped {path}" in out
    assert set(expected["ok"]) <= set(index["samples"]["path"]) and index["num_samples"] == 11
    code, out, err = run_cli(capsys, "extract", "--config", str(cfg))
    assert code == 0, err
    g = zarr.open_group(str(tmp_path / "features.zarr"), mode="r")
    assert g.attrs["complete"] is True and g.attrs["num_samples"] == 11
    assert np.asarray(g["valid"][:]).all() and not g.attrs["failures"]


def test_on_error_fail_names_the_file_in_one_line(tmp_path, capsys, low_pixel_limit):
    write_odd_folder(tmp_path / "images")
    code, _, err = run_cli(capsys, "prepare", "--config", str(odd_config(tmp_path, "full", "fail")))
    line = one_line(code, err)
    assert "b/bad\\xff name.png" in line and "not valid UTF-8" in line and "data.on_error=fail" in line, line


# ---- a full disk, a read-only directory ---------------------------------------------

@pytest.fixture
def small_fs(tmp_path):
    """mount(size) -> a fresh tmpfs of ``size`` bytes under tmp_path (root only; skipped when not permitted)."""
    import subprocess

    mounted = []

    def mount(size: int, name: str = "fs", ro: bool = False) -> Path:
        d = tmp_path / name
        d.mkdir()
        opts = f"size={size}" + (",ro" if ro else "")
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(d)], capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        mounted.append(d)
        return d

    def remount(d: Path, opts: str) -> None:
        subprocess.run(["mount", "-o", f"remount,{opts}", str(d)], check=True)

    mount.remount = remount
    yield mount
    for d in reversed(mounted):
        subprocess.run(["umount", "-l", str(d)], check=False)


def test_atomic_write_on_a_full_disk_is_one_line_and_leaves_the_target(small_fs):
    import torch

    d = small_fs(64 << 10)
    target = d / "ckpt.pt"
    target.write_text("old and whole")
    for write in (lambda: artifacts.atomic_write_text(target, "x" * (1 << 20)),
                  lambda: artifacts.atomic_torch_save({"w": torch.zeros(1 << 18)}, target)):
        with pytest.raises(UserError) as e:
            write()
        msg = str(e.value)
        assert msg.startswith(f"cannot write {target}: no space left on device; free some space") and "\n" not in msg
        assert target.read_text() == "old and whole" and sorted(p.name for p in d.iterdir()) == ["ckpt.pt"]


def test_atomic_write_on_a_read_only_directory_is_one_line(small_fs):
    d = small_fs(64 << 10, ro=True)
    with pytest.raises(UserError, match=rf"cannot write {d}/sub/x.json: read-only file system; make it writable"):
        artifacts.atomic_write_json(d / "sub" / "x.json", {"a": 1})
    with pytest.raises(UserError, match=rf"cannot write {d}/x.json: read-only file system"):
        artifacts.atomic_write_json(d / "x.json", {"a": 1})


def test_prepare_onto_a_read_only_directory_is_one_line(tmp_path, small_fs, capsys):
    from helpers_extract import write_config

    ro = small_fs(64 << 10, "ro", ro=True)
    cfg = write_config(tmp_path, paths={"index": str(ro / "index.json"), "features": "cache/features.zarr"},
                       data={"root": str(tmp_path / "demo")})
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        code, _, err = run_cli(capsys, "prepare", "--config", str(cfg))
    finally:
        os.chdir(cwd)
    assert one_line(code, err) == (f"fae-pipe: error: cannot write {ro / 'index.json'}: read-only file system; make it "
                                   "writable (or point the path elsewhere) and run the same command again (finished "
                                   "parts are kept, unfinished ones are redone)")


@pytest.mark.slow
def test_extract_on_a_full_disk_stops_in_one_line_and_the_same_command_finishes(tmp_path, small_fs):
    """A store on a real 160 KiB tmpfs: the disk fills mid-store; the shards with records are whole, the
    one that failed has none; after the space grows the same command completes it bit-identically."""
    from helpers_extract import assert_same_arrays, cli, one_line_error, prepare_tiny, read_arrays

    prepare_tiny(tmp_path)
    ref = cli(tmp_path, "extract", "--config", "tiny.yaml", "--shards", "1")
    assert ref.returncode == 0, ref.stderr
    fs = small_fs(160 << 10)
    store = fs / "features.zarr"
    args = ("extract", "--config", "tiny.yaml", "--shards", "1", "--set", f"paths.features={store}")
    line = one_line_error(cli(tmp_path, *args))
    assert line.startswith(f"fae-pipe: error: cannot write {store}/") and "no space left on device" in line, line
    records = sorted(int(p.stem.split("-")[1]) for p in (store / ".fae/done").glob("shard-*.json"))
    assert records == list(range(len(records))) and 0 < len(records) < 6, records
    g = zarr.open_group(str(store), mode="r")
    assert g.attrs.get("complete") is not True
    small_fs.remount(fs, "size=4m")
    again = cli(tmp_path, *args)
    assert again.returncode == 0, again.stderr
    assert f"{6 - len(records)} shards written, {len(records)} skipped" in again.stdout
    assert_same_arrays(read_arrays(store), read_arrays(tmp_path / "cache/features.zarr"))


@pytest.mark.slow
def test_train_sit_checkpoint_on_a_full_disk_is_one_line_and_resume_finishes(tmp_path, small_fs):
    import subprocess
    import sys

    from test_sharded_loader import make_latent_store
    from test_train_sit import ENV, write_config

    store = tmp_path / "latents.zarr"
    make_latent_store(store, n=48)
    fs = small_fs(64 << 10)
    cfg = write_config(fs.parent, store, "fs/run", steps=4, checkpoint_every=2)
    run = [sys.executable, "-m", "fae_pipe.cli", "train-sit", "--config", str(cfg)]
    done = subprocess.run(run, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    errors = [ln for ln in done.stderr.splitlines() if ln.startswith("fae-pipe: error:")]
    assert len(errors) == 1 and f"cannot write {fs}/run/" in errors[0] and "no space left" in errors[0], done.stderr[-3000:]
    assert not list((fs / "run").rglob("*.tmp"))
    small_fs.remount(fs, "size=64m")
    done = subprocess.run(run + ["--resume", "auto"], env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (fs / "run" / "checkpoints").is_dir() and any((fs / "run").glob("sit.*"))


def test_demo_images_onto_a_full_disk_is_one_line(tmp_path, small_fs, capsys):
    """Writes outside atomic_write (the demo image writer, log appends) meet the CLI's safety net."""
    from helpers_extract import write_config

    fs = small_fs(16 << 10)
    cfg = write_config(tmp_path, paths={"index": str(tmp_path / "index.json"), "features": "f.zarr"},
                       data={"root": str(fs / "demo"), "demo_per_class": 40})
    code, _, err = run_cli(capsys, "prepare", "--config", str(cfg))
    line = one_line(code, err)
    assert line.startswith("fae-pipe: error: cannot write ") and "no space left on device" in line, line


def test_encode_on_a_full_disk_stops_in_one_line_and_the_same_command_finishes(tiny, tmp_path, small_fs, capsys):
    """Latents on a 40 KiB tmpfs: encode stops in one line; with space, the same command gives the tiny build's bits."""
    fs = small_fs(40 << 10)
    store = fs / "latents.zarr"
    cfg = copy_config(tiny, tmp_path, latents=store)
    code, _, err = run_cli(capsys, "encode", "--config", str(cfg))
    line = one_line(code, err)
    assert line.startswith(f"fae-pipe: error: cannot write {store}/") and "no space left on device" in line, line
    assert zarr.open_group(str(store), mode="r").attrs.get("complete") is not True
    small_fs.remount(fs, "size=8m")
    code, _, err = run_cli(capsys, "encode", "--config", str(cfg))
    assert code == 0, err
    names = ("latents", "labels", "sample_ids", "valid")
    got, ref = zarr.open_group(str(store), mode="r"), zarr.open_group(str(tiny.parent / "latents.zarr"), mode="r")
    assert got.attrs["complete"] is True
    for n in names:
        assert np.array_equal(np.asarray(got[n][:]).view(np.uint8), np.asarray(ref[n][:]).view(np.uint8)), n


def test_atomic_write_dir_replaces_whole_or_leaves_the_old_directory(tmp_path):
    target = tmp_path / "model"
    artifacts.atomic_write_dir(target, lambda d: (d / "a.txt").write_text("old"))

    def half_then_fail(d):
        (d / "a.txt").write_text("new")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        artifacts.atomic_write_dir(target, half_then_fail)
    assert [p.name for p in target.iterdir()] == ["a.txt"] and (target / "a.txt").read_text() == "old"
    artifacts.atomic_write_dir(target, lambda d: (d / "b.txt").write_text("new"))
    assert [p.name for p in target.iterdir()] == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary siblings left
