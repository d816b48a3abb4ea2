"""DeepSeek-V3 in plain PyTorch: multi-head latent attention (MLA) and routed + shared experts.

MLA caches one latent per token: c = RMSNorm(kv_a(x)[:r]) (r = kv_lora_rank) and the rotated
shared key k_rope. Attention runs in the "absorbed" form over that latent, as SGLang does:
q_nope is multiplied into latent space by kv_b's key part (W_uk), the scores are
[q_nope W_uk, q_rope] . [c, k_rope], and the output latent is lifted to v_head_dim by kv_b's
value part (W_uv). Mathematically the same as expanding K and V per head.
Shapes: T new tokens, n heads, r kv_lora_rank, dr rope dims, dn nope dims, dv value dims.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from sglang_fx.checkpoint import ModelSpec
from sglang_fx.sharding import Shard
from sglang_fx.spi import AttentionSpec, KVCache

from .attention import TorchPagedAttention
from .collectives import TorchCollectives
from .decoder import Decoder
from .layers import Rope, linear, rms_norm


class LatentAttention:
    def __init__(self, spec: ModelSpec, w: Mapping[str, torch.Tensor], p: str):
        m, n = spec.mla, spec.num_heads
        self.spec, self.m, self.eps = spec, m, spec.rms_norm_eps
        self.q_a, self.q_a_norm = w.get(p + "q_a_proj.weight"), w.get(p + "q_a_layernorm.weight")
        self.q_b = w[p + "q_b_proj.weight"] if m.q_lora_rank is not None else w[p + "q_proj.weight"]
        self.kv_a, self.kv_a_norm = w[p + "kv_a_proj_with_mqa.weight"], w[p + "kv_a_layernorm.weight"]
        kv_b = w[p + "kv_b_proj.weight"].view(n, m.qk_nope_head_dim + m.v_head_dim, m.kv_lora_rank)
        self.w_uk, self.w_uv = kv_b[:, : m.qk_nope_head_dim], kv_b[:, m.qk_nope_head_dim :]  # [n, dn, r], [n, dv, r]
        self.o = w[p + "o_proj.weight"]

    def __call__(self, layer: int, x: torch.Tensor, rope: Rope, cos, sin, attn: TorchPagedAttention, cache: KVCache) -> torch.Tensor:
        m, n = self.m, self.spec.num_heads
        q_in = x if self.q_a is None else rms_norm(linear(x, self.q_a), self.q_a_norm, self.eps)
        q = linear(q_in, self.q_b).view(-1, n, m.qk_head_dim)  # [T, n, dn + dr]
        q_nope, q_rope = q.split([m.qk_nope_head_dim, m.qk_rope_head_dim], dim=-1)
        c, k_rope = linear(x, self.kv_a).split([m.kv_lora_rank, m.qk_rope_head_dim], dim=-1)
        c = rms_norm(c, self.kv_a_norm, self.eps)  # [T, r]
        q_rope, k_rope = rope(q_rope, cos, sin), rope(k_rope[:, None, :], cos, sin)  # [T, n, dr], [T, 1, dr]
        q_lat = torch.einsum("tnd,ndr->tnr", q_nope, self.w_uk)  # [T, n, r]
        latent = torch.cat([c[:, None, :], k_rope], dim=-1)  # [T, 1, r + dr]: what the cache keeps
        o = attn.forward(layer, torch.cat([q_lat, q_rope], dim=-1), latent, None, cache)  # [T, n, r]
        o = torch.einsum("tnr,nvr->tnv", o, self.w_uv)  # [T, n, dv]
        return linear(o.reshape(len(o), -1), self.o)


def deepseek_v3(shard: Shard, weights: Mapping[str, torch.Tensor], device: torch.device, comm: TorchCollectives) -> Decoder:
    spec = shard.local
    m = spec.mla
    rope = Rope(m.qk_rope_head_dim, spec.rope_theta, interleaved=m.rope_interleave, device=device)
    # MQA over the latent: one KV "head" of r + dr channels; values are its first r channels.
    attn_spec = AttentionSpec(spec.num_heads, 1, m.kv_lora_rank + m.qk_rope_head_dim, m.kv_lora_rank, m.qk_head_dim**-0.5)
    return Decoder(shard, weights, device, comm, LatentAttention, rope, attn_spec)
