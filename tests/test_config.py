"""The config schema: nested train groups, renamed keys with one-line pointers, one set of paper defaults."""

import dataclasses

import pytest
import yaml

from fae_pipe.config import Config, Train, iter_keys, load_config
from fae_pipe.errors import UserError


def write(tmp_path, data) -> str:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_nested_train_groups_load_from_yaml_and_from_set(tmp_path):
    cfg = load_config(write(tmp_path, {"sit": {"model": "sit_tiny", "train": {"lr": 2e-4, "log_every": 1}}}),
                      {"fae.train.steps": "7", "decoder.phase": "2"})
    assert (cfg.sit.model, cfg.sit.train.lr, cfg.sit.train.log_every) == ("sit_tiny", 2e-4, 1)
    assert cfg.sit.train.schedule == "constant" and cfg.sit.train.ema_decay == 0.9999  # untouched: sit defaults
    assert cfg.fae.train.steps == 7 and cfg.decoder.phase == 2
    assert cfg.to_dict()["sit"]["train"]["lr"] == 2e-4


@pytest.mark.parametrize("data, new", [
    ({"encoder": {"name": "vit_small_patch14_dinov2"}}, "section 'encoder' was renamed: use 'image_encoder'"),
    ({"fae": {"lr": 1e-3}}, "key 'fae.lr' was renamed: use 'fae.train.lr'"),
    ({"sit": {"memory_budget_gb": 1.0}}, "key 'sit.memory_budget_gb' was renamed: use 'sit.train.memory_budget_gb'"),
    ({"decoder": {"stage": 2}}, "key 'decoder.stage' was renamed: use 'decoder.phase'"),
])
def test_a_config_of_an_earlier_release_names_the_new_key(tmp_path, data, new):
    path = write(tmp_path, data)
    with pytest.raises(UserError) as err:
        load_config(path)
    assert new in str(err.value) and path in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("data, message", [
    ({"sit": {"train": 5}}, "'sit.train' is a group of keys; set one of sit.train.steps"),
    ({"sit": {"train": {"nope": 1}}}, "unknown key 'sit.train.nope'; valid keys in 'sit.train': steps, batch_size"),
    ({"sit": {"model": {"x": 1}}}, "unknown key 'sit.model.x': 'sit.model' is a value, not a group"),
    ({"sit": {"train": {"precision": "fp8"}}}, "sit.train.precision = 'fp8' is invalid: expected one of fp32, bf16"),
])
def test_bad_nested_values_are_one_line_errors(tmp_path, data, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(write(tmp_path, data))


def test_a_group_is_not_a_value():
    with pytest.raises(UserError, match="'fae.train' is a group of keys; set one of fae.train.steps"):
        load_config(None, {"fae.train": "1"})


def test_every_training_section_has_the_same_train_keys_with_its_own_paper_defaults():
    cfg = Config()
    names = [f.name for f in dataclasses.fields(Train)]
    for section in ("fae", "decoder", "sit"):
        assert [k.split(".")[-1] for k, _ in iter_keys(section) if ".train." in k] == names
    assert (cfg.fae.train.steps, cfg.fae.train.batch_size, cfg.fae.train.schedule) == (1_000_000, 1024, "cosine")
    assert (cfg.decoder.train.batch_size, cfg.decoder.train.warmup) == (512, 1000)
    assert (cfg.sit.train.steps, cfg.sit.train.warmup, cfg.sit.train.keep_last) == (2_000_000, 0, 3)
    assert cfg.runtime.attention == "sdpa"
