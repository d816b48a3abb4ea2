"""torch <-> MindSpore by DLPack capsules (MindSpore reads capsules, not `__dlpack__`)."""

from __future__ import annotations

import torch
from mindspore import Tensor
from mindspore.utils.dlpack import from_dlpack, to_dlpack

from sglang_fx.exchange import export_torch, finish_import


class MindSporeExchange:
    """Zero-copy exchange under the copy rules of `spi.Exchange`. bf16 crosses as bf16 (DLPack
    carries it; NumPy is never involved)."""

    def from_torch(self, t: torch.Tensor, *, copy: bool | None = None) -> Tensor:
        return from_dlpack(torch.utils.dlpack.to_dlpack(export_torch(t, copy)))

    def to_torch(self, x: Tensor, *, copy: bool | None = None) -> torch.Tensor:
        if not x.is_contiguous():
            if copy is False:
                raise BufferError(
                    f"MindSpore tensor of shape {list(x.shape)} is not contiguous, so it cannot be "
                    "exchanged without a copy; call .contiguous() first or pass copy=None"
                )
            x, copy = x.contiguous(), False
        return finish_import(torch.utils.dlpack.from_dlpack(to_dlpack(x)), copy)
