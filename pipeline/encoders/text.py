"""The frozen text encoder (transformers), loaded from a local directory, for cached text embeddings.

Text-to-image training reads caption embeddings from ``text.zarr`` and never runs the
text encoder; it runs only in ``embed-text`` and, for the prompts, in ``sample``. Both
load it here, from a directory holding a transformers model *and* its tokenizer
(``config.json``, weights, ``tokenizer.json`` / ``spiece.model``...), the layout
``save_pretrained`` writes and the hub's snapshots have. Supported towers, chosen from
the directory's ``config.json`` ``model_type`` (never from the path's name):

* T5 / Flan-T5 / mT5 / UMT5 encoders: token embeddings only (no pooled vector; the
  generator then pools the real tokens itself);
* CLIP text towers (``clip_text_model``, or a full ``clip`` directory): tokens and the
  pooled EOS vector;
* SigLIP / SigLIP2 text towers (``siglip_text_model``, ``siglip``, ``siglip2``): tokens
  and the pooled head output.

``write_random_text_encoder`` makes the offline demo's and the tests' encoder: a
word-level tokenizer trained (``tokenizers``, seconds) on the captions, and a tiny T5
encoder from a fixed seed, written with ``save_pretrained`` so it is then loaded
through exactly the path a user's real directory takes. Its fingerprint is the same
kind as a real one (the directory's files), and stores made with it record
``random: true`` so they can never pass for real embeddings. The encoder itself prints
nothing about that: ``.random`` is set and each command says it once, in its own words
(``embed-text`` names the config key and the directory).

transformers 5 draws a "Loading weights" / "Writing model shards" bar per model read
or written; for this encoder (one small file, loaded once per command and per dask
worker) those bars only bury the command's own progress, so fae-pipe's loads and
writes run inside ``quiet_transformers()``, which turns them off for that call alone.
"""

from __future__ import annotations

import hashlib
import json
from contextlib import contextmanager
from pathlib import Path

import torch

from fae_pipe.artifacts import atomic_write_dir
from fae_pipe.device import note_emulated_bf16, pick_device
from fae_pipe.errors import UserError

# model_type -> (transformers class, has a pooled vector)
TOWERS = {"t5": ("T5EncoderModel", False), "mt5": ("MT5EncoderModel", False), "umt5": ("UMT5EncoderModel", False),
          "clip_text_model": ("CLIPTextModel", True), "clip": ("CLIPTextModel", True),
          "siglip_text_model": ("SiglipTextModel", True), "siglip": ("SiglipTextModel", True),
          "siglip2": ("SiglipTextModel", True)}
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}
RANDOM_MARKER = "fae-pipe-random-text-encoder.json"
RANDOM_WARNING = ("text encoder weights are RANDOM (a tiny T5 written by fae-pipe): embeddings carry the caption "
                  "words but no pretrained meaning; set text_encoder.weights to a local transformers directory")


@contextmanager
def quiet_transformers():
    """transformers' own progress bars off inside the block, restored after; other code keeps its bars.

    Uses ``transformers.utils.logging.set_tqdm_hook`` (transformers 5; it returns the hook it
    replaces, so the block is undone exactly and leaves the global ``disable_progress_bar``
    state and huggingface_hub's bars alone). Older transformers has no such hook and no
    per-model loading bar for a one-file model, so there it changes nothing.
    """
    from transformers.utils import logging as hf_logging

    if not hasattr(hf_logging, "set_tqdm_hook"):
        yield
        return
    previous = hf_logging.set_tqdm_hook(lambda factory, args, kwargs: factory(*args, **{**kwargs, "disable": True}))
    try:
        yield
    finally:
        hf_logging.set_tqdm_hook(previous)


def directory_fingerprint(directory: Path) -> str:
    """``sha256:<hex>`` over the names and bytes of the directory's files, in sorted order."""
    h = hashlib.sha256()
    for f in sorted(p for p in directory.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(directory)).encode() + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return "sha256:" + h.hexdigest()


class FrozenTextEncoder:
    """A transformers text tower in eval mode; ``encode(captions)`` gives token embeddings, mask, pooled."""

    def __init__(self, directory, max_length: int, device: str = "auto", precision: str = "fp32",
                 key: str = "text_encoder.weights"):
        import transformers

        self.directory = Path(directory).expanduser()
        config_file = self.directory / "config.json"
        if not config_file.is_file():
            raise UserError(f"{key} '{directory}': not a transformers model directory (no config.json); "
                            f"expected a directory written by save_pretrained (model + tokenizer files)")
        if precision not in PRECISIONS:
            raise UserError(f"text_encoder.precision: '{precision}' is not valid; valid: {', '.join(PRECISIONS)}")
        model_type = json.loads(config_file.read_text()).get("model_type", "")
        if model_type not in TOWERS:
            raise UserError(f"{key} '{directory}': model_type '{model_type}' is not a supported text encoder; "
                            f"valid: {', '.join(sorted(TOWERS))}")
        cls_name, self.has_pooled = TOWERS[model_type]
        try:
            with quiet_transformers():
                self.tokenizer = transformers.AutoTokenizer.from_pretrained(str(self.directory))
                self.model = getattr(transformers, cls_name).from_pretrained(str(self.directory))
        except (OSError, ValueError) as e:
            raise UserError(f"{key} '{directory}': cannot load the model or tokenizer: "
                            f"{type(e).__name__}: {str(e).splitlines()[0][:200]}") from None
        self.device = torch.device(pick_device(device))
        note_emulated_bf16(self.device, precision, "text_encoder.precision")
        self.dtype = PRECISIONS[precision]
        self.model.requires_grad_(False).eval().to(self.device)
        self.model_type, self.max_length = model_type, int(max_length)
        self.dim = int(self.model.config.hidden_size if hasattr(self.model.config, "hidden_size")
                       else self.model.config.d_model)
        self.pooled_dim = self.dim if self.has_pooled else 0
        self.fingerprint = directory_fingerprint(self.directory)
        self.random = (self.directory / RANDOM_MARKER).is_file()  # the command says so (RANDOM_WARNING)

    def describe(self) -> dict:
        """What produced the embeddings, for the store attrs and the generator export."""
        return {"model_type": self.model_type, "directory": str(self.directory), "fingerprint": self.fingerprint,
                "random": self.random, "dim": self.dim, "pooled_dim": self.pooled_dim,
                "max_length": self.max_length}

    @torch.no_grad()
    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Float32 token embeddings (B, max_length, D) zeroed past each length, lengths (B,), pooled (B, D) or None.

        Captions longer than ``max_length`` tokens are truncated (the store records the length).
        """
        batch = self.tokenizer(list(captions), padding="max_length", truncation=True, max_length=self.max_length,
                               return_tensors="pt").to(self.device)
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        mask = batch["attention_mask"].bool()
        tokens = out.last_hidden_state.float() * mask[..., None]
        pooled = out.pooler_output.float() if self.has_pooled else None
        return tokens.cpu(), mask.sum(1).cpu(), None if pooled is None else pooled.cpu()


def write_random_text_encoder(directory, captions, width: int = 64, layers: int = 2, heads: int = 4,
                              seed: int = 0) -> Path:
    """Write a tiny random T5 encoder and a word-level tokenizer trained on ``captions`` to ``directory``.

    Deterministic: the same captions and seed give the same files. Written to a temporary
    sibling and renamed into place, so a killed writer never leaves half a model.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    directory = Path(directory)
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(sorted(set(captions)), trainers.WordLevelTrainer(special_tokens=["<pad>", "</s>", "<unk>"]))
    tok.post_processor = processors.TemplateProcessing(single="$A </s>",
                                                       special_tokens=[("</s>", tok.token_to_id("</s>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    config = T5Config(vocab_size=fast.vocab_size, d_model=width, d_kv=width // heads, num_heads=heads,
                      num_layers=layers, d_ff=2 * width, dropout_rate=0.0, decoder_start_token_id=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = T5EncoderModel(config).eval()

    def write(tmp: Path) -> None:
        with quiet_transformers():
            model.save_pretrained(str(tmp))
            fast.save_pretrained(str(tmp))
        (tmp / RANDOM_MARKER).write_text(json.dumps({"seed": seed, "width": width, "layers": layers}) + "\n")

    atomic_write_dir(directory, write)
    return directory
