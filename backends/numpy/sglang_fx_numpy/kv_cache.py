from __future__ import annotations

import numpy as np
import torch

from sglang_fx.kv_pool import KVLayout

from .exchange import NumpyExchange


class NumpyKVCache:
    """`spi.KVCache`: NumPy views of the host's buffers (made once, no copy); writes go through
    them into the host's memory."""

    def __init__(self, layout: KVLayout, k_buffers: list[torch.Tensor], v_buffers: list[torch.Tensor] | None, exchange: NumpyExchange):
        layout.check_buffers(k_buffers, v_buffers)
        self.layout = layout
        self._k = [exchange.from_torch(b, copy=False) for b in k_buffers]
        self._v = None if v_buffers is None else [exchange.from_torch(b, copy=False) for b in v_buffers]

    def k(self, layer: int) -> np.ndarray:
        return self._k[layer]

    def v(self, layer: int) -> np.ndarray | None:
        return None if self._v is None else self._v[layer]

    def write(self, layer: int, slots: np.ndarray, k: np.ndarray, v: np.ndarray | None) -> None:
        self._k[layer][slots] = k
        if self._v is not None:
            self._v[layer][slots] = v
