"""The ``fae-pipe`` command line: thin over the stage functions in ``fae_pipe.stages``.

Config keys are set one way: ``--config FILE`` picks the YAML file (default
``params.yaml`` when present) and ``--set SECTION.KEY=VALUE`` (repeatable) overrides
any key; both go through ``fae_pipe.config.load_config``, the one validation path.
The few flags typed daily are shorthand for a ``--set`` of one key (``extract
--shards N`` is ``--set extract.shards=N``); giving a flag and a ``--set`` of the
same key is an error, not a silent choice. The remaining flags (``--resume``,
``--overwrite``, ``--synthetic``) are arguments of the stage's ``run``, not config.
``fae-pipe <command> --help`` lists the keys of the sections the command reads
with their current values. Stage modules are imported only when their command runs,
so ``train-sit`` never imports the image encoder.
"""

from __future__ import annotations

import errno
import importlib
import sys
from typing import NamedTuple

import click
import yaml

from fae_pipe import config as C
from fae_pipe.errors import StopRequested, UserError


class KeyOption(click.Option):
    """A daily flag that is shorthand for ``--set KEY=VALUE`` (translated into the same override)."""

    def __init__(self, flag: str, key: str, metavar: str | None = None):
        """``metavar`` None: a bare flag setting the (boolean) key to true."""
        fields = {k: f for section in C.section_names() for k, f in C.iter_keys(section)}
        is_flag = metavar is None
        value = "true" if is_flag else metavar
        help_text = f"{fields[key].metadata['help']} (same as --set {key}={value})"
        super().__init__([flag], default=None, metavar=metavar, is_flag=is_flag,
                         flag_value="true" if is_flag else None, help=help_text)
        self.key = key


def shards(section: str) -> tuple[click.Option, ...]:
    """The dask flags of ``extract``, ``encode`` and ``embed-text``."""
    return (KeyOption("--shards", f"{section}.shards", "N"),
            KeyOption("--workers", f"{section}.workers", "N"),
            KeyOption("--scheduler", f"{section}.scheduler", "ADDR"))


RESUME = click.Option(["--resume"], is_flag=False, flag_value="latest", default=None, metavar="[PATH|auto]",
                      help="continue from the latest checkpoint of the run directory (--resume), a checkpoint file "
                           "(--resume PATH), or the latest one only if made with the same settings (--resume auto, "
                           "used by dvc.yaml)")
OVERWRITE = click.Option(["--overwrite"], is_flag=True, default=False,
                         help="replace a store made with a different config instead of refusing")


class Stage(NamedTuple):
    module: str                 # fae_pipe.stages.<module>
    sections: list[str]         # config sections it reads (own first); shown by --help
    help: str
    params: tuple = ()          # KeyOption shorthands and arguments of the stage's run()


ATTENTION = "runtime"  # the section of every command that builds an attention model
COMMANDS: dict[str, Stage] = {
    "prepare": Stage("prepare", ["data", "paths"],
                     "Write the dataset index of data.source: a class folder, or captioned images (captions folder, "
                     "JSONL/CSV/Parquet manifest, WebDataset tars); --demo writes the offline demo folder first.",
                     (KeyOption("--demo", "data.demo"),)),
    "extract": Stage("extract", ["extract", "image_encoder", "data", "paths"],
                     "Extract frozen DINOv2 features into the sharded zarr store.", (*shards("extract"), OVERWRITE)),
    "train-fae": Stage("train_fae", ["fae", "paths", ATTENTION],
                       "Train the FAE encoder + feature decoder from the feature store alone.", (RESUME,)),
    "train-decoder": Stage("train_decoder", ["decoder", "fae", "data", "image_encoder", "paths", ATTENTION],
                           "Train the pixel decoder on cached features and the source pixels.", (RESUME,)),
    "encode": Stage("encode", ["encode", "vae", "extract", "fae", "data", "paths", ATTENTION],
                    "Encode the feature store (FAE) or the images (encode.source=sdvae: a pretrained VAE) into "
                    "the compact latent store.", (*shards("encode"), OVERWRITE)),
    "embed-text": Stage("embed_text", ["embed_text", "text_encoder", "paths"],
                        "Embed every caption of the index with the frozen text encoder into the text store.",
                        (*shards("embed_text"), OVERWRITE)),
    "train-sit": Stage("train_sit", ["sit", "paths", ATTENTION],
                       "Train SiT on the cached latents only (Accelerate).", (RESUME,)),
    "train-flow": Stage("train_flow", ["flow", "paths", ATTENTION],
                        "Train the TARFlow/STARFlow normalizing flow on the cached latents only (Accelerate).",
                        (RESUME,)),
    "train-t2i": Stage("train_t2i", ["t2i", "paths", ATTENTION],
                       "Train the text-conditioned MMDiT on the cached latents and caption embeddings only "
                       "(Accelerate).", (RESUME,)),
    "sample": Stage("sample", ["sample", "generator", "flow", "sit", "fae", "paths", ATTENTION],
                    "Sample latents with the trained generator (SiT, flow, or text-to-image MMDiT with prompts) "
                    "and decode them to images.",
                    (click.Option(["--export"], default=None, metavar="PATH",
                                  help="the generator export to sample (a sit.safetensors, flow.safetensors or "
                                       "t2i.safetensors; the family is read from the file) [default: the "
                                       "configured generator's]"),
                     click.Option(["--prompt"], multiple=True, metavar="TEXT",
                                  help="text-to-image: a prompt (repeatable; before those of --prompts)"),
                     KeyOption("--prompts", "sample.prompts", "FILE"))),
    "evaluate": Stage("evaluate", ["evaluate", "sample", "image_encoder", "data", "fae", "paths", ATTENTION],
                      "FD-DINOv2, FID/IS (local Inception weights), precision/recall, reconstruction metrics."),
    "probe": Stage("probe", ["probe", "fae", "paths", ATTENTION],
                   "Linear probe on encoder features, FAE latents and reconstructed features."),
}
BENCHES: dict[str, Stage] = {
    "extract": Stage("bench_extract", ["extract", "image_encoder", "data", "paths"],
                     "Images/s: bare encoder vs full extract path vs naive per-image .npy extractor."),
    "loader": Stage("bench_loader", ["sit", "paths", "storage"],
                    "Samples/s: latent (or feature) loader vs in-RAM array vs one .npy file per sample.",
                    (click.Option(["--synthetic"], default=None, metavar="NxCxHxW",
                                  help="bench a temporary store of N random samples (2 views) shaped CxHxW "
                                       "instead of paths.latents, e.g. 16384x32x16x16 for the paper's latents"),
                     click.Option(["--features"], is_flag=True, default=False,
                                  help="bench the feature store (paths.features, or with --synthetic C channels "
                                       "on an HxW token grid) and FeatureBatches, with REPA targets too"),
                     click.Option(["--object-store"], default=None, metavar="URL",
                                  help="also bench the store copied to a prefix of this URL (s3://bucket/prefix, "
                                       "storage.options) against local disk, side by side"))),
    "train-step": Stage("bench_train_step", ["sit", "image_encoder", "fae", "data", "paths", ATTENTION],
                        "SiT steps/s on cached latents vs the online encoder path, with the FLOP-expected ratio; "
                        "with sit.repa_weight > 0 also SiT + REPA, targets from paths.features vs DINOv2 online.",
                        (click.Option(["--synthetic"], type=int, default=None, metavar="N",
                                      help="bench a temporary store of random latents (and, with REPA, of random "
                                           "features) for the first N images of paths.index, shaped by the "
                                           "configured encoder and FAE, instead of paths.latents"),)),
    "flow": Stage("bench_flow", ["flow", "sit", "sample", "paths"],
                  "Images/s of flow sampling (KV-cached, uncached) vs SiT as the token count grows.",
                  (click.Option(["--sides"], default="4,8,16", metavar="S,...",
                                help="latent grid sides to bench at patch 1 (N = side^2 tokens)"),
                   click.Option(["--batch"], type=int, default=16, metavar="B", help="images per sampling call"),
                   click.Option(["--uncached-max"], type=int, default=64, show_default=True, metavar="N",
                                help="bench the uncached (quadratic) flow inversion up to N tokens"))),
    "stages": Stage("bench_stages", ["image_encoder", "fae", "decoder", "encode", "sit", "sample", "evaluate", "data",
                                     "paths", ATTENTION],
                    "Roofline: every stage's FLOP/s against this machine's matmul peak, samples/s, step time split.",
                    (click.Option(["--synthetic"], is_flag=True, default=False,
                                  help="paper shapes with B-sized models (DINOv2-B at 224 px, fae_dinov2_b, sit_b: "
                                       "16x16 tokens, 32-channel latents) and small batches"),
                     click.Option(["--competitor"], is_flag=True, default=False,
                                  help="training stages idle vs beside one busy process, under this process's "
                                       "OMP_WAIT_POLICY and ACTIVE"),
                     click.Option(["--compile", "compile_"], is_flag=True, default=False,
                                  help="training stages eager vs torch.compile (compile_in_place), side by side"),
                     click.Option(["--only"], default=None, metavar="STAGE,...",
                                  help="bench only these stages (extract, train-fae, train-decoder, encode, "
                                       "train-sit, sample, evaluate)"))),
    "prepare": Stage("bench_prepare", ["data"],
                     "Captioned prepare at web scale: a synthetic N-row manifest as JSONL vs CSV vs Parquet, "
                     "parse / split+fingerprint / write / image check seconds and peak RSS, side by side.",
                     (click.Option(["--rows"], type=click.IntRange(min=1), default=1_000_000, show_default=True,
                                   metavar="N", help="manifest rows"),
                      click.Option(["--images"], type=click.IntRange(min=1), default=2000, show_default=True,
                                   help="distinct tiny PNGs the rows point at"),
                      click.Option(["--check-rows", "check_rows"], type=click.IntRange(min=1), default=100_000,
                                   show_default=True, help="rows the header check is timed on (projected to N)"),
                      click.Option(["--workdir"], default=None, metavar="DIR",
                                   help="keep the images, manifests and indexes in DIR [default: a temporary "
                                        "directory, removed]"))),
    "scale": Stage("bench_scale", [],
                   "ImageNet-sized rehearsal: generated folder, real stages and bookkeeping with tiny models; "
                   "wall time, peak RSS, files, time outside the model per stage and growth per 10x samples.",
                   (click.Option(["--samples"], default="10000", show_default=True, metavar="N[,N...]",
                                 help="rehearsal sizes (1281000 = ImageNet: 1,000 classes x 1,281 images)"),
                    click.Option(["--workdir"], default="bench-scale", show_default=True, metavar="DIR",
                                 help="where each size's project (images, caches, runs) is made, as DIR/<N>"),
                    click.Option(["--results"], default=None, metavar="FILE",
                                 help="JSON the sizes accumulate in [default: DIR/results.json]"),
                    click.Option(["--keep"], is_flag=True, default=False,
                                 help="keep each size's project instead of deleting it after measuring"),
                    click.Option(["--sit-steps"], type=click.IntRange(min=1), default=200, show_default=True,
                                 help="train-sit steps (streaming)"),
                    click.Option(["--fae-steps"], type=click.IntRange(min=1), default=20, show_default=True,
                                 help="train-fae steps"),
                    click.Option(["--workers"], type=click.IntRange(min=0), default=2, show_default=True,
                                 help="dask workers of extract and encode (0: in-process, no dask)"))),
}

KEY_COLUMN = 40  # characters of `key = value` before the help column
CHOICES_SHOWN = 40  # characters: longer choice lists are left to the error message of a bad value


def _value_text(value) -> str:
    """A value as it is written in YAML and in ``--set`` (``0.0001``, ``true``, ``[orig, flip]``, ``''``)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    return text[:-3].strip() if text.endswith("\n...") else text


def current_config(config_file: str | None) -> tuple[C.Config, str]:
    """The config ``--help`` shows and where it came from: the file when it loads, else the defaults and why."""
    try:
        cfg = C.load_config(config_file)
    except UserError as e:
        return C.Config(), f"the defaults, as the file does not load: {e}"
    return cfg, (f"the defaults (no {C.DEFAULT_CONFIG} here)" if cfg.source == "<defaults>" else cfg.source)


def _old_flag_keys(option: str, sections: list[str]) -> list[str]:
    """``--lr`` -> ``[sit.train.lr]``: the keys an old per-key flag of these sections meant."""
    name = option.lstrip("-").removeprefix("no-").replace("-", "_")
    keys = [k for s in sections for k, _ in C.iter_keys(s)]
    return [k for k in keys if k.replace(".", "_") == name or k.replace(".", "_").endswith("_" + name)]


class StageCommand(click.Command):
    """A stage command whose help lists the config keys it reads, with current values, before the flags."""

    def __init__(self, name: str, stage: Stage):
        params = [
            # eager, so `--config FILE --help` shows FILE's values (eager params run in command-line order)
            click.Option(["--config", "config_file"], type=click.Path(dir_okay=False), default=None, is_eager=True,
                         metavar="FILE", help=f"YAML config file [default: {C.DEFAULT_CONFIG} when present]"),
            click.Option(["--set", "sets"], multiple=True, metavar="SECTION.KEY=VALUE",
                         help="override one config key (repeatable); the keys are listed above"),
            *stage.params,
        ]
        super().__init__(name, params=params, callback=self.run_stage, help=stage.help, short_help=stage.help)
        self.stage = stage

    def run_stage(self, config_file, sets, **flags):
        overrides = C.parse_sets(sets)
        for param in self.params:
            if isinstance(param, KeyOption):
                value = flags.pop(param.name)
                if value is None:
                    continue
                if param.key in overrides:
                    raise UserError(f"{param.opts[0]} and --set {param.key}=... both set {param.key}: give one")
                overrides[param.key] = value
        cfg = C.load_config(config_file, overrides)
        from fae_pipe.cache.location import configure as configure_storage
        from fae_pipe.threads import configure_threads

        configure_threads(cfg.runtime.threads)
        configure_storage(cfg.storage.options, cfg.storage.lease_seconds)  # URL stores: s3://, gs://...
        module = importlib.import_module(f"fae_pipe.stages.{self.stage.module}")
        module.run(cfg, **flags)

    def parse_args(self, ctx, args):
        try:
            return super().parse_args(ctx, args)
        except click.NoSuchOption as e:
            keys = _old_flag_keys(e.option_name, self.stage.sections)
            if keys:
                hint = "config keys are set with --set, e.g. " + " or ".join(f"--set {k}=VALUE" for k in keys[:3])
            elif e.possibilities:  # a typo of one of this command's flags: click's "Did you mean" says it best
                raise
            else:
                hint = "config keys are set with --set SECTION.KEY=VALUE (see --help)"
            raise click.NoSuchOption(e.option_name, message=f"no such option: {e.option_name}; {hint}",
                                     ctx=ctx) from None

    def format_help(self, ctx, formatter):
        self.format_usage(ctx, formatter)
        self.format_help_text(ctx, formatter)
        self.format_keys(ctx, formatter)
        self.format_options(ctx, formatter)
        self.format_epilog(ctx, formatter)

    def format_keys(self, ctx, formatter):
        if not self.stage.sections:  # e.g. bench scale: it writes its own project config
            return
        cfg, source = current_config(ctx.params.get("config_file"))
        groups = []
        for section in self.stage.sections:
            rows = []
            for key, f in C.iter_keys(section):
                text = f.metadata.get("help") or ""
                choices = f.metadata.get("choices")
                if choices and len(" ".join(map(str, choices))) <= CHOICES_SHOWN:
                    text += f" [{'|'.join(map(str, choices))}]"
                rows.append((f"{key} = {_value_text(C.get_key(cfg, key))}", text))
            groups.append((section, rows))
        # one help column for all sections: pad the terms (a longer term gets its help on the next line)
        width = min(KEY_COLUMN, max(len(term) for _, rows in groups for term, _ in rows))
        formatter.write_paragraph()
        formatter.write_text(f"Config keys it reads (change with --set KEY=VALUE); current values from {source}:")
        for section, rows in groups:
            with formatter.section(section):
                formatter.write_dl([(term.ljust(width), text) for term, text in rows], col_max=KEY_COLUMN)


class LazyGroup(click.Group):
    """Builds each stage command on demand; the stage module is imported only when the command runs."""

    table: dict[str, Stage] = COMMANDS

    def list_commands(self, ctx):
        return sorted(set(self.table) | set(super().list_commands(ctx)))

    def get_command(self, ctx, name):
        if name in self.table:
            return StageCommand(name, self.table[name])
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


def storage_for(path) -> None:
    """A store URL given to inspect/verify/feature-stats is opened with ``storage.options`` of the
    default config (``params.yaml`` when present); local paths need no config."""
    from fae_pipe.cache.location import configure, is_url

    if is_url(path):
        cfg = C.load_config(None)
        configure(cfg.storage.options, cfg.storage.lease_seconds)


@cli.command("inspect")
@click.argument("path", type=click.Path())
def inspect_cmd(path):
    """Print a store's schema, attrs, completeness and per-array shapes/dtypes/chunks/shards."""
    from fae_pipe.cache.inspect import inspect_store

    storage_for(path)
    click.echo(inspect_store(path))


@cli.command("verify")
@click.argument("path", type=click.Path())
@click.option("--index", "index_path", type=click.Path(dir_okay=False), default=None,
              help="dataset index to check labels against (default: the one recorded in the store)")
def verify_cmd(path, index_path):
    """Check every shard of a store (complete, finite, counts, labels); exit 1 on any defect."""
    from fae_pipe.cache.inspect import verify_store
    from fae_pipe.data.index import read_index

    storage_for(path)
    defects = verify_store(path, index_path, read_index=read_index)
    for line in defects:
        click.echo(f"DEFECT {line}")
    if defects:
        click.echo(f"verify: {path}: {len(defects)} defect(s)", err=True)
        sys.exit(1)
    click.echo(f"verify: {path}: OK")


@cli.command("feature-stats")
@click.argument("path", type=click.Path())
@click.option("--per-position", is_flag=True, default=False,
              help="also RAE's per-position-and-channel tables (arrays position_mean/position_std)")
def feature_stats_cmd(path, per_position):
    """Compute a feature store's exact statistics (float64, valid samples, all views) into the store."""
    from fae_pipe.cache.feature_stats import compute_feature_stats

    storage_for(path)
    stats = compute_feature_stats(path, per_position)
    where = "attrs channel_mean/channel_std" + (" + arrays position_mean/position_std" if per_position else "")
    click.echo(f"feature-stats: {path}: {stats.channels} channels over {stats.count} values each -> {where}")


@cli.command("compare-report")
@click.argument("runs", nargs=-1, type=click.Path(file_okay=False))
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="JSON table to write (a DVC metrics file)")
@click.option("--metrics-root", default=None, type=click.Path(file_okay=False),
              help="directory holding <variant>/sit.json (the runs' paths.metrics), for steps/s")
def compare_report_cmd(runs, out, metrics_root):
    """One table (final/best FD-DINOv2, seconds, steps/s) of train-sit runs compared on one cache."""
    from fae_pipe.stages.compare_report import run

    run(list(runs), out, metrics_root)


@cli.command("convert-export")
@click.argument("old", type=click.Path(dir_okay=False))
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="where to write the safetensors file [default: OLD with the suffix .safetensors]")
def convert_export_cmd(old, out):
    """Convert a pickled export of an earlier release (fae.pt, decoder.pt, sit.pt) to safetensors, once."""
    from fae_pipe.stages.convert_export import run

    run(old, out)


@cli.command("config")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None, metavar="FILE",
              help=f"YAML config file [default: {C.DEFAULT_CONFIG} when present]")
@click.option("--set", "sets", multiple=True, metavar="SECTION.KEY=VALUE", help="override one config key (repeatable)")
def show_config(config_file, sets):
    """Print the resolved config (defaults < file < overrides) as YAML, validated like every stage."""
    click.echo(C.dump_config(C.load_config(config_file, C.parse_sets(sets))), nl=False)


_FULL_OR_READ_ONLY = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


def _close_progress_bars() -> None:
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        try:
            bar.close()
        except Exception:  # noqa: BLE001 - closing is cosmetic
            pass


def main(argv=None) -> None:
    """Entry point: user errors become one line on stderr and exit code 2."""
    try:
        cli.main(args=argv, prog_name="fae-pipe", standalone_mode=False)
    except UserError as e:
        _close_progress_bars()  # a bar left open by the failing stage would share the error's line
        click.echo(f"fae-pipe: error: {e}", err=True)
        sys.exit(2)
    except StopRequested as e:  # a stop signal: clean stop, continue later (docs/train-sit.md, Training setup)
        if str(e):  # the main process says it; the other ranks stop quietly
            click.echo(str(e), err=True)
        sys.exit(e.exit_code)
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
    except OSError as e:  # a full disk / read-only file system met by a write outside atomic_write (logs, demo)
        if e.errno not in _FULL_OR_READ_ONLY:
            raise
        from fae_pipe.artifacts import disk_write_error

        _close_progress_bars()
        click.echo(f"fae-pipe: error: {disk_write_error(e.filename or 'a file (name unknown)', e)}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
