"""The text encoder loads from a written transformers directory exactly as a user's real one would."""

import json

import pytest
import torch

from fae_pipe.encoders.text import FrozenTextEncoder, directory_fingerprint, write_random_text_encoder
from fae_pipe.errors import UserError

CAPTIONS = ["two red circles on a blue background", "one green square on a black background", "a cyan ring"]


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    return write_random_text_encoder(tmp_path_factory.mktemp("t5") / "enc", CAPTIONS, width=32, layers=1)


def test_random_t5_is_deterministic_and_recorded(t5_dir, tmp_path):
    again = write_random_text_encoder(tmp_path / "enc", CAPTIONS, width=32, layers=1)
    assert directory_fingerprint(again) == directory_fingerprint(t5_dir)
    enc = FrozenTextEncoder(t5_dir, max_length=12)
    d = enc.describe()
    assert d["random"] is True and d["model_type"] == "t5" and d["pooled_dim"] == 0 and d["dim"] == 32
    assert d["fingerprint"] == directory_fingerprint(t5_dir)


def test_tokens_are_masked_and_independent_of_the_batch(t5_dir):
    enc = FrozenTextEncoder(t5_dir, max_length=12)
    tokens, lengths, pooled = enc.encode(CAPTIONS + [""])
    assert tokens.shape == (4, 12, 32) and pooled is None
    assert lengths.tolist() == [8, 8, 4, 1]  # words + </s>; the empty caption keeps its </s>
    assert torch.all(tokens[0, 8:] == 0) and torch.all(tokens[0, :8].abs().sum(-1) > 0)
    alone, _, _ = enc.encode(CAPTIONS[2:3])
    assert torch.allclose(alone[0], tokens[2], atol=1e-6)
    # the words reach the embedding: an unseen word maps to <unk> and changes the tokens
    other, _, _ = enc.encode(["a magenta ring"])
    assert not torch.allclose(other[0, :4], tokens[2, :4])


def test_clip_text_tower_gives_a_pooled_vector(tmp_path, t5_dir):
    from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel

    tok = AutoTokenizer.from_pretrained(str(t5_dir))
    cfg = CLIPTextConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, max_position_embeddings=16, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    CLIPTextModel(cfg).save_pretrained(str(tmp_path / "clip"))
    tok.save_pretrained(str(tmp_path / "clip"))
    enc = FrozenTextEncoder(tmp_path / "clip", max_length=16)
    tokens, lengths, pooled = enc.encode(CAPTIONS)
    assert enc.describe()["random"] is False and pooled.shape == (3, 32) and tokens.shape == (3, 16, 32)
    # CLIP pools the </s> token's output
    assert torch.allclose(pooled[2], CLIPTextModel.from_pretrained(str(tmp_path / "clip"))(
        **tok(CAPTIONS[2:3], return_tensors="pt")).pooler_output[0], atol=1e-5)


def test_bad_directories_are_one_line_errors(tmp_path):
    with pytest.raises(UserError, match="no config.json"):
        FrozenTextEncoder(tmp_path, max_length=8)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(UserError, match="model_type 'gpt2' is not a supported text encoder; valid: clip"):
        FrozenTextEncoder(tmp_path, max_length=8)


def test_writing_and_loading_print_no_bars_or_warning_and_leave_transformers_bars_on(tmp_path, capfd, caplog):
    """The command prints the RANDOM line (once, naming the key); transformers' per-model bars stay off only
    inside fae-pipe's own loads and writes, even when one of them fails."""
    from transformers.utils import logging as hf_logging

    from fae_pipe.encoders.text import quiet_transformers

    enc = FrozenTextEncoder(write_random_text_encoder(tmp_path / "enc", CAPTIONS, width=32, layers=1), max_length=12)
    err = capfd.readouterr().err
    assert enc.random and "Loading weights" not in err and "Writing model shards" not in err
    assert "RANDOM" not in err and "RANDOM" not in caplog.text
    with pytest.raises(RuntimeError), quiet_transformers():
        assert hf_logging.tqdm(range(2)).disable
        raise RuntimeError("a load that fails")
    bar = hf_logging.tqdm(range(2), desc="the user's own bar")
    assert hf_logging.is_progress_bar_enabled() and not bar.disable
    bar.close()
