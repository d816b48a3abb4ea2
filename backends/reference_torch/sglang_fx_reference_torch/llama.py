"""Qwen3 / Qwen2 / Llama in plain PyTorch, written to be read.

The three share one shape: pre-norm decoder blocks of GQA attention with RoPE and a SwiGLU
MLP. Qwen3 adds an RMSNorm on every q/k head (qk_norm); Qwen2 adds q/k/v biases.
Shapes: T new tokens, H hidden, Hq/Hkv heads, D head dim, I intermediate, V vocab.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sglang_fx.checkpoint import ModelSpec
from sglang_fx.errors import UnsupportedConfigError
from sglang_fx.metadata import ForwardMetadata
from sglang_fx.spi import AttentionSpec, KVCache, RunnerOptions

from .attention import TorchPagedAttention


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


@dataclass
class Layer:
    ln1: torch.Tensor
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    o: torch.Tensor
    q_bias: torch.Tensor | None
    k_bias: torch.Tensor | None
    v_bias: torch.Tensor | None
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    ln2: torch.Tensor
    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor

    @classmethod
    def from_weights(cls, w: Mapping[str, torch.Tensor], i: int) -> Layer:
        p = f"model.layers.{i}."
        return cls(
            ln1=w[p + "input_layernorm.weight"],
            q=w[p + "self_attn.q_proj.weight"],
            k=w[p + "self_attn.k_proj.weight"],
            v=w[p + "self_attn.v_proj.weight"],
            o=w[p + "self_attn.o_proj.weight"],
            q_bias=w.get(p + "self_attn.q_proj.bias"),
            k_bias=w.get(p + "self_attn.k_proj.bias"),
            v_bias=w.get(p + "self_attn.v_proj.bias"),
            q_norm=w.get(p + "self_attn.q_norm.weight"),
            k_norm=w.get(p + "self_attn.k_norm.weight"),
            ln2=w[p + "post_attention_layernorm.weight"],
            gate=w[p + "mlp.gate_proj.weight"],
            up=w[p + "mlp.up_proj.weight"],
            down=w[p + "mlp.down_proj.weight"],
        )


class LlamaFamilyModel:
    def __init__(self, spec: ModelSpec, weights: Mapping[str, torch.Tensor], options: RunnerOptions):
        if options.extra:
            raise UnsupportedConfigError(f"reference_torch takes no backend options, got {sorted(options.extra)}")
        self.spec = spec
        dev = torch.device(options.device)
        w = {n: t.to(dev) for n, t in weights.items()}
        self.embed, self.norm, self.lm_head = w["model.embed_tokens.weight"], w["model.norm.weight"], w["lm_head.weight"]
        self.layers = [Layer.from_weights(w, i) for i in range(spec.num_layers)]
        D = spec.head_dim
        self.inv_freq = 1.0 / (spec.rope_theta ** (torch.arange(0, D, 2, dtype=torch.int64, device=dev).float() / D))
        self.attn = TorchPagedAttention(AttentionSpec(spec.num_heads, spec.num_kv_heads, D, D, D**-0.5))

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[:, None] * self.inv_freq[None, :]  # [T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]  # [T, 1, D], broadcast over heads
        return emb.cos().to(self.spec.dtype), emb.sin().to(self.spec.dtype)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, meta: ForwardMetadata, cache: KVCache) -> torch.Tensor:
        s = self.spec
        cos, sin = self.rope(meta.positions)
        self.attn.plan(meta)
        x = self.embed[input_ids]  # [T, H]
        for i, L in enumerate(self.layers):
            h = rms_norm(x, L.ln1, s.rms_norm_eps)
            q = F.linear(h, L.q, L.q_bias).view(-1, s.num_heads, s.head_dim)  # [T, Hq, D]
            k = F.linear(h, L.k, L.k_bias).view(-1, s.num_kv_heads, s.head_dim)  # [T, Hkv, D]
            v = F.linear(h, L.v, L.v_bias).view(-1, s.num_kv_heads, s.head_dim)  # [T, Hkv, D]
            if L.q_norm is not None:
                q, k = rms_norm(q, L.q_norm, s.rms_norm_eps), rms_norm(k, L.k_norm, s.rms_norm_eps)
            q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
            a = self.attn.forward(i, q, k, v, cache)  # [T, Hq, D]
            x = x + F.linear(a.reshape(a.shape[0], -1), L.o)
            h = rms_norm(x, L.ln2, s.rms_norm_eps)
            x = x + F.linear(F.silu(F.linear(h, L.gate)) * F.linear(h, L.up), L.down)
        x = rms_norm(x[meta.logits_indices], self.norm, s.rms_norm_eps)  # [N, H]
        return F.linear(x, self.lm_head).float()  # [N, V]
