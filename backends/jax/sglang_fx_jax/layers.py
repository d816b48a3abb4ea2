"""Building blocks of the JAX models, as plain functions over HF-named weights: linears (float or
W8A8 int8), norms, RoPE, dense and MoE MLPs, and the TP collectives. Shapes: T tokens, H hidden,
I MLP width, E experts, k experts per token.

Linear weights are stored [in, out], transposed from HF's [out, in] once at load (`is_linear`
names them; experts [E, in, out]): XLA's CPU matmul contracting the weight's last axis was 7x
slower at 8 rows (9.1 vs 1.2 ms for ten 576x1536 products, jax 0.7.1, 2 cores). A W8A8
linear's weight is an `Int8Weight`, stored the same way; `linear` and `product` take either."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import torch
from jax import lax

from sglang_fx.checkpoint import MoESpec
from sglang_fx.quant import ABSMAX_FLOOR, QMAX

f32 = jnp.float32


#: Suffixes of the HF weights `linear` takes, stored transposed ([in, out]).
LINEAR = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight", "gate_proj.weight", "up_proj.weight",
          "down_proj.weight", "q_a_proj.weight", "q_b_proj.weight", "kv_a_proj_with_mqa.weight", "mlp.gate.weight")  # fmt: skip


def is_linear(name: str) -> bool:
    return name.endswith(LINEAR)


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class Int8Weight:
    """A W8A8 linear's weight (sglang_fx/quant.py), a pytree of two arrays: q int8 [..., in, out],
    kept int8 in device memory and laid out like a float linear's weight (transposed from the
    checkpoint's [out, in]), and scale float32 [..., out], its per-output-channel weight_scale.
    Leading axes (experts, or layers under scan) index both; `w[i]` indexes them together."""

    q: jax.Array
    scale: jax.Array

    def __getitem__(self, index) -> Int8Weight:
        return Int8Weight(self.q[index], self.scale[index])


def quantize(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x [..., in] -> (q int8 [..., in], scale float32 [..., 1]): per row, by sglang_fx.quant's rule
    (jnp.round rounds half to even; true float32 divisions). XLA turns a division by a constant
    into a multiplication by its rounded reciprocal (absmax / 127 came out 1 ulp off the rule), so
    the 127 reaches the division through an optimization barrier, as a value XLA cannot fold."""
    x32 = x.astype(f32)
    qmax = lax.optimization_barrier(f32(QMAX))
    scale = jnp.maximum(jnp.abs(x32).max(axis=-1, keepdims=True), f32(ABSMAX_FLOOR)) / qmax
    return jnp.clip(jnp.round(x32 / scale), -QMAX, QMAX).astype(jnp.int8), scale


def product(subscripts: str, x: jax.Array, w: jax.Array | Int8Weight) -> jax.Array:
    """jnp.einsum(subscripts, x, w) for a weight contracted over x's last axis, in x's dtype.
    An Int8Weight runs W8A8: each row of x (its last axis) quantized by `quantize`, int8 x int8
    summed in int32 by XLA (exact), dequantized as float32(acc) * x_scale * w.scale; the result's
    last axis must be w's out axis, its other axes x's, broadcast against w.scale's."""
    if not isinstance(w, Int8Weight):
        return jnp.einsum(subscripts, x, w)
    q, scale = quantize(x)
    acc = jnp.einsum(subscripts, q, w.q, preferred_element_type=jnp.int32)
    return (acc.astype(f32) * scale * w.scale).astype(x.dtype)


def linear(x: jax.Array, w: jax.Array | Int8Weight, b: jax.Array | None = None) -> jax.Array:
    """x [..., in] @ w [in, out] (+ b [out]); an Int8Weight runs W8A8 (`product`: lax.dot_general
    of int8 operands with an int32 preferred element type), its bias added in float32 before the
    cast back to x's dtype, as sglang_fx.quant.w8a8_linear does."""
    if not isinstance(w, Int8Weight):
        y = x @ w
        return y if b is None else y + b
    q, scale = quantize(x)
    acc = lax.dot_general(q, w.q, (((q.ndim - 1,), (0,)), ((), ())), preferred_element_type=jnp.int32)  # [..., out]
    y = acc.astype(f32) * scale * w.scale
    return (y if b is None else y + b.astype(f32)).astype(x.dtype)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    x32 = x.astype(f32)
    x32 = x32 * lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight * x32.astype(x.dtype)


@dataclass(frozen=True)
class Rope:
    """Rotary position embedding over `dim` channels; interleaved as in the reference backend's
    Rope (adjacent pairs, returned evens then odds) or halves (Llama, Qwen)."""

    dim: int
    theta: float
    interleaved: bool

    def inv_freq(self) -> np.ndarray:
        """[dim/2] float32, computed as the reference does (torch, on the host)."""
        return (1.0 / (self.theta ** (torch.arange(0, self.dim, 2, dtype=torch.int64).float() / self.dim))).numpy()

    def angles(self, positions: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
        """cos, sin [T, 1, dim/2] in dtype."""
        freqs = (positions.astype(f32)[:, None] * jnp.asarray(self.inv_freq())[None, :])[:, None, :]
        return jnp.cos(freqs).astype(dtype), jnp.sin(freqs).astype(dtype)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
        """x [T, heads, dim] -> rotated, same shape."""
        if self.interleaved:
            x1, x2 = x[..., 0::2], x[..., 1::2]
        else:
            x1, x2 = jnp.split(x, 2, axis=-1)
        return jnp.concatenate((x1 * cos - x2 * sin, x2 * cos + x1 * sin), axis=-1)


def mlp(w: Mapping[str, jax.Array], x: jax.Array, prefix: str = "mlp.") -> jax.Array:
    """SwiGLU: down(silu(gate(x)) * up(x))."""
    gate, up, down = (w[f"{prefix}{n}_proj.weight"] for n in ("gate", "up", "down"))
    return linear(jax.nn.silu(linear(x, gate)) * linear(x, up), down)


def route(spec: MoESpec, w: Mapping[str, jax.Array], x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x [T, H] -> (weights [T, k] float32, expert ids [T, k]), as the reference routes."""
    logits = linear(x.astype(f32), w["mlp.gate.weight"].astype(f32))  # [T, E]
    if spec.scoring == "softmax":
        weights, experts = lax.top_k(jax.nn.softmax(logits, axis=-1), spec.top_k)
    else:  # sigmoid scores; experts chosen among the best groups by the bias-corrected scores
        scores = jax.nn.sigmoid(logits)
        choice = scores + w["mlp.gate.e_score_correction_bias"].astype(f32) if spec.score_correction_bias else scores
        per_group = choice.reshape(len(x), spec.num_groups, -1)  # [T, G, E/G]
        group_score = lax.top_k(per_group, 2)[0].sum(-1)  # [T, G]
        best = lax.top_k(group_score, spec.topk_groups)[1]  # [T, g]
        allowed = jax.nn.one_hot(best, spec.num_groups, dtype=jnp.bool_).any(axis=1)  # [T, G]
        choice = jnp.where(jnp.repeat(allowed, per_group.shape[-1], axis=1), choice, -jnp.inf)
        experts = lax.top_k(choice, spec.top_k)[1]
        weights = jnp.take_along_axis(scores, experts, axis=1)
    if spec.norm_topk_prob:
        weights = weights / weights.sum(-1, keepdims=True)
    return weights * spec.routed_scaling_factor, experts


def gathers_experts(tokens: int, spec: MoESpec, held: range) -> bool:
    """Whether `moe` gathers each token's chosen experts (True) or runs every held expert densely:
    gathering reads tokens x k experts' weights (a copy each) instead of all held ones, and wins
    while tokens x k is under half the held experts. Measured, 64 experts of 512 x 256, top-8,
    jax 0.7.1, 2 cores: gathered 5.8x faster at 1 token, 40x at 2, 1.6x at 4 (XLA's batched
    matvec over the 32 gathered matrices slows down sharply there), 0.8x at 16."""
    return tokens * spec.top_k * 2 <= len(held)


def moe(spec: MoESpec, held: range, w: Mapping[str, jax.Array], x: jax.Array, gather: bool | None = None) -> jax.Array:
    """Routed experts (+ shared experts); x [T, H]. w["mlp.experts.*"] are this rank's `held`
    experts, [len(held), ...]; the result is this rank's partial sum. gather (default
    `gathers_experts`): each token's k chosen experts' weights are gathered ([T, k, H, I]) and
    applied to it alone; else every token runs through each held expert, weighted by its routing
    weight (zero for experts it was not routed to): static shapes either way, the dense one at
    E/k times the expert compute.

    W8A8 experts (`Int8Weight`) quantize each (token, expert) activation row on its own and weight
    an expert's output after down_proj, as the reference applies each expert to its tokens: the
    gathered path by `product` over [T, k] rows, the dense path as a scan over the held experts
    (an int32 [T, E, H] product would be E times a step's output)."""
    weights, experts = route(spec, w, x)
    gate, up, down = (w[f"mlp.experts.{n}_proj.weight"] for n in ("gate", "up", "down"))  # [e, H, I], [e, H, I], [e, I, H]
    if gather is None:
        gather = gathers_experts(len(x), spec, held)
    if gather:
        local = experts - held.start  # [T, k]; other ranks' experts weigh zero here
        weights = jnp.where((local >= 0) & (local < len(held)), weights, 0).astype(x.dtype)
        local = jnp.clip(local, 0, len(held) - 1)
        xs = jnp.broadcast_to(x[:, None, :], local.shape + x.shape[1:])  # [T, k, H]
        h = jax.nn.silu(product("tkh,tkhi->tki", xs, gate[local])) * product("tkh,tkhi->tki", xs, up[local])
        if isinstance(down, Int8Weight):
            out = (product("tki,tkih->tkh", h, down[local]) * weights[..., None]).sum(1)
        else:
            out = jnp.einsum("tki,tkih->th", h * weights[..., None], down[local])
    else:
        combine = (jax.nn.one_hot(experts, spec.num_experts, dtype=f32) * weights[..., None]).sum(1)  # [T, E]
        combine = combine[:, held.start : held.stop].astype(x.dtype)
        if isinstance(down, Int8Weight):

            def expert(out, e):  # e: one held expert's (gate, up, down, routing weights [T])
                g, u, d, c = e
                return out + linear(jax.nn.silu(linear(x, g)) * linear(x, u), d) * c[:, None], None

            out = lax.scan(expert, jnp.zeros_like(x), (gate, up, down, combine.T))[0]
        else:
            h = jax.nn.silu(jnp.einsum("th,ehi->tei", x, gate)) * jnp.einsum("th,ehi->tei", x, up)
            out = jnp.einsum("tei,eih->th", h * combine[:, :, None], down)
    return out + mlp(w, x, "mlp.shared_experts.") if spec.num_shared_experts else out


@dataclass(frozen=True)
class Collectives:
    """The TP group's collectives, for use inside the step's traced function: under
    `shard_map` over the mesh axis `axis` when size > 1, the identity otherwise (a trace-time
    branch). psum: the sum over the group. gather_columns: [N, C] from every rank ->
    [N, size * C], rank blocks in group order."""

    size: int = 1
    axis: str = "tp"

    def psum(self, x: jax.Array) -> jax.Array:
        return x if self.size == 1 else lax.psum(x, self.axis)

    def gather_columns(self, x: jax.Array) -> jax.Array:
        return x if self.size == 1 else lax.all_gather(x, self.axis, axis=1, tiled=True)
