"""Where MindSpore runs: sglang-fx device strings -> MindSpore device targets, dtypes, and the
choice of attention kernel tier."""

from __future__ import annotations

import ctypes
import enum
import functools
import glob
import logging
import os

import torch

from sglang_fx.errors import UnsupportedConfigError
from sglang_fx.kv_pool import KVLayout

logger = logging.getLogger(__name__)

#: sglang-fx device kind -> MindSpore device target.
DEVICE_TARGETS = {"cpu": "CPU", "cuda": "GPU", "npu": "Ascend"}

#: Entries of the oneDNN primitive cache that MindSpore's CPU kernels use (oneDNN's default is
#: 1024). oneDNN caches a primitive per operand shape, and the attention's shapes change every
#: step with the context length, so the default cache only grows: about 1 MB per entry on
#: SmolLM2, +300 MB over a chat and a decode-heavy run. 64 entries keep the fixed-shape
#: primitives of every graph warm (they are used each step, the cache is LRU); measured on SmolLM2
#: with six decode graphs, steps took the same time at 16, 64, 256 and 1024 entries.
PRIMITIVE_CACHE = 64
#: oneDNN's own variables: where the user set one, the capacity is theirs.
ONEDNN_CACHE_ENV = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "DNNL_PRIMITIVE_CACHE_CAPACITY")


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
    if kind == "cpu":
        limit_primitive_cache()


@functools.cache
def limit_primitive_cache(capacity: int = PRIMITIVE_CACHE) -> int | None:
    """Give the oneDNN library bundled with MindSpore a primitive cache of `capacity` entries
    (PRIMITIVE_CACHE), unless the user set oneDNN's variable (ONEDNN_CACHE_ENV). Process-wide for
    MindSpore's kernels only: torch's oneDNN is another copy. Returns the capacity in force, or
    None where this MindSpore build ships no oneDNN."""
    import mindspore as ms

    found = sorted(glob.glob(os.path.join(os.path.dirname(ms.__file__), "lib", "libdnnl.so*")))
    if not found:
        return None
    lib = ctypes.CDLL(found[0])
    if not any(name in os.environ for name in ONEDNN_CACHE_ENV):
        status = lib.dnnl_set_primitive_cache_capacity(ctypes.c_int(capacity))
        if status != 0:  # dnnl_success
            logger.warning("sglang-fx mindspore: oneDNN refused a primitive cache of %d entries (status %d)", capacity, status)
    current = ctypes.c_int()
    lib.dnnl_get_primitive_cache_capacity(ctypes.byref(current))
    return current.value


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
