"""The host's KV buffers, read by JAX without a copy and written from the host side.

JAX arrays are immutable, and a jitted scatter into a DLPack-imported buffer copies the whole
buffer (XLA cannot donate memory torch owns), so the backend never writes through JAX: it reads
the pool through JAX aliases made once here (`keys`, `values`), and stores each step's new K/V
rows with torch's `index_copy_` into the host's own buffers (`write`, `write_layers`). Per step
that copies exactly the new rows: T x Hkv x D elements per layer for K, and for V.
"""

from __future__ import annotations

import jax
import torch

from sglang_fx.kv_pool import KVLayout

from .exchange import JaxExchange


class JaxKVCache:
    """`spi.KVCache` over host buffers. keys/values: per layer, [S, *shape] JAX arrays aliasing
    the host buffers (values None without V). Raises BufferError when a buffer cannot be aliased
    (not 64-byte aligned): a copy would never see the step's writes."""

    def __init__(self, layout: KVLayout, k_buffers: list[torch.Tensor], v_buffers: list[torch.Tensor] | None, exchange: JaxExchange):
        layout.check_buffers(k_buffers, v_buffers)
        self.layout, self.exchange = layout, exchange
        self.k_buffers, self.v_buffers = k_buffers, v_buffers
        self.keys = tuple(exchange.from_torch(b, copy=False) for b in k_buffers)
        self.values = None if v_buffers is None else tuple(exchange.from_torch(b, copy=False) for b in v_buffers)

    def k(self, layer: int) -> jax.Array:
        return self.keys[layer]

    def v(self, layer: int) -> jax.Array | None:
        return None if self.values is None else self.values[layer]

    def write(self, layer: int, slots: jax.Array, k: jax.Array, v: jax.Array | None) -> None:
        to = self.exchange.to_torch
        self._store(layer, to(slots).long(), to(k), None if v is None else to(v))

    def write_layers(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None) -> None:
        """Every layer's new rows at once: slots [T] int64; k [layers, T, *k_shape], or a sequence
        of each layer's [T, *k_shape] (v likewise, or None without V), as a step returns them."""
        for layer in range(self.layout.num_layers):
            self._store(layer, slots, k[layer], None if v is None else v[layer])

    def _store(self, layer: int, rows: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None) -> None:
        """The one place rows reach the pool: torch's index_copy_ into the host's buffers."""
        self.k_buffers[layer].index_copy_(0, rows, k.to(self.k_buffers[layer].dtype))
        if self.v_buffers is not None:
            self.v_buffers[layer].index_copy_(0, rows, v.to(self.v_buffers[layer].dtype))
