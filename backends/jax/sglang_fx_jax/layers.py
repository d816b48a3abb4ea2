"""Building blocks of the JAX models, as plain functions over HF-named weights: norms, RoPE,
dense and MoE MLPs, and the TP collectives. Shapes: T tokens, H hidden, I MLP width, E experts,
k experts per token.

Linear weights are stored [in, out], transposed from HF's [out, in] once at load (`is_linear`
names them; experts [E, in, out]): XLA's CPU matmul contracting the weight's last axis was 7x
slower at 8 rows (9.1 vs 1.2 ms for ten 576x1536 products, jax 0.7.1, 2 cores)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import torch
from jax import lax

from sglang_fx.checkpoint import MoESpec

f32 = jnp.float32


#: Suffixes of the HF weights `linear` takes, stored transposed ([in, out]).
LINEAR = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight", "gate_proj.weight", "up_proj.weight",
          "down_proj.weight", "q_a_proj.weight", "q_b_proj.weight", "kv_a_proj_with_mqa.weight", "mlp.gate.weight")  # fmt: skip


def is_linear(name: str) -> bool:
    return name.endswith(LINEAR)


def linear(x: jax.Array, w: jax.Array, b: jax.Array | None = None) -> jax.Array:
    """x [..., in] @ w [in, out] (+ b [out])."""
    y = x @ w
    return y if b is None else y + b


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
    E/k times the expert compute."""
    weights, experts = route(spec, w, x)
    gate, up, down = (w[f"mlp.experts.{n}_proj.weight"] for n in ("gate", "up", "down"))  # [e, H, I], [e, H, I], [e, I, H]
    if gather is None:
        gather = gathers_experts(len(x), spec, held)
    if gather:
        local = experts - held.start  # [T, k]; other ranks' experts weigh zero here
        weights = jnp.where((local >= 0) & (local < len(held)), weights, 0).astype(x.dtype)
        local = jnp.clip(local, 0, len(held) - 1)
        xs = jnp.broadcast_to(x[:, None, :], local.shape + x.shape[1:])  # [T, k, H]
        h = jax.nn.silu(jnp.einsum("tkh,tkhi->tki", xs, gate[local])) * jnp.einsum("tkh,tkhi->tki", xs, up[local])
        out = jnp.einsum("tki,tkih->th", h * weights[..., None], down[local])
    else:
        combine = (jax.nn.one_hot(experts, spec.num_experts, dtype=f32) * weights[..., None]).sum(1)  # [T, E]
        combine = combine[:, held.start : held.stop].astype(x.dtype)
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
