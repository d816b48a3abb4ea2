from __future__ import annotations

import numpy as np

from sglang_fx.metadata import ForwardMetadata
from sglang_fx.spi import AttentionSpec

from .kv_cache import NumpyKVCache


class NumpyPagedAttention:
    """Paged attention, one sequence at a time: write the new K/V into the pool, gather the
    sequence's keys and values from its slots (req_to_token), attend in float32 under the step's
    mask (`ForwardMetadata.visible`: causal, or prefix plus draft tree in a VERIFY step)."""

    def __init__(self, spec: AttentionSpec):
        self.spec = spec

    def plan(self, meta: ForwardMetadata) -> None:
        self.out_cache_loc = meta.out_cache_loc.numpy()
        self.seqs = []  # (first new-token row, new tokens, slots [L] of all its tokens, visible [new, L])
        row = 0
        for b, (length, new) in enumerate(zip(meta.seq_lens_cpu, meta.extend_lens_cpu)):
            self.seqs.append((row, new, meta.req_to_token[b, :length].numpy(), meta.visible(b).numpy()))
            row += new

    def forward(self, layer: int, q: np.ndarray, k: np.ndarray, v: np.ndarray | None, cache: NumpyKVCache) -> np.ndarray:
        cache.write(layer, self.out_cache_loc, k, v)
        keys = cache.k(layer)
        values = keys[..., : self.spec.v_head_dim] if v is None else cache.v(layer)  # MLA: the latent
        group = self.spec.num_heads // self.spec.num_kv_heads
        out = np.empty((len(q), self.spec.num_heads, self.spec.v_head_dim), q.dtype)
        for row, new, slots, visible in self.seqs:
            qs = q[row : row + new].astype(np.float32)  # [e, Hq, D]
            ks = np.repeat(keys[slots].astype(np.float32), group, axis=1)  # [L, Hq, D]
            vs = np.repeat(values[slots].astype(np.float32), group, axis=1)  # [L, Hq, Dv]
            scores = np.einsum("ehd,lhd->hel", qs, ks) * self.spec.scale
            scores = np.where(visible, scores, -np.inf)
            p = np.exp(scores - scores.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            out[row : row + new] = np.einsum("hel,lhd->ehd", p, vs)
        return out
