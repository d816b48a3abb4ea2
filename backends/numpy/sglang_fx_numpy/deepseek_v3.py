"""DeepSeek-V3 in NumPy: multi-head latent attention in the absorbed form (see the reference
backend's deepseek_v3.py): the cache keeps one latent per token, [c, k_rope]; q_nope goes into
latent space by kv_b's key part, the output comes out by its value part."""

from __future__ import annotations

import numpy as np

from sglang_fx.spi import AttentionSpec

from .decoder import Decoder
from .layers import Rope, linear, rms_norm


def mla_block(s, w, p, layer, x, rope, cos, sin, attn, cache):
    m, n, eps = s.mla, s.num_heads, s.rms_norm_eps
    if m.q_lora_rank is None:
        q = linear(x, w[p + "q_proj.weight"])
    else:
        q = linear(rms_norm(linear(x, w[p + "q_a_proj.weight"]), w[p + "q_a_layernorm.weight"], eps), w[p + "q_b_proj.weight"])
    q_nope, q_rope = np.split(q.reshape(len(x), n, m.qk_head_dim), [m.qk_nope_head_dim], axis=-1)
    c, k_rope = np.split(linear(x, w[p + "kv_a_proj_with_mqa.weight"]), [m.kv_lora_rank], axis=-1)
    c = rms_norm(c, w[p + "kv_a_layernorm.weight"], eps)  # [T, r]
    q_rope, k_rope = rope(q_rope, cos, sin), rope(k_rope[:, None, :], cos, sin)
    kv_b = w[p + "kv_b_proj.weight"].reshape(n, m.qk_nope_head_dim + m.v_head_dim, m.kv_lora_rank)
    w_uk, w_uv = kv_b[:, : m.qk_nope_head_dim], kv_b[:, m.qk_nope_head_dim :]  # [n, dn, r], [n, dv, r]
    q_lat = np.einsum("tnd,ndr->tnr", q_nope, w_uk)
    latent = np.concatenate([c[:, None, :], k_rope], axis=-1)  # [T, 1, r + dr]: what the cache keeps
    o = attn.forward(layer, np.concatenate([q_lat, q_rope], axis=-1), latent, None, cache)  # [T, n, r]
    return linear(np.einsum("tnr,nvr->tnv", o, w_uv).reshape(len(x), -1), w[p + "o_proj.weight"])


def deepseek_v3(spec, weights) -> Decoder:
    m = spec.mla
    attn_spec = AttentionSpec(spec.num_heads, 1, m.kv_lora_rank + m.qk_rope_head_dim, m.kv_lora_rank, m.qk_head_dim**-0.5)
    return Decoder(spec, weights, mla_block, Rope(m.qk_rope_head_dim, spec.rope_theta, interleaved=m.rope_interleave), attn_spec)
