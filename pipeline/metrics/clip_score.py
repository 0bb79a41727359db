"""CLIP score: how well generated images match their prompts, with a local CLIP only.

The score is ``100 * max(cos(image embedding, text embedding), 0)`` averaged over the
images (the torchmetrics convention; Hessel et al.'s CLIPScore is the same cosine
scaled by 2.5). Only a real CLIP gives a meaningful number, and none can be
downloaded here, so the weights come from ``evaluate.clip_weights``: a local
transformers CLIP directory (``config.json`` with model_type ``clip``, weights and
tokenizer files, as ``save_pretrained`` writes them or a hub snapshot holds them).
Without one, or with a directory fae-pipe wrote with random weights (its
``RANDOM_MARKER``), the metric is ``MetricUnavailable``: reported unavailable, never
computed with random weights. Image preprocessing is CLIP's: bicubic resize of the
short side and centre crop to the model's ``image_size``, then the directory's
``preprocessor_config.json`` mean/std (OpenAI's when the file is absent).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from fae_pipe.metrics.weights import MetricUnavailable

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


class ClipScorer:
    """A frozen CLIP from a local directory; ``score(images, prompts)`` gives per-image CLIP scores."""

    def __init__(self, directory, device="cpu"):
        from fae_pipe.encoders.text import RANDOM_MARKER, directory_fingerprint, quiet_transformers

        d = Path(directory or "")
        if not directory:
            raise MetricUnavailable("no evaluate.clip_weights (a local transformers CLIP directory)")
        if not (d / "config.json").is_file():
            raise MetricUnavailable(f"evaluate.clip_weights '{d}' holds no config.json; expected a transformers CLIP "
                                    "directory (save_pretrained layout)")
        if (d / RANDOM_MARKER).is_file():
            raise MetricUnavailable(f"evaluate.clip_weights '{d}' holds random weights written by fae-pipe; "
                                    "CLIP score is never computed with random weights")
        model_type = json.loads((d / "config.json").read_text()).get("model_type")
        if model_type != "clip":
            raise MetricUnavailable(f"evaluate.clip_weights '{d}' is a '{model_type}' model; expected model_type clip")
        import transformers

        try:
            with quiet_transformers():
                self.model = transformers.CLIPModel.from_pretrained(str(d)).eval().requires_grad_(False).to(device)
                self.tokenizer = transformers.AutoTokenizer.from_pretrained(str(d))
        except (OSError, ValueError) as e:
            raise MetricUnavailable(f"evaluate.clip_weights '{d}' cannot be loaded: {type(e).__name__}: "
                                    f"{str(e).splitlines()[0][:160]}") from None
        pre = d / "preprocessor_config.json"
        cfg = json.loads(pre.read_text()) if pre.is_file() else {}
        self.mean = torch.tensor(cfg.get("image_mean", OPENAI_MEAN)).view(1, 3, 1, 1)
        self.std = torch.tensor(cfg.get("image_std", OPENAI_STD)).view(1, 3, 1, 1)
        self.size = int(self.model.config.vision_config.image_size)
        self.device = torch.device(device)
        self.fingerprint = directory_fingerprint(d)

    def _pixels(self, images: np.ndarray) -> torch.Tensor:
        from PIL import Image

        out = []
        for img in images:
            pil = Image.fromarray(np.asarray(img, np.uint8))
            scale = self.size / min(pil.size)
            w, h = max(self.size, round(pil.width * scale)), max(self.size, round(pil.height * scale))
            pil = pil.resize((w, h), Image.BICUBIC)
            left, top = (w - self.size) // 2, (h - self.size) // 2
            out.append(np.asarray(pil.crop((left, top, left + self.size, top + self.size)), np.float32) / 255.0)
        x = torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2)
        return ((x - self.mean) / self.std).to(self.device)

    @torch.no_grad()
    def score(self, images: np.ndarray, prompts: list[str], batch_size: int = 64) -> np.ndarray:
        """float32 (N,) CLIP scores of uint8 images (N, H, W, 3) against their prompts (N strings)."""
        scores = []
        for lo in range(0, len(images), batch_size):
            img = self.model.get_image_features(pixel_values=self._pixels(images[lo:lo + batch_size]))
            tok = self.tokenizer(list(prompts[lo:lo + batch_size]), padding=True, truncation=True,
                                 max_length=self.model.config.text_config.max_position_embeddings,
                                 return_tensors="pt").to(self.device)
            txt = self.model.get_text_features(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"])
            img, txt = (_tensor(v) for v in (img, txt))
            cos = torch.nn.functional.cosine_similarity(img.float(), txt.float(), dim=-1)
            scores.append((100 * cos.clamp_min(0)).cpu().numpy())
        return np.concatenate(scores) if scores else np.zeros(0, np.float32)


def _tensor(v) -> torch.Tensor:
    """transformers 5 may return a model output instead of a tensor from ``get_*_features``."""
    if isinstance(v, torch.Tensor):
        return v
    return getattr(v, "pooler_output", None) if getattr(v, "pooler_output", None) is not None else v[0]
