from __future__ import annotations

import torch
from mindspore import Tensor, mutable

from sglang_fx.kv_pool import KVLayout

from .exchange import MindSporeExchange
from .kernels import write_rows


class MindSporeKVCache:
    """MindSpore tensors aliasing the host's torch KV buffers, made once here (never per step).

    Besides the `spi.KVCache` methods, every layer's buffer is held in three zero-copy views, as
    MindSpore `mutable` tuples (the form a jit graph takes them in, so that its writes land in
    place): `keys`/`values` [S, *shape] (what the KV writes take), `key_rows`/`value_rows`
    [S * Hkv, D] (one row per slot and KV head: what the portable tier gathers from; a reshape
    inside a graph would copy the whole buffer), and `key_pages`/`value_pages`
    [num_pages, P, *shape] for Ascend's paged kernels. The value views are None without V.
    """

    def __init__(
        self,
        layout: KVLayout,
        k_buffers: list[torch.Tensor],
        v_buffers: list[torch.Tensor] | None,
        exchange: MindSporeExchange,
    ):
        layout.check_buffers(k_buffers, v_buffers)
        self.layout = layout

        def alias(buffers: list[torch.Tensor] | None, view) -> tuple | None:
            return None if buffers is None else mutable(tuple(exchange.from_torch(view(b), copy=False) for b in buffers))

        def slots(b):
            return b.view(layout.num_slots, *b.shape[1:])

        def rows(b):
            return b.view(-1, b.shape[-1])

        def pages(b):
            return b.view(layout.num_pages, layout.page_size, *b.shape[1:])

        self.keys, self.key_rows, self.key_pages = (alias(k_buffers, f) for f in (slots, rows, pages))
        self.values, self.value_rows, self.value_pages = (alias(v_buffers, f) for f in (slots, rows, pages))
        #: (keys,) or (keys, values): what a jit step stores this step's K/V into (a ready mutable
        #: tuple: making one checks every element, too slow to repeat per step).
        self.slot_views = mutable((self.keys,) if self.values is None else (self.keys, self.values))

    def k(self, layer: int) -> Tensor:
        return self.keys[layer]

    def v(self, layer: int) -> Tensor | None:
        return None if self.values is None else self.values[layer]

    def write(self, layer: int, slots: Tensor, k: Tensor, v: Tensor | None) -> None:
        write_rows(self.keys[layer], slots, k)
        if self.values is not None:
            write_rows(self.values[layer], slots, v)
