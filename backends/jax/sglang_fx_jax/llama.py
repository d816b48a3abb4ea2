"""Qwen3 / Qwen3-MoE / Qwen2 / Llama in JAX: GQA attention with RoPE (decoder.py adds the rest).
Qwen3 normalises each q/k head (qk_norm); Qwen2 has q/k/v biases. Shapes: T new tokens, Hq/Hkv
heads, D head dim."""

from __future__ import annotations

from sglang_fx.sharding import Shard
from sglang_fx.spi import AttentionSpec

from .decoder import Decoder
from .layers import Collectives, Rope, linear, rms_norm


def gqa_block(spec, w, x, rope, cos, sin, attn):
    p, eps = "self_attn.", spec.rms_norm_eps
    q = linear(x, w[p + "q_proj.weight"], w.get(p + "q_proj.bias")).reshape(len(x), -1, spec.head_dim)  # [T, Hq, D]
    k = linear(x, w[p + "k_proj.weight"], w.get(p + "k_proj.bias")).reshape(len(x), -1, spec.head_dim)  # [T, Hkv, D]
    v = linear(x, w[p + "v_proj.weight"], w.get(p + "v_proj.bias")).reshape(len(x), -1, spec.head_dim)
    if spec.qk_norm:
        q, k = rms_norm(q, w[p + "q_norm.weight"], eps), rms_norm(k, w[p + "k_norm.weight"], eps)
    q, k = rope(q, cos, sin), rope(k, cos, sin)
    o = attn(q, k, v)  # [T, Hq, D]
    return linear(o.reshape(len(x), -1), w[p + "o_proj.weight"]), k, v


def llama_family(shard: Shard, comm: Collectives, scan: bool) -> Decoder:
    spec = shard.local
    D = spec.head_dim
    return Decoder(shard, gqa_block, Rope(D, spec.rope_theta, interleaved=False),
                   AttentionSpec(spec.num_heads, spec.num_kv_heads, D, D, D**-0.5), comm, scan)  # fmt: skip
