"""torch <-> MindSpore by DLPack capsules (MindSpore reads capsules, not `__dlpack__`)."""

from __future__ import annotations

import mindspore as ms
import torch
from mindspore import Tensor
from mindspore.utils.dlpack import from_dlpack, to_dlpack

from sglang_fx.exchange import export_torch, finish_import

#: What MindSpore 2.10's DLPack accepts. bool is not among them: it crosses as uint8 and is
#: reinterpreted on arrival (Tensor.view(dtype), no copy).
DLPACK_DTYPES = frozenset({
    torch.uint8, torch.uint16, torch.uint32, torch.uint64, torch.int8, torch.int16, torch.int32, torch.int64,
    torch.float16, torch.bfloat16, torch.float32, torch.float64,
})  # fmt: skip


#: MindSpore dtypes NumPy has (not bfloat16).
NUMPY_DTYPES = frozenset({ms.float16, ms.float32, ms.float64, ms.int8, ms.int16, ms.int32, ms.int64, ms.uint8})


class MindSporeExchange:
    """Zero-copy exchange under the copy rules of `spi.Exchange`. bf16 crosses as bf16 (DLPack
    carries it; NumPy is never involved). Raises TypeError for dtypes MindSpore's DLPack lacks
    (complex, float8)."""

    def from_torch(self, t: torch.Tensor, *, copy: bool | None = None) -> Tensor:
        if t.dtype == torch.bool:
            return self.from_torch(t.view(torch.uint8), copy=copy).view(ms.bool_)
        if t.dtype not in DLPACK_DTYPES:
            raise TypeError(f"MindSpore's DLPack cannot take {t.dtype}; convert the tensor to a supported dtype first")
        return from_dlpack(torch.utils.dlpack.to_dlpack(export_torch(t, copy)))

    def to_torch(self, x: Tensor, *, copy: bool | None = None) -> torch.Tensor:
        if x.dtype == ms.bool_:
            return self.to_torch(x.view(ms.uint8), copy=copy).view(torch.bool)
        if not x.is_contiguous():
            if copy is False:
                raise BufferError(
                    f"MindSpore tensor of shape {list(x.shape)} is not contiguous, so it cannot be "
                    "exchanged without a copy; call .contiguous() first or pass copy=None"
                )
            x, copy = x.contiguous(), False
        return finish_import(torch.utils.dlpack.from_dlpack(to_dlpack(x)), copy)

    def output_to_torch(self, x: Tensor) -> torch.Tensor:
        """to_torch(x) for a tensor MindSpore allocated, such as a compiled graph's output: on CPU,
        through its NumPy view, which shares that memory and keeps it alive. (to_dlpack of a
        graph's output takes ~0.3-0.5 ms on CPU, ten times asnumpy; asnumpy of a tensor imported by
        DLPack, on the other hand, copies, so to_torch does not take this way.)"""
        if x.device == "CPU" and x.dtype in NUMPY_DTYPES and x.is_contiguous():
            return torch.from_numpy(x.asnumpy())
        return self.to_torch(x)
