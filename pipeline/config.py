"""Typed, validated configuration: one dataclass per pipeline section (``config_sections``).

Defaults reproduce the paper (ImageNet 256, App. D of arXiv 2512.07829); named
files in ``configs/`` override them and ``params.yaml`` is the active config that
DVC tracks. Every field carries its help text and valid range here, so the CLI,
the docs and the validator read one source. A bad key, type or value raises
``UserError`` with one line naming the key, the value and what is valid.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any

import yaml

from fae_pipe.config_sections import (  # noqa: F401 (re-exported: the config's schema)
    F, Paths, Data, ImageEncoder, Extract, TextEncoder, EmbedText, Train, T, Fae, Decoder, Encode, Vae, Sit, Flow,
    Runtime, Storage, Sample, Evaluate, Probe, Config, section_names, top_keys,
)
from fae_pipe.errors import UserError

DEFAULT_CONFIG = "params.yaml"


def _is_group(cls, f: dataclasses.Field) -> bool:
    return dataclasses.is_dataclass(typing.get_type_hints(cls)[f.name])


def iter_keys(section: str) -> list[tuple[str, dataclasses.Field]]:
    """Every leaf key of ``section`` as ``(dotted key, field)``, nested groups flattened (``sit.train.lr``)."""
    out: list[tuple[str, dataclasses.Field]] = []
    if section in top_keys():
        return [(section, next(f for f in dataclasses.fields(Config) if f.name == section))]

    def walk(cls, prefix: str) -> None:
        for f in dataclasses.fields(cls):
            if _is_group(cls, f):
                walk(typing.get_type_hints(cls)[f.name], f"{prefix}.{f.name}")
            else:
                out.append((f"{prefix}.{f.name}", f))

    walk(typing.get_type_hints(Config)[section], section)
    return out


def get_key(cfg: Config, key: str) -> Any:
    """The value of a dotted key (``fae.train.lr``)."""
    obj = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


# Keys of earlier releases -> their names now; a user's old config gets a one-line pointer.
RENAMED_SECTIONS = {"encoder": "image_encoder"}
RENAMED_KEYS = {"decoder.stage": "decoder.phase"}
MOVED_TO_TRAIN = ("fae", "decoder", "sit")  # flat loop keys of these sections now live in <section>.train


def renamed(key: str) -> str | None:
    """The current name of a key written for an earlier release, or None."""
    parts = key.split(".")
    if parts[0] in RENAMED_SECTIONS:
        return ".".join([RENAMED_SECTIONS[parts[0]], *parts[1:]])
    if key in RENAMED_KEYS:
        return RENAMED_KEYS[key]
    train_keys = {f.name for f in dataclasses.fields(Train)}
    if len(parts) == 2 and parts[0] in MOVED_TO_TRAIN and parts[1] in train_keys:
        return f"{parts[0]}.train.{parts[1]}"
    return None


def _type_name(tp) -> str:
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string", list: "a list",
            dict: "a mapping"}[tp]


def coerce(key: str, value: Any, f: dataclasses.Field, where: str, owner) -> Any:
    """Convert ``value`` to the type of field ``f`` (of dataclass ``owner``) and check its constraints."""
    hints = typing.get_type_hints(owner)
    tp = hints[f.name]
    meta = f.metadata
    loc = f" ({where})" if where else ""

    def bad(what: str):
        return UserError(f"config error{loc}: {key} = {value!r} is invalid: expected {what}")

    if tp is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            value = value.lower() in ("true", "1", "yes")
        if not isinstance(value, bool):
            raise bad("true or false")
    elif tp is int:
        if isinstance(value, str):
            try:
                value = int(value.replace("_", ""))
            except ValueError:
                raise bad(_type_name(int)) from None
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad(_type_name(int))
    elif tp is float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise bad(_type_name(float)) from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad(_type_name(float))
        value = float(value)
    elif tp is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str):
            raise bad(_type_name(str))
    elif tp is list:
        if isinstance(value, str):
            try:
                value = yaml.safe_load(value) if value.strip().startswith("[") else [v for v in value.split(",") if v]
            except yaml.YAMLError:
                raise bad("a list like [a, b] or a,b") from None
        if not isinstance(value, list):
            raise bad(_type_name(list))
    elif tp is dict:
        if isinstance(value, str):
            try:
                value = yaml.safe_load(value) if value.strip() else {}
            except yaml.YAMLError:
                raise bad("a mapping like {s3: {anon: true}}") from None
        if not isinstance(value, dict):
            raise bad(_type_name(dict))
    choices = meta.get("choices")
    if choices is not None and "fp32" in choices and value in ("no", False):
        value = "fp32"  # accelerate's spelling; YAML 1.1 also reads a bare `no` as false
    if choices is not None:
        items = value if tp is list else [value]
        for item in items:
            if item not in choices:
                raise bad("one of " + ", ".join(map(str, choices)))
    lo, hi = meta.get("min"), meta.get("max")
    if lo is not None and value < lo:
        raise bad(f"a value >= {lo}")
    if hi is not None and value > hi:
        raise bad(f"a value <= {hi}")
    return value


def _resolve(key: str, where: str) -> tuple[Any, dataclasses.Field]:
    """The dataclass *type* owning the leaf ``key`` and its field; a one-line error for unknown keys."""
    parts = key.split(".")
    sections = section_names()
    if key in top_keys():
        return Config, next(f for f in dataclasses.fields(Config) if f.name == key)
    new = renamed(key)
    if new is not None:
        raise UserError(f"config error ({where}): key '{key}' was renamed: use '{new}'")
    if len(parts) < 2 or parts[0] not in sections:
        raise UserError(f"config error ({where}): unknown key '{key}'; sections are: {', '.join(sections)}")
    cls = typing.get_type_hints(Config)[parts[0]]
    for i, name in enumerate(parts[1:], start=1):
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if name not in fields:
            here = ".".join(parts[:i])
            raise UserError(f"config error ({where}): unknown key '{key}'; valid keys in '{here}': "
                            f"{', '.join(fields)}")
        f = fields[name]
        last = i == len(parts) - 1
        if _is_group(cls, f):
            if last:
                raise UserError(f"config error ({where}): '{key}' is a group of keys; set one of "
                                f"{', '.join(k for k, _ in iter_keys(parts[0]) if k.startswith(key + '.'))}")
            cls = typing.get_type_hints(cls)[name]
        elif not last:
            raise UserError(f"config error ({where}): unknown key '{key}': '{'.'.join(parts[:i + 1])}' is a value, "
                            "not a group")
        else:
            return cls, f
    raise AssertionError(key)


def set_key(cfg: Config, key: str, value: Any, where: str = "command line") -> None:
    """Validate ``value`` for the dotted ``key`` and set it (the one validation path of every command)."""
    owner, f = _resolve(key, where)
    parent = cfg
    for part in key.split(".")[:-1]:
        parent = getattr(parent, part)
    setattr(parent, f.name, coerce(key, value, f, where, owner))


def _flatten(prefix: str, values: Any, where: str) -> dict[str, Any]:
    """A YAML mapping under ``prefix`` -> dotted leaf keys (nested groups are mappings too)."""
    if not isinstance(values, dict):
        raise UserError(f"config error ({where}): '{prefix}' must be a mapping of keys, got {type(values).__name__}")
    out: dict[str, Any] = {}
    for name, value in values.items():
        key = f"{prefix}.{name}"
        if isinstance(value, dict) and not _is_mapping_key(key):
            out.update(_flatten(key, value, where))
        else:
            out[key] = value
    return out


def _is_mapping_key(key: str) -> bool:
    """True when ``key`` is a leaf whose value is itself a mapping (``storage.options``)."""
    try:
        owner, f = _resolve(key, "")
    except UserError:
        return False
    return typing.get_type_hints(owner)[f.name] is dict


def parse_sets(items) -> dict[str, str]:
    """``--set section.key=value`` items -> overrides; a malformed item is a one-line error."""
    overrides: dict[str, str] = {}
    for item in items:
        if "=" not in item or not item.split("=", 1)[0].strip():
            raise UserError(f"--set {item!r} is invalid: expected SECTION.KEY=VALUE, e.g. sit.train.lr=2e-4")
        key, value = item.split("=", 1)
        overrides[key.strip()] = value
    return overrides


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Defaults, then the YAML file (``params.yaml`` when present and none is given), then overrides."""
    cfg = Config()
    if path is None and Path(DEFAULT_CONFIG).exists():
        path = DEFAULT_CONFIG
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"config error: file '{p}' not found; pass --config with an existing YAML file")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            line = getattr(getattr(e, "problem_mark", None), "line", None)
            at = f" at line {line + 1}" if line is not None else ""
            raise UserError(f"config error: '{p}' is not valid YAML{at}") from None
        if not isinstance(raw, dict):
            raise UserError(f"config error: '{p}' must be a mapping of sections, got {type(raw).__name__}")
        for section, values in raw.items():
            if section in RENAMED_SECTIONS:
                raise UserError(f"config error ({p}): section '{section}' was renamed: use "
                                f"'{RENAMED_SECTIONS[section]}'")
            if section in top_keys():
                set_key(cfg, section, values, str(p))
                continue
            if section not in section_names():
                raise UserError(f"config error ({p}): unknown section '{section}'; valid: {', '.join(section_names())}")
            for key, value in _flatten(section, values, str(p)).items():
                set_key(cfg, key, value, str(p))
        cfg.source = str(p)
    for key, value in (overrides or {}).items():
        set_key(cfg, key, value, "command line")
    _check_cross_field(cfg)
    return cfg


def _check_patch_multiple(key: str, enc: ImageEncoder) -> None:
    """input_size a multiple of the patch timm spells in the name (``_patch14``), checked before any model is
    built; names without it are checked when built (``fae_pipe.encoders``, the owner of every encoder fact)."""
    import re

    found = re.search(r"_patch(\d+)", enc.name)
    if found and enc.input_size % int(found.group(1)):
        p = int(found.group(1))
        raise UserError(f"config error: {key}.input_size = {enc.input_size} is invalid: expected a multiple of {p}, "
                        f"the patch of {enc.name} ({16 * p} gives a 16x16 token grid)")


def _check_data_source(d) -> None:
    """data.source and the two demo sets: which combinations mean something."""
    if d.demo and d.caption_demo:
        raise UserError("config error: data.demo and data.caption_demo are both true: give one (class demo or "
                        "caption demo)")
    if d.demo and d.source != "folder":
        raise UserError(f"config error: data.demo = true writes a class folder, but data.source = {d.source}: "
                        "use data.source=folder")
    if d.caption_demo and d.source not in ("folder", "manifest"):
        raise UserError(f"config error: data.caption_demo = true indexes the demo's manifest, but data.source = "
                        f"{d.source}: use data.source=manifest (or leave it at folder)")
    if d.caption_demo and d.manifest:
        raise UserError(f"config error: data.caption_demo = true indexes the manifest it writes (root/manifest.jsonl), "
                        f"but data.manifest = {d.manifest!r}: leave data.manifest empty")
    if d.source == "manifest" and not d.manifest and not d.caption_demo:
        raise UserError("config error: data.source = manifest needs data.manifest (a .jsonl, .csv or .parquet file)")


def _check_cross_field(cfg: Config) -> None:
    """Constraints between keys, reported like single-key errors."""
    for key in ("image_encoder", "evaluate.reference_encoder"):
        _check_patch_multiple(key, get_key(cfg, key))
    if cfg.text_encoder.random_width % 4:
        raise UserError(f"config error: text_encoder.random_width = {cfg.text_encoder.random_width} is invalid: "
                        "expected a multiple of 4 (the random T5's heads)")
    if not cfg.data.views:
        raise UserError("config error: data.views = [] is invalid: expected at least one of orig, flip")
    if len(set(cfg.data.views)) != len(cfg.data.views):
        raise UserError(f"config error: data.views = {cfg.data.views} is invalid: views must not repeat")
    _check_data_source(cfg.data)
    for seg in cfg.sample.guidance:
        if not (isinstance(seg, list) and len(seg) == 3 and all(isinstance(v, (int, float)) for v in seg)):
            raise UserError(f"config error: sample.guidance segment {seg!r} is invalid: expected [t_start, t_end, scale]")


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
