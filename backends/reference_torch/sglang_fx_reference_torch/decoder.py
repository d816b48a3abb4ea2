"""The pre-norm decoder every reference model shares: embed, then per layer
x += attention(norm(x)) and x += mlp(norm(x)), then norm and lm_head for the wanted tokens.
A model file supplies only its attention block (a `Block`), its RoPE and its AttentionSpec."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Protocol

import torch
import torch.nn.functional as F

from sglang_fx.checkpoint import ModelSpec
from sglang_fx.metadata import ForwardMetadata
from sglang_fx.spi import AttentionSpec, KVCache

from .attention import TorchPagedAttention
from .layers import MLP, MoE, Rope, rms_norm


class Block(Protocol):
    """One layer's attention: x [T, H] (normed) -> [T, H], writing its K/V into the cache."""

    def __call__(self, layer: int, x: torch.Tensor, rope: Rope, cos: torch.Tensor, sin: torch.Tensor,
                 attn: TorchPagedAttention, cache: KVCache) -> torch.Tensor: ...


class Decoder:
    def __init__(self, spec: ModelSpec, weights: Mapping[str, torch.Tensor], device: torch.device,
                 block: Callable[[ModelSpec, Mapping[str, torch.Tensor], str], Block], rope: Rope, attn_spec: AttentionSpec):
        self.spec, self.rope, self.attn = spec, rope, TorchPagedAttention(attn_spec)
        w = {n: t.to(device) for n, t in weights.items()}
        self.embed, self.norm, self.lm_head = w["model.embed_tokens.weight"], w["model.norm.weight"], w["lm_head.weight"]
        self.layers = []
        for i in range(spec.num_layers):
            p = f"model.layers.{i}."
            mlp = MoE(spec.moe, w, p + "mlp.") if spec.is_moe_layer(i) else MLP.from_weights(w, p + "mlp.")
            self.layers.append((w[p + "input_layernorm.weight"], block(spec, w, p + "self_attn."), w[p + "post_attention_layernorm.weight"], mlp))

    @torch.no_grad()  # not inference_mode: see ModelRunner.forward's contract
    def forward(self, input_ids: torch.Tensor, meta: ForwardMetadata, cache: KVCache) -> torch.Tensor:
        eps = self.spec.rms_norm_eps
        cos, sin = self.rope.angles(meta.positions, self.spec.dtype)
        self.attn.plan(meta)
        x = self.embed[input_ids]  # [T, H]
        for i, (ln1, block, ln2, mlp) in enumerate(self.layers):
            x = x + block(i, rms_norm(x, ln1, eps), self.rope, cos, sin, self.attn, cache)
            x = x + mlp(rms_norm(x, ln2, eps))
        x = rms_norm(x[meta.logits_indices], self.norm, eps)  # [N, H]
        return F.linear(x, self.lm_head).float()  # [N, V]
