"""The ``fae-pipe`` command line: thin over the stage functions in ``fae_pipe.stages``.

Options are generated from the config schema (``fae_pipe.config``), so every
config key of a stage's sections is an option: keys of the stage's own section
as ``--key-name``, keys of the other sections it reads as ``--section-key-name``.
``--config FILE`` picks the YAML file (default ``params.yaml``) and ``--set
section.key=value`` overrides any key. Stage modules are imported only when their
command runs, so ``train-sit`` never imports the image encoder.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import MISSING

import click

from fae_pipe import config as C
from fae_pipe.errors import UserError

# command -> (stage module, sections it reads (own first), one-line help, extra click params)
RESUME = click.Option(["--resume"], is_flag=False, flag_value="latest", default=None,
                      help="continue from the latest checkpoint of the run directory (--resume), a checkpoint file (--resume PATH), "
                           "or the latest one only if made with the same settings (--resume auto, used by dvc.yaml)")
OVERWRITE = click.Option(["--overwrite"], is_flag=True, default=False,
                         help="replace a store made with a different config instead of refusing")
COMMANDS: dict[str, tuple[str, list[str], str, list[click.Parameter]]] = {
    "prepare": ("prepare", ["data", "paths"],
                "Write the dataset index (and the offline demo image folder with --demo).", []),
    "extract": ("extract", ["extract", "encoder", "data", "paths"],
                "Extract frozen DINOv2 features into the sharded zarr store.", [OVERWRITE]),
    "train-fae": ("train_fae", ["fae", "paths"],
                  "Train the FAE encoder + feature decoder from the feature store alone.", [RESUME]),
    "train-decoder": ("train_decoder", ["decoder", "fae", "data", "encoder", "paths"],
                      "Train the pixel decoder on cached features and the source pixels.", [RESUME]),
    "encode": ("encode", ["encode", "extract", "fae", "paths"],
               "Encode the feature store into the compact latent store.", [OVERWRITE]),
    "train-sit": ("train_sit", ["sit", "paths"],
                  "Train SiT on the cached latents only (Accelerate).", [RESUME]),
    "sample": ("sample", ["sample", "sit", "fae", "paths"],
               "Sample latents with SiT and decode them to images.", []),
    "evaluate": ("evaluate", ["evaluate", "sample", "encoder", "data", "fae", "paths"],
                 "FD-DINOv2, FID/IS (local Inception weights), precision/recall, reconstruction metrics.", []),
    "probe": ("probe", ["probe", "fae", "paths"],
              "Linear probe on encoder features, FAE latents and reconstructed features.", []),
}
BENCHES: dict[str, tuple[str, list[str], str, list[click.Parameter]]] = {
    "extract": ("bench_extract", ["extract", "encoder", "data", "paths"],
                "Images/s: bare encoder vs full extract path vs naive per-image .npy extractor.", []),
    "loader": ("bench_loader", ["sit", "paths"],
               "Samples/s: latent loader vs in-RAM array vs one .npy file per sample.",
               [click.Option(["--synthetic"], default=None, metavar="NxCxHxW",
                             help="bench a temporary store of N random samples (2 views) shaped CxHxW "
                                  "instead of paths.latents, e.g. 16384x32x16x16 for the paper's latents")]),
    "train-step": ("bench_train_step", ["sit", "encoder", "fae", "data", "paths"],
                   "SiT steps/s on cached latents vs the online encoder path, with the FLOP-expected ratio.",
                   [click.Option(["--synthetic"], type=int, default=None, metavar="N",
                                 help="bench a temporary store of random latents for the first N images of "
                                      "paths.index, shaped by the configured encoder and FAE, instead of paths.latents")]),
}


def _option_name(section: str, own: str, name: str) -> str:
    flag = name.replace("_", "-")
    return f"--{flag}" if section == own else f"--{section}-{flag}"


def _current_defaults() -> C.Config:
    """The config ``--help`` shows as defaults: params.yaml when readable, else the built-in one."""
    try:
        return C.load_config()
    except UserError:
        return C.Config()


def _build_command(table: dict, cmd: str) -> click.Command:
    module, sections, help_text, extra = table[cmd]
    shown = _current_defaults()
    params: list[click.Parameter] = [
        click.Option(["--config", "config_file"], type=click.Path(dir_okay=False), default=None,
                     help=f"YAML config file [default: {C.DEFAULT_CONFIG} when present]"),
        click.Option(["--set", "sets"], multiple=True, metavar="SECTION.KEY=VALUE",
                     help="override any config key (repeatable)"),
    ]
    keymap: dict[str, str] = {}
    for section in sections:
        for f in C.section_fields(section):
            opt = _option_name(section, sections[0], f.name)
            dest = f"{section}__{f.name}"
            keymap[dest] = f"{section}.{f.name}"
            current = getattr(getattr(shown, section), f.name)
            ftype = f.type if isinstance(f.type, type) else None
            is_bool = ftype is bool or f.type == "bool" or (f.default is not MISSING and isinstance(f.default, bool))
            decls = [f"{opt}/--no-{opt[2:]}" if is_bool else opt, dest]
            metavar = {"int": "INT", "float": "FLOAT", "list": "LIST"}.get(str(f.type), "TEXT")
            params.append(click.Option(decls, default=None, show_default=False, metavar=None if is_bool else metavar,
                                       help=f"{f.metadata['help']} [{section}.{f.name}: {current!r}]"))
    params.extend(extra)

    def callback(config_file, sets, **kwargs):
        overrides = {keymap[k]: v for k, v in kwargs.items() if k in keymap and v is not None}
        for item in sets:
            if "=" not in item:
                raise UserError(f"--set {item!r} is invalid: expected SECTION.KEY=VALUE")
            key, value = item.split("=", 1)
            overrides[key.strip()] = value
        cfg = C.load_config(config_file, overrides)
        flags = {k: v for k, v in kwargs.items() if k not in keymap}
        stage = importlib.import_module(f"fae_pipe.stages.{module}")
        stage.run(cfg, **flags)

    return click.Command(cmd, params=params, callback=callback, help=help_text, short_help=help_text)


class LazyGroup(click.Group):
    """Builds each stage command on demand so ``--help`` of one stage stays fast."""

    table: dict = COMMANDS

    def list_commands(self, ctx):
        return sorted(set(self.table) | set(super().list_commands(ctx)))

    def get_command(self, ctx, name):
        if name in self.table:
            return _build_command(self.table, name)
        return super().get_command(ctx, name)


class BenchGroup(LazyGroup):
    table = BENCHES


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="fae-pipe")
def cli():
    """fae-pipe: FAE image generation on cached DINOv2 features and cached latents."""


@cli.group("bench", cls=BenchGroup)
def bench():
    """Benchmarks that print ratios measured side by side in one run (not timed tests)."""


@cli.command("inspect")
@click.argument("path", type=click.Path())
def inspect_cmd(path):
    """Print a store's schema, attrs, completeness and per-array shapes/dtypes/chunks/shards."""
    from fae_pipe.cache.inspect import inspect_store

    click.echo(inspect_store(path))


@cli.command("verify")
@click.argument("path", type=click.Path())
@click.option("--index", "index_path", type=click.Path(dir_okay=False), default=None,
              help="dataset index to check labels against (default: the one recorded in the store)")
def verify_cmd(path, index_path):
    """Check every shard of a store (complete, finite, counts, labels); exit 1 on any defect."""
    from fae_pipe.cache.inspect import verify_store

    defects = verify_store(path, index_path)
    for line in defects:
        click.echo(f"DEFECT {line}")
    if defects:
        click.echo(f"verify: {path}: {len(defects)} defect(s)", err=True)
        sys.exit(1)
    click.echo(f"verify: {path}: OK")


@cli.command("config")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None)
@click.option("--set", "sets", multiple=True, metavar="SECTION.KEY=VALUE")
def show_config(config_file, sets):
    """Print the resolved config (defaults < file < overrides) as YAML."""
    overrides = dict(s.split("=", 1) for s in sets if "=" in s)
    click.echo(C.dump_config(C.load_config(config_file, overrides)), nl=False)


def main(argv=None) -> None:
    """Entry point: user errors become one line on stderr and exit code 2."""
    try:
        cli.main(args=argv, prog_name="fae-pipe", standalone_mode=False)
    except UserError as e:
        click.echo(f"fae-pipe: error: {e}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("fae-pipe: aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        click.echo(f"fae-pipe: error: {e.format_message()}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("fae-pipe: interrupted", err=True)
        sys.exit(130)
    except SystemExit:
        raise


if __name__ == "__main__":
    main()
