"""Captioned sources (captions folder, JSONL/CSV/Parquet manifests, WebDataset tars) -> one captioned index."""

from __future__ import annotations

import csv
import io
import json
import sys
import tarfile
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from fae_pipe.config import load_config
from fae_pipe.data.captions import NO_CAPTION, read_manifest, scan_captioned
from fae_pipe.data.index import read_index, write_index
from fae_pipe.data.tar_members import TarMember
from fae_pipe.data.transforms import ImageDecodeError, load_rgb
from fae_pipe.errors import UserError

CAPTIONS = [["a red circle"], ["two blue squares", "blue squares, two"], ["one green triangle", "a triangle", "green"]]
FORMATS = ("jsonl", "csv", "parquet")


def image_bytes(i: int, fmt: str) -> bytes:
    arr = np.random.default_rng(i).integers(0, 256, (12, 12, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def make_pairs(n: int = 8) -> list[tuple[str, bytes, list[str]]]:
    """(file name, image bytes, captions) with 1-3 captions each, JPEG and PNG."""
    return [(f"{i:06d}.{'jpg' if i % 2 else 'png'}", image_bytes(i, "JPEG" if i % 2 else "PNG"), CAPTIONS[i % 3])
            for i in range(n)]


def write_folder(root: Path, pairs) -> Path:
    """Images + caption files; the .txt files carry blank lines and padding the reader must drop."""
    root.mkdir(parents=True, exist_ok=True)
    for name, data, caps in pairs:
        (root / name).write_bytes(data)
        (root / name).with_suffix(".txt").write_text("\n".join(f"  {c} " for c in caps) + "\n\n", encoding="utf-8")
    return root


def write_manifest(root: Path, pairs, fmt: str, heldout=None, name: str = "manifest", single: bool = False) -> Path:
    """A manifest of ``pairs`` (paths relative to ``root``) with an extra field the reader must ignore; captions
    padded with spaces plus an empty one (the reader strips and drops them), or only the first (``single``)."""
    path = root / f"{name}.{fmt}"
    rows = [{"path": n, "caption": f"{caps[0]} "} if single else {"path": n, "captions": [f" {c}" for c in caps] + [""]}
            for n, _, caps in pairs]
    for row in rows:
        row["source"] = "test"
    if heldout is not None:
        for row, h in zip(rows, heldout):
            row["heldout"] = bool(h)
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    elif fmt == "csv":
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(list(rows[0]))
            w.writerows([[json.dumps(v) if isinstance(v, list) else str(v).lower() if isinstance(v, bool) else v
                          for v in r.values()] for r in rows])
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def write_shards(root: Path, pairs, per_shard: int = 3, heldout=None) -> Path:
    """img2dataset layout: <key>.jpg|png + <key>.txt + <key>.json per key, ``per_shard`` keys per tar."""
    root.mkdir(parents=True, exist_ok=True)
    for s in range(0, len(pairs), per_shard):
        with tarfile.open(root / f"{s // per_shard:05d}.tar", "w") as tf:
            for j, (name, data, caps) in enumerate(pairs[s:s + per_shard]):
                key = name.split(".")[0]
                meta = {"key": key, "status": "success"}
                if heldout is not None:
                    meta["heldout"] = bool(heldout[s + j])
                for member, payload in ((name, data), (f"{key}.txt", "\n".join(caps).encode()),
                                        (f"{key}.json", json.dumps(meta).encode())):
                    info = tarfile.TarInfo(member)
                    info.size = len(payload)
                    tf.addfile(info, io.BytesIO(payload))
    return root


def scan(source, root="", manifest="", **kw):
    kw.setdefault("check", "full")
    return scan_captioned(source, str(root), str(manifest), 0.25, 0, **kw)


def test_every_source_gives_the_same_index(tmp_path):
    pairs = make_pairs(8)
    folder = write_folder(tmp_path / "folder", pairs)
    shards = write_shards(tmp_path / "shards", pairs)
    indexes = {"folder": scan("captions_folder", folder)}
    for fmt in FORMATS:
        indexes[fmt] = scan("manifest", manifest=write_manifest(folder, pairs, fmt))
    indexes["tar dir"] = scan("webdataset", shards)
    indexes["tar braces"] = scan("webdataset", f"{shards}/{{00000..00002}}.tar")
    indexes["tar glob"] = scan("webdataset", f"{shards}/*.tar")
    ref = indexes["folder"]
    assert ref.captions.to_lists() == [caps for _, _, caps in pairs]
    assert ref.sizes.tolist() == [len(d) for _, d, _ in pairs] and ref.classes == ["captioned"]
    assert 0 < ref.holdout.sum() < len(pairs) and not ref.failures
    for name, index in indexes.items():
        assert index.fingerprint == ref.fingerprint, name
        assert index.captions == ref.captions and np.array_equal(index.sizes, ref.sizes), name
        assert np.array_equal(index.holdout, ref.holdout) and not index.failures, name
    tars = indexes["tar dir"]
    assert tars.tars is not None and list(tars.tars.tars) == ["00000.tar", "00001.tar", "00002.tar"]
    for i in (0, 5):
        member = tars.abspath(i)
        assert isinstance(member, TarMember) and str(member) == f"{shards}/0000{i // 3}.tar[{pairs[i][0]}]"
        assert np.array_equal(np.asarray(load_rgb(member)), np.asarray(load_rgb(ref.abspath(i))))


def test_tar_columns_round_trip_and_class_indexes_stay_without_them(tmp_path):
    pairs = make_pairs(5)
    index = scan("webdataset", write_shards(tmp_path / "shards", pairs, per_shard=2))
    for name in ("index.npz", "index.json"):
        back = read_index(write_index(index, tmp_path / name))
        assert back.tars == index.tars and back.fingerprint == index.fingerprint and back.captions == index.captions
        assert str(back.abspath(4)) == str(index.abspath(4))
    with np.load(tmp_path / "index.npz") as z:
        assert {"tar_id", "tar_offset", "tar_path_bytes", "tar_path_offsets"} <= set(z.files)
    folder = scan("captions_folder", write_folder(tmp_path / "folder", pairs))
    with np.load(write_index(folder, tmp_path / "folder.npz")) as z:
        assert not any(f.startswith("tar_") for f in z.files)


def test_absolute_manifest_paths_and_the_manifest_split(tmp_path):
    pairs = make_pairs(6)
    folder = write_folder(tmp_path / "images", pairs)
    heldout = [0, 1, 0, 0, 1, 0]
    rows = [{"path": str(folder / n), "caption": caps[0], "heldout": bool(h)} for (n, _, caps), h in zip(pairs, heldout)]
    manifest = tmp_path / "elsewhere" / "m.jsonl"
    manifest.parent.mkdir()
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    index = scan("manifest", manifest=manifest)
    assert index.holdout.astype(int).tolist() == heldout and index.holdout_fraction == round(2 / 6, 6)
    assert index.abspath(2) == str(folder / pairs[2][0]) and index.captions.counts.tolist() == [1] * 6
    for fmt in FORMATS:
        read = read_manifest(write_manifest(folder, pairs, fmt, heldout, single=True))
        assert np.array_equal(read.heldout, heldout) and read.captions.to_lists() == [[c[0]] for _, _, c in pairs]
    tar_index = scan("webdataset", write_shards(tmp_path / "shards", pairs, heldout=heldout))
    assert tar_index.holdout.astype(int).tolist() == heldout


def test_tens_of_thousands_of_rows_parse_into_columns(tmp_path):
    """30k rows in every format: the parse keeps no object per row (its peak memory is a few column bytes
    per row: ~3.7 MB measured; the list of 30k row dicts of a per-row-object parse peaks at ~20 MB) and the
    index is columnar."""
    pairs = make_pairs(4)
    folder = write_folder(tmp_path / "folder", pairs)
    n = 30_000
    many = [(f"{pairs[i % 4][0]}", b"", [f"caption {i}", f"another {i}"]) for i in range(n)]
    for fmt in FORMATS:
        manifest = write_manifest(folder, many, fmt)
        tracemalloc.start()
        try:
            pairs_read = read_manifest(manifest)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert len(pairs_read) == n and peak < 6_000_000, (fmt, peak)
        assert pairs_read.captions.texts.blob.dtype == np.uint8 and pairs_read.captions.counts.tolist() == [2] * n
    index = scan("manifest", manifest=manifest, check="stat", workers=2)
    assert len(index) == n and index.captions.of(n - 1) == [f"caption {n - 1}", f"another {n - 1}"]
    assert isinstance(index.paths.blob, np.ndarray) and index.sizes[:4].tolist() == [len(d) for _, d, _ in pairs]


def broken_set(tmp_path: Path):
    """Six pairs: #1 all captions empty, #3 a truncated JPEG, #4 no caption file/entry at all."""
    pairs = make_pairs(6)
    pairs[1] = (pairs[1][0], pairs[1][1], ["", "   "])
    pairs[3] = (pairs[3][0], pairs[3][1][: len(pairs[3][1]) // 2], pairs[3][2])
    pairs[4] = (pairs[4][0], pairs[4][1], [])
    return pairs


@pytest.mark.parametrize("source", ["captions_folder", "jsonl", "webdataset"])
def test_empty_captions_and_broken_images_skipped_and_recorded_or_fatal(tmp_path, source):
    pairs = broken_set(tmp_path)
    folder = write_folder(tmp_path / "folder", pairs)
    (folder / pairs[4][0]).with_suffix(".txt").unlink()
    args = {"captions_folder": ("captions_folder", folder, ""), "jsonl": ("manifest", "", write_manifest(folder, pairs, "jsonl")),
            "webdataset": ("webdataset", write_shards(tmp_path / "shards", pairs, per_shard=4), "")}[source]
    index = scan(*args, check="header")
    assert len(index) == 3 and index.captions.to_lists() == [pairs[i][2] for i in (0, 2, 5)]
    reasons = {f["path"]: f["reason"] for f in index.failures}
    shown = [f"0000{i // 4}.tar[{n}]" if source == "webdataset" else n for i, (n, _, _) in enumerate(pairs)]
    assert reasons[shown[1]] == NO_CAPTION and reasons[shown[4]] == NO_CAPTION
    assert reasons[shown[3]].startswith("truncated or corrupt image") and len(reasons) == 3
    with pytest.raises(UserError, match=rf"{pairs[1][0]}.*no caption.*data.on_error=fail"):
        scan(*args, on_error="fail")
    if source == "webdataset":  # decoding later names the tar and the member
        bad = TarMember(str(tmp_path / "shards" / "00000.tar"), pairs[3][0], 0, 10)
        with pytest.raises(ImageDecodeError, match=r"00000\.tar\[000003\.jpg\]"):
            load_rgb(bad)


def test_malformed_manifests_are_one_clear_error(tmp_path, monkeypatch):
    bad = {"m.jsonl": '{"path": "a.jpg", "caption": "x"}\nnot json\n',
           "n.jsonl": '{"path": "a.jpg", "caption": "x", "heldout": true}\n{"path": "b.jpg", "caption": "y"}\n',
           "o.jsonl": '{"path": "a.jpg", "captions": "not a list"}\n',
           "p.csv": "file,caption\na.jpg,x\n", "q.txt": "a.jpg\n"}
    expected = {"m.jsonl": "line 2: not valid JSON", "n.jsonl": "'heldout' is given for some rows but not for line 2",
                "o.jsonl": "line 1: 'captions' must be a list of strings", "p.csv": "must name a 'path' column",
                "q.txt": "unknown manifest format .txt"}
    for name, text in bad.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(UserError, match=expected[name]):
            read_manifest(tmp_path / name)
    write_manifest(tmp_path, make_pairs(2), "parquet", name="r")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as if pyarrow were not installed
    with pytest.raises(UserError, match=r"pip install fae-pipe\[parquet\]"):
        read_manifest(tmp_path / "r.parquet")


def test_data_source_config_keys_are_validated(tmp_path):
    (tmp_path / "empty.yaml").write_text("{}\n")

    def load(**sets):
        return load_config(tmp_path / "empty.yaml", {k.replace("_", ".", 1): v for k, v in sets.items()})

    with pytest.raises(UserError, match="data.source"):
        load(data_source="tfrecord")
    with pytest.raises(UserError, match="needs data.manifest"):
        load(data_source="manifest")
    with pytest.raises(UserError, match="use data.source=folder"):
        load(data_source="webdataset", data_demo=True)
    with pytest.raises(UserError, match="leave data.manifest empty"):
        load(data_caption_demo=True, data_manifest="m.jsonl")
    assert load(data_caption_demo=True, data_check="stat").data.caption_demo


@pytest.mark.slow
def test_prepare_cli_indexes_the_caption_demo(tmp_path):
    from helpers_extract import cli

    cfg = {"data": {"root": "data/captions", "caption_demo": True, "caption_demo_images": 24, "demo_size": 16},
           "paths": {"index": "cache/index.npz"}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    done = cli(tmp_path, "prepare", "--config", "c.yaml")
    assert done.returncode == 0, done.stderr
    assert "prepare: 24 images, 72 captions" in done.stdout
    index = read_index(tmp_path / "cache" / "index.npz")
    rows = [json.loads(line) for line in (tmp_path / "data" / "captions" / "manifest.jsonl").read_text().splitlines()]
    assert index.captions.to_lists() == [r["captions"] for r in rows]
    assert index.holdout.tolist() == [r["heldout"] for r in rows] and any(index.holdout)


@pytest.mark.slow
def test_extract_from_tar_shards_equals_extract_from_a_folder(tmp_path, monkeypatch):
    """The same images as tar members and as files give bit-identical features (``extract`` by the real CLI)."""
    from helpers_extract import cli, read_arrays, assert_same_arrays, write_config

    from fae_pipe.cli import main

    pairs = make_pairs(10)
    for name, source, root in (("folder", "captions_folder", "images"), ("tars", "webdataset", "shards/*.tar")):
        work = tmp_path / name
        work.mkdir()
        (write_folder if name == "folder" else write_shards)(work / root.split("/")[0], pairs)
        config = write_config(work, data={"root": root, "source": source, "demo": False, "image_size": 12,
                                          "check": "full"}, extract={"shards": 2, "shard_samples": 4})
        monkeypatch.chdir(work)
        main(["prepare", "--config", config.name])  # in-process: one Python start less per source
        done = cli(work, "extract", "--config", config.name)
        assert done.returncode == 0, done.stderr
    assert read_index(tmp_path / "tars/cache/index.json").tars is not None
    a, b = read_arrays(tmp_path / "folder/cache/features.zarr"), read_arrays(tmp_path / "tars/cache/features.zarr")
    assert a["valid"].all() and len(a["valid"]) == 10
    assert_same_arrays(a, b)


@pytest.mark.slow
def test_bench_prepare_runs_every_format_side_by_side(tmp_path, capsys):
    """The bench itself (small): each format in its own process, one index (the bench asserts one fingerprint)."""
    from fae_pipe.stages import bench_prepare

    (tmp_path / "empty.yaml").write_text("{}\n")
    result = bench_prepare.run(load_config(tmp_path / "empty.yaml"), rows=3000, images=20, check_rows=300,
                               workdir=str(tmp_path / "work"))
    assert set(result["formats"]) == set(FORMATS) and all(r["rows"] == 3000 for r in result["formats"].values())
    out = capsys.readouterr().out
    assert "peak RSS MB" in out and "header check (data.check=header)" in out


def test_captions_folder_walks_subdirectories_and_leaves_hidden_files_out(tmp_path):
    pairs = make_pairs(4)
    root = tmp_path / "root"
    write_folder(root / "b", pairs[:2])
    write_folder(root / "a" / "deep", pairs[2:])
    write_folder(root / ".cache", pairs[:1])
    (root / "b" / "._000000.png").write_bytes(b"\x00\x05AppleDouble")
    index = scan("captions_folder", root)
    assert list(index.paths) == [f"a/deep/{pairs[2][0]}", f"a/deep/{pairs[3][0]}", f"b/{pairs[0][0]}",
                                 f"b/{pairs[1][0]}"]
    assert index.captions.to_lists() == [pairs[i][2] for i in (2, 3, 0, 1)] and not index.failures
