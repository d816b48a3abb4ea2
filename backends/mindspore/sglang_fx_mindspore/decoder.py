"""The pre-norm decoder every MindSpore model shares, as one Cell whose `construct` is a whole
step: embed, then per layer x += attention(norm(x)) and x += mlp(norm(x)) (dense or routed
experts), then norm and lm_head for the tokens that want logits. A model file subclasses it with
its attention `block`, the weights that block takes, its AttentionSpec and its RoPE.

Weights, KV buffers and step tensors come in as arguments (mutable tuples of MindSpore tensors
aliasing host memory), so a compiled graph holds no data of its own. Shapes: T new tokens,
H hidden, V vocab, N tokens that want logits.
"""

from __future__ import annotations

from collections.abc import Mapping

import mindspore as ms
import torch
from mindspore import Tensor, nn, ops

from sglang_fx.checkpoint import ModelSpec
from sglang_fx.spi import AttentionSpec

from .kernels import cast
from .layers import linear, mlp, mlp_weights, moe, moe_weights, rms_norm, rope_angles, rope_matrices


class Decoder(nn.Cell):
    """construct returns logits [N, V] float32; or, when the attention leaves K/V writes to its
    caller (not attention.writes_kv), (logits, k[, v]) with this step's keys (and values, when the
    cache has them) of every layer, [num_layers, T, *kv shape] in the KV dtype, for
    MindSporeKVCache.write_layers."""

    def __init__(self, spec: ModelSpec, attention: nn.Cell, kv_dtype, has_values: bool):
        super().__init__()
        self.spec, self.attn, self.kv_dtype, self.has_values = spec, attention, kv_dtype, has_values
        self.return_kv = not attention.writes_kv
        self.num_layers, self.eps = spec.num_layers, spec.rms_norm_eps
        self.moe_layers = tuple(spec.is_moe_layer(i) for i in range(spec.num_layers))
        self.interleaved = self.rope_dims(spec)[1]

    # --- what a model file supplies -----------------------------------------------------------

    @staticmethod
    def attention_spec(spec: ModelSpec) -> AttentionSpec:
        raise NotImplementedError

    @staticmethod
    def rope_dims(spec: ModelSpec) -> tuple[int, bool]:
        """(channels RoPE rotates, interleaved pairs)."""
        raise NotImplementedError

    @staticmethod
    def attention_weights(w: Mapping[str, torch.Tensor], prefix: str, spec: ModelSpec) -> tuple[torch.Tensor, ...]:
        """The tensors `block` takes for the layer whose attention weights start with prefix."""
        raise NotImplementedError

    def block(self, w: tuple, x: Tensor, rope: tuple, k_cache: Tensor, v_cache, attn_inputs, attn_variant):
        """One layer's attention: x [T, H] (normed) -> (out [T, H], k, v): the layer's output,
        and this step's K and V in the layout of the pool (v None without a V cache).
        rope: (cos, sin, p, r) for `layers.rope`."""
        raise NotImplementedError

    # --- shared -------------------------------------------------------------------------------

    @classmethod
    def weights(cls, w: Mapping[str, torch.Tensor], spec: ModelSpec) -> tuple:
        """All weights in the nested order construct unpacks: (embed, final norm, lm_head,
        (inv_freq, P, R) for RoPE, layers); layer i is (input norm, `attention_weights`,
        post-attention norm, MLP weights: `mlp_weights` or `moe_weights`). Fusing tensors copies
        them once here and saves kernel launches on every step."""
        dim, interleaved = cls.rope_dims(spec)
        inv_freq = 1.0 / (spec.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        p, r = (m.to(spec.dtype) for m in rope_matrices(dim, interleaved))
        layers = []
        for i in range(spec.num_layers):
            pre = f"model.layers.{i}."
            mlp_w = moe_weights(w, pre + "mlp.", spec.moe) if spec.is_moe_layer(i) else mlp_weights(w, pre + "mlp.")
            layers.append((w[pre + "input_layernorm.weight"], cls.attention_weights(w, pre + "self_attn.", spec),
                           w[pre + "post_attention_layernorm.weight"], mlp_w))  # fmt: skip
        return (w["model.embed_tokens.weight"], w["model.norm.weight"], w["lm_head.weight"], (inv_freq, p, r), tuple(layers))

    def construct(self, weights, keys, values, input_ids, positions, logits_indices, attn_inputs, attn_variant, gather_experts):
        """gather_experts: how MoE layers compute (`layers.gathers_experts`); like attn_variant, a
        Python constant that picks a path of the graph."""
        embed, norm, lm_head, (inv_freq, p, r), layers = weights
        cos, sin = rope_angles(positions, inv_freq, embed.dtype)
        x = ops.gather(embed, input_ids, 0)  # [T, H]
        new_k, new_v = [], []
        for i in range(self.num_layers):
            ln1, attn_w, ln2, mlp_w = layers[i]
            v_cache = values[i] if self.has_values else None
            a, k, v = self.block(attn_w, rms_norm(x, ln1, self.eps), (cos, sin, p, r), keys[i], v_cache, attn_inputs, attn_variant)
            new_k.append(k)
            new_v.append(v)
            x = x + a
            h = rms_norm(x, ln2, self.eps)
            x = x + (moe(h, mlp_w, self.spec.moe, gather_experts) if self.moe_layers[i] else mlp(h, *mlp_w))
        x = rms_norm(ops.gather(x, logits_indices, 0), norm, self.eps)  # [N, H]
        logits = cast(linear(x, lm_head), ms.float32)  # [N, V]
        if not self.return_kv:
            return logits
        k = cast(ops.stack(new_k), self.kv_dtype)
        if self.has_values:
            return logits, k, cast(ops.stack(new_v), self.kv_dtype)
        return logits, k
