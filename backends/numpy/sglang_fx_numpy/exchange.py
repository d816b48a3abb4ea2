"""torch <-> NumPy, zero-copy both ways, under the copy rules of `spi.Exchange`.

Not by DLPack: NumPy 1.26's `np.from_dlpack` returns read-only arrays and refuses bfloat16.
`Tensor.numpy()` and `torch.from_numpy` share memory and stay writeable, which is what the KV
pool needs (the backend writes into SGLang's buffers in place). NumPy has no bfloat16: such a
tensor is refused with a TypeError, and the backend does not declare that dtype.
"""

from __future__ import annotations

import numpy as np
import torch

from sglang_fx.exchange import export_torch, finish_import

#: The torch dtypes NumPy has.
DTYPES = frozenset({
    torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16, torch.float32, torch.float64,
})  # fmt: skip


class NumpyExchange:
    def from_torch(self, t: torch.Tensor, *, copy: bool | None = None) -> np.ndarray:
        if t.dtype not in DTYPES:
            raise TypeError(f"NumPy has no {t.dtype}; convert the tensor to one of {sorted(map(str, DTYPES))} first")
        if t.device.type != "cpu":
            raise TypeError(f"NumPy arrays live in host memory; this tensor is on {t.device}")
        return export_torch(t, copy).numpy()

    def to_torch(self, x: np.ndarray, *, copy: bool | None = None) -> torch.Tensor:
        if not x.flags.c_contiguous:
            if copy is False:
                raise BufferError(f"array of shape {list(x.shape)} and strides {list(x.strides)} is not contiguous, so it "
                                  "cannot be exchanged without a copy; call np.ascontiguousarray first or pass copy=None")  # fmt: skip
            x, copy = np.ascontiguousarray(x), False
        return finish_import(torch.from_numpy(x), copy)
