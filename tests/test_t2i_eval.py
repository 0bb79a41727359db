"""Text-to-image evaluation pieces: prompts files, the oracle by seen/held-out prompts, CLIP score (local only)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fae_pipe.data.caption_demo import HELD_OUT, prompt_set, render, scene
from fae_pipe.errors import UserError
from fae_pipe.metrics.clip_score import ClipScorer
from fae_pipe.metrics.oracle import by_split
from fae_pipe.metrics.weights import MetricUnavailable
from fae_pipe.sampling.prompts import read_prompts, resolve_prompts


def test_prompts_from_text_jsonl_and_the_command_line(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("# a comment\none red circle\n\n  two blue squares  \n", encoding="utf-8")
    assert read_prompts(txt) == [{"prompt": "one red circle"}, {"prompt": "two blue squares"}]
    jl = tmp_path / "p.jsonl"
    jl.write_text(json.dumps({"prompt": "x", "colour": "red"}) + "\n", encoding="utf-8")
    assert resolve_prompts(["a cat"], str(jl)) == [{"prompt": "a cat"}, {"prompt": "x", "colour": "red"}]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"text": "no prompt key"}\n', encoding="utf-8")
    with pytest.raises(UserError, match="bad.jsonl' line 2"):
        read_prompts(bad)
    with pytest.raises(UserError, match="needs prompts"):
        resolve_prompts(None, None)
    with pytest.raises(UserError, match="empty prompt"):
        resolve_prompts([" "], None)


def test_demo_prompts_cover_every_pair_and_mark_the_held_out_ones():
    rows = prompt_set(per_pair=2)
    pairs = {(r["colour"], r["shape"]) for r in rows}
    assert len(rows) == 36 and len(pairs) == 18
    assert {(r["colour"], r["shape"]) for r in rows if r["heldout"]} == set(HELD_OUT)


def test_oracle_by_split_scores_seen_and_held_out_prompts_separately():
    prompts = prompt_set(per_pair=1)
    images, ids = [], []
    for i, p in enumerate(prompts):  # a perfect generator for seen prompts, the wrong colour for held-out ones
        s = next(sc for sc in (scene(k, 64, 0) for k in range(10_000))
                 if (sc["shape"], sc["count"]) == (p["shape"], p["count"]))
        s = dict(s, colour=p["colour"] if not p["heldout"] else ("red" if p["colour"] != "red" else "blue"))
        images.append(render(s, 64))
        ids.append(i)
    out = by_split(images, ids, prompts)
    assert out["seen"]["colour"] == 1.0 and out["heldout"]["colour"] == 0.0
    assert out["seen"]["prompts"] == 12 and out["heldout"]["prompts"] == 6 and out["chance"]["colour"] == 1 / 6
    assert by_split(images, ids, [{"prompt": p["prompt"]} for p in prompts]) is None  # no attributes: not scored


def _tiny_clip(path, seed=0):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPConfig, CLIPModel, PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "red": 4, "blue": 5,
                                      "circle": 6}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")
    cfg = CLIPConfig(text_config=dict(vocab_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, max_position_embeddings=16, bos_token_id=1,
                                      eos_token_id=2, pad_token_id=0),
                     vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, image_size=32, patch_size=8), projection_dim=16)
    torch.manual_seed(seed)
    model = CLIPModel(cfg).eval()
    model.save_pretrained(str(path))
    fast.save_pretrained(str(path))
    return model, fast


def test_clip_score_equals_the_cosine_of_a_local_clip_and_refuses_missing_or_random_weights(tmp_path):
    model, fast = _tiny_clip(tmp_path / "clip")
    scorer = ClipScorer(tmp_path / "clip")
    images = np.random.default_rng(0).integers(0, 256, (3, 48, 64, 3), dtype=np.uint8)
    prompts = ["red circle", "blue circle", "red"]
    got = scorer.score(images, prompts, batch_size=2)
    with torch.no_grad():  # by hand: resize short side to 32, centre crop, OpenAI mean/std, projected embeddings
        out = model(input_ids=fast(prompts, padding=True, return_tensors="pt")["input_ids"],
                    attention_mask=fast(prompts, padding=True, return_tensors="pt")["attention_mask"],
                    pixel_values=scorer._pixels(images))
    want = (100 * (out.image_embeds * out.text_embeds).sum(-1).clamp_min(0)).numpy()
    assert got.shape == (3,) and np.allclose(got, want, atol=1e-4)
    with pytest.raises(MetricUnavailable, match="no evaluate.clip_weights"):
        ClipScorer("")
    from fae_pipe.encoders.text import RANDOM_MARKER

    (tmp_path / "clip" / RANDOM_MARKER).write_text("{}")
    with pytest.raises(MetricUnavailable, match="never computed with random weights"):
        ClipScorer(tmp_path / "clip")
