"""The pre-norm decoder every NumPy model shares: embed, then per layer
x += attention(norm(x)) and x += mlp(norm(x)), then norm and lm_head for the wanted tokens.
A model file supplies its attention block, its RoPE and its AttentionSpec."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from sglang_fx.checkpoint import ModelSpec
from sglang_fx.eagle3 import check_capture
from sglang_fx.metadata import ForwardMetadata
from sglang_fx.spi import AttentionSpec

from .attention import NumpyPagedAttention
from .kv_cache import NumpyKVCache
from .layers import Rope, Weights, linear, mlp, moe, rms_norm

#: One layer's attention: (spec, weights, prefix, layer, x [T, H] normed, rope, cos, sin, attention, cache) -> [T, H].
Block = Callable[..., np.ndarray]


class Decoder:
    def __init__(self, spec: ModelSpec, weights: Weights, block: Block, rope: Rope, attn_spec: AttentionSpec):
        self.spec, self.w, self.block, self.rope = spec, weights, block, rope
        self.attn = NumpyPagedAttention(attn_spec)

    def forward(self, input_ids: torch.Tensor, meta: ForwardMetadata, cache: NumpyKVCache) -> torch.Tensor:
        return self._step(input_ids, meta, cache, ())[0]

    def forward_hidden(self, input_ids: torch.Tensor, meta: ForwardMetadata, cache: NumpyKVCache, *, capture: Sequence[int] = (),
                       hidden: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
        """spi.ModelRunner.forward_hidden of a target model: the logits and the captured layers' inputs."""
        if hidden is not None:
            raise ValueError(f"hidden was given to a {self.spec.architecture} target; only an EAGLE3 draft takes hidden states")
        check_capture(capture, self.spec.num_layers)
        return self._step(input_ids, meta, cache, tuple(capture))

    def _step(self, input_ids: torch.Tensor, meta: ForwardMetadata, cache: NumpyKVCache, capture: tuple[int, ...]):
        s, w, eps = self.spec, self.w, self.spec.rms_norm_eps
        x = w["model.embed_tokens.weight"][input_ids.numpy()]  # [T, H]
        cos, sin = self.rope.angles(meta.positions.numpy(), x.dtype)
        self.attn.plan(meta)
        taken = []  # the residual stream entering each captured layer
        for i in range(s.num_layers):
            if i in capture:
                taken.append(x.astype(np.float32))
            p = f"model.layers.{i}."
            h = rms_norm(x, w[p + "input_layernorm.weight"], eps)
            x = x + self.block(s, w, p + "self_attn.", i, h, self.rope, cos, sin, self.attn, cache)
            h = rms_norm(x, w[p + "post_attention_layernorm.weight"], eps)
            x = x + (moe(s.moe, w, p + "mlp.", h) if s.is_moe_layer(i) else mlp(w, p + "mlp.", h))
        x = rms_norm(x[meta.logits_indices.numpy()], w["model.norm.weight"], eps)  # [N, H]
        logits = linear(x, w["lm_head.weight"]).astype(np.float32)  # [N, V]
        hidden = torch.from_numpy(np.concatenate(taken, axis=1)) if taken else None  # [T, H * n]
        return torch.from_numpy(logits), hidden  # ordinary tensors the caller owns (SGLang's sampler writes into logits)

    def apply_linear(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """The optional probe of spi.ModelRunner: linear `name` on x [T, in] -> float32 [T, out]."""
        w = self.w[name + ".weight"]
        return torch.from_numpy(linear(x.numpy().astype(self.w["model.norm.weight"].dtype), w).astype(np.float32))
