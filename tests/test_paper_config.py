"""configs/imagenet256.yaml carries the paper's App. D numbers, and every model it names builds.

Models are built on the meta device (no memory) from the config's own model names,
with the shapes the config implies (DINOv2-g/14 at 224 px -> 16x16x1536 tokens,
C = 32 latents, SiT patch 1), and their parameter counts are checked against App. D.
configs/t2i_cc12m.yaml (the text-to-image system) likewise: its MMDiT on the FAE's latent
grid with the text store's width, and the text store's bytes per sample at CC12M scale.
"""

from pathlib import Path

import pytest
import torch

from fae_pipe.config import load_config
from fae_pipe.models.registry import count_parameters, create_model, fae_parts

PAPER = Path(__file__).resolve().parents[1] / "configs" / "imagenet256.yaml"


@pytest.fixture(scope="module")
def cfg():
    return load_config(PAPER)


def test_config_holds_the_papers_settings(cfg):
    assert (cfg.image_encoder.name, cfg.image_encoder.input_size) == ("vit_giant_patch14_dinov2", 224)
    assert cfg.data.image_size == 256 and cfg.data.views == ["orig", "flip"]
    assert (cfg.fae.train.lr, cfg.fae.train.warmup, cfg.fae.train.steps, cfg.fae.train.batch_size) == (1e-4, 1000, 1_000_000, 1024)
    assert (cfg.decoder.noise_sigma, cfg.decoder.train.steps, cfg.decoder.train.batch_size) == (0.4, 1_000_000, 512)
    assert (cfg.sit.model, cfg.sit.patch_size, cfg.sit.train.steps, cfg.sit.train.batch_size) == ("sit_xl", 1, 2_000_000, 512)
    assert (cfg.sit.train.lr, cfg.sit.train.warmup, cfg.sit.shift_mode, cfg.sit.shift) == (1e-4, 0, "auto", 0.4)
    from fae_pipe.transport import resolve_shift_mode

    assert resolve_shift_mode(cfg.sit.shift_mode, cfg.sit.input) == "scalar"  # the paper's 0.4 on FAE latents
    assert cfg.sample.steps == 250 and cfg.sample.guidance[-1] == [0.0, 0.7, 2.5]


def test_every_model_builds_on_meta_with_app_d_counts(cfg):
    parts = fae_parts(cfg.fae.model)
    expected = {"encoder": 38.17e6, "feature_decoder": 170.43e6, "pixel_decoder": 305.36e6}
    with torch.device("meta"):
        for part, name in parts.items():
            assert count_parameters(create_model(name)) == pytest.approx(expected[part], rel=0.01), name
        sit = create_model(cfg.sit.model, in_channels=32, input_size=16, patch_size=cfg.sit.patch_size,
                           num_classes=1000)
        assert count_parameters(sit) == pytest.approx(675e6, rel=0.01)
        disc = create_model(cfg.decoder.discriminator)
        assert count_parameters(disc) > 0
    with torch.device("meta"):
        enc = create_model(parts["encoder"])
        x = torch.empty(2, 256, 1536)
        mean, logvar = enc(x)
    assert tuple(mean.shape) == (2, 256, 32) and tuple(logvar.shape) == (2, 256, 32)


# ---- configs/t2i_cc12m.yaml: the paper's text-to-image system (CC12M, MMDiT ~600M) ------------------------
T2I_PAPER = PAPER.with_name("t2i_cc12m.yaml")
FLAN_T5_XL_WIDTH = 2048  # d_model of google/flan-t5-xl's config.json: the width embed-text stores
CC12M_CAPTIONS_PER_SAMPLE = 1  # one alt-text per CC12M image (img2dataset's .txt)
CC12M_SAMPLES = 12_000_000


@pytest.fixture(scope="module")
def t2i_cfg():
    return load_config(T2I_PAPER)


@pytest.fixture(scope="module")
def cc12m_text_store(t2i_cfg, tmp_path_factory):
    """An empty text.zarr with the config's shapes, created by the schema owner (what embed-text creates)."""
    import numpy as np

    from fae_pipe.cache import schema

    path = tmp_path_factory.mktemp("cc12m") / "text.zarr"
    length = t2i_cfg.text_encoder.max_length
    schema.create_text_store(path, 2, CC12M_CAPTIONS_PER_SAMPLE, length, FLAN_T5_XL_WIDTH, 2, 1, {},
                             np.zeros((length, FLAN_T5_XL_WIDTH), np.float16), 1)
    group, kind = schema.open_store(path)
    assert kind == schema.KIND_TEXT
    return group


def test_t2i_config_holds_the_papers_system(t2i_cfg):
    c = t2i_cfg
    assert (c.data.source, c.data.check, c.data.image_size, c.data.views) == ("webdataset", "stat", 256, ["orig"])
    assert c.data.root.endswith(".tar") and "{" in c.data.root  # a shard pattern
    assert (c.image_encoder.name, c.image_encoder.input_size, c.fae.model) == (
        "vit_giant_patch14_dinov2", 224, "fae_dinov2_g")
    assert c.text_encoder.weights not in ("", "random") and c.text_encoder.max_length == 128
    assert (c.t2i.model, c.t2i.patch_size, c.t2i.shift_mode, c.t2i.shift) == ("mmdit_600m", 1, "scalar", 0.4)
    t = c.t2i.train
    assert (t.batch_size, t.steps, t.lr, t.warmup, t.schedule, t.ema_decay) == (
        1024, 500_000, 1e-4, 1000, "constant", 0.9999)
    assert c.sample.prompts.endswith(".txt") and c.sample.num_samples == 30_000
    assert (c.sample.method, c.sample.steps, c.sample.guidance) == ("euler", 250, [[0.0, 0.9, 4.0]])
    from fae_pipe.transport.guidance import GuidanceSchedule

    GuidanceSchedule(c.sample.guidance)  # a valid guidance interval


def test_t2i_mmdit_builds_on_meta_with_its_pinned_size(t2i_cfg, cc12m_text_store):
    from fae_pipe.cache import schema
    from fae_pipe.models.registry import model_kwargs, require_kind

    c = t2i_cfg
    require_kind(c.t2i.model, "text_generator", "t2i.model", "text-to-image generator")
    parts = fae_parts(c.fae.model)
    channels = model_kwargs(parts["encoder"])["latent_channels"]
    grid = c.image_encoder.input_size // 14  # DINOv2-g/14 tokens per side
    assert (channels, grid, model_kwargs(parts["pixel_decoder"])["grid_size"]) == (32, 16, 16)
    width = int(cc12m_text_store[schema.TOKENS].shape[-1])
    kwargs = model_kwargs(c.t2i.model, in_channels=channels, input_size=grid, patch_size=c.t2i.patch_size,
                          text_dim=width, pooled_dim=0)  # T5 has no pooled vector (as train-t2i passes it)
    with torch.device("meta"):
        net = create_model(c.t2i.model, **kwargs)
    assert count_parameters(net) == 599_560_224  # the paper's "about 600M" (604M)


def test_t2i_text_store_bytes_per_sample(t2i_cfg, cc12m_text_store):
    """The store is uncompressed, so its bytes per sample are its per-sample shapes times their dtypes."""
    import numpy as np

    from fae_pipe.cache import schema

    assert schema.COMPRESSORS is None  # else the number below is an upper bound, not the size on disk
    group = cc12m_text_store
    per_sample = sum(int(np.prod(a.shape[1:])) * a.dtype.itemsize for name, a in group.arrays()
                     if name not in schema.EMPTY_DIMENSIONS)  # the empty caption is stored once, not per sample
    # 1 caption x 128 tokens x 2048 fp16 + int32 length + int64 sample id + bool valid
    assert per_sample == 1 * 128 * 2048 * 2 + 4 + 8 + 1 == 524_301
    assert per_sample * CC12M_SAMPLES / 1e12 == pytest.approx(6.29, abs=0.01)  # TB for CC12M (config comment)
