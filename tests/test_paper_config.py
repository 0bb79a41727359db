"""configs/imagenet256.yaml carries the paper's App. D numbers, and every model it names builds.

Models are built on the meta device (no memory) from the config's own model names,
with the shapes the config implies (DINOv2-g/14 at 224 px -> 16x16x1536 tokens,
C = 32 latents, SiT patch 1), and their parameter counts are checked against App. D.
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
