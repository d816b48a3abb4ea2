"""Building blocks of the NumPy models: linears (float or W8A8 int8), norms, RoPE, dense and MoE
MLPs, over HF-named weights (linear weights [out, in], as in the checkpoint). Shapes: T tokens,
H hidden, E experts."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from sglang_fx.checkpoint import ModelSpec, MoESpec
from sglang_fx.quant import ABSMAX_FLOOR, QMAX


@dataclass(frozen=True)
class Int8Weight:
    """A W8A8 linear's weight (sglang_fx/quant.py): q int8 [out, in], kept int8 in memory, and
    scale float32 [out] (its per-channel weight_scale)."""

    q: np.ndarray
    scale: np.ndarray


Weights = Mapping[str, "np.ndarray | Int8Weight"]


def int8_weights(spec: ModelSpec, arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray | Int8Weight]:
    """The arrays with each quantized linear's X.weight and X.weight_scale as one Int8Weight under
    X.weight, so a model reads a linear's weight by the same name, float or int8."""
    if spec.quant is None:
        return dict(arrays)
    out = {n: a for n, a in arrays.items() if not n.endswith(".weight_scale")}
    for n in arrays:
        if spec.quant.covers(n):
            out[n] = Int8Weight(arrays[n], arrays[n + "_scale"].reshape(-1))
    return out


def linear(x: np.ndarray, w: np.ndarray | Int8Weight, b: np.ndarray | None = None) -> np.ndarray:
    """x [..., in] @ w [out, in].T (+ b [out]). An Int8Weight runs W8A8 by sglang_fx.quant's rule:
    x quantized per token (np.rint: half to even; a true float32 division), int8 x int8 summed
    in int32 (exact), dequantized by x_scale * w_scale in float32, cast to x's dtype."""
    if isinstance(w, Int8Weight):
        x32 = x.astype(np.float32)
        scale = np.maximum(np.abs(x32).max(axis=-1, keepdims=True), np.float32(ABSMAX_FLOOR)) / np.float32(QMAX)
        q = np.clip(np.rint(x32 / scale), -QMAX, QMAX).astype(np.int8)
        y = np.matmul(q, w.q.T, dtype=np.int32).astype(np.float32) * scale * w.scale
        return (y if b is None else y + b).astype(x.dtype)
    y = x @ w.T
    return y if b is None else y + b


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1 + np.exp(-x))


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    x32 = x.astype(np.float32)
    x32 = x32 / np.sqrt(np.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight * x32.astype(x.dtype)


class Rope:
    """Rotary position embedding over `dim` channels: halves rotated as pairs (Llama, Qwen), or
    adjacent channels (interleaved, DeepSeek), returned evens then odds."""

    def __init__(self, dim: int, theta: float, interleaved: bool):
        self.inv_freq = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim)
        self.interleaved = interleaved

    def angles(self, positions: np.ndarray, dtype) -> tuple[np.ndarray, np.ndarray]:
        """cos, sin [T, 1, dim/2]."""
        freqs = (positions.astype(np.float32)[:, None] * self.inv_freq.astype(np.float32)[None, :])[:, None, :]
        return np.cos(freqs).astype(dtype), np.sin(freqs).astype(dtype)

    def __call__(self, x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
        """x [T, heads, dim] -> rotated, same shape."""
        x1, x2 = (x[..., 0::2], x[..., 1::2]) if self.interleaved else np.split(x, 2, axis=-1)
        return np.concatenate((x1 * cos - x2 * sin, x2 * cos + x1 * sin), axis=-1)


def mlp(w: Weights, prefix: str, x: np.ndarray) -> np.ndarray:
    """SwiGLU: down(silu(gate(x)) * up(x))."""
    return linear(silu(linear(x, w[prefix + "gate_proj.weight"])) * linear(x, w[prefix + "up_proj.weight"]), w[prefix + "down_proj.weight"])


def top_k(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(values, indices) of the k largest of each row, largest first."""
    idx = np.argsort(-x, axis=-1, kind="stable")[..., :k]
    return np.take_along_axis(x, idx, axis=-1), idx


def route(spec: MoESpec, w: Weights, prefix: str, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x [T, H] -> (weights [T, k] float32, expert ids [T, k]), as the reference routes."""
    logits = linear(x.astype(np.float32), w[prefix + "gate.weight"].astype(np.float32))  # [T, E]
    if spec.scoring == "softmax":
        p = np.exp(logits - logits.max(-1, keepdims=True))
        weights, experts = top_k(p / p.sum(-1, keepdims=True), spec.top_k)
    else:  # sigmoid scores; experts chosen among the best groups by the bias-corrected scores
        scores = 1 / (1 + np.exp(-logits))
        choice = scores + w[prefix + "gate.e_score_correction_bias"].astype(np.float32) if spec.score_correction_bias else scores
        per_group = choice.reshape(len(x), spec.num_groups, -1)  # [T, G, E/G]
        best = top_k(top_k(per_group, 2)[0].sum(-1), spec.topk_groups)[1]  # [T, g]
        allowed = np.zeros(per_group.shape[:2], bool)
        np.put_along_axis(allowed, best, True, axis=1)
        choice = np.where(np.repeat(allowed, per_group.shape[-1], axis=1), choice, -np.inf)
        experts = top_k(choice, spec.top_k)[1]
        weights = np.take_along_axis(scores, experts, axis=1)
    if spec.norm_topk_prob:
        weights = weights / weights.sum(-1, keepdims=True)
    return weights * spec.routed_scaling_factor, experts


def moe(spec: MoESpec, w: Weights, prefix: str, x: np.ndarray) -> np.ndarray:
    """Routed experts (+ shared experts): each expert runs on the tokens routed to it."""
    weights, experts = route(spec, w, prefix, x)
    out = np.zeros_like(x)
    for e in np.unique(experts):
        rows, slot = np.nonzero(experts == e)
        out[rows] += mlp(w, f"{prefix}experts.{e}.", x[rows]) * weights[rows, slot, None].astype(x.dtype)
    return out + mlp(w, prefix + "shared_experts.", x) if spec.num_shared_experts else out
