"""Where and how models run: the device (``cuda`` when present, else ``cpu``; never hard-coded)
and ``torch.compile`` (``runtime.compile``). The CPU thread policy is ``fae_pipe.threads``."""

import torch


def pick_device(requested: str = "auto") -> torch.device:
    """Return the device for ``requested`` ("auto", "cpu", "cuda", "cuda:N")."""
    from fae_pipe.errors import UserError

    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device: '{requested}' requested but no CUDA device is visible; use 'auto' or 'cpu'")
    return torch.device(requested)


_NOTED: set = set()


def note_emulated_bf16(device: torch.device, precision: str, key: str) -> bool:
    """Print one line (once per key and process) when ``key`` asks for bf16 on a CPU without
    native bf16 (AVX512-BF16 / AMX): oneDNN then emulates it, several times slower than fp32
    (measured: a ViT-S/14 at 112 px, 1.9 vs 10.7 img/s on an AVX2-only EPYC). The precision
    is kept as asked (it is recorded in caches and runs); the note says how to change it."""
    import sys

    if precision != "bf16" or torch.device(device).type != "cpu" or key in _NOTED:
        return False
    if torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return False
    _NOTED.add(key)
    print(f"note: {key} = 'bf16' on a CPU without native bf16 (no AVX512-BF16/AMX) is emulated and "
          f"several times slower than fp32; set {key}: fp32 for CPU runs", file=sys.stderr)
    return True


def compile_unavailable(device: torch.device) -> str | None:
    """Why ``torch.compile`` (inductor) cannot run on ``device`` here, or None when it can.

    Inductor builds C++ kernels on CPU (a C++ compiler, ``$CXX`` or g++) and Triton
    kernels on CUDA; without them the first compiled call would fail deep inside torch.
    """
    import os
    import shutil

    if device.type == "cpu":
        cxx = os.environ.get("CXX") or "g++"
        return None if shutil.which(cxx) else f"no C++ compiler ('{cxx}') on PATH for inductor's CPU kernels"
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        return None if has_triton() else "Triton is not installed (inductor's CUDA kernels need it)"
    return f"inductor does not support device '{device.type}'"


def compile_in_place(modules, device: torch.device, who: str, announce: bool = True) -> bool:
    """``runtime.compile``: compile each module's forward in place (``nn.Module.compile``).

    In place, so parameter names, ``state_dict`` keys, checkpoints and exports are the
    same as eager and a run may be resumed with compile on or off. Where inductor cannot
    run, one note and eager execution; a graph that fails to compile later also falls
    back to eager (dynamo's ``suppress_errors``) instead of ending the run. Returns
    whether the modules were compiled.
    """
    import sys

    reason = compile_unavailable(device)
    if reason is not None:
        if announce:
            print(f"{who}: note: runtime.compile: {reason}; running eager", file=sys.stderr)
        return False
    import torch._dynamo

    torch._dynamo.config.suppress_errors = True
    for module in modules:
        module.compile()
    if announce:
        print(f"{who}: runtime.compile: forward compiled with inductor on {device.type} (the first steps "
              "include compilation: tens of seconds on CPU)", file=sys.stderr)
    return True
