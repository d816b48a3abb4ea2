"""Graph-callable building blocks the MindSpore models share: projections, RMSNorm, RoPE, the
SwiGLU MLP and routed experts. Every function is plain MindSpore ops, so mindspore.jit inlines it
into the model's graph. Shapes: T tokens, H hidden, I intermediate, E experts, k experts per token.

Written for few kernel launches under dynamic shapes: constant slices rather than ops.split
(which computes its sizes at run time with Shape/ShapeCalc host kernels around each slice), and
2-D MatMul rather than ops.matmul on 3-D tensors (broadcasts, a transpose and a BatchMatMul).
"""

from __future__ import annotations

from collections.abc import Mapping

import mindspore as ms
import torch
from mindspore import Tensor, ops

from sglang_fx.checkpoint import MoESpec
from sglang_fx.errors import UnsupportedConfigError
from sglang_fx.quant import QuantSpec

from . import int8
from .kernels import cast

_matmul, _matmul_t = ops.MatMul(), ops.MatMul(transpose_b=True)  # x @ w, and x @ w.T without materialising w.T
_bmm, _bmm_t = ops.BatchMatMul(), ops.BatchMatMul(transpose_b=True)


def linear(x: Tensor, w: Tensor | tuple) -> Tensor:
    """x [T, K] -> [T, N] with w [N, K], or with a quantized linear's pair (q, scale) by W8A8 (`int8.linear`)."""
    return int8.linear(x, w) if int8.is_int8(w) else _matmul_t(x, w)


def widened(t: Tensor, like: Tensor | tuple) -> Tensor:
    """t broadcast to like's shape (or to the shape `like`) by an explicit BroadcastTo, for an
    elementwise op of that shape.
    In a jit graph on CPU, a Mul or Add that broadcasts an operand itself keeps a buffer of about
    4x its output alive for the life of the graph, never returned: about 1.4 MB per prefill token
    for SmolLM2's 30 layers (a 2000-token prompt took a process from 1.92 to 4.79 GiB; with this,
    to 2.29). A same-shape op after BroadcastTo keeps nothing and runs no slower."""
    return ops.broadcast_to(t, like if isinstance(like, tuple) else like.shape)


def rms_norm(x: Tensor, weight: Tensor | None, eps: float) -> Tensor:
    """RMSNorm over the last axis, in float32; weight None: the norm's weight was folded into the
    projections that read its output (`fold_norm`)."""
    x32 = cast(x, ms.float32)
    x32 = x32 * widened(ops.rsqrt(ops.mean(x32 * x32, -1, True) + eps), x32)
    return cast(x32, x.dtype) if weight is None else widened(weight, x32) * cast(x32, x.dtype)


def fold_norm(w: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """A projection w [N, H] with the RMSNorm weight [H] before it folded in, computed in float32
    and returned in w's dtype: linear(norm * x, w) == linear(x, w * norm). This spares, per norm
    and step, a Mul that broadcasts the weight over the tokens: one of MindSpore's slowest CPU
    kernels for its size (5-8x a same-shape Mul)."""
    return (w.float() * norm.float()).to(w.dtype)


# ---------------------------------------------------------------------------------------------
# RoPE as matmuls with constant +-1/0 matrices: exact, and fewer kernels than slicing
# ---------------------------------------------------------------------------------------------


def rope_matrices(dim: int, interleaved: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """[dim, dim] P and R for `rope`. R applies rotate_half: x @ R == cat(-x[d/2:], x[:d/2]).
    interleaved=False (Llama, Qwen): P is the identity. interleaved=True (DeepSeek): P
    de-interleaves the pairs (x0, x1), (x2, x3)... into evens then odds, as the reference does,
    and R is P's result rotated (x @ R == rotate_half(x @ P)). Both are exact: one +-1 per column."""
    half = dim // 2
    r = torch.zeros(dim, dim)
    r[torch.arange(half) + half, torch.arange(half)] = -1.0
    r[torch.arange(half), torch.arange(half) + half] = 1.0
    p = torch.eye(dim)
    if interleaved:
        p = p[:, torch.cat([torch.arange(0, dim, 2), torch.arange(1, dim, 2)])]
    return p, p @ r


def rope_angles(positions: Tensor, inv_freq: Tensor, dtype) -> tuple[Tensor, Tensor]:
    """cos, sin [T, 1, dim] in dtype (the two halves repeat the dim/2 frequencies), broadcast
    over heads. positions [T] int; inv_freq [dim/2] float32."""
    freqs = positions.astype(ms.float32).reshape(-1, 1) * inv_freq.reshape(1, -1)  # [T, dim/2]
    emb = ops.cat((freqs, freqs), -1).reshape(freqs.shape[0], 1, -1)
    return cast(ops.cos(emb), dtype), cast(ops.sin(emb), dtype)


def rope_rotations(cos: Tensor, sin: Tensor, p: Tensor, r: Tensor) -> Tensor:
    """Each token's rotation as one matrix, [T, dim, dim]: x_t @ M_t == rope(x_t). M = P cos + R sin,
    scaling columns; like P and R it has one cos and one +-sin term per column, so it is exact.
    With it, `rope` is one batched matmul instead of four kernels, for T * dim * dim values a
    step: worth it for few tokens (decode), not for a long prefill."""
    shape = (cos.shape[0], r.shape[0], r.shape[1])  # [T, dim, dim]
    return widened(p, shape) * widened(cos, shape) + widened(r, shape) * widened(sin, shape)


def rope(x: Tensor, heads: int, rot: tuple, interleaved: bool) -> Tensor:
    """x [T, heads, dim] rotated by rot: (cos, sin, p, r) from `rope_angles` and `rope_matrices`
    (p is skipped when not interleaved), or (M,) from `rope_rotations`."""
    if len(rot) == 1:
        return _bmm(x, rot[0])
    cos, sin, p, r = rot
    dim = r.shape[0]

    def times(m):
        return _matmul(x.reshape(-1, dim), m).reshape(-1, heads, dim)

    return (times(p) if interleaved else x) * widened(cos, x) + times(r) * widened(sin, x)


# ---------------------------------------------------------------------------------------------
# MLPs: dense SwiGLU, and routed experts
# ---------------------------------------------------------------------------------------------


def projection(w: Mapping[str, torch.Tensor], names: list[str], quant: QuantSpec | None = None) -> torch.Tensor | tuple:
    """The linears `names` (HF weight names, each [N_i, K]) as one projection, fused along their
    outputs ([sum N_i, K]; one name: its tensor as is). Quantized ones (quant covers them: all or
    none) as the pair (int8 [sum N_i, K], float32 scale [sum N_i]) that `linear` takes: fusing
    int8 rows is exact, as activations are quantized per token and weights per output row."""
    quantized = {quant is not None and quant.covers(n) for n in names}
    if len(quantized) > 1:
        raise UnsupportedConfigError(f"mindspore backend: {', '.join(names)} run as one projection, but the checkpoint quantizes "
                                     f"only some of them; quantize all or none of them (sglang-fx quantize does)")  # fmt: skip

    def fused(tensors: list[torch.Tensor]) -> torch.Tensor:
        return tensors[0] if len(tensors) == 1 else torch.cat(tensors)

    if quantized == {True}:
        return fused([w[n] for n in names]), fused([w[n + "_scale"].reshape(-1) for n in names])
    return fused([w[n] for n in names])


def mlp_weights(w: Mapping[str, torch.Tensor], prefix: str, norm: torch.Tensor | None = None,
                quant: QuantSpec | None = None) -> tuple:  # fmt: skip
    """A SwiGLU MLP's gate_proj, up_proj [I, H], with the weight of the RMSNorm `norm` before it
    folded in if given (float weights only), and down_proj [H, I]; quantized ones as (q, scale)
    pairs (`projection`). (Two matmuls cost what one over the fused gate/up weight does, and spare
    the two slices that would split its output.)"""
    gate, up, down = (projection(w, [prefix + n], quant) for n in ("gate_proj.weight", "up_proj.weight", "down_proj.weight"))
    if norm is not None:
        gate, up = fold_norm(gate, norm), fold_norm(up, norm)
    return gate, up, down


def mlp(x: Tensor, gate: Tensor, up: Tensor, down: Tensor) -> Tensor:
    """SwiGLU: x [T, H] -> [T, H]."""
    return linear(ops.silu(linear(x, gate)) * linear(x, up), down)


def moe_weights(w: Mapping[str, torch.Tensor], prefix: str, spec: MoESpec, held: range | None = None,
                quant: QuantSpec | None = None) -> tuple:  # fmt: skip
    """An MoE layer's tensors in the order `moe` unpacks them: the router [E, H] in float32
    (routing runs in float32, over all E experts); the score-correction bias [E] float32 (zeros
    when the model has none); the gate and up rows of each `held` expert (all by default; this
    rank's under expert parallelism), expert after expert, as one [Eh * 2 I, H]; their down_proj
    transposed, expert after expert, as one [Eh * I, H]; then the shared experts' gate, up and
    down (`mlp_weights`) if the model has them. Held expert e's blocks are rows
    [e' * 2 I, (e' + 1) * 2 I) and [e' * I, (e' + 1) * I), e' = e - held.start: reshaped to
    [Eh, ., H] they are what the gathered path indexes, and as they are, what the dense path
    multiplies by. Quantized experts (quant): gate and up as the pair (int8 [Eh * 2 I, H], scale
    [Eh * 2 I]), down_proj untransposed and stacked, (int8 [Eh, H, I], scale [Eh, H]): each
    expert's output is its own int8 product (its input rows quantized on their own)."""
    experts = [f"{prefix}experts.{e}." for e in (range(spec.num_experts) if held is None else held)]
    bias = w[prefix + "gate.e_score_correction_bias"] if spec.score_correction_bias else torch.zeros(spec.num_experts)
    gate_up = projection(w, [p + n for p in experts for n in ("gate_proj.weight", "up_proj.weight")], quant)
    if int8.is_int8(gate_up):
        down = (torch.stack([w[p + "down_proj.weight"] for p in experts]),  # [Eh, H, I] int8
                torch.stack([w[p + "down_proj.weight_scale"].reshape(-1) for p in experts]))  # [Eh, H]
    else:
        down = torch.cat([w[p + "down_proj.weight"].T for p in experts])
    out = (w[prefix + "gate.weight"].float(), bias.float(), gate_up, down)
    return out + mlp_weights(w, prefix + "shared_experts.", quant=quant) if spec.num_shared_experts else out


def gathers_experts(num_tokens: int, spec: MoESpec) -> bool:
    """Whether `moe` should gather each token's k experts (True) or run every expert densely:
    gathering moves T * k experts' weights, the dense path reads all E, so gather while
    T * k < E (decode and small batches; a jit-graph constant, so at most two graphs)."""
    return num_tokens * spec.top_k < spec.num_experts


def route(logits: Tensor, bias: Tensor, spec: MoESpec) -> tuple[Tensor, Tensor]:
    """Each token's experts and their weights: (weights [T, k] float32, ids [T, k] int32).
    logits [T, E] float32 router outputs.

    softmax scoring (Qwen3-MoE): the top_k softmax probabilities. sigmoid scoring (DeepSeek-V3):
    experts are chosen by sigmoid score + bias, among the topk_groups groups whose two best
    biased scores sum highest; their weights are the unbiased sigmoid scores. Then, as in the
    reference, renormalised to sum to 1 when norm_topk_prob, times routed_scaling_factor."""
    E, k = spec.num_experts, spec.top_k
    if spec.scoring == "softmax":
        scores = ops.softmax(logits, -1)
        weights, ids = ops.topk(scores, k)  # [T, k]
    else:
        scores = ops.sigmoid(logits)
        per_group = (scores + bias).reshape(-1, spec.num_groups, E // spec.num_groups)  # [T, G, E/G]
        group_score = ops.topk(per_group, 2)[0].sum(-1)  # [T, G]
        best = ops.topk(group_score, spec.topk_groups)[1]  # [T, g]
        hidden = _one_hot(best, spec.num_groups).sum(1) == 0  # [T, G]: groups not chosen
        choice = ops.masked_fill(per_group, hidden.reshape(-1, spec.num_groups, 1), float("-inf"))
        ids = ops.topk(choice.reshape(-1, E), k)[1]  # [T, k]
        weights = ops.gather_elements(scores, 1, ids)
    if spec.norm_topk_prob:
        weights = weights / weights.sum(-1, keepdims=True)
    if spec.routed_scaling_factor != 1.0:
        weights = weights * spec.routed_scaling_factor
    return weights, ids.astype(ms.int32)


def _one_hot(ids: Tensor, n: int) -> Tensor:
    """[..., n] float32: 1 at ids, 0 elsewhere."""
    return ops.one_hot(ids, n, Tensor(1.0, ms.float32), Tensor(0.0, ms.float32))


def moe(x: Tensor, weights: tuple, spec: MoESpec, gather: bool, held: range | None = None) -> Tensor:
    """Routed SwiGLU experts (+ shared experts): x [T, H] -> [T, H]; weights from `moe_weights`
    for the `held` experts (default all); gather from `gathers_experts`. Every token is routed
    over all experts; only held ones are applied (the others' weights count as zero), so under
    expert parallelism the result is this rank's partial sum. Neither path has data-dependent
    shapes, so each compiles once under dynamic T.

    gather: each token's k experts' weights are gathered ([T, k * 2 I, H] and [T, k * I, H]) and
    applied by two batched matmuls over the T tokens: the routed work, and the weights of T * k
    experts moved. Dense: every token goes through all E experts ([T, E * 2 I], then
    [T, E * I] -> [T, H], two plain matmuls) with the unchosen experts' activations weighted by
    zero: E/k times the routed FLOPs, but one read of each expert for any T.
    Both weight each expert's activation before down_proj rather than its output after it: the
    same sum, differing only in rounding. Grouped-matmul kernels (Ascend) would serve large T
    better than either; MindSpore has none on CPU. Quantized experts: `_int8_experts`."""
    router, bias, gate_up, down = weights[:4]
    held = range(spec.num_experts) if held is None else held
    E, I, k = len(held), spec.intermediate_size, spec.top_k  # E: the experts applied here
    top, ids = route(linear(cast(x, ms.float32), router), bias, spec)  # [T, k] x2
    if gather and E < spec.num_experts:  # another rank's experts: weight 0, any held expert's index
        ids = ids - held.start
        top = top * ((ids >= 0) & (ids < E)).astype(ms.float32)
        ids = ops.clamp(ids, 0, E - 1)
    if int8.is_int8(gate_up):
        out = _int8_experts(x, top, ids, gate_up, down, spec, held, gather)
    elif gather:
        H = gate_up.shape[1]
        ids = ids.reshape(-1)  # [T * k]
        w1 = ops.gather(gate_up.reshape(E, 2 * I, H), ids, 0).reshape(-1, k * 2 * I, H)  # [T, k * 2 I, H]
        gate_up = _bmm_t(x.reshape(-1, 1, H), w1).reshape(-1, k, 2 * I)  # [T, k, 2 I]
        act = ops.silu(gate_up[..., :I]) * gate_up[..., I:]
        act = act * widened(cast(top, x.dtype).reshape(-1, k, 1), act)
        w2 = ops.gather(down.reshape(E, I, H), ids, 0).reshape(-1, k * I, H)  # [T, k * I, H]
        out = _bmm(act.reshape(-1, 1, k * I), w2).reshape(-1, H)  # [T, H]
    else:
        weight = _dense_weights(top, ids, spec, held)  # [T, E]
        gate_up = linear(x, gate_up).reshape(-1, E, 2 * I)  # [T, E, 2 I]
        act = ops.silu(gate_up[..., :I]) * gate_up[..., I:]
        act = act * widened(cast(weight, x.dtype).reshape(-1, E, 1), act)
        out = _matmul(act.reshape(-1, E * I), down)  # [T, H]
    if len(weights) > 4:
        out = out + mlp(x, *weights[4:])
    return out


def _dense_weights(top: Tensor, ids: Tensor, spec: MoESpec, held: range) -> Tensor:
    """Each token's routing weight of each held expert, [T, E] float32 (zero off its top k)."""
    hot = _one_hot(ids, spec.num_experts)
    weight = (hot * widened(top.reshape(-1, spec.top_k, 1), hot)).sum(1)  # [T, all E]
    return weight[:, held.start : held.stop] if len(held) < spec.num_experts else weight


def _int8_experts(x: Tensor, top: Tensor, ids: Tensor, gate_up: tuple, down: tuple, spec: MoESpec, held: range,
                  gather: bool) -> Tensor:  # fmt: skip
    """The routed experts of `moe` with quantized weights (`moe_weights`: gate_up (int8 [E * 2 I,
    H], scale [E * 2 I]), down (int8 [E, H, I], scale [E, H])), as the reference computes them:
    each expert applied to its tokens, each linear's input rows quantized on their own (so the
    down_proj input per (token, expert)), and each expert's output weighted after down_proj.
    top, ids [T, k]: routing weights and held-expert indices. gather: each token's k experts'
    int8 weights gathered ([T, k * 2 I, H], [T * k, H, I]); dense: one product over every held
    expert's gate/up rows, then a batched product per expert ([E, T, I] x [E, H, I] -> [E, T, H])."""
    E, I, k = len(held), spec.intermediate_size, spec.top_k
    H = gate_up[0].shape[1]
    if gather:
        ids = ids.reshape(-1)  # [T * k]
        q, x_scale = int8.quantize(x.reshape(-1, 1, H))  # [T, 1, H], [T, 1, 1]
        w1 = ops.gather(gate_up[0].reshape(E, 2 * I, H), ids, 0).reshape(-1, k * 2 * I, H)  # int8 [T, k * 2 I, H]
        s1 = ops.gather(gate_up[1].reshape(E, 2 * I), ids, 0).reshape(-1, 1, k * 2 * I)
        h = cast(int8.dequantize(int8.product(q, w1), x_scale, s1), x.dtype).reshape(-1, 1, 2 * I)  # [T * k, 1, 2 I]
        q, a_scale = int8.quantize(ops.silu(h[..., :I]) * h[..., I:])  # [T * k, 1, I]: one row per (token, expert)
        s2 = ops.gather(down[1], ids, 0).reshape(-1, 1, H)
        y = cast(int8.dequantize(int8.product(q, ops.gather(down[0], ids, 0)), a_scale, s2), x.dtype).reshape(-1, k, H)
        return (y * widened(cast(top, x.dtype).reshape(-1, k, 1), y)).sum(1)  # [T, H]
    h = linear(x, gate_up).reshape(-1, E, 2 * I).transpose(1, 0, 2)  # [E, T, 2 I]
    q, a_scale = int8.quantize(ops.silu(h[..., :I]) * h[..., I:])  # [E, T, I], [E, T, 1]
    y = cast(int8.dequantize(int8.product(q, down[0]), a_scale, down[1].reshape(E, 1, H)), x.dtype)  # [E, T, H]
    weight = cast(_dense_weights(top, ids, spec, held), x.dtype).transpose(1, 0).reshape(E, -1, 1)  # [E, T, 1]
    return (y * widened(weight, y)).sum(0)
