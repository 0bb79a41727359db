"""dvc.yaml's deps are complete: no edit to code or upstream data can leave an artefact silently stale.

For every stage, ``fae-pipe <command>`` names a stage module (``fae_pipe.cli.COMMANDS``);
its import closure within ``fae_pipe`` is computed statically (module-level and
function-local imports, relative imports, the ``__init__.py`` of every package on
the way, and string literals naming a module: ``importlib.import_module("fae_pipe.x")``
or the model registry's ``"fae_pipe.models.sit:SiT"`` builders). Every file of the
closure must be covered by a dep (the file or an ancestor directory). Every
``paths.<key>`` the closure uses that names another stage's output must be a dep
(``${paths.key}`` or a file under it); ``Path(paths.key) / NAME`` is resolved to
``${paths.key}/NAME`` when NAME is a string literal or a module constant. A key the
stage itself writes under is its output namespace, not an input. Deps are compared
as raw template strings; module files come from setup.cfg's ``package_dir``.

Params: every ``params:`` entry is a dotted path into params.yaml (a key, a section or a
nested group such as ``fae.train``), and every config section the command reads
(``fae_pipe.cli.COMMANDS[cmd][1]``) is listed whole or by at least one of its keys. A
partial list is meant for sections that mostly hold other stages' settings (``data.*``,
``paths.*``, ``fae.model``); which keys of a section matter is not checked statically.
"""

import ast
import configparser
import copy
import dataclasses
import re
import shlex
from functools import lru_cache
from pathlib import Path

import pytest
import yaml

from fae_pipe.cli import COMMANDS
from fae_pipe.config import Config

GENERATORS = next(f for f in dataclasses.fields(Config) if f.name == "generator").metadata["choices"]

REPO = Path(__file__).resolve().parents[1]
MODULE_STRING = re.compile(r"(fae_pipe(?:\.\w+)*)(?::\w+)?")


def _package_dirs() -> dict[str, str]:
    cfg = configparser.ConfigParser(interpolation=None)
    cfg.read(REPO / "setup.cfg")
    lines = [line.partition("=") for line in cfg["options"]["package_dir"].strip().splitlines()]
    return {pkg.strip(): d.strip() for pkg, _, d in lines}


PACKAGE_DIRS = _package_dirs()  # {"fae_pipe": "pipeline", "fae_pipe.stages": "stages"}


@lru_cache(maxsize=None)
def module_file(module: str) -> str | None:
    """Repository-relative file of a fae_pipe module (package -> its __init__.py), or None."""
    pkg = max((p for p in PACKAGE_DIRS if module == p or module.startswith(p + ".")), key=len, default=None)
    if pkg is None:
        return None
    base = Path(PACKAGE_DIRS[pkg], *module[len(pkg):].split(".")[1:])
    for cand in (base / "__init__.py", base.with_suffix(".py")):
        if (REPO / cand).is_file():
            return cand.as_posix()
    return None


@lru_cache(maxsize=None)
def parse(module: str) -> ast.Module:
    return ast.parse((REPO / module_file(module)).read_text(), module_file(module))


def from_base(module: str, node: ast.ImportFrom) -> str:
    """The absolute module of ``from <base> import ...`` (relative levels resolved)."""
    package = (module if module_file(module).endswith("__init__.py") else module.rpartition(".")[0]).split(".")
    parent = ".".join(package[:len(package) - node.level + 1]) if node.level else ""
    return ".".join(p for p in (parent, node.module) if p)


@lru_cache(maxsize=None)
def imported_modules(module: str) -> set[str]:
    """fae_pipe modules one module imports, anywhere in its body (lazy imports included)."""
    found = set()
    for node in ast.walk(parse(module)):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = from_base(module, node)
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)  # `from pkg import submodule`
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and MODULE_STRING.fullmatch(node.value):
            found.add(MODULE_STRING.fullmatch(node.value).group(1))
    return {m for m in found if module_file(m)}


def closure(root: str) -> dict[str, str]:
    """Every fae_pipe module importing ``root`` runs -> the module that imports it (root -> itself)."""
    via, todo = {}, [(root, root)]
    while todo:
        mod, importer = todo.pop(0)
        parts = mod.split(".")
        for m in (".".join(parts[:i]) for i in range(1, len(parts) + 1)):  # parent packages run first
            if module_file(m) and m not in via:
                via[m] = importer
                todo += [(sub, m) for sub in imported_modules(m)]
    return via


@lru_cache(maxsize=None)
def path_uses(module: str) -> set[tuple[str, str | None]]:
    """(key, sub-path or None) for each ``paths.key`` / ``x.paths.key`` (``Path(..) / NAME`` resolved)."""
    consts = {a.asname or a.name: constant(from_base(module, n), a.name) for n in ast.walk(parse(module))
              if isinstance(n, ast.ImportFrom) for a in n.names}
    consts.update({name: constant(module, name) for name in assignments(module)})

    def is_use(n):
        return isinstance(n, ast.Attribute) and (isinstance(n.value, ast.Name) and n.value.id == "paths"
                                                 or isinstance(n.value, ast.Attribute) and n.value.attr == "paths")
    uses, seen = set(), set()
    for n in ast.walk(parse(module)):
        if isinstance(n, ast.BinOp) and isinstance(n.op, ast.Div):
            left = n.left.args[0] if isinstance(n.left, ast.Call) and n.left.args else n.left
            sub = n.right.value if isinstance(n.right, ast.Constant) else consts.get(getattr(n.right, "id", None))
            if is_use(left) and isinstance(sub, str):
                uses.add((left.attr, sub))
                seen.add(id(left))
    return uses | {(n.attr, None) for n in ast.walk(parse(module)) if is_use(n) and id(n) not in seen}


def assignments(module: str) -> dict[str, ast.expr]:
    return {t.id: n.value for n in parse(module).body if isinstance(n, ast.Assign)
            for t in n.targets if isinstance(t, ast.Name)}


def constant(module: str, name: str) -> str | None:
    """The value of ``module.name`` when it is a module-level string literal."""
    value = assignments(module).get(name) if module_file(module) else None
    return value.value if isinstance(value, ast.Constant) and isinstance(value.value, str) else None


def covers(dep: str, target: str) -> bool:
    return target == dep or target.startswith(dep.rstrip("/") + "/")


def entries(stage: dict, *sections: str) -> list[str]:
    return [e if isinstance(e, str) else next(iter(e)) for s in sections for e in stage.get(s) or []]


def variants(stage: dict) -> list[tuple[str, str | None]]:
    """(fae-pipe command, generator) pairs a stage can run: ``train-${generator}`` is one per generator choice."""
    argv = shlex.split(stage["cmd"])
    if "${generator}" in argv[1]:
        pairs = [(argv[1].replace("${generator}", g), g) for g in GENERATORS]
    else:
        pairs = [(argv[1], None)]
    assert argv[0] == "fae-pipe" and all(c in COMMANDS for c, _ in pairs), f"not a fae-pipe stage command: {stage['cmd']}"
    return pairs


def commands(stage: dict) -> list[str]:
    """The fae-pipe command(s) a stage runs (every generator's, for ``train-${generator}``)."""
    return [c for c, _ in variants(stage)]


def stage_modules(stage: dict) -> list[str]:
    return [f"fae_pipe.stages.{COMMANDS[c][0]}" for c in commands(stage)]


def missing_deps(dvc: dict) -> list[str]:
    """One line per dep a stage lacks: a closure file, or an upstream artefact it reads."""
    problems = []
    outputs = {name: entries(st, "outs", "metrics", "plots") for name, st in dvc["stages"].items()}
    for name, stage in dvc["stages"].items():
        deps, own = entries(stage, "deps"), outputs[name]
        others = [o for other, outs in outputs.items() if other != name for o in outs]
        mods = {k: v for m in stage_modules(stage) for k, v in closure(m).items()}
        for mod, importer in sorted(mods.items(), key=lambda kv: module_file(kv[0])):
            if not any(covers(d, module_file(mod)) for d in deps):
                problems.append(f"dvc.yaml stage '{name}' does not depend on {module_file(mod)} (imported via {importer})")
        for mod in sorted(mods):
            for key, sub in sorted(path_uses(mod), key=str):
                target = f"${{paths.{key}}}" + (f"/{sub}" if sub else "")
                if any(covers(o, target) if sub else covers(target, o) for o in own):
                    continue  # the stage writes there
                upstream = any(covers(target, o) or covers(o, target) for o in others)
                if upstream and not any(covers(d, target) or covers(target, d) for d in deps):
                    problems.append(f"dvc.yaml stage '{name}' does not depend on {target} (paths.{key} used in {mod})")
    return list(dict.fromkeys(problems))


PIPELINES = ("dvc.yaml", "t2i/dvc.yaml")  # every pipeline whose stages run `fae-pipe` from the repository root


def load_dvc(name: str = "dvc.yaml") -> dict:
    return yaml.safe_load((REPO / name).read_text())


def config_file(stage: dict) -> str:
    """The config file the stage's command reads: its ``--config FILE``, else params.yaml (DVC's default too)."""
    argv = shlex.split(stage["cmd"])
    return argv[argv.index("--config") + 1] if "--config" in argv else "params.yaml"


def load_yaml(name: str) -> dict:
    return yaml.safe_load((REPO / name).read_text())


# `runtime` need not be a param: runtime.attention picks the attention kernel (SDPA or xformers,
# numerically equal to ~1e-6), which changes how fast a stage runs, not what it writes.
UNTRACKED_SECTIONS = {"runtime"}


# Sections a pipeline's stage need not list: t2i/dvc.yaml samples a t2i export given by --export, so
# `sample`'s generator choice and SiT / flow settings (read only for those exports) play no part there.
NOT_READ = {("t2i/params.yaml", "sample"): {"generator", "sit", "flow"}}


def has_key(tree, dotted: str) -> bool:
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return False
        tree = tree[part]
    return True


def param_problems(dvc: dict) -> list[str]:
    """One line per params entry params.yaml lacks, or config section a stage reads but does not list."""
    problems = []
    for name, stage in dvc["stages"].items():
        config = config_file(stage)
        for command, generator in variants(stage):  # ``${generator}`` in a param expands as DVC expands it
            declared = []  # existing keys of the file `fae-pipe <cmd>` reads
            for e in stage.get("params") or []:
                files = e if isinstance(e, dict) else {"params.yaml": [e]}  # `- other.yaml: [keys]`: another file
                for file, keys in files.items():
                    for k in keys or []:
                        k = k.replace("${generator}", generator) if generator else k
                        if not has_key(load_yaml(file), k):
                            problems.append(f"dvc.yaml stage '{name}' lists param '{k}', which {file} does not have")
                        elif file == config:
                            declared.append(k)
            for section in COMMANDS[command][1]:
                if section in NOT_READ.get((config, command), ()):
                    continue
                if section not in UNTRACKED_SECTIONS and not any(p == section or p.startswith(section + ".")
                                                                 for p in declared):
                    problems.append(f"dvc.yaml stage '{name}' reads config section '{section}' but lists neither "
                                    f"it nor a key of it under params")
    return list(dict.fromkeys(problems))


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_dvc_yaml_lists_every_code_and_data_dep(pipeline):
    problems = missing_deps(load_dvc(pipeline))
    assert not problems, "incomplete dvc.yaml deps:\n" + "\n".join(problems)


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_dvc_yaml_code_deps_exist(pipeline):
    stale = [f"{pipeline} stage '{name}' lists {d}, which does not exist"
             for name, st in load_dvc(pipeline)["stages"].items()
             for d in entries(st, "deps") if "${" not in d and not (REPO / d).exists()]
    assert not stale, "stale dvc.yaml deps (moved or deleted?):\n" + "\n".join(stale)


def test_closure_follows_lazy_and_string_imports():
    sample, sit = closure("fae_pipe.stages.sample"), closure("fae_pipe.stages.train_sit")
    assert sample["fae_pipe.cache.schema"] == "fae_pipe.stages.sample"  # imported inside class_names()
    assert sit["fae_pipe.models.sit"] == "fae_pipe.models.registry"  # "fae_pipe.models.sit:SiT" builder
    assert "fae_pipe" in sit and "fae_pipe.stages" in sit
    assert sit["fae_pipe.encoders.timm_vit"] == "fae_pipe.sampling.reference"  # lazy: the quality curve's scorer
    assert "fae_pipe.encoders" not in closure("fae_pipe.stages.train_fae")  # no over-inclusion
    assert ("latents", None) in path_uses("fae_pipe.stages.sample")
    assert ("fae_run", "fae.safetensors") in path_uses("fae_pipe.stages.encode")  # Path(..) / FAE_FILE


@pytest.mark.parametrize("stage, removed, expected", [
    ("encode", "pipeline/models/fae_encoder.py",
     "dvc.yaml stage 'encode' does not depend on pipeline/models/fae_encoder.py (imported via fae_pipe."),
    ("encode", "${paths.fae_run}/fae.safetensors",
     "dvc.yaml stage 'encode' does not depend on ${paths.fae_run}/fae.safetensors (paths.fae_run used in fae_pipe.stages.encode)"),
    ("sample", "${paths.latents}",
     "dvc.yaml stage 'sample' does not depend on ${paths.latents} (paths.latents used in fae_pipe.stages.sample)"),
], ids=["encode-code", "encode-data", "sample-data"])
def test_checker_reports_a_removed_dep(stage, removed, expected):
    dvc = load_dvc()
    broken = copy.deepcopy(dvc)  # an in-memory copy; dvc.yaml itself is not touched
    broken["stages"][stage]["deps"] = [d for d in entries(broken["stages"][stage], "deps") if not covers(d, removed)]
    problems = [p for p in missing_deps(broken) if p not in missing_deps(dvc)]
    assert any(p.startswith(expected) for p in problems), problems
    assert all(p.startswith(f"dvc.yaml stage '{stage}' ") for p in problems), problems


def test_dvc_yaml_params_name_params_yaml_keys_and_cover_read_sections():
    problems = param_problems(load_dvc()) + param_problems(load_dvc("t2i/dvc.yaml"))
    assert not problems, "dvc.yaml params out of step with params.yaml / fae_pipe.cli.COMMANDS:\n" + "\n".join(problems)


def test_has_key_walks_sections_and_nested_groups():
    params = load_yaml("params.yaml")
    assert all(has_key(params, k) for k in ("sit", "fae.train", "fae.train.steps", "decoder.phase", "image_encoder"))
    assert not any(has_key(params, k) for k in ("encoder", "fae.steps", "decoder.stage", "sit.train.lr.x"))


@pytest.mark.parametrize("stage, old, new, expected", [
    ("evaluate", "image_encoder", None,
     ["dvc.yaml stage 'evaluate' reads config section 'image_encoder' but lists neither it nor a key of it"]),
    ("train-fae", "fae", "fae.train.lr", []),  # one key of the section is enough
    ("train-sit", "${generator}", None, ["dvc.yaml stage 'train-sit' reads config section 'sit' but",
                                         "dvc.yaml stage 'train-sit' reads config section 'flow' but"]),
    ("extract", "image_encoder", "encoder",
     ["dvc.yaml stage 'extract' lists param 'encoder', which params.yaml does not have",
      "dvc.yaml stage 'extract' reads config section 'image_encoder' but"]),
    ("train-fae", "fae", "fae.steps",  # the pre-restructure flat key
     ["dvc.yaml stage 'train-fae' lists param 'fae.steps', which params.yaml does not have",
      "dvc.yaml stage 'train-fae' reads config section 'fae' but"]),
], ids=["missing-section", "one-key-enough", "missing-own-section", "renamed-section", "moved-key"])
def test_param_checker_reports_a_bad_or_missing_param(stage, old, new, expected):
    dvc = load_dvc()
    broken = copy.deepcopy(dvc)  # an in-memory copy; dvc.yaml itself is not touched
    params = broken["stages"][stage]["params"]
    assert old in params
    params[params.index(old):params.index(old) + 1] = [new] if new else []
    problems = [p for p in param_problems(broken) if p not in param_problems(dvc)]
    assert len(problems) == len(expected) and all(p.startswith(e) for p, e in zip(problems, expected)), problems


def test_the_comparison_stages_depend_on_what_train_sit_does():
    """compare/dvc.yaml runs train-sit per variant: same code and artefact deps as the root train-sit stage."""
    root = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["train-sit"]
    compare = yaml.safe_load((REPO / "compare" / "dvc.yaml").read_text())["stages"]["train"]["do"]
    flow_only = {"pipeline/flow", "stages/train_flow.py"}  # the root stage also trains the flow (generator: flow)
    assert compare["wdir"] == ".." and compare["deps"] == [d for d in root["deps"] if d not in flow_only]
    assert compare["cmd"].startswith("fae-pipe train-sit --resume auto")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    assert all(p.split(".")[0] in params for p in compare["params"]), compare["params"]  # dvc refuses a missing one


def test_the_generator_stage_follows_the_generator_param():
    """`dvc exp run -S generator=flow`: the generator stage runs train-<generator> into runs/<generator>,
    which must be where paths.<generator>_run points (dvc.yaml cannot look a key up by the param's value)."""
    stage = load_dvc()["stages"]["train-sit"]
    assert stage["cmd"].startswith("fae-pipe train-${generator} ") and "generator" in stage["params"]
    assert all(o.startswith("runs/${generator}/") for o in entries(stage, "outs"))
    for name in ("params.yaml", "configs/demo.yaml"):
        params = load_yaml(name)
        assert params["generator"] == "sit" and all(params["paths"][f"{g}_run"] == f"runs/{g}" for g in GENERATORS)
    assert {f"train-{g}" for g in GENERATORS} <= set(COMMANDS)


def test_the_text_to_image_pipeline_shares_the_root_stages():
    """t2i/dvc.yaml's first five stages are the root's with --config t2i/params.yaml: same deps, params, outs."""
    root, t2i = load_dvc()["stages"], load_dvc("t2i/dvc.yaml")["stages"]
    for name in ("prepare", "extract", "train-fae", "train-decoder", "encode"):
        ours, theirs = t2i[name], root[name]
        assert ours["wdir"] == ".." and config_file(ours) == "t2i/params.yaml", name
        assert shlex.split(ours["cmd"])[:2] + shlex.split(ours["cmd"])[4:] == shlex.split(theirs["cmd"]), name
        assert ours["deps"] == theirs["deps"] and ours["params"] == [{"t2i/params.yaml": theirs["params"]}], name
        assert ours.get("outs") == theirs.get("outs") and ours.get("metrics") == theirs.get("metrics"), name
    assert all(s["wdir"] == ".." and config_file(s) == "t2i/params.yaml" for s in t2i.values())
