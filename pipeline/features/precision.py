"""Device and autocast choice shared by extraction and training."""
from __future__ import annotations

import contextlib

import torch


def pick_device(use_gpu: bool) -> torch.device:
    """Returns cuda when asked for and present, else cpu."""
    return torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")


def cpu_supports_bf16() -> bool:
    """Returns True when oneDNN has native bf16 kernels on this CPU (avx512_bf16 / AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """Returns fp32, bf16 or fp16: `auto` picks bf16 on a GPU or a bf16-capable CPU, else fp32."""
    if precision != "auto":
        if precision == "fp16" and device.type == "cpu":
            return "bf16" if cpu_supports_bf16() else "fp32"  # fp16 autocast on CPU is slow or absent
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_supports_bf16() else "fp32"


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """Returns the autocast context for a resolved precision (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)
