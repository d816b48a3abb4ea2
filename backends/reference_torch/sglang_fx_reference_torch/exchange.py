from __future__ import annotations

import torch

from sglang_fx.exchange import export_torch


class TorchExchange:
    """torch <-> torch: the identity, under the same copy rules as every other backend."""

    def from_torch(self, t: torch.Tensor, *, copy: bool | None = None) -> torch.Tensor:
        return export_torch(t, copy)

    def to_torch(self, x: torch.Tensor, *, copy: bool | None = None) -> torch.Tensor:
        return export_torch(x, copy)
