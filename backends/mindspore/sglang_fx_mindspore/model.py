"""Qwen3 / Qwen3-MoE / Qwen2 / Llama in MindSpore, written to be read (and compiled by mindspore.jit).

They share one shape: pre-norm decoder blocks of GQA attention with RoPE and a SwiGLU MLP.
Qwen3 adds an RMSNorm on every q/k head (qk_norm); Qwen2 adds q/k/v biases; Qwen3-MoE is Qwen3
with the MLP of its MoE layers replaced by softmax-routed experts (`moe_mlp`).
Shapes: T new tokens, H hidden, Hq/Hkv heads, D head dim, I intermediate, V vocab, N logits,
E experts, k experts per token.

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
from .kernels import cast, rows_writer
from .kv_cache import MindSporeKVCache
from .runtime import DEVICE_TARGETS, ms_dtype

MODES = ("jit", "pynative")
_matmul_t = ops.MatMul(transpose_b=True)  # x @ w.T, without materialising w.T
_matmul = ops.MatMul()  # 2-D x @ w: one kernel (ops.matmul on 3-D x adds broadcasts and a transpose)


def linear(x: Tensor, w: Tensor) -> Tensor:
    return _matmul_t(x, w)


def rms_norm(x: Tensor, weight: Tensor | None, eps: float) -> Tensor:
    """RMSNorm over the last axis, in float32; weight None: the weight was folded into the
    projection that follows (`fold_norm`)."""
    x32 = cast(x, ms.float32)
    x32 = x32 * ops.rsqrt(ops.mean(x32 * x32, -1, True) + eps)
    return cast(x32, x.dtype) if weight is None else weight * cast(x32, x.dtype)


def fold_norm(norm_weight: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """w [N, H] with the RMSNorm weight [H] that precedes it folded in: linear(x * g, w) ==
    linear(x, w * g). Computed in float32. Saves a weight-broadcast Mul per norm and step, one
    of MindSpore's slowest CPU kernels for its size."""
    return (w.float() * norm_weight.float()).to(w.dtype)


def rotate_half_matrix(head_dim: int) -> torch.Tensor:
    """[D, D] R with x @ R == cat(-x[..., D/2:], x[..., :D/2]): RoPE's rotate_half as one
    matmul (exact: one +-1 per column) instead of four slice/negate/concat kernels."""
    half = head_dim // 2
    r = torch.zeros(head_dim, head_dim)
    r[torch.arange(half) + half, torch.arange(half)] = -1.0
    r[torch.arange(half), torch.arange(half) + half] = 1.0
    return r


def check_moe(spec: ModelSpec) -> None:
    """`moe_mlp` implements Qwen3-MoE routing only; refuse the rest (DeepSeek-V3's) up front."""
    m = spec.moe
    if m is None:
        return
    if m.scoring != "softmax" or m.num_shared_experts or spec.mla is not None:
        raise UnsupportedConfigError(
            f"mindspore backend: only Qwen3-MoE routing (softmax scores, no shared experts, GQA) is "
            f"supported, not scoring={m.scoring!r} with {m.num_shared_experts} shared expert(s)"
            + (" and latent attention" if spec.mla is not None else "")
        )


def mlp_weights(w: Mapping[str, torch.Tensor], m: str, spec: ModelSpec, moe: bool, norm: torch.Tensor) -> list[torch.Tensor]:
    """A dense MLP: gate_proj and up_proj [I, H] (two matmuls cost what one fused one does, and
    spare the slices that would split its output), down_proj [H, I]. The RMSNorm weight
    `norm` before the MLP is folded into the projections that read its output (`fold_norm`).

    An MoE MLP (E experts of width I): the router [E, H] in float32 (routing runs in float32);
    every expert's gate and up rows, expert after expert, as one [E * 2 I, H] projection; and
    every expert's down_proj side by side as one [H, E * I] (column e * I + j is expert e's
    column j), so that `moe_mlp` evaluates all experts with two plain matmuls."""
    if not moe:
        return [fold_norm(norm, w[m + "gate_proj.weight"]), fold_norm(norm, w[m + "up_proj.weight"]), w[m + "down_proj.weight"]]
    experts = [f"{m}experts.{e}." for e in range(spec.moe.num_experts)]
    return [
        fold_norm(norm, w[m + "gate.weight"].float()),
        fold_norm(norm, torch.cat([w[p + n] for p in experts for n in ("gate_proj.weight", "up_proj.weight")])),
        torch.cat([w[p + "down_proj.weight"] for p in experts], 1),
    ]


def layer_weights(w: Mapping[str, torch.Tensor], i: int, spec: ModelSpec) -> list[torch.Tensor]:
    """Layer i's tensors in the order `LlamaFamily.construct` unpacks them: fused q/k/v
    projection [(Hq + 2 Hkv) * D, H] with the input norm's weight folded in, o_proj, the MLP's
    three weights (`mlp_weights`, dense or MoE) with the post-attention norm's weight folded in;
    then the fused q/k/v bias (attention_bias); then the q and k head norms as one [Hq + Hkv, D]
    weight (qk_norm). Fusing copies those weights once and saves kernel launches on every step."""
    a, m = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
    out = [
        fold_norm(w[f"model.layers.{i}.input_layernorm.weight"], torch.cat([w[a + f"{n}_proj.weight"] for n in "qkv"])),
        w[a + "o_proj.weight"],
        *mlp_weights(w, m, spec, spec.is_moe_layer(i), w[f"model.layers.{i}.post_attention_layernorm.weight"]),
    ]
    if spec.attention_bias:
        out.append(torch.cat([w[a + f"{n}_proj.bias"] for n in "qkv"]))
    if spec.qk_norm:
        q, k = w[a + "q_norm.weight"], w[a + "k_norm.weight"]
        out.append(torch.cat([q.expand(spec.num_heads, -1), k.expand(spec.num_kv_heads, -1)]))
    return out


def moe_mlp(x: Tensor, router: Tensor, gate_up: Tensor, down: Tensor, E: int, I: int, top_k: int,
            norm_topk_prob: bool, scaling: float) -> Tensor:
    """Softmax-routed SwiGLU experts, as the reference's MoE: x [T, H] -> [T, H].

    Routing in float32: softmax over the router logits, the top_k experts, renormalised to sum
    to 1 when norm_topk_prob, times `scaling`; as a dense [T, E] matrix with zeros for the
    experts a token did not choose (one-hot of the top-k ids, weighted and summed).

    Dense compute: every token goes through all E experts ([T, E * 2 I] then [T, E * I] ->
    [T, H] in two matmuls), with the unchosen experts' outputs weighted by zero. That costs E/k
    times the FLOPs of routed compute (4x for the tiny 8-expert top-2 model) but has no
    data-dependent shapes, so it compiles once under dynamic T and launches a handful of kernels;
    fine for small models, not for real MoE sizes (those want a grouped/sorted expert kernel).
    The routing weight multiplies each expert's activation before down_proj rather than its
    output after it: the same sum, differing only in rounding."""
    probs = ops.softmax(linear(cast(x, ms.float32), router), -1)  # [T, E] float32
    top, ids = ops.topk(probs, top_k)  # [T, k]
    if norm_topk_prob:
        top = top / top.sum(-1, keepdims=True)
    if scaling != 1.0:
        top = top * scaling
    one = Tensor(1.0, ms.float32)
    zero = Tensor(0.0, ms.float32)
    route = (ops.one_hot(ids, E, one, zero) * top.reshape(-1, top_k, 1)).sum(1)  # [T, E]
    gate_up = linear(x, gate_up).reshape(-1, E, 2 * I)
    gate, up = gate_up[..., :I], gate_up[..., I:]  # [T, E, I] x2
    act = ops.silu(gate) * up * cast(route, x.dtype).reshape(-1, E, 1)
    return linear(act.reshape(-1, E * I), down)  # [T, H]


class LlamaFamily(nn.Cell):
    """The decoder. Weights, KV buffers and step tensors come in as arguments (mutable tuples of
    MindSpore tensors aliasing host memory), so the compiled graph holds no data of its own.

    construct returns logits [N, V] float32. When the attention leaves K/V writes to its caller
    (not attn.writes_kv), the step stores layer i's k and v into kv_store's layer-i buffers
    [S, Hkv, D] at `slots` [T] int64 before that layer's attention reads the pool (`store`)."""

    def __init__(self, spec: ModelSpec, attention: nn.Cell, kv_dtype, in_graph: bool):
        super().__init__()
        self.attn, self.kv_dtype = attention, kv_dtype
        self.stores_kv = not attention.writes_kv
        self.in_graph = in_graph
        self.num_layers, self.eps = spec.num_layers, spec.rms_norm_eps
        self.num_heads, self.num_kv_heads, self.head_dim = spec.num_heads, spec.num_kv_heads, spec.head_dim
        self.qk_norm, self.attention_bias = spec.qk_norm, spec.attention_bias
        self.moe_layers = tuple(spec.is_moe_layer(i) for i in range(spec.num_layers))
        moe = spec.moe
        self.num_experts, self.moe_intermediate = (moe.num_experts, moe.intermediate_size) if moe else (0, 0)
        self.top_k = moe.top_k if moe else 0
        self.norm_topk_prob = moe.norm_topk_prob if moe else False
        self.routed_scaling = float(moe.routed_scaling_factor) if moe else 1.0

    def construct(self, weights, keys, values, kv_store, input_ids, positions, logits_indices, slots, attn_inputs, attn_variant):
        embed, lm_head, inv_freq, rotate_half, layers = weights
        Hq, Hkv, D, eps = self.num_heads, self.num_kv_heads, self.head_dim, self.eps
        freqs = positions.astype(ms.float32).reshape(-1, 1) * inv_freq.reshape(1, -1)  # [T, D/2]
        emb = ops.cat((freqs, freqs), -1).reshape(-1, 1, D)  # [T, 1, D]
        # [T, Hq + Hkv, D]: broadcast over the q and k heads once per step, so that every layer's
        # RoPE multiplies tensors of one shape (MindSpore's CPU broadcasting Mul is several times slower)
        emb = ops.broadcast_to(emb, (-1, Hq + Hkv, D))
        cos, sin = cast(ops.cos(emb), embed.dtype), cast(ops.sin(emb), embed.dtype)
        x = ops.gather(embed, input_ids, 0)  # [T, H]
        for i in range(self.num_layers):
            L = layers[i]
            qkv = linear(rms_norm(x, None, eps), L[0])  # [T, (Hq + 2 Hkv) * D]
            moe = self.moe_layers[i]
            if self.attention_bias:
                qkv = qkv + L[5]
            qkv = qkv.reshape(-1, Hq + 2 * Hkv, D)
            qk, v = qkv[:, : Hq + Hkv], qkv[:, Hq + Hkv :]  # [T, Hq+Hkv, D], [T, Hkv, D]
            if self.qk_norm:
                qk = rms_norm(qk, L[-1], eps)
            rotated = _matmul(qk.reshape(-1, D), rotate_half).reshape(-1, Hq + Hkv, D)  # rotate_half(qk)
            qk = qk * cos + rotated * sin  # RoPE on q and k heads at once
            q, k = qk[:, :Hq], qk[:, Hq:]
            k_pool, v_pool = keys[i], values[i]
            if self.stores_kv:
                k_pool, v_pool = self.store(kv_store, i, slots, k, v, k_pool, v_pool)
            a = self.attn.run(q, k, v, k_pool, v_pool, attn_inputs, attn_variant)  # [T, Hq, D]
            x = x + linear(a.reshape(-1, Hq * D), L[1])
            h = rms_norm(x, None, eps)
            if moe:
                x = x + moe_mlp(h, L[2], L[3], L[4], self.num_experts, self.moe_intermediate, self.top_k,
                                self.norm_topk_prob, self.routed_scaling)  # fmt: skip
            else:
                x = x + linear(ops.silu(linear(h, L[2])) * linear(h, L[3]), L[4])  # SwiGLU, [T, I] inside
        x = rms_norm(ops.gather(x, logits_indices, 0), None, eps)  # [N, H]
        return cast(linear(x, lm_head), ms.float32)  # [N, V]

    def store(self, kv_store, i, slots, k, v, k_pool, v_pool):
        """Write layer i's k, v [T, Hkv, D] into kv_store[0][i], kv_store[1][i] at `slots`, and
        return the attention's views of the pool (k_pool, v_pool) ordered after the writes.

        kv_store holds `MindSporeKVCache.keys`/`values`: MindSpore tensors distinct from the
        views the attention reads (`cache_views`), though over the same memory, so a compiled
        graph (in_graph) scatters into them in place (a graph that reads and writes one input
        tensor copies it whole); ops.depend makes the reads wait for the writes. PyNative's
        scatter_update returns new storage, so there each write runs the in-place `rows_writer`
        graph."""
        k, v = cast(k, self.kv_dtype), cast(v, self.kv_dtype)
        if self.in_graph:
            k_pool = ops.depend(k_pool, ops.scatter_update(kv_store[0][i], slots, k))
            v_pool = ops.depend(v_pool, ops.scatter_update(kv_store[1][i], slots, v))
        else:
            write = rows_writer(self.kv_dtype)
            write(mutable((kv_store[0][i],)), slots, k.expand_dims(0))
            write(mutable((kv_store[1][i],)), slots, v.expand_dims(0))
        return k_pool, v_pool


class MindSporeRunner:
    """`spi.ModelRunner` over LlamaFamily. options.extra: {"mode": "jit" (default) | "pynative"}.

    Weights are placed at construction; the attention tier, the step Cell and its compiled graph
    depend on the KV layout, so they are built on the first forward (and again only if a cache
    of another layout arrives)."""

    def __init__(self, spec: ModelSpec, weights: Mapping[str, torch.Tensor], options: RunnerOptions, exchange: MindSporeExchange):
        unknown = sorted(set(options.extra) - {"mode"})
        if unknown:
            raise UnsupportedConfigError(f"mindspore backend: unknown option(s) {unknown}; it takes only 'mode' ({' | '.join(MODES)})")
        mode = options.extra.get("mode", "jit")
        if mode not in MODES:
            raise UnsupportedConfigError(f"mindspore backend: mode {mode!r} is not one of {' | '.join(MODES)}")
        check_moe(spec)
        self.spec, self.exchange, self.device, self.mode = spec, exchange, options.device, mode
        self.layout: KVLayout | None = None  # the layout the step below was built for
        D = spec.head_dim
        inv_freq = 1.0 / (spec.rope_theta ** (torch.arange(0, D, 2, dtype=torch.int64).float() / D))
        target = DEVICE_TARGETS[options.device.partition(":")[0]]

        def load(t: torch.Tensor) -> Tensor:  # aliases host memory on CPU, copies to a device
            x = exchange.from_torch(t)
            return x if target == "CPU" else x.move_to(target)

        layers = tuple(tuple(load(t) for t in layer_weights(weights, i, spec)) for i in range(spec.num_layers))
        rotate_half = rotate_half_matrix(D).to(spec.dtype)
        lm_head = fold_norm(weights["model.norm.weight"], weights["lm_head.weight"])  # final norm folded in
        self.weights = mutable((load(weights["model.embed_tokens.weight"]), load(lm_head), load(inv_freq), load(rotate_half), layers))

    def _bind(self, layout: KVLayout) -> None:
        D = self.spec.head_dim
        attn_spec = AttentionSpec(self.spec.num_heads, self.spec.num_kv_heads, D, D, D**-0.5)
        self.attn = make_attention(attn_spec, layout, self.device, self.spec.dtype, self.exchange)
        self.model = LlamaFamily(self.spec, self.attn, ms_dtype(layout.dtype), in_graph=self.mode == "jit")
        self._step = self.model if self.mode == "pynative" else self._compile()
        self.layout = layout

    def _compile(self):
        i32, i64 = ms.int32, ms.int64
        return enable_dynamic(
            input_ids=Tensor(shape=[None], dtype=i32),
            positions=Tensor(shape=[None], dtype=i64),
            logits_indices=Tensor(shape=[None], dtype=i32),
            slots=Tensor(shape=[None], dtype=i64),
            attn_inputs=self.attn.dynamic_inputs,
        )(ms.jit(self.model.construct))

    def forward(self, input_ids: torch.Tensor, meta: ForwardMetadata, cache: MindSporeKVCache) -> torch.Tensor:
        if cache.layout != self.layout:
            self._bind(cache.layout)
        self.attn.plan(meta)
        keys, values = self.attn.cache_views(cache)
        kv_store = mutable((cache.keys, cache.values)) if self.model.stores_kv else ()
        ex = self.exchange.from_torch
        # Gather indices as int32: MindSpore's CPU Gather casts int64 indices with a kernel of its own.
        ids, logits_indices = input_ids.to(torch.int32), meta.logits_indices.to(torch.int32)
        out = self._step(self.weights, keys, values, kv_store, ex(ids), ex(meta.positions), ex(logits_indices),
                         ex(meta.out_cache_loc), self.attn.inputs, self.attn.variant)  # fmt: skip
        return self.exchange.to_torch(out)
