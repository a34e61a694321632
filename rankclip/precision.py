"""Mixed precision: which autocast dtype a --precision runs under, and the fp16 loss scaler."""

from __future__ import annotations

import contextlib
import os
from typing import Optional

import torch

# Tests only: with RANKCLIP_CPU_AMP=1 the CPU runs --precision amp / amp_bf16 as a GPU would (CPU
# autocast, fp16 with a GradScaler), so that those code paths are exercised without a GPU. Users on
# a CPU always train in fp32.
CPU_AMP_ENV = "RANKCLIP_CPU_AMP"


def mixed_precision(device: torch.device) -> bool:
    """Whether --precision amp / amp_bf16 take effect on `device`."""
    return device.type == "cuda" or os.environ.get(CPU_AMP_ENV) == "1"


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Mixed precision on CUDA (and where RANKCLIP_CPU_AMP asks for it); otherwise fp32."""
    dtypes = {"amp": torch.float16, "amp_bf16": torch.bfloat16, "fp32": None}
    if precision not in dtypes:
        raise ValueError(f"unknown precision {precision!r}; expected one of {list(dtypes)}")
    if dtypes[precision] is None or not mixed_precision(device):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtypes[precision])


def build_scaler(device: torch.device, precision: str) -> Optional[torch.amp.GradScaler]:
    """fp16 needs loss scaling (gradients below fp16's range would vanish); bf16 and fp32 do not."""
    return torch.amp.GradScaler(device.type) if precision == "amp" and mixed_precision(device) else None
