"""The binary index (fae-pipe-index/2): round trip, the JSON format's compatibility, damage, PathColumn."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fae_pipe.data.index import INDEX_SCHEMA, JSON_SCHEMA, DatasetIndex, PathColumn, read_index, write_index
from fae_pipe.errors import UserError


def small_index(n: int = 7) -> DatasetIndex:
    paths = [f"c{i % 3}/ü-{i:03d}.png" for i in range(n)]  # non-ASCII: the blob is UTF-8
    return DatasetIndex(root="data/train", classes=["c0", "c1", "c2"], paths=paths,
                        labels=[i % 3 for i in range(n)], sizes=[100 + i for i in range(n)],
                        holdout=[i == 4 for i in range(n)], seed=5, holdout_fraction=0.1,
                        failures=[{"path": "c1/bad.png", "reason": "zero-byte file"}])


def test_binary_round_trip_keeps_every_column_and_the_fingerprint(tmp_path):
    index = small_index()
    path = write_index(index, tmp_path / "index.npz")
    assert path.read_bytes()[:2] == b"PK"
    back = read_index(path)
    assert isinstance(back.paths, PathColumn) and back.paths == index.paths and list(back.paths) == list(index.paths)
    assert back.paths[1] == "c1/ü-001.png" and back.paths[-1] == "c0/ü-006.png" and back.paths[2:4] == index.paths[2:4]
    assert back.abspath(1) == index.abspath(1)
    for name in ("labels", "sizes", "holdout", "ids"):
        assert np.array_equal(getattr(back, name), getattr(index, name)), name
    assert (back.root, back.classes, back.seed, back.holdout_fraction, back.failures) == \
        (index.root, index.classes, index.seed, index.holdout_fraction, index.failures)
    assert back.fingerprint == index.fingerprint == back.recompute_fingerprint()


def test_json_path_writes_the_first_format_and_both_give_one_fingerprint(tmp_path):
    index = small_index()
    doc = json.loads(write_index(index, tmp_path / "index.json").read_text())
    assert doc["schema"] == JSON_SCHEMA and doc["samples"]["path"] == list(index.paths)
    old, new = read_index(tmp_path / "index.json"), read_index(write_index(index, tmp_path / "index.npz"))
    assert old.fingerprint == new.fingerprint and old.paths == new.paths


def test_damaged_binary_index_is_one_line_naming_the_file(tmp_path):
    path = write_index(small_index(50), tmp_path / "index.npz")
    data = bytearray(path.read_bytes())
    data[data.index(b"c0/")] = ord("X")  # a flipped byte of the path blob: the zip CRC catches it
    path.write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"index '.*index.npz' is corrupt \(.*\): run `fae-pipe prepare` again"):
        read_index(path)
    good = write_index(small_index(50), tmp_path / "good.npz")
    with np.load(good) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["label"][3] = 2  # a consistent zip whose columns no longer match the header's checksum
    with open(tmp_path / "edited.npz", "wb") as f:
        np.savez(f, **arrays)
    with pytest.raises(UserError, match=r"is corrupt \(its columns do not match their checksum\)"):
        read_index(tmp_path / "edited.npz")
    path.write_bytes(bytes(data[:200]))  # truncated zip
    with pytest.raises(UserError, match=r"is corrupt \(unreadable binary index"):
        read_index(path)
    other = tmp_path / "other.npz"
    np.savez(other, header=np.frombuffer(json.dumps({"schema": "someone-else/9"}).encode(), np.uint8))
    with pytest.raises(UserError, match="is corrupt"):
        read_index(other)
    (tmp_path / "wrong.npz").write_text('{"schema": "nope"}')
    with pytest.raises(UserError, match=f"expected schema {JSON_SCHEMA} \\(JSON\\) or {INDEX_SCHEMA} \\(binary\\)"):
        read_index(tmp_path / "wrong.npz")


def test_path_column_is_a_sequence_of_str_without_a_str_per_row():
    col = PathColumn.from_strings(["a/x.png", "", "b/ÿ.png"])
    assert len(col) == 3 and col[1] == "" and col[-1] == "b/ÿ.png" and list(col) == ["a/x.png", "", "b/ÿ.png"]
    assert col == ["a/x.png", "", "b/ÿ.png"] and col != ["a/x.png"] and col != "a/x.png"
    assert col.blob.dtype == np.uint8 and col.offsets.tolist() == [0, 7, 7, 15]
    with pytest.raises(IndexError):
        col[3]
    with pytest.raises(ValueError, match="offsets"):
        PathColumn(b"abc", np.array([0, 5]))


def test_caption_column_round_trips_in_both_formats_and_owns_part_of_the_fingerprint(tmp_path):
    plain = small_index(5)
    caps = [["two red circles", "red circles, two"], [], ["ünïcode caption"], ["a", "b", "c"], ["x"]]
    index = DatasetIndex(**{k: getattr(plain, k) for k in ("root", "classes", "paths", "labels", "sizes", "holdout",
                                                           "seed", "holdout_fraction")}, captions=caps)
    assert index.captions.to_lists() == caps and index.captions.of(3) == ["a", "b", "c"] and index.captions.of(1) == []
    assert index.captions.counts.tolist() == [2, 0, 1, 3, 1]
    assert index.fingerprint != plain.fingerprint  # captions are part of the dataset
    for name in ("index.npz", "index.json"):
        back = read_index(write_index(index, tmp_path / name))
        assert back.captions == index.captions and back.fingerprint == index.fingerprint, name
    edited = [list(c) for c in caps]
    edited[2] = ["another caption"]
    assert DatasetIndex(**{k: getattr(index, k) for k in ("root", "classes", "paths", "labels", "sizes", "holdout",
                                                          "seed", "holdout_fraction")},
                        captions=edited).fingerprint != index.fingerprint
    # a class-labelled index stays byte-compatible: no caption columns, the first format's fingerprint
    with np.load(write_index(plain, tmp_path / "plain.npz")) as z:
        assert not any(f.startswith("caption") for f in z.files)
    assert read_index(tmp_path / "plain.npz").captions is None
    with pytest.raises(ValueError, match="captions for 4"):
        DatasetIndex(root="r", classes=["c"], paths=["a", "b", "c", "d", "e"], labels=[0] * 5, captions=caps[:4])
