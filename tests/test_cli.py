"""The command line layer alone: help listing, the one override path, one-line errors.

Stage modules are replaced by stubs in ``sys.modules`` that record what the CLI
hands them, so nothing here trains, extracts or imports torch models.
"""

import ast
import subprocess
import sys
import types
from pathlib import Path

import click
import pytest
import yaml
from click.testing import CliRunner

from fae_pipe import config as C
from fae_pipe.cli import BENCHES, COMMANDS, KeyOption, cli, main

REPO = Path(__file__).resolve().parents[1]

# every flag a stage command may have besides --config/--set/--help: daily shorthand and run() arguments
ALLOWED = {
    "prepare": {"demo"}, "extract": {"shards", "workers", "scheduler", "overwrite"},
    "encode": {"shards", "workers", "scheduler", "overwrite"},
    "embed-text": {"shards", "workers", "scheduler", "overwrite"},
    "train-fae": {"resume"}, "train-decoder": {"resume"}, "train-sit": {"resume"},
    "train-flow": {"resume"}, "train-t2i": {"resume"}, "sample": {"export", "prompt", "prompts"}, "evaluate": set(), "probe": set(),
    "bench extract": set(), "bench loader": {"synthetic", "features", "object_store"}, "bench train-step": {"synthetic"},
    "bench stages": {"synthetic", "competitor", "compile_", "only"},
    "bench flow": {"sides", "batch", "uncached_max"},
    "bench scale": {"samples", "workdir", "results", "keep", "sit_steps", "fae_steps", "workers"},
    "bench prepare": {"rows", "images", "check_rows", "workdir"},
}


def command(name: str) -> click.Command:
    group, ctx = cli, click.Context(cli)
    for part in name.split():
        group = group.get_command(ctx, part)
    return group


def run_params(module: str) -> set[str]:
    """Keyword parameters of ``stages/<module>.py:run`` (read with ast: the stage is not imported)."""
    tree = ast.parse((REPO / "stages" / f"{module}.py").read_text())
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "run")
    return {a.arg for a in fn.args.args[1:] + fn.args.kwonlyargs}


def help_text(*args: str) -> str:
    result = CliRunner().invoke(cli, [*args, "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    return result.output


def fail(capsys, *argv: str) -> str:
    """Run ``fae-pipe ARGV`` in-process; it must exit 2 with exactly one line on stderr, returned."""
    with pytest.raises(SystemExit) as exc:
        main(list(argv))
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    assert err.count("\n") == 1 and err.startswith("fae-pipe: error: "), err
    return err.strip()


@pytest.fixture
def stub(monkeypatch):
    """Replace stage modules by recorders of ``run(cfg, **flags)``; returns the list of calls."""
    calls = []

    def install(module: str):
        fake = types.ModuleType(f"fae_pipe.stages.{module}")
        fake.run = lambda cfg, **flags: calls.append((module, cfg, flags))
        monkeypatch.setitem(sys.modules, f"fae_pipe.stages.{module}", fake)

    for stage in [*COMMANDS.values(), *BENCHES.values()]:
        install(stage.module)
    return calls


@pytest.fixture(autouse=True)
def cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_train_decoder_help_lists_keys_with_current_values_and_no_per_key_flags(cwd):
    (cwd / "params.yaml").write_text(yaml.safe_dump({"decoder": {"train": {"lr": 3e-4}}}))
    out = help_text("train-decoder")
    assert "current values from params.yaml" in out
    line = next(line for line in out.splitlines() if line.strip().startswith("decoder.train.lr = "))
    assert line.split() == ["decoder.train.lr", "=", "0.0003", "AdamW", "learning", "rate"]
    assert "  decoder.phase = 1 " in out and "[1|2]" in out  # short choices shown
    for section in ("decoder:", "fae:", "data:", "image_encoder:", "paths:", "runtime:"):
        assert f"\n{section}\n" in out
    options = out.split("\nOptions:\n")[1]
    flags = [line.split()[0].rstrip(",") for line in options.splitlines() if line.lstrip().startswith("-")]
    assert flags == ["--config", "--set", "--resume", "-h"]
    assert "--lr" not in out and "--steps" not in out and "--batch-size" not in out


def test_every_command_has_only_the_allowed_flags_and_passes_only_run_arguments():
    for name, allowed in ALLOWED.items():
        cmd = command(name)
        names = {p.name for p in cmd.params} - {"config_file", "sets", "help"}
        assert names == allowed, name
        stage = (BENCHES if name.startswith("bench ") else COMMANDS)[name.split()[-1]]
        passed = {p.name for p in cmd.params if p.name in allowed and not isinstance(p, KeyOption)}
        assert passed <= run_params(stage.module), name
    assert set(ALLOWED) == set(COMMANDS) | {f"bench {b}" for b in BENCHES}


def test_no_option_shows_a_made_up_default_and_bench_flow_parses_uncached_max(cwd, stub):
    """``click.Option(["--x"], "x")`` passes "x" as ``show_default`` (help said ``[default: (x)]``): no option may
    carry a string there, and ``--uncached-max`` shows and parses its real default."""
    for name in ALLOWED:
        for p in command(name).params:
            assert not isinstance(getattr(p, "show_default", None), str), (name, p.name, p.show_default)
    line = next(x for x in help_text("bench", "flow").splitlines() if "--uncached-max" in x)
    assert "[default: 64]" in line and "uncached_max" not in line
    main(["bench", "flow"])
    main(["bench", "flow", "--uncached-max", "16"])
    assert [calls[2]["uncached_max"] for calls in stub] == [64, 16]


def test_sections_table():
    for name in ("train-fae", "train-decoder", "train-sit", "train-flow", "train-t2i", "encode", "sample", "evaluate",
                 "probe"):
        assert "runtime" in COMMANDS[name].sections, name
    assert "runtime" not in COMMANDS["extract"].sections and "runtime" not in COMMANDS["prepare"].sections
    for stage in [*COMMANDS.values(), *BENCHES.values()]:
        assert set(stage.sections) <= set(C.section_names()) | set(C.top_keys()), stage


def test_help_without_params_yaml_and_with_an_invalid_one(cwd):
    out = help_text("train-sit")
    assert "the defaults (no params.yaml here)" in out and "  sit.train.lr = 0.0001 " in out
    assert "  runtime.attention = sdpa " in out and "image_encoder" not in out
    (cwd / "params.yaml").write_text("sit: {lr: 1}\n")
    out = help_text("train-sit")
    assert "  sit.train.lr = 0.0001 " in out and "sit.train.lr'" in out  # defaults, and why
    (cwd / "params.yaml").write_text("sit: [unclosed\n")
    assert "  sit.train.steps = 2000000 " in help_text("train-sit")
    (cwd / "params.yaml").unlink()
    assert "  extract.shards = 64 " in help_text("bench", "extract")


def test_config_file_before_help_is_shown(cwd):
    (cwd / "c.yaml").write_text(yaml.safe_dump({"paths": {"sit_run": "elsewhere"}}))
    assert "  paths.sit_run = elsewhere " in help_text("train-sit", "--config", "c.yaml")
    assert "current values from c.yaml" in help_text("train-sit", "--config", "c.yaml")


def test_set_and_daily_flags_reach_the_stage(cwd, stub):
    (cwd / "c.yaml").write_text(yaml.safe_dump({"extract": {"threads": 1}}))
    main(["extract", "--config", "c.yaml", "--set", "image_encoder.precision=fp32", "--shards", "3",
          "--workers", "2", "--scheduler", "tcp://h:8786", "--overwrite"])
    module, cfg, flags = stub.pop()
    assert module == "extract" and flags == {"overwrite": True}
    assert (cfg.extract.shards, cfg.extract.workers, cfg.extract.scheduler) == (3, 2, "tcp://h:8786")
    assert cfg.image_encoder.precision == "fp32" and cfg.extract.threads == 1 and cfg.source == "c.yaml"

    main(["encode", "--shards", "5"])
    module, cfg, flags = stub.pop()
    assert module == "encode" and cfg.encode.shards == 5 and cfg.extract.shards == 64 and flags == {"overwrite": False}

    main(["train-sit", "--set", "sit.train.lr=2e-4", "--set", "sit.train.steps=7"])
    _, cfg, flags = stub.pop()
    assert (cfg.sit.train.lr, cfg.sit.train.steps, flags) == (2e-4, 7, {"resume": None})
    main(["train-sit", "--resume", "--set", "sit.train.steps=7"])
    assert stub.pop()[2] == {"resume": "latest"}
    main(["train-decoder", "--resume", "auto"])
    assert stub.pop()[2] == {"resume": "auto"}
    main(["train-fae", "--resume", "runs/fae/checkpoints/step-1.pt"])
    assert stub.pop()[2] == {"resume": "runs/fae/checkpoints/step-1.pt"}

    main(["prepare", "--demo"])
    _, cfg, flags = stub.pop()
    assert cfg.data.demo is True and flags == {}
    main(["prepare"])
    assert stub.pop()[1].data.demo is False

    main(["bench", "loader", "--synthetic", "40x4x2x2", "--set", "paths.metrics=m"])
    module, cfg, flags = stub.pop()
    assert module == "bench_loader" and flags == {"synthetic": "40x4x2x2", "features": False, "object_store": None}
    assert cfg.paths.metrics == "m"
    main(["bench", "loader", "--features", "--object-store", "s3://b/p"])
    assert stub.pop()[2] == {"synthetic": None, "features": True, "object_store": "s3://b/p"}
    main(["bench", "train-step", "--synthetic", "5"])
    assert stub.pop()[2] == {"synthetic": 5}
    main(["sample", "--set", "sample.classes=[1,2]"])
    module, cfg, flags = stub.pop()
    assert module == "sample" and cfg.sample.classes == [1, 2] and flags == {"export": None, "prompt": ()}
    main(["sample", "--export", "runs/flow/flow.safetensors", "--set", "generator=flow"])
    module, cfg, flags = stub.pop()
    assert cfg.generator == "flow" and flags == {"export": "runs/flow/flow.safetensors", "prompt": ()}
    main(["sample", "--prompt", "two red circles", "--prompt", "a blue square", "--prompts", "p.jsonl"])
    module, cfg, flags = stub.pop()
    assert flags["prompt"] == ("two red circles", "a blue square") and cfg.sample.prompts == "p.jsonl"


def test_daily_flags_are_validated_like_set_and_conflicts_are_errors(capsys, stub):
    assert "extract.shards = 0 is invalid: expected a value >= 1" in fail(capsys, "extract", "--shards", "0")
    assert "encode.workers = 'x' is invalid: expected an integer" in fail(capsys, "encode", "--workers", "x")
    line = fail(capsys, "extract", "--shards", "2", "--set", "extract.shards=3")
    assert "--shards" in line and "extract.shards" in line
    assert not stub


def test_config_and_stages_reject_bad_sets_with_the_same_line(capsys, stub):
    for argv in (["--set", "foo"], ["--set", "=1"], ["--set", "sit.lr=1"], ["--set", "sit.nope=1"],
                 ["--set", "nope.x=1"], ["--set", "sit.train=1"], ["--set", "encoder.name=x"],
                 ["--set", "decoder.stage=2"], ["--set", "sit.train.lr=fast"]):
        line = fail(capsys, "config", *argv)
        assert fail(capsys, "train-sit", *argv) == line
    assert not stub
    assert "expected SECTION.KEY=VALUE" in fail(capsys, "config", "--set", "foo")
    assert "use 'sit.train.lr'" in fail(capsys, "config", "--set", "sit.lr=1")
    line = fail(capsys, "config", "--set", "sit.nope=1")
    assert "unknown key 'sit.nope'" in line and "model" in line and "train" in line
    assert "image_encoder" in fail(capsys, "config", "--set", "nope.x=1")
    assert "use 'image_encoder.name'" in fail(capsys, "config", "--set", "encoder.name=x")
    assert "use 'decoder.phase'" in fail(capsys, "config", "--set", "decoder.stage=2")


def test_config_prints_the_validated_overrides(capsys):
    main(["config", "--set", "sit.train.lr=3e-4", "--set", "image_encoder.precision=fp32"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["sit"]["train"]["lr"] == 3e-4 and printed["image_encoder"]["precision"] == "fp32"


def test_old_per_key_flags_exit_2_naming_the_key(capsys, stub):
    assert "--set sit.train.lr=VALUE" in fail(capsys, "train-sit", "--lr", "1")
    assert "--set image_encoder.precision=VALUE" in fail(capsys, "extract", "--encoder-precision", "fp32")
    assert "--set sample.use_ema=VALUE" in fail(capsys, "sample", "--no-use-ema")
    assert "Did you mean '--resume'" in fail(capsys, "train-sit", "--resum")
    assert "--set SECTION.KEY=VALUE" in fail(capsys, "probe", "--frobnicate")
    assert not stub


def test_real_entry_point_one_line_errors_and_help(tmp_path):
    (tmp_path / "params.yaml").write_text("sit: {train: {lr: oops}}\n")
    bad = subprocess.run([sys.executable, "-m", "fae_pipe.cli", "config", "--set", "foo"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stdout == "" and bad.stderr.count("\n") == 1, bad.stderr
    code = ("import sys; from fae_pipe.cli import main\n"
            "try: main(['train-sit', '--help'])\nexcept SystemExit as e: assert not e.code, e.code\n"
            "print('HEAVY', sorted(m for m in sys.modules if m == 'torch' or m.startswith('fae_pipe.encoders')))")
    shown = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert "sit.train.lr = 0.0001" in shown.stdout and "does not load" in shown.stdout
    assert shown.stdout.strip().endswith("HEAVY []")


@pytest.mark.parametrize("argv", [[name] for name in COMMANDS] + [["bench", name] for name in BENCHES],
                         ids=lambda argv: " ".join(argv))
def test_every_command_has_help(cwd, argv):
    """A new user's first call: every stage and bench prints its help (bench scale reads no config keys)."""
    out = help_text(*argv)
    assert "Usage:" in out and "--help" in out


def test_prompts_without_a_t2i_export_point_at_train_t2i(cwd, capsys):
    """--prompt with no export on disk: the line names train-t2i (not train-sit, the class default)."""
    err = fail(capsys, "sample", "--prompt", "two red circles", "--export", "runs/t2i/t2i.safetensors")
    assert "text-to-image export 'runs/t2i/t2i.safetensors' not found" in err and "fae-pipe train-t2i" in err
