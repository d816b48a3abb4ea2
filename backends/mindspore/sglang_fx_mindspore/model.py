"""Qwen3 / Qwen2 / Llama in MindSpore, written to be read (and compiled by mindspore.jit).

The three share one shape: pre-norm decoder blocks of GQA attention with RoPE and a SwiGLU MLP.
Qwen3 adds an RMSNorm on every q/k head (qk_norm); Qwen2 adds q/k/v biases.
Shapes: T new tokens, H hidden, Hq/Hkv heads, D head dim, I intermediate, V vocab, N logits.

`LlamaFamily.construct` is one whole step and runs either op by op (PyNative) or as one graph:
`MindSporeRunner` wraps it in mindspore.jit with every per-step dimension declared dynamic, so a
new batch size or length reuses the compiled graph.
"""

from __future__ import annotations

from collections.abc import Mapping

import mindspore as ms
import torch
from mindspore import Tensor, enable_dynamic, mutable, nn, ops

from sglang_fx.checkpoint import ModelSpec
from sglang_fx.errors import UnsupportedConfigError
from sglang_fx.kv_pool import KVLayout
from sglang_fx.metadata import ForwardMetadata
from sglang_fx.spi import AttentionSpec, RunnerOptions

from .attention import make_attention
from .exchange import MindSporeExchange
from .kv_cache import MindSporeKVCache
from .runtime import DEVICE_TARGETS, ms_dtype

MODES = ("jit", "pynative")
_matmul_t = ops.MatMul(transpose_b=True)  # x @ w.T, without materialising w.T


def linear(x: Tensor, w: Tensor) -> Tensor:
    return _matmul_t(x, w)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    x32 = x.astype(ms.float32)
    x32 = x32 * ops.rsqrt(ops.mean(x32 * x32, -1, True) + eps)
    return weight * x32.astype(x.dtype)


def rotate_half(x: Tensor, half: int) -> Tensor:
    return ops.cat((-x[..., half:], x[..., :half]), -1)


def layer_weights(w: Mapping[str, torch.Tensor], i: int, spec: ModelSpec) -> list[torch.Tensor]:
    """Layer i's tensors in the order `LlamaFamily.construct` unpacks them: 9 always, then the
    q/k/v biases (attention_bias), then the q/k norms (qk_norm)."""
    p = f"model.layers.{i}."
    names = ["input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
             "post_attention_layernorm", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]  # fmt: skip
    out = [w[p + n + ".weight"] for n in names]
    if spec.attention_bias:
        out += [w[p + f"self_attn.{n}_proj.bias"] for n in "qkv"]
    if spec.qk_norm:
        out += [w[p + "self_attn.q_norm.weight"], w[p + "self_attn.k_norm.weight"]]
    return out


class LlamaFamily(nn.Cell):
    """The decoder. Weights, KV buffers and step tensors come in as arguments (mutable tuples of
    MindSpore tensors aliasing host memory), so the compiled graph holds no data of its own.

    construct returns logits [N, V] float32, or, when the attention leaves K/V writes to its
    caller (not attn.writes_kv), (logits, k, v) with this step's k and v [num_layers, T, Hkv, D]
    in the KV dtype, for MindSporeKVCache.write_layers."""

    def __init__(self, spec: ModelSpec, attention: nn.Cell, kv_dtype):
        super().__init__()
        self.attn, self.kv_dtype = attention, kv_dtype
        self.return_kv = not attention.writes_kv
        self.num_layers, self.eps = spec.num_layers, spec.rms_norm_eps
        self.num_heads, self.num_kv_heads, self.head_dim = spec.num_heads, spec.num_kv_heads, spec.head_dim
        self.qk_norm, self.attention_bias = spec.qk_norm, spec.attention_bias

    def construct(self, weights, keys, values, input_ids, positions, logits_indices, attn_inputs, attn_variant):
        embed, norm, lm_head, inv_freq, layers = weights
        Hq, Hkv, D, eps = self.num_heads, self.num_kv_heads, self.head_dim, self.eps
        freqs = positions.astype(ms.float32).reshape(-1, 1) * inv_freq.reshape(1, -1)  # [T, D/2]
        emb = ops.cat((freqs, freqs), -1).reshape(-1, 1, D)  # [T, 1, D], broadcast over heads
        cos, sin = ops.cos(emb).astype(embed.dtype), ops.sin(emb).astype(embed.dtype)
        x = ops.gather(embed, input_ids, 0)  # [T, H]
        new_k, new_v = [], []
        for i in range(self.num_layers):
            L = layers[i]
            ln1, wq, wk, wv, wo, ln2, gate, up, down = L[0], L[1], L[2], L[3], L[4], L[5], L[6], L[7], L[8]
            h = rms_norm(x, ln1, eps)
            q, k, v = linear(h, wq), linear(h, wk), linear(h, wv)  # [T, Hq*D], [T, Hkv*D] x2
            if self.attention_bias:
                q, k, v = q + L[9], k + L[10], v + L[11]
            q, k, v = q.reshape(-1, Hq, D), k.reshape(-1, Hkv, D), v.reshape(-1, Hkv, D)
            if self.qk_norm:
                q, k = rms_norm(q, L[-2], eps), rms_norm(k, L[-1], eps)
            q = q * cos + rotate_half(q, D // 2) * sin
            k = k * cos + rotate_half(k, D // 2) * sin
            a = self.attn.run(q, k, v, keys[i], values[i], attn_inputs, attn_variant)  # [T, Hq, D]
            new_k.append(k)
            new_v.append(v)
            x = x + linear(a.reshape(-1, Hq * D), wo)
            h = rms_norm(x, ln2, eps)
            x = x + linear(ops.silu(linear(h, gate)) * linear(h, up), down)
        x = rms_norm(ops.gather(x, logits_indices, 0), norm, eps)  # [N, H]
        logits = linear(x, lm_head).astype(ms.float32)  # [N, V]
        if self.return_kv:
            return logits, ops.stack(new_k).astype(self.kv_dtype), ops.stack(new_v).astype(self.kv_dtype)
        return logits


class MindSporeRunner:
    """`spi.ModelRunner` over LlamaFamily. options.extra: {"mode": "jit" (default) | "pynative"}."""

    def __init__(
        self,
        spec: ModelSpec,
        weights: Mapping[str, torch.Tensor],
        layout: KVLayout,
        options: RunnerOptions,
        exchange: MindSporeExchange,
    ):
        unknown = sorted(set(options.extra) - {"mode"})
        mode = options.extra.get("mode", "jit")
        if unknown or mode not in MODES:
            raise UnsupportedConfigError(
                f"mindspore backend options: unknown keys {unknown} or mode {mode!r}; it takes only "
                f"{{'mode': {' | '.join(map(repr, MODES))}}}"
            )
        self.spec, self.exchange = spec, exchange
        D = spec.head_dim
        attn_spec = AttentionSpec(spec.num_heads, spec.num_kv_heads, D, D, D**-0.5)
        self.attn = make_attention(attn_spec, layout, options.device, spec.dtype, exchange)
        self.model = LlamaFamily(spec, self.attn, ms_dtype(layout.dtype))
        inv_freq = 1.0 / (spec.rope_theta ** (torch.arange(0, D, 2, dtype=torch.int64).float() / D))
        target = DEVICE_TARGETS[options.device.partition(":")[0]]

        def load(t: torch.Tensor) -> Tensor:  # aliases host memory on CPU, copies to a device
            x = exchange.from_torch(t)
            return x if target == "CPU" else x.move_to(target)

        layers = tuple(tuple(load(t) for t in layer_weights(weights, i, spec)) for i in range(spec.num_layers))
        self.weights = mutable((load(weights["model.embed_tokens.weight"]), load(weights["model.norm.weight"]),
                                load(weights["lm_head.weight"]), load(inv_freq), layers))  # fmt: skip
        self._step = self.model if mode == "pynative" else self._compile()

    def _compile(self):
        i64 = ms.int64
        return enable_dynamic(
            input_ids=Tensor(shape=[None], dtype=i64),
            positions=Tensor(shape=[None], dtype=i64),
            logits_indices=Tensor(shape=[None], dtype=i64),
            attn_inputs=self.attn.dynamic_inputs,
        )(ms.jit(self.model.construct))

    def forward(self, input_ids: torch.Tensor, meta: ForwardMetadata, cache: MindSporeKVCache) -> torch.Tensor:
        self.attn.plan(meta)
        keys, values = self.attn.cache_views(cache)
        ex = self.exchange.from_torch
        out = self._step(self.weights, keys, values, ex(input_ids), ex(meta.positions), ex(meta.logits_indices),
                         self.attn.inputs, self.attn.variant)  # fmt: skip
        if self.model.return_kv:
            out, k, v = out
            cache.write_layers(ex(meta.out_cache_loc), k, v)
        return self.exchange.to_torch(out)
