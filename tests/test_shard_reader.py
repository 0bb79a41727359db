"""ShardReader: the direct file path returns exactly what zarr returns, and falls back when it must."""

import numpy as np
import pytest
import zarr
from zarr.codecs import ZstdCodec

from fae_pipe.cache import schema
from fae_pipe.cache.shard_reader import ShardReader


def _latent_store(path, n=70, shard=32, chunk=8):
    group = schema.create_latent_store(path, n, 2, 3, (2, 2), shard, chunk, {}, store_std=True)
    rng = np.random.default_rng(0)
    group[schema.LATENTS][:] = rng.standard_normal((n, 2, 3, 2, 2)).astype(np.float16)
    group[schema.STD][:] = rng.random((n, 2, 3, 2, 2)).astype(np.float16)
    group[schema.LABELS][:] = rng.integers(0, 5, n)
    group[schema.SAMPLE_IDS][:] = np.arange(n) * 3
    group[schema.VALID][:] = rng.random(n) > 0.2
    return zarr.open_group(str(path), mode="r")


def test_direct_reads_equal_zarr_for_every_array_and_shard(tmp_path):
    group = _latent_store(tmp_path / "l.zarr")  # 70 rows: shards of 32, 32 and a short 6 (one partial chunk)
    for name in schema.sample_array_names(group):
        arr, reader = group[name], ShardReader(group[name])
        assert reader.direct, name
        for s in range(3):
            got, mapped = reader.read(s), reader.map(s)
            np.testing.assert_array_equal(got, arr[s * 32:(s + 1) * 32])
            np.testing.assert_array_equal(mapped, got)
            assert got.dtype == mapped.dtype == arr.dtype and not mapped.flags.writeable
        assert (reader.direct_reads, reader.zarr_reads) == (6, 0), name


def test_compressed_store_is_read_through_zarr(tmp_path):
    arr = zarr.create_array(str(tmp_path / "c.zarr"), shape=(40, 2, 4), chunks=(4, 2, 4), shards=(20, 2, 4),
                            dtype="float16", compressors=ZstdCodec(level=1))
    arr[:] = np.arange(320, dtype=np.float16).reshape(40, 2, 4)
    reader = ShardReader(zarr.open_array(str(tmp_path / "c.zarr"), mode="r"))
    assert not reader.direct and reader.map(1) is None
    np.testing.assert_array_equal(reader.read(1), arr[20:40])
    assert reader.zarr_reads == 1


def test_empty_inner_chunks_fall_back_to_zarr_fill_values(tmp_path):
    arr = zarr.create_array(str(tmp_path / "e.zarr"), shape=(16, 3), chunks=(4, 3), shards=(16, 3),
                            dtype="float32", fill_value=7, compressors=None, config={"write_empty_chunks": False})
    arr[8:12] = 1.5  # chunks 0, 1 and 3 are never written: the index marks them empty
    reader = ShardReader(zarr.open_array(str(tmp_path / "e.zarr"), mode="r"))
    assert reader.direct and reader.map(0) is None  # the index says chunk 0 is empty
    got = reader.read(0)
    assert (reader.direct_reads, reader.zarr_reads) == (0, 1)
    np.testing.assert_array_equal(got, np.where(np.arange(16)[:, None] // 4 == 2, 1.5, 7.0).repeat(3, 1))


def test_corrupt_shard_index_is_not_trusted(tmp_path):
    group = _latent_store(tmp_path / "l.zarr")
    victim = schema.shard_file(tmp_path / "l.zarr", group, schema.LATENTS, 1)
    raw = bytearray(victim.read_bytes())
    raw[-20] ^= 0xFF  # a bit flip inside the index: its CRC32C no longer matches
    victim.write_bytes(bytes(raw))
    reader = ShardReader(group[schema.LATENTS])
    np.testing.assert_array_equal(reader.read(0), group[schema.LATENTS][:32])
    with pytest.raises(Exception, match="checksum"):
        reader.read(1)  # the direct path declines, zarr raises its own checksum error
    assert reader.direct_reads == 1  # only shard 0 came through the direct path


def test_buffer_must_fit_the_shard(tmp_path):
    group = _latent_store(tmp_path / "l.zarr")
    reader = ShardReader(group[schema.LATENTS])
    with pytest.raises(ValueError, match="does not fit"):
        reader.read_into(2, np.empty((32, 2, 3, 2, 2), np.float16))  # shard 2 holds only 6 rows


@pytest.mark.parametrize("kind", [schema.KIND_FEATURES, schema.KIND_LATENTS])
def test_stores_the_pipeline_writes_take_the_direct_path(tmp_path, kind):
    """Guards the zarr pin in setup.cfg: ShardReader parses zarr's shard files itself.

    A zarr release that changes how these stores are laid out (codec pipeline, index
    place or format, chunk order) must fail here, not silently fall back to the slow
    zarr path in every training run.
    """
    from fae_pipe.cache.shards import write_shard

    path, n, shard = tmp_path / f"{kind}.zarr", 40, 16
    if kind == schema.KIND_FEATURES:
        group = schema.create_feature_store(path, n, 2, 4, 3, (2, 2), shard, 4, {})
    else:
        group = schema.create_latent_store(path, n, 2, 3, (2, 2), shard, 4, {}, store_std=True)
    rng = np.random.default_rng(1)
    for s in range(schema.store_num_shards(group)):  # the writers' own path: one write per array and shard
        start, stop = schema.shard_bounds(n, shard, s)
        arrays = {name: rng.standard_normal((stop - start, *group[name].shape[1:])).astype(group[name].dtype)
                  for name in schema.sample_array_names(group)}
        write_shard(group, path, s, start, stop, arrays, {}, "hash", 0.0)
    group = zarr.open_group(str(path), mode="r")
    for name in schema.sample_array_names(group):
        arr, reader = group[name], ShardReader(group[name])
        layout = (f"zarr {zarr.__version__} laid out {kind} array {name!r} as codecs {arr.metadata.codecs}, "
                  f"chunks {arr.chunks}, shards {arr.shards}")
        assert reader.direct, f"{layout}: ShardReader does not understand it ({reader.not_direct})"
        full = schema.shard_file(path, group, name, 0).stat().st_size
        assert full == shard * reader.row_nbytes + reader.index_nbytes, (
            f"{layout}: a full shard file is {full} bytes, ShardReader expects the C-order rows "
            f"({shard * reader.row_nbytes}) then the index ({reader.index_nbytes})")
        for s in range(schema.store_num_shards(group)):
            lo, hi = reader.bounds(s)
            np.testing.assert_array_equal(reader.read(s), arr[lo:hi])
            np.testing.assert_array_equal(reader.map(s), arr[lo:hi])
        assert reader.zarr_reads == 0 and reader.direct_reads == 2 * schema.store_num_shards(group), (
            f"{layout}: {reader.zarr_reads} shard read(s) fell back to zarr: the shard index does not match "
            "the layout ShardReader expects")
