from __future__ import annotations

import torch
import torch.nn.functional as F

from sglang_fx.metadata import ForwardMetadata
from sglang_fx.spi import AttentionSpec, KVCache


class TorchPagedAttention:
    """Paged attention, one sequence at a time: gather the sequence's K/V from its slots
    (req_to_token), then SDPA under the step's mask (`ForwardMetadata.visible`: causal, or the
    committed prefix plus the draft tree in a VERIFY step)."""

    def __init__(self, spec: AttentionSpec):
        self.spec = spec

    def plan(self, meta: ForwardMetadata) -> None:
        self.out_cache_loc = meta.out_cache_loc
        self.seqs = []  # (first new-token row, new tokens, slots [L_b] of all tokens, mask [e, L_b])
        row = 0
        for b, (length, new) in enumerate(zip(meta.seq_lens_cpu, meta.extend_lens_cpu)):
            self.seqs.append((row, new, meta.req_to_token[b, :length].long(), meta.visible(b)))
            row += new

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None, cache: KVCache) -> torch.Tensor:
        cache.write(layer, self.out_cache_loc, k, v)
        keys = cache.k(layer)
        values = keys[..., : self.spec.v_head_dim] if v is None else cache.v(layer)  # MLA: the latent
        out = q.new_empty((q.shape[0], q.shape[1], self.spec.v_head_dim))
        for row, new, slots, mask in self.seqs:
            qs = q[row : row + new].transpose(0, 1)  # [Hq, e, D]
            ks = keys[slots].transpose(0, 1).to(q.dtype)  # [Hkv, L_b, D]
            vs = values[slots].transpose(0, 1).to(q.dtype)  # [Hkv, L_b, Dv]
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=self.spec.scale, enable_gqa=True)
            out[row : row + new] = o.transpose(0, 1)
        return out
