"""Qwen3 / Qwen3-MoE / Qwen2 / Llama in MindSpore: grouped-query attention with RoPE on the
Decoder. Qwen3 adds an RMSNorm on every q/k head (qk_norm); Qwen2 adds q/k/v biases; Qwen3-MoE's
MoE layers are the Decoder's routed experts. Shapes: T new tokens, Hq/Hkv heads, D head dim."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from sglang_fx.checkpoint import ModelSpec
from sglang_fx.spi import AttentionSpec

from .decoder import Decoder
from .layers import linear, projection, rms_norm, rope


class LlamaFamily(Decoder):
    @staticmethod
    def attention_spec(spec: ModelSpec) -> AttentionSpec:
        D = spec.head_dim
        return AttentionSpec(spec.num_heads, spec.num_kv_heads, D, D, D**-0.5)

    @staticmethod
    def rope_dims(spec: ModelSpec) -> tuple[int, bool]:
        return spec.head_dim, False

    @staticmethod
    def attention_weights(w: Mapping[str, torch.Tensor], prefix: str, spec: ModelSpec) -> tuple[torch.Tensor, ...]:
        """The fused q/k/v projection [(Hq + 2 Hkv) * D, H], o_proj (each a (q, scale) pair when
        quantized: `layers.projection`); then the fused q/k/v bias (attention_bias); then the q and
        k head norms as one [Hq + Hkv, D] weight (qk_norm)."""
        qkv = projection(w, [prefix + f"{n}_proj.weight" for n in "qkv"], spec.quant)
        out = [qkv, projection(w, [prefix + "o_proj.weight"], spec.quant)]
        if spec.attention_bias:
            out.append(torch.cat([w[prefix + f"{n}_proj.bias"] for n in "qkv"]))
        if spec.qk_norm:
            q, k = w[prefix + "q_norm.weight"], w[prefix + "k_norm.weight"]
            out.append(torch.cat([q.expand(spec.num_heads, -1), k.expand(spec.num_kv_heads, -1)]))
        return tuple(out)

    @staticmethod
    def attention_linear(spec: ModelSpec, name: str) -> tuple[int, range | None]:
        if name == "o_proj":
            return 1, None
        Hq, Hkv, D = spec.num_heads, spec.num_kv_heads, spec.head_dim
        start = {"q_proj": 0, "k_proj": Hq * D, "v_proj": (Hq + Hkv) * D}[name]
        return 0, range(start, start + (Hq if name == "q_proj" else Hkv) * D)

    def block(self, w, x, rope_w, kv):
        s = self.spec
        Hq, Hkv, D = s.num_heads, s.num_kv_heads, s.head_dim
        qkv = linear(x, w[0])  # [T, (Hq + 2 Hkv) * D]
        if s.attention_bias:
            qkv = qkv + w[2]
        qkv = qkv.reshape(-1, Hq + 2 * Hkv, D)
        qk, v = qkv[:, : Hq + Hkv], qkv[:, Hq + Hkv :]  # [T, Hq + Hkv, D], [T, Hkv, D]
        if s.qk_norm:
            qk = rms_norm(qk, w[-1], self.eps)
        qk = rope(qk, Hq + Hkv, rope_w, self.interleaved)  # RoPE on q and k heads at once
        q, k = qk[:, :Hq], qk[:, Hq:]
        a = self.attend(q, k, v, kv)  # [T, Hq, D]
        return linear(a.reshape(-1, Hq * D), w[1])
