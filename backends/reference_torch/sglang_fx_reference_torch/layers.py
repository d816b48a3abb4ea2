"""Building blocks shared by the reference models: norms, RoPE, dense and MoE MLPs.
Shapes: T tokens, H hidden, E experts, k experts per token."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sglang_fx.checkpoint import MoESpec


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
        return F.linear(F.silu(F.linear(x, self.gate)) * F.linear(x, self.up), self.down)


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
