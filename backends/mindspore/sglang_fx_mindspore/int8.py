"""W8A8 int8 linears (sglang_fx/quant.py) in MindSpore: activations quantized per token by the
rule every backend follows, the int8 x int8 -> int32 product, and its dequantization.

A quantized linear's weight is the pair (q, scale) in the weights tree, where a float linear's is
one tensor: q int8 [N, K] kept int8 in memory (the checkpoint's [out, in]; fused projections
concatenate along N), scale float32 [N] (its per-output-channel weight_scale). `layers.linear`
takes either; `is_int8` tells them apart (a Python test, so under jit a graph-time constant).

The product runs by the kernels this process's device target has (`select`, called by the runner
before any graph compiles; MindSpore runs one device target per process):
- portable (CPU, GPU): MindSpore 2.10 on CPU has no int8 x int8 -> int32 product: MatMul,
  BatchMatMul, mint.matmul and ops.dense take int8 but return int8 (the sums wrap), and
  QuantBatchMatmul has no CPU kernel (measured). The declared fallback keeps the weights int8 in
  memory and casts both operands inside the graph, per step, to a type whose MatMul sums them
  exactly: float32 while the sum has at most EXACT_K = 1040 terms (every partial sum is then a
  whole number below 2^24), int32 above (exact; MindSpore's int32 MatMul is 3-9x slower than
  float32 on CPU). Costs measured in the backend's README.
- Ascend, half-precision activations: the fused QuantBatchMatmul (aclnn QuantMatmul): int8 x
  int8 summed in int32 and dequantized by the weight's scale and the per-token activation scale
  inside the kernel (`ascend_linear`). Activations are still quantized by `quantize` here, so
  the rule is ours. Written for the NPU; on CPU it is checked only as far as MindSpore's shape
  inference goes (the kernel is Ascend's).
"""

from __future__ import annotations

import mindspore as ms
from mindspore import Tensor, ops
from mindspore.ops.auto_generate import QuantBatchMatmul

from sglang_fx.quant import ABSMAX_FLOOR, QMAX

from .kernels import cast

#: Whether this process runs Ascend's fused int8 kernel (`select`); read when a graph is traced.
ASCEND = False

_matmul_t, _bmm_t = ops.MatMul(transpose_b=True), ops.BatchMatMul(transpose_b=True)

#: The longest int8 x int8 sum a float32 MatMul computes exactly: each of its partial sums is a
#: whole number of magnitude at most 127^2 K, exactly representable while 127^2 K <= 2^24.
EXACT_K = 2**24 // QMAX**2  # 1040
_quant_matmul_f16 = QuantBatchMatmul(transpose_x1=False, transpose_x2=True, dtype=ms.float16)
_quant_matmul_bf16 = QuantBatchMatmul(transpose_x1=False, transpose_x2=True, dtype=ms.bfloat16)


def select(device_target: str) -> str:
    """Choose the product for a MindSpore device target ("CPU", "GPU", "Ascend") for this
    process: Ascend's fused kernel on an NPU (for half-precision activations), the portable one
    elsewhere. Returns its description."""
    global ASCEND
    ASCEND = device_target == "Ascend"
    return "QuantBatchMatmul (Ascend)" if ASCEND else "int32 MatMul of the int8 operands (portable)"


def is_int8(w) -> bool:
    """Whether a weights-tree entry is a quantized linear's (q, scale) pair."""
    return isinstance(w, tuple)


def quantize(x: Tensor) -> tuple[Tensor, Tensor]:
    """x [..., K] -> (q int8 [..., K], scale float32 [..., 1]), per row, by sglang_fx.quant's rule:
    scale = max(absmax, 1e-10) / 127 and q = clip(round(x / scale), -127, 127), a true float32
    division, and MindSpore's Round, which rounds half to even (checked by the backend's tests)."""
    x32 = cast(x, ms.float32)
    scale = ops.clamp(ops.abs(x32).max(axis=-1, keepdims=True), min=ABSMAX_FLOOR) / QMAX
    q = ops.clamp(ops.round(x32 / ops.broadcast_to(scale, x32.shape)), -QMAX, QMAX)
    return q.astype(ms.int8), scale


def product(q: Tensor, w: Tensor) -> Tensor:
    """int8 q [..., M, K] x int8 w [..., N, K] (w transposed; the same leading axes, or none for
    both) -> [..., M, N], the exact int8 x int8 sums by the portable product: while K <= EXACT_K
    a float32 MatMul of the int8 values, which holds them exactly (float32 of whole numbers);
    above, an int32 MatMul (int32)."""
    exact_in_float32 = w.shape[-1] <= EXACT_K
    kind = ms.float32 if exact_in_float32 else ms.int32
    a, b = q.astype(kind), w.astype(kind)
    return _matmul_t(a, b) if q.ndim == 2 else _bmm_t(a, b)


def dequantize(acc: Tensor, x_scale: Tensor, w_scale: Tensor) -> Tensor:
    """The exact sums acc [..., N] (`product`) -> float32(acc) * x_scale [..., 1] * w_scale [..., N],
    in that order, float32."""
    y = cast(acc, ms.float32)
    return y * ops.broadcast_to(x_scale, y.shape) * ops.broadcast_to(w_scale, y.shape)


def linear(x: Tensor, w: tuple) -> Tensor:
    """x [T, K] -> [T, N] in x's dtype: the W8A8 product with the pair w = (q [N, K], scale [N])."""
    if ASCEND and x.dtype in (ms.float16, ms.bfloat16):
        return ascend_linear(x, w)
    q, x_scale = quantize(x)
    return cast(dequantize(product(q, w[0]), x_scale, w[1]), x.dtype)


def ascend_linear(x: Tensor, w: tuple) -> Tensor:
    """`linear` on Ascend, x float16 or bfloat16 [T, K]: QuantBatchMatmul(q [T, K], w.q [N, K]
    (transpose_x2), scale = w.scale [N] float32, pertokenScaleOptional = x_scale [T] float32,
    dtype = x's) -> [T, N]."""
    q, x_scale = quantize(x)
    kernel = _quant_matmul_bf16 if x.dtype == ms.bfloat16 else _quant_matmul_f16
    return kernel(q, w[0], w[1], None, None, x_scale.reshape(-1))
