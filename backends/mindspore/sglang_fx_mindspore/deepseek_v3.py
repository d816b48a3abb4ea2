"""DeepSeek-V3 in MindSpore: multi-head latent attention (MLA) on the Decoder, whose MoE layers
route by grouped sigmoid scores through routed + shared experts (`layers.route`), after
first_k_dense_replace dense layers.

MLA caches one latent per token: c = RMSNorm(kv_a(x)[:r]) and the rotated shared key k_rope.
Attention runs in the absorbed form over that latent, as the reference and SGLang do: q_nope
enters latent space through kv_b's key part (W_uk), the scores are [q_nope W_uk, q_rope] .
[c, k_rope] (one KV head of r + dr channels), and the output latent (the values are the first r
channels) is lifted to v_head_dim by kv_b's value part (W_uv).
Shapes: T new tokens, n heads, r kv_lora_rank, dr rope dims, dn nope dims, dv value dims.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from mindspore import ops

from sglang_fx.checkpoint import ModelSpec
from sglang_fx.spi import AttentionSpec

from .decoder import Decoder
from .layers import linear, projection, rms_norm, rope

_bmm = ops.BatchMatMul()


class DeepseekV3(Decoder):
    @staticmethod
    def attention_spec(spec: ModelSpec) -> AttentionSpec:
        m = spec.mla
        return AttentionSpec(spec.num_heads, 1, m.kv_lora_rank + m.qk_rope_head_dim, m.kv_lora_rank, m.qk_head_dim**-0.5)

    @staticmethod
    def rope_dims(spec: ModelSpec) -> tuple[int, bool]:
        return spec.mla.qk_rope_head_dim, spec.mla.rope_interleave

    @staticmethod
    def attention_weights(w: Mapping[str, torch.Tensor], prefix: str, spec: ModelSpec) -> tuple[torch.Tensor, ...]:
        """(q_a_proj, or q_proj without q_lora_rank, and kv_a_proj_with_mqa as one projection of
        x; kv_a_layernorm; W_uk [n, dn, r]; W_uv transposed, [n, r, dv]; o_proj); then q_b_proj
        and q_a_layernorm when the model has q_lora_rank. Projections quantized in the checkpoint are
        (q, scale) pairs (`layers.projection`); kv_b_proj never is."""
        m, n = spec.mla, spec.num_heads
        lora = m.q_lora_rank is not None
        kv_b = w[prefix + "kv_b_proj.weight"].view(n, m.qk_nope_head_dim + m.v_head_dim, m.kv_lora_rank)
        out = (
            projection(w, [prefix + ("q_a_proj.weight" if lora else "q_proj.weight"), prefix + "kv_a_proj_with_mqa.weight"], spec.quant),
            w[prefix + "kv_a_layernorm.weight"],
            kv_b[:, : m.qk_nope_head_dim].contiguous(),
            kv_b[:, m.qk_nope_head_dim :].transpose(1, 2).contiguous(),
            projection(w, [prefix + "o_proj.weight"], spec.quant),
        )
        return out + (projection(w, [prefix + "q_b_proj.weight"], spec.quant), w[prefix + "q_a_layernorm.weight"]) if lora else out

    @staticmethod
    def attention_linear(spec: ModelSpec, name: str) -> tuple[int, range | None]:
        m = spec.mla
        q = spec.num_heads * m.qk_head_dim if m.q_lora_rank is None else m.q_lora_rank  # rows of q_proj or q_a_proj
        kv_a = range(q, q + m.kv_lora_rank + m.qk_rope_head_dim)
        return {"q_proj": (0, range(q)), "q_a_proj": (0, range(q)), "kv_a_proj_with_mqa": (0, kv_a), "o_proj": (4, None),
                "q_b_proj": (5, None)}[name]  # fmt: skip

    def block(self, w, x, rope_w, kv):
        m, n, eps = self.spec.mla, self.spec.num_heads, self.eps
        qkv_a, kv_a_norm, w_uk, w_uv_t, o_proj = w[:5]
        r, dr, dn = m.kv_lora_rank, m.qk_rope_head_dim, m.qk_nope_head_dim
        qkv = linear(x, qkv_a)
        q, c, k_rope = qkv[:, : -r - dr], qkv[:, -r - dr : -dr], qkv[:, -dr:]  # [T, q_lora or n (dn + dr)], [T, r], [T, dr]
        if m.q_lora_rank is not None:
            q = linear(rms_norm(q, w[6], eps), w[5])
        q = q.reshape(-1, n, dn + dr)
        q_nope, q_rope = q[..., :dn], rope(q[..., dn:], n, rope_w, self.interleaved)  # [T, n, dn], [T, n, dr]
        k_rope = rope(k_rope.reshape(-1, 1, dr), 1, rope_w, self.interleaved)  # [T, 1, dr]
        q_lat = _bmm(q_nope.transpose(1, 0, 2), w_uk).transpose(1, 0, 2)  # [T, n, r]
        latent = ops.cat((rms_norm(c, kv_a_norm, eps).reshape(-1, 1, r), k_rope), -1)  # [T, 1, r + dr]: what the cache keeps
        o = self.attend(ops.cat((q_lat, q_rope), -1), latent, None, kv)  # [T, n, r]
        o = _bmm(o.transpose(1, 0, 2), w_uv_t).transpose(1, 0, 2)  # [T, n, dv]
        return linear(o.reshape(-1, n * m.v_head_dim), o_proj)
