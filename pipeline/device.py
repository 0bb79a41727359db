"""Device choice: ``cuda`` when present, else ``cpu``; never hard-coded."""

import torch


def pick_device(requested: str = "auto") -> torch.device:
    """Return the device for ``requested`` ("auto", "cpu", "cuda", "cuda:N")."""
    from fae_pipe.errors import UserError

    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device: '{requested}' requested but no CUDA device is visible; use 'auto' or 'cpu'")
    return torch.device(requested)
