"""Building blocks shared by the reference models: linears (float or W8A8 int8), norms, RoPE,
dense and MoE MLPs. Shapes: T tokens, H hidden, E experts, k experts per token."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sglang_fx.checkpoint import ModelSpec, MoESpec
from sglang_fx.quant import ABSMAX_FLOOR, QMAX


@dataclass
class Int8Weight:
    """A W8A8 linear's weight as the checkpoint gives it (sglang_fx/quant.py): q int8 [out, in],
    kept int8 in memory, and scale float32 [out] (its per-channel weight_scale)."""

    q: torch.Tensor
    scale: torch.Tensor

    def to(self, device: torch.device) -> Int8Weight:
        return Int8Weight(self.q.to(device), self.scale.to(device))


def int8_weights(spec: ModelSpec, weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor | Int8Weight]:
    """The weights with each quantized linear's X.weight and X.weight_scale as one Int8Weight
    under X.weight (so a model reads a linear's weight by the same name, float or int8)."""
    if spec.quant is None:
        return dict(weights)
    out = {n: t for n, t in weights.items() if not n.endswith(".weight_scale")}
    for n in weights:
        if spec.quant.covers(n):
            out[n] = Int8Weight(weights[n], weights[n + "_scale"].reshape(-1))
    return out


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, in] -> (int8 [T, in], float32 scale [T, 1]) by sglang_fx.quant's rule (torch.round
    rounds half to even; a true float32 division)."""
    x = x.float()
    scale = x.abs().amax(-1, keepdim=True).clamp_min(ABSMAX_FLOOR) / QMAX
    return torch.round(x / scale).clamp_(-QMAX, QMAX).to(torch.int8), scale


def linear(x: torch.Tensor, w: torch.Tensor | Int8Weight, b: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., in] @ w [out, in].T (+ b [out]). An Int8Weight runs W8A8: int8 x int8 summed in
    int32 by torch._int_mm (exact), dequantized by x_scale * w_scale in float32, cast to x's dtype."""
    if not isinstance(w, Int8Weight):
        return F.linear(x, w, b)
    q, x_scale = quantize_activations(x.reshape(-1, x.shape[-1]))
    y = torch._int_mm(q, w.q.t()).float() * x_scale * w.scale  # [T, out]
    if b is not None:
        y = y + b.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], -1)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


class Rope:
    """Rotary position embedding over `dim` channels. interleaved=False rotates the two halves
    (x[:d/2], x[d/2:]) as pairs (Llama, Qwen); interleaved=True rotates adjacent channels
    (x0, x1), (x2, x3)... and returns them de-interleaved, evens then odds (DeepSeek; q and k
    get the same permutation, so q.k is unchanged)."""

    def __init__(self, dim: int, theta: float, interleaved: bool, device: torch.device):
        self.inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim))
        self.interleaved = interleaved

    def angles(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape [T, 1, dim/2], broadcast over heads."""
        freqs = (positions.float()[:, None] * self.inv_freq[None, :])[:, None, :]
        return freqs.cos().to(dtype), freqs.sin().to(dtype)

    def __call__(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [T, heads, dim] -> rotated, same shape."""
        if self.interleaved:
            x1, x2 = x[..., 0::2], x[..., 1::2]
        else:
            x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


@dataclass
class MLP:
    gate: torch.Tensor  # [I, H]
    up: torch.Tensor  # [I, H]
    down: torch.Tensor  # [H, I]

    @classmethod
    def from_weights(cls, w: Mapping[str, torch.Tensor], prefix: str) -> MLP:
        return cls(w[prefix + "gate_proj.weight"], w[prefix + "up_proj.weight"], w[prefix + "down_proj.weight"])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return linear(F.silu(linear(x, self.gate)) * linear(x, self.up), self.down)


class MoE:
    """Routed experts (+ shared experts) as described by MoESpec. Routing runs in float32 over
    all experts; only `held` experts (this rank's, under expert parallelism) are applied, so the
    output is this rank's partial sum."""

    def __init__(self, spec: MoESpec, w: Mapping[str, torch.Tensor], prefix: str, held: range):
        self.spec = spec
        self.router = w[prefix + "gate.weight"].float()  # [E, H]
        self.bias = w[prefix + "gate.e_score_correction_bias"].float() if spec.score_correction_bias else None
        self.experts = {e: MLP.from_weights(w, f"{prefix}experts.{e}.") for e in held}
        self.shared = MLP.from_weights(w, prefix + "shared_experts.") if spec.num_shared_experts else None

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, H] -> (weights [T, k] float32, expert ids [T, k])."""
        s = self.spec
        logits = F.linear(x.float(), self.router)  # [T, E]
        if s.scoring == "softmax":
            weights, experts = logits.softmax(-1).topk(s.top_k, dim=-1)
        else:  # sigmoid scores; choose among the best groups using the bias-corrected scores
            scores = logits.sigmoid()
            choice = scores + self.bias if self.bias is not None else scores
            per_group = choice.view(len(x), s.num_groups, -1)  # [T, G, E/G]
            best_groups = per_group.topk(2, dim=-1).values.sum(-1).topk(s.topk_groups, dim=-1).indices  # [T, g]
            allowed = torch.zeros_like(per_group[..., 0], dtype=torch.bool).scatter_(1, best_groups, True)
            choice = choice.masked_fill(~allowed.repeat_interleave(per_group.shape[-1], dim=1), float("-inf"))
            experts = choice.topk(s.top_k, dim=-1).indices
            weights = scores.gather(1, experts)
        if s.norm_topk_prob:
            weights = weights / weights.sum(-1, keepdim=True)
        return weights * s.routed_scaling_factor, experts

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        weights, experts = self.route(x)
        out = torch.zeros_like(x)
        for e in experts.unique().tolist():
            if e not in self.experts:
                continue  # another rank's
            rows, slot = (experts == e).nonzero(as_tuple=True)
            out.index_add_(0, rows, self.experts[e](x[rows]) * weights[rows, slot, None].to(x.dtype))
        return out + self.shared(x) if self.shared is not None else out
