"""Shared DLPack helpers implementing the copy rules of `spi.Exchange` on the torch side.

Backends call `export_torch` before handing a torch tensor to their framework's from_dlpack,
and `finish_import` on the torch tensor they get back, so the rules live in one place.
"""

from __future__ import annotations

import torch


def export_torch(t: torch.Tensor, copy: bool | None) -> torch.Tensor:
    """The tensor to export by DLPack under the `spi.Exchange` copy rules: `t` itself when it
    is contiguous and copy is not True; a contiguous copy when copy is True or (copy=None)
    when `t` is strided; BufferError when a copy is needed but copy=False."""
    if copy:
        return t.clone(memory_format=torch.contiguous_format)
    if t.is_contiguous():
        return t
    if copy is False:
        raise BufferError(
            f"tensor of shape {list(t.shape)} and strides {list(t.stride())} is not contiguous, so it "
            "cannot be exchanged without a copy; call .contiguous() first or pass copy=None"
        )
    return t.contiguous()


def finish_import(t: torch.Tensor, copy: bool | None) -> torch.Tensor:
    """Apply copy=True to a torch tensor just imported by DLPack (which always aliases)."""
    return t.clone() if copy else t


def shares_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when a and b start at the same address (an alias, not a copy)."""
    return a.untyped_storage().data_ptr() + a.storage_offset() * a.element_size() == (
        b.untyped_storage().data_ptr() + b.storage_offset() * b.element_size()
    )
