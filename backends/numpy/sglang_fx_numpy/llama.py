"""Qwen3 / Qwen3-MoE / Qwen2 / Llama in NumPy: GQA attention with RoPE (decoder.py adds the rest).
Qwen3 normalises each q/k head; Qwen2 has q/k/v biases."""

from __future__ import annotations

from sglang_fx.spi import AttentionSpec

from .decoder import Decoder
from .layers import Rope, linear, rms_norm


def gqa_block(s, w, p, layer, x, rope, cos, sin, attn, cache):
    q = linear(x, w[p + "q_proj.weight"], w.get(p + "q_proj.bias")).reshape(len(x), s.num_heads, s.head_dim)
    k = linear(x, w[p + "k_proj.weight"], w.get(p + "k_proj.bias")).reshape(len(x), s.num_kv_heads, s.head_dim)
    v = linear(x, w[p + "v_proj.weight"], w.get(p + "v_proj.bias")).reshape(len(x), s.num_kv_heads, s.head_dim)
    if s.qk_norm:
        q, k = rms_norm(q, w[p + "q_norm.weight"], s.rms_norm_eps), rms_norm(k, w[p + "k_norm.weight"], s.rms_norm_eps)
    o = attn.forward(layer, rope(q, cos, sin), rope(k, cos, sin), v, cache)  # [T, Hq, D]
    return linear(o.reshape(len(x), -1), w[p + "o_proj.weight"])


def llama_family(spec, weights) -> Decoder:
    D = spec.head_dim
    attn_spec = AttentionSpec(spec.num_heads, spec.num_kv_heads, D, D, D**-0.5)
    return Decoder(spec, weights, gqa_block, Rope(D, spec.rope_theta, interleaved=False), attn_spec)
