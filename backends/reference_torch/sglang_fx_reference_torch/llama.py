"""Qwen3 / Qwen3-MoE / Qwen2 / Llama in plain PyTorch, written to be read.

All share one shape: pre-norm decoder blocks (decoder.py) of GQA attention with RoPE and a
SwiGLU MLP. Qwen3 adds an RMSNorm on every q/k head (qk_norm); Qwen2 adds q/k/v biases;
Qwen3-MoE replaces the MLP with routed experts. Shapes: T new tokens, H hidden, Hq/Hkv heads,
D head dim.
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


class GQABlock:
    def __init__(self, spec: ModelSpec, w: Mapping[str, torch.Tensor], p: str):
        self.spec = spec
        self.q, self.k, self.v, self.o = (w[f"{p}{n}_proj.weight"] for n in "qkvo")
        self.q_bias, self.k_bias, self.v_bias = (w.get(f"{p}{n}_proj.bias") for n in "qkv")
        self.q_norm, self.k_norm = w.get(p + "q_norm.weight"), w.get(p + "k_norm.weight")

    def __call__(self, layer: int, x: torch.Tensor, rope: Rope, cos, sin, attn: TorchPagedAttention, cache: KVCache) -> torch.Tensor:
        s = self.spec
        q = linear(x, self.q, self.q_bias).view(-1, s.num_heads, s.head_dim)  # [T, Hq, D]
        k = linear(x, self.k, self.k_bias).view(-1, s.num_kv_heads, s.head_dim)  # [T, Hkv, D]
        v = linear(x, self.v, self.v_bias).view(-1, s.num_kv_heads, s.head_dim)  # [T, Hkv, D]
        if self.q_norm is not None:
            q, k = rms_norm(q, self.q_norm, s.rms_norm_eps), rms_norm(k, self.k_norm, s.rms_norm_eps)
        o = attn.forward(layer, rope(q, cos, sin), rope(k, cos, sin), v, cache)  # [T, Hq, D]
        return linear(o.reshape(len(o), -1), self.o)


def llama_family(shard: Shard, weights: Mapping[str, torch.Tensor], device: torch.device, comm: TorchCollectives) -> Decoder:
    spec = shard.local
    D = spec.head_dim
    rope = Rope(D, spec.rope_theta, interleaved=False, device=device)
    return Decoder(shard, weights, device, comm, GQABlock, rope, AttentionSpec(spec.num_heads, spec.num_kv_heads, D, D, D**-0.5))
