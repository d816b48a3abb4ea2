from __future__ import annotations

import torch

from sglang_fx.kv_pool import KVLayout


class TorchKVCache:
    """The host's torch buffers, used as they are (torch is the host framework)."""

    def __init__(self, layout: KVLayout, k_buffers: list[torch.Tensor], v_buffers: list[torch.Tensor] | None):
        self.layout, self._k, self._v = layout, k_buffers, v_buffers

    def k(self, layer: int) -> torch.Tensor:
        return self._k[layer]

    def v(self, layer: int) -> torch.Tensor | None:
        return None if self._v is None else self._v[layer]

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None) -> None:
        self._k[layer][slots] = k.to(self._k[layer].dtype)
        if self._v is not None:
            self._v[layer][slots] = v.to(self._v[layer].dtype)
