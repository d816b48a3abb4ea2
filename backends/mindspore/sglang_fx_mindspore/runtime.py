"""Where MindSpore runs: sglang-fx device strings -> MindSpore device targets, dtypes, and the
choice of attention kernel tier."""

from __future__ import annotations

import enum
import functools

import torch

from sglang_fx.errors import UnsupportedConfigError
from sglang_fx.kv_pool import KVLayout

#: sglang-fx device kind -> MindSpore device target.
DEVICE_TARGETS = {"cpu": "CPU", "cuda": "GPU", "npu": "Ascend"}


def activate(device: str) -> None:
    """Make `device` ("cpu", "cuda:0", "npu:1") MindSpore's device. MindSpore runs one device
    target per process; raises UnsupportedConfigError when `device` is unknown or this process
    cannot use it."""
    import mindspore as ms

    kind, _, index = device.partition(":")
    if kind not in DEVICE_TARGETS:
        raise UnsupportedConfigError(
            f"device {device!r} is not a MindSpore device; use one of: {', '.join(f'{k}[:N]' for k in DEVICE_TARGETS)}"
        )
    try:
        ms.set_device(DEVICE_TARGETS[kind], int(index or 0))
    except (RuntimeError, ValueError) as e:
        raise UnsupportedConfigError(
            f"MindSpore cannot run on {device!r} in this process: {str(e).splitlines()[0]} "
            "(install the MindSpore build for that device, and use one device kind per process)"
        ) from None


@functools.cache
def ms_dtype(dtype: torch.dtype):
    """The MindSpore dtype of a torch dtype."""
    import mindspore as ms

    return {torch.float32: ms.float32, torch.float16: ms.float16, torch.bfloat16: ms.bfloat16}[dtype]


class Tier(enum.Enum):
    """Attention kernel tier: portable mint/ops kernels, or Ascend's fused kernels."""

    PORTABLE = "portable"
    ASCEND = "ascend"


def choose_tier(device: str, layout: KVLayout, dtype: torch.dtype) -> Tier:
    """The one place that picks the attention tier. Ascend's fused kernels (flash_attention_score,
    paged_attention, reshape_and_cache) need an NPU, half-precision activations and KV of the same
    dtype, and KV blocks of a multiple of 16 tokens; everything else runs the portable tier."""
    half = dtype in (torch.float16, torch.bfloat16) and layout.dtype == dtype
    fused = device.startswith("npu") and half and layout.page_size % 16 == 0
    return Tier.ASCEND if fused else Tier.PORTABLE
