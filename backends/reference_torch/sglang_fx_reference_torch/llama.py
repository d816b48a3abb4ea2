"""Qwen3 / Qwen3-MoE / Qwen2 / Llama in plain PyTorch, written to be read.

All share one shape: pre-norm decoder blocks of GQA attention with RoPE and a SwiGLU MLP.
Qwen3 adds an RMSNorm on every q/k head (qk_norm); Qwen2 adds q/k/v biases; Qwen3-MoE
replaces the MLP with routed experts. Shapes: T new tokens, H hidden, Hq/Hkv heads, D head dim.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sglang_fx.checkpoint import ModelSpec
from sglang_fx.metadata import ForwardMetadata
from sglang_fx.spi import AttentionSpec, KVCache

from .attention import TorchPagedAttention
from .layers import MLP, MoE, Rope, rms_norm


@dataclass
class Attention:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    o: torch.Tensor
    q_bias: torch.Tensor | None
    k_bias: torch.Tensor | None
    v_bias: torch.Tensor | None
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None

    @classmethod
    def from_weights(cls, w: Mapping[str, torch.Tensor], p: str) -> Attention:
        return cls(
            *(w[f"{p}{n}_proj.weight"] for n in "qkvo"),
            *(w.get(f"{p}{n}_proj.bias") for n in "qkv"),
            w.get(p + "q_norm.weight"),
            w.get(p + "k_norm.weight"),
        )


class LlamaFamilyModel:
    def __init__(self, spec: ModelSpec, weights: Mapping[str, torch.Tensor], device: torch.device):
        self.spec = spec
        w = {n: t.to(device) for n, t in weights.items()}
        self.embed, self.norm, self.lm_head = w["model.embed_tokens.weight"], w["model.norm.weight"], w["lm_head.weight"]
        self.layers = []
        for i in range(spec.num_layers):
            p = f"model.layers.{i}."
            mlp = MoE(spec.moe, w, p + "mlp.") if spec.is_moe_layer(i) else MLP.from_weights(w, p + "mlp.")
            attn = Attention.from_weights(w, p + "self_attn.")
            self.layers.append((w[p + "input_layernorm.weight"], attn, w[p + "post_attention_layernorm.weight"], mlp))
        D = spec.head_dim
        self.rope = Rope(D, spec.rope_theta, interleaved=False, device=device)
        self.attn = TorchPagedAttention(AttentionSpec(spec.num_heads, spec.num_kv_heads, D, D, D**-0.5))

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, meta: ForwardMetadata, cache: KVCache) -> torch.Tensor:
        s = self.spec
        cos, sin = self.rope.angles(meta.positions, s.dtype)
        self.attn.plan(meta)
        x = self.embed[input_ids]  # [T, H]
        for i, (ln1, a, ln2, mlp) in enumerate(self.layers):
            h = rms_norm(x, ln1, s.rms_norm_eps)
            q = F.linear(h, a.q, a.q_bias).view(-1, s.num_heads, s.head_dim)  # [T, Hq, D]
            k = F.linear(h, a.k, a.k_bias).view(-1, s.num_kv_heads, s.head_dim)  # [T, Hkv, D]
            v = F.linear(h, a.v, a.v_bias).view(-1, s.num_kv_heads, s.head_dim)  # [T, Hkv, D]
            if a.q_norm is not None:
                q, k = rms_norm(q, a.q_norm, s.rms_norm_eps), rms_norm(k, a.k_norm, s.rms_norm_eps)
            o = self.attn.forward(i, self.rope(q, cos, sin), self.rope(k, cos, sin), v, cache)  # [T, Hq, D]
            x = x + F.linear(o.reshape(len(o), -1), a.o)
            x = x + mlp(rms_norm(x, ln2, s.rms_norm_eps))
        x = rms_norm(x[meta.logits_indices], self.norm, s.rms_norm_eps)  # [N, H]
        return F.linear(x, self.lm_head).float()  # [N, V]
