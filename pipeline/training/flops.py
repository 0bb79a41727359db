"""Count the FLOPs of a piece of work with torch's FlopCounterMode, CPU attention included.

Why: benchmarks compare measured speed-ups with the speed-up FLOP counts predict.
torch's counter knows the CUDA attention kernels but not the CPU one that
``scaled_dot_product_attention`` dispatches to, so on CPU every attention product
would be missed. The CPU kernel is registered here with the same formulas torch
uses for its other attention kernels (forward: QK^T and AV; backward: four products).
"""

from __future__ import annotations

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
