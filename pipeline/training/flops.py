"""Count the FLOPs of a piece of work with torch's FlopCounterMode, CPU attention included; and the
matmul rate those FLOPs are judged against.

Why: benchmarks compare measured speed-ups with the speed-up FLOP counts predict.
torch's counter knows the CUDA attention kernels but not the CPU one that
``scaled_dot_product_attention`` dispatches to, so on CPU every attention product
would be missed. The CPU kernel is registered here with the same formulas torch
uses for its other attention kernels (forward: QK^T and AV; backward: four products).
``matmul_rates`` measures the machine's own ceiling (large square matmuls), the
reference of ``fae-pipe bench stages``' fraction of peak.
"""

from __future__ import annotations

import time
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

_aten = torch.ops.aten


def _cpu_sdpa_forward(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_sdpa_backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


CPU_ATTENTION = {
    _aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_forward,
    _aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward,
}


def count_flops(fn: Callable[[], object]) -> int:
    """Total FLOPs (multiply-add = 2) of running ``fn()`` once, forward and any backward it runs."""
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION) as counter:
        fn()
    return int(counter.get_total_flops())


def matmul_rates(dtype: torch.dtype, sizes=(2048, 4096), seconds: float = 3.0, device="cpu") -> dict[int, float]:
    """FLOP/s of the fastest single ``n x n @ n x n`` call for each ``n``, calls repeated for ``seconds``.

    The fastest call, not the mean: on a shared machine it is the least disturbed one, the
    closest to what the hardware and this process's threads can do.
    """
    device = torch.device(device)
    rates = {}
    for n in sizes:
        a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
        a @ b  # first call: allocation and kernel selection
        best, end = 0.0, time.perf_counter() + seconds
        while time.perf_counter() < end or best == 0.0:
            t = time.perf_counter()
            a @ b
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            best = max(best, 2.0 * n**3 / (time.perf_counter() - t))
        rates[n] = best
    return rates
