"""train-t2i on a tiny latent store + a tiny text store: caption choice and dropout, exact resume (CLI stop and
SIGKILL), two processes, guidance, the export round trip.

The text store is written directly with ``schema.create_text_store`` (not by ``embed-text``), in another
sample order, another shard size and with rows the latent store does not have, so every served caption
proves the alignment by sample id: channel 0 of caption slot k of sample id i holds i - ID0, channel 1 holds k.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from fae_pipe.cache import schema
from fae_pipe.cli import main as cli_main
from fae_pipe.data.text_batches import TextBatches, caption_slots
from fae_pipe.errors import UserError
from fae_pipe.models.registry import create_model
from fae_pipe.sampling.text import TextCondition, empty_condition, sample_text
from fae_pipe.training.flow_export import generator_family
from fae_pipe.training.logs import parameter_checksum
from fae_pipe.training.sit_export import load_sit_export
from fae_pipe.training.t2i_export import build_t2i_from_export, load_t2i_export
from fae_pipe.transport import sample
from test_sharded_loader import make_latent_store
from test_train_sit import ENV, fresh_accelerate_state, loss_rows, one_thread, sigkill_after_checkpoint  # noqa: F401
from test_train_sit_multiproc import ACCELERATE_CONFIG, free_port

N, ID0, SLOTS, LENGTH, DIM = 48, 1000, 3, 6, 16  # make_latent_store: sample ids 1000 + row
EMPTY_LENGTH = 1
ENCODER = {"model_type": "t5", "directory": "/nowhere/t5", "fingerprint": "sha256:" + "ab" * 32, "random": True,
           "dim": DIM, "pooled_dim": 0, "max_length": LENGTH}
STEPS = 8  # 6 steps an epoch: the resumed runs cross into epoch 1 (new captions, new order)
TRAIN = {"steps": STEPS, "batch_size": 8, "checkpoint_every": 2, "keep_last": 2, "log_every": 1,
         "precision": "fp32", "warmup": 2, "lr": 1e-3, "ema_decay": 0.9, "memory_budget_gb": 0.0, "shuffle_buffer": 1,
         "schedule": "constant"}


def caption_lengths(ids: np.ndarray) -> np.ndarray:
    """(n, SLOTS) lengths: 1 to 3 non-empty slots per sample, not always the first ones."""
    lengths = np.zeros((ids.size, SLOTS), np.int32)
    for r, i in enumerate(ids.tolist()):
        for k in range(SLOTS):
            if k == 0 and i % 3 == 1:
                continue  # slot 0 empty
            if k == 2 and i % 2:
                continue
            lengths[r, k] = 1 + (i + k) % LENGTH
    return lengths


def make_text_store(path: Path, pooled: bool = False, drop_id: int | None = None) -> Path:
    """A complete text store holding the ids of make_latent_store (and 5 more), shuffled, 10 rows a shard."""
    ids = ID0 + np.random.default_rng(1).permutation(N + 5)
    if drop_id is not None:
        ids = ids[ids != drop_id]
    n = ids.size
    empty = np.zeros((LENGTH, DIM), np.float32)
    empty[0] = -1.0  # the empty caption: one real token
    g = schema.create_text_store(path, n, SLOTS, LENGTH, DIM, 10, 5, {schema.A_TEXT_ENCODER: ENCODER}, empty,
                                 EMPTY_LENGTH, np.full(DIM, -2.0, np.float32) if pooled else None)
    lengths = caption_lengths(ids)
    tokens = np.zeros((n, SLOTS, LENGTH, DIM), np.float16)
    rng = np.random.default_rng(2)
    for r in range(n):
        for k in range(SLOTS):
            m = lengths[r, k]
            tokens[r, k, :m] = rng.standard_normal((m, DIM))
            tokens[r, k, :m, 0], tokens[r, k, :m, 1] = ids[r] - ID0, k
    g[schema.TOKENS][:] = tokens
    g[schema.LENGTHS][:] = lengths
    if pooled:
        g[schema.POOLED][:] = tokens[:, :, 0]  # the first token's: (id - ID0, slot, ...)
    g[schema.SAMPLE_IDS][:] = ids
    g[schema.VALID][:] = True
    g.attrs[schema.A_COMPLETE] = True
    return path


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("t2i")
    make_latent_store(tmp / "latents.zarr", n=N)
    return tmp, tmp / "latents.zarr", make_text_store(tmp / "text.zarr"), make_text_store(tmp / "pooled.zarr", True)


def test_caption_slot_is_a_pure_function_of_seed_epoch_and_id():
    ids = np.arange(200) + 7
    lengths = np.tile([[0, 3, 5, 0, 2]], (200, 1))
    a = caption_slots(3, 1, ids, lengths)
    perm = np.random.default_rng(0).permutation(200)
    assert np.array_equal(caption_slots(3, 1, ids[perm], lengths[perm]), a[perm])  # batch order / split: no effect
    assert np.array_equal(caption_slots(3, 1, ids[:5], lengths[:5]), a[:5])
    assert set(a.tolist()) == {1, 2, 4}  # only non-empty slots, each of them
    assert not np.array_equal(caption_slots(3, 2, ids, lengths), a) and not np.array_equal(caption_slots(4, 1, ids, lengths), a)
    per_epoch = np.stack([caption_slots(3, e, ids[:1], lengths[:1])[0] for e in range(60)])
    assert set(per_epoch.tolist()) == {1, 2, 4}  # one sample sees all its captions over the epochs


@pytest.mark.parametrize("world", [1, 2])
def test_batches_serve_the_chosen_caption_of_each_sample_id(stores, world):
    _, latents, text, pooled_store = stores
    for store in (text, pooled_store):
        for rank in range(world):
            data = TextBatches(latents, store, 4, seed=5, rank=rank, world_size=world, memory_budget_bytes=0,
                               shuffle_buffer=1)
            ref = data.loader  # the same order, with the bookkeeping
            for (epoch, x, tokens, mask, pooled), (_, raw), _ in zip(data.from_step(0, "cpu"), ref.batches_from(0),
                                                                     range(3 * data.steps_per_epoch)):
                ids = raw["sample_ids"]
                slots = caption_slots(5, epoch, ids, caption_lengths(ids))
                lengths = caption_lengths(ids)[np.arange(ids.size), slots]
                assert tokens.dtype == torch.float32 and tokens.shape == (4, LENGTH, DIM) and mask.dtype == torch.bool
                assert torch.equal(mask.sum(1), torch.from_numpy(lengths).long())
                assert all((tokens[i, :lengths[i], 0] == ids[i] - ID0).all() and (tokens[i, :lengths[i], 1] == slots[i]).all()
                           and not tokens[i, lengths[i]:].any() for i in range(4))
                code = data.info.stats.denormalize(x)[:, 0, 0, 0].double().numpy()  # the latent's (row, view) mark
                assert np.allclose(code, (ids - ID0) * 10 + raw["views"], atol=0.05)
                assert (pooled is None) == (store == text)
                if pooled is not None:
                    assert torch.equal(pooled[:, :2], torch.from_numpy(np.stack([ids - ID0, slots], 1)).float())


def test_dropout_puts_the_stored_empty_caption_in_the_dropped_rows(stores):
    _, latents, _, pooled_store = stores
    data = TextBatches(latents, pooled_store, 4, seed=0)
    _, _, tokens, mask, pooled = next(data.from_step(0, "cpu"))
    drop = torch.tensor([True, False, True, False])
    t2, m2, p2 = data.text.drop(drop, tokens, mask, pooled)
    assert (t2[0, 0] == -1).all() and not t2[0, 1:].any() and m2[0].tolist() == [True] + [False] * (LENGTH - 1)
    assert (p2[2] == -2).all() and torch.equal(t2[1], tokens[1]) and torch.equal(m2[3], mask[3])
    assert torch.equal(p2[1], pooled[1])


def test_a_sample_without_text_row_is_a_one_line_error_naming_both(stores, tmp_path):
    _, latents, _, _ = stores
    missing = make_text_store(tmp_path / "missing.zarr", drop_id=ID0 + 7)
    with pytest.raises(UserError) as e:
        TextBatches(latents, missing, 4, seed=0)
    msg = str(e.value)
    assert "sample id 1007" in msg and str(latents) in msg and str(missing) in msg and "\n" not in msg
    with pytest.raises(UserError, match="expected the text store"):
        TextBatches(latents, latents, 4, seed=0)


def random_mmdit(pooled_dim: int = 0) -> torch.nn.Module:
    """mmdit_tiny on 4x4x4 latents with every weight random (the zero-initialised head would output 0)."""
    torch.manual_seed(0)
    net = create_model("mmdit_tiny", in_channels=4, input_size=4, patch_size=1, text_dim=DIM, pooled_dim=pooled_dim,
                       width=32, depth=2, heads=2)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.1)
    return net.eval()


def test_guidance_one_equals_the_unguided_sampler_and_skips_the_unconditional_pass():
    net = random_mmdit()
    g = torch.Generator().manual_seed(0)
    b = 3
    lengths = torch.tensor([2, 5, 1])
    text = TextCondition.from_lengths(torch.randn(b, LENGTH, DIM, generator=g) * (torch.arange(LENGTH) < lengths[:, None])[..., None], lengths)
    empty = TextCondition(torch.zeros(1, LENGTH, DIM), torch.arange(LENGTH)[None] < 1)
    noise = torch.randn(b, 4, 4, 4, generator=g)
    calls = []

    def counted(x, t, *cond):
        calls.append(x.shape[0])
        return net(x, t, *cond)

    plain = sample(lambda x, t, _: net(x, t, text.tokens, text.mask), noise, None, steps=6, shift=2.0)
    for scale in (None, 1.0, [[0.0, 1.0, 1.0]], [[0.0, 0.5, 1.0], [0.5, 1.0, 1.0]]):
        calls.clear()
        out = sample_text(counted, noise, text, empty, steps=6, shift=2.0, guidance=scale)
        assert torch.equal(out, plain), scale
        assert calls == [b] * 6, scale  # never the doubled batch
    calls.clear()
    guided = sample_text(counted, noise, text, empty, steps=6, shift=2.0, guidance=[[0.0, 0.5, 3.0]])
    assert calls == [b] * 4 + [2 * b] * 2  # the shifted grid's 1, .91, .8, .67 | .5, .29: doubled only in [0, 0.5]
    assert not torch.allclose(guided, plain)
    for method in ("heun", "sde"):  # the other samplers take the same conditioning
        assert sample_text(net, noise, text, empty, method=method, steps=3, guidance=2.0).shape == noise.shape
    with pytest.raises(UserError, match="2 prompts for a batch of 3"):
        sample_text(net, noise, text._replace(tokens=text.tokens[:2], mask=text.mask[:2]), empty, steps=2)


# ---- the stage through the CLI --------------------------------------------------------------------------------
def write_config(tmp: Path, latents: Path, text: Path, run: str, **train) -> Path:
    cfg = {"paths": {"latents": str(latents), "text": str(text), "t2i_run": str(tmp / run),
                     "metrics": str(tmp / f"metrics-{run}")},
           "t2i": {"model": "mmdit_tiny", "caption_dropout": 0.25, "train": {**TRAIN, **train}}}
    path = tmp / f"{run}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def assert_same_weights(a: Path, b: Path) -> None:
    ea, eb = load_t2i_export(a / "t2i.safetensors"), load_t2i_export(b / "t2i.safetensors")
    for key in ("state_dict", "ema_state_dict"):
        assert ea[key].keys() == eb[key].keys()
        assert all(torch.equal(ea[key][k], eb[key][k]) for k in ea[key]), key


@pytest.fixture(scope="module")
def reference(stores):
    """An uninterrupted run through the real CLI, in process on one thread (as the resumed runs)."""
    tmp, latents, _, pooled_store = stores
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cli_main(["train-t2i", "--config", str(write_config(tmp, latents, pooled_store, "ref"))])
    finally:
        torch.set_num_threads(before)
    return tmp, latents, pooled_store, tmp / "ref"


def test_artefacts_and_the_export_round_trip(reference):
    tmp, _, store, run = reference
    rows = loss_rows(run)
    assert [int(r["step"]) for r in rows] == list(range(1, STEPS + 1)) and all(np.isfinite(float(r["loss"])) for r in rows)
    assert json.loads((tmp / "metrics-ref" / "t2i.json").read_text())["steps"] == STEPS
    path = run / "t2i.safetensors"
    assert generator_family(path) == "t2i"
    export = load_t2i_export(path)
    with pytest.raises(UserError, match="t2i-export"):  # the SiT reader refuses it, naming the family's format
        load_sit_export(path)
    assert export["generator"] == "t2i" and export["latent_shape"] == [4, 4, 4]
    assert export["fae_fingerprint"] == "sha256:test" and export["latent_source"] == {"kind": "fae"}
    assert export["text"] == {"encoder": ENCODER, "max_length": LENGTH, "dim": DIM, "pooled_dim": DIM,
                              "empty_length": EMPTY_LENGTH, "captions_per_sample": SLOTS}
    group = schema.open_group(store)
    assert torch.equal(export["empty_caption"]["tokens"], torch.from_numpy(group[schema.EMPTY_TOKENS][...]))
    assert torch.equal(export["empty_caption"]["pooled"], torch.from_numpy(group[schema.EMPTY_POOLED][...]))
    assert export["transport"]["shift_factor"] == pytest.approx(2.5) and export["model_kwargs"]["text_dim"] == DIM
    model = build_t2i_from_export(export)
    assert parameter_checksum(build_t2i_from_export(export, use_ema=False)) == \
        json.loads((run / "ranks" / "rank-0.json").read_text())["param_sha256"]
    empty = empty_condition(export)
    assert empty.mask.tolist() == [[True] + [False] * (LENGTH - 1)] and empty.pooled.shape == (1, DIM)
    prompts = TextCondition(torch.randn(2, LENGTH, DIM), torch.ones(2, LENGTH, dtype=torch.bool), torch.randn(2, DIM))
    out = sample_text(model, torch.randn(2, 4, 4, 4), prompts, empty, steps=3,
                      shift=export["transport"]["shift_factor"], guidance=[[0.0, 0.7, 2.5]])
    assert out.shape == (2, 4, 4, 4) and torch.isfinite(out).all()


def test_a_model_of_another_kind_is_refused_in_one_line(stores, capsys):
    tmp, latents, text, _ = stores
    with pytest.raises(SystemExit) as e:
        cli_main(["train-t2i", "--config", str(write_config(tmp, latents, text, "wrong")), "--set", "t2i.model=sit_tiny"])
    err = capsys.readouterr().err
    assert e.value.code != 0 and err.count("\n") == 1
    assert "t2i.model = 'sit_tiny' is not a registered text-to-image generator; valid: mmdit_600m, " in err


def test_stop_then_resume_through_the_cli_is_exact(reference, one_thread):
    tmp, latents, store, ref = reference
    cfg = write_config(tmp, latents, store, "cli")
    cli_main(["train-t2i", "--config", str(cfg), "--set", "t2i.train.steps=3"])
    cli_main(["train-t2i", "--config", str(cfg), "--resume"])
    assert loss_rows(tmp / "cli") == loss_rows(ref)
    assert_same_weights(tmp / "cli", ref)


def test_resume_refuses_a_checkpoint_trained_on_other_captions(reference, tmp_path, capsys):
    tmp, latents, _, _ = reference
    other = make_text_store(tmp_path / "other.zarr", pooled=True)
    schema.open_group(other, "r+").attrs[schema.A_CONFIG_HASH] = "re-embedded"
    checkpoint = sorted((tmp / "ref" / "checkpoints").glob("step-*.pt"))[-1]
    with pytest.raises(SystemExit):
        cli_main(["train-t2i", "--config", str(write_config(tmp_path, latents, other, "other")), "--resume",
                  str(checkpoint)])
    assert "(text_store differ)" in capsys.readouterr().err


@pytest.mark.slow
def test_sigkill_then_resume_is_exact(reference, one_thread):
    tmp, latents, store, ref = reference
    cfg = write_config(tmp, latents, store, "kill", steps=100_000, checkpoint_every=1, keep_last=3)
    sigkill_after_checkpoint("train-t2i", cfg, tmp / "kill")
    cli_main(["train-t2i", "--config", str(cfg), "--resume", "--set", f"t2i.train.steps={STEPS}"])
    assert loss_rows(tmp / "kill") == loss_rows(ref)
    assert_same_weights(tmp / "kill", ref)


@pytest.mark.slow
def test_two_cpu_processes_under_accelerate_launch(stores):
    tmp, latents, text, _ = stores
    cfg = write_config(tmp, latents, text, "multi", steps=2, checkpoint_every=2)
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [str(accelerate), "launch", "--config_file", str(ACCELERATE_CONFIG), "--main_process_port", str(free_port()),
           "-m", "fae_pipe.cli", "train-t2i", "--config", str(cfg)]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                         timeout=240, cwd=tmp)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "world size 2, global batch 8 = 2 x 1 x 4" in out.stdout
    records = [json.loads((tmp / "multi" / "ranks" / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world_size"] == 2 and r["step"] == 2 and r["samples_this_run"] == 2 * 4 for r in records)
    assert records[0]["param_sha256"] == records[1]["param_sha256"]
    export = load_t2i_export(tmp / "multi" / "t2i.safetensors")
    assert parameter_checksum(build_t2i_from_export(export, use_ema=False)) == records[0]["param_sha256"]


@pytest.mark.slow
def test_prompts_are_embedded_with_the_recorded_encoder_only(tmp_path):
    """prompt_encoder loads the directory the export records (through FrozenTextEncoder, the real path) and
    refuses one whose files changed since the captions were embedded."""
    from fae_pipe.encoders.text import FrozenTextEncoder, write_random_text_encoder
    from fae_pipe.sampling.text import embed_prompts, prompt_encoder

    directory = write_random_text_encoder(tmp_path / "t5", ["a red circle", "two blue squares"], width=16, layers=1)
    export = {"text": {"encoder": FrozenTextEncoder(directory, 8, "cpu").describe(), "max_length": 8}}
    cond = embed_prompts(prompt_encoder(export), ["a red circle", "two blue squares"])
    assert cond.tokens.shape == (2, 8, 16) and cond.pooled is None
    assert cond.mask.sum(1).tolist() == [4, 4]  # three words + the end token each
    assert not cond.tokens[~cond.mask].any()
    (directory / "config.json").write_text((directory / "config.json").read_text().replace("{", "{\"note\": 1, ", 1))
    with pytest.raises(UserError) as e:
        prompt_encoder(export)
    assert "not the one the generator was trained with" in str(e.value) and "\n" not in str(e.value)
