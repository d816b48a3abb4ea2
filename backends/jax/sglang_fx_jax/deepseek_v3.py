"""DeepSeek-V3 in JAX: multi-head latent attention (MLA) in the absorbed form, as the reference
backend computes it (see its deepseek_v3.py): the cache keeps one latent per token, c =
RMSNorm(kv_a(x)[:r]) and the rotated shared key k_rope; q_nope is taken into latent space by
kv_b's key part, and the attention output lifted out by its value part. Routed and shared
experts come from decoder.py. Shapes: T new tokens, n heads, r kv_lora_rank, dr rope dims,
dn nope dims, dv value dims."""

from __future__ import annotations

import jax.numpy as jnp

from sglang_fx.sharding import Shard
from sglang_fx.spi import AttentionSpec

from .decoder import Decoder
from .layers import Collectives, Rope, linear, rms_norm


def mla_block(spec, w, x, rope, cos, sin, attn):
    m, n, eps, p = spec.mla, spec.num_heads, spec.rms_norm_eps, "self_attn."
    T = len(x)
    if m.q_lora_rank is None:
        q = linear(x, w[p + "q_proj.weight"])
    else:
        q = linear(rms_norm(linear(x, w[p + "q_a_proj.weight"]), w[p + "q_a_layernorm.weight"], eps), w[p + "q_b_proj.weight"])
    q_nope, q_rope = jnp.split(q.reshape(T, n, m.qk_head_dim), [m.qk_nope_head_dim], axis=-1)  # [T, n, dn], [T, n, dr]
    c, k_rope = jnp.split(linear(x, w[p + "kv_a_proj_with_mqa.weight"]), [m.kv_lora_rank], axis=-1)
    c = rms_norm(c, w[p + "kv_a_layernorm.weight"], eps)  # [T, r]
    q_rope, k_rope = rope(q_rope, cos, sin), rope(k_rope[:, None, :], cos, sin)  # [T, n, dr], [T, 1, dr]
    kv_b = w[p + "kv_b_proj.weight"].reshape(n, m.qk_nope_head_dim + m.v_head_dim, m.kv_lora_rank)
    w_uk, w_uv = kv_b[:, : m.qk_nope_head_dim], kv_b[:, m.qk_nope_head_dim :]  # [n, dn, r], [n, dv, r]
    q_lat = jnp.einsum("tnd,ndr->tnr", q_nope, w_uk)  # [T, n, r]
    latent = jnp.concatenate([c[:, None, :], k_rope], axis=-1)  # [T, 1, r + dr]: what the cache keeps
    o = attn(jnp.concatenate([q_lat, q_rope], axis=-1), latent, None)  # [T, n, r]
    o = jnp.einsum("tnr,nvr->tnv", o, w_uv)  # [T, n, dv]
    return linear(o.reshape(T, -1), w[p + "o_proj.weight"]), latent, None


def deepseek_v3(shard: Shard, comm: Collectives, scan: bool) -> Decoder:
    spec = shard.local
    m = spec.mla
    # MQA over the latent: one KV "head" of r + dr channels; values are its first r channels.
    attn_spec = AttentionSpec(spec.num_heads, 1, m.kv_lora_rank + m.qk_rope_head_dim, m.kv_lora_rank, m.qk_head_dim**-0.5)
    return Decoder(shard, mla_block, Rope(m.qk_rope_head_dim, spec.rope_theta, interleaved=m.rope_interleave), attn_spec, comm, scan)
