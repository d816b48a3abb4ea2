"""Quantized checkpoints: the schemes sglang-fx reads, and THE rounding rule every backend follows.

Scheme "w8a8_int8" (the only one so far), as compressed-tensors writes it (`format:
int-quantized`; what `llmcompressor`'s W8A8 recipe and `sglang-fx quantize` produce):
- per quantized linear `X`: `X.weight` int8 [out, in] and `X.weight_scale` [out, 1] (float),
  symmetric per output channel: the float weight is `weight * weight_scale`. No zero point.
- activations quantized dynamically, per token, symmetric, by `quantize_activations` below.
- the product `q_x [T, in] @ q_w.T` is int8 x int8 summed in int32 (exact: |sum| <= 127^2 * in),
  then dequantized in float32: `y = float32(acc) * x_scale [T, 1] * w_scale.T [1, out]`
  (+ bias, kept float), cast to the activation dtype. `w8a8_linear` is the NumPy reference.
Which linears are quantized comes from config.json's `quantization_config` (its config groups'
`targets` and its `ignore` list, matched as compressed-tensors matches them: a module's class
name, its exact name, or "re:<regex>" matched from the start of its name). Embeddings and norms
are never quantized; the LM head, MoE routers and MLA's kv_b_proj (used as two matrices by the
absorbed attention, not applied to activations) must be ignored, or the checkpoint is refused.

THE rounding rule, for activations here and for weights in `sglang-fx quantize`:
    scale = max(absmax, 1e-10) / 127        (float32; absmax over the token's channels)
    q     = clip(round_half_to_even(x / scale), -127, 127)   (int8)
Half to even, not SGLang's half away from zero (its Triton `per_token_quant_int8`, which also
computes x * (127 / absmax) rather than x / scale), because it is what every framework's own
round does (torch.round, numpy.rint, jax.numpy.round, MindSpore's Round), so each backend writes
it as one op and all of them agree bit for bit on q; compressed-tensors' own quantizer (which
writes the checkpoints) rounds the same way. The two rules differ only where x / scale lands
exactly on a half, which float inputs almost never do. The division is a true float32 division
(not a multiply by 1 / scale), so every backend computes the same q from the same x.

Refused with a reason: other compressed-tensors schemes (weight-only, static or per-tensor
activations, group strategies, fp8, asymmetric), and ModelSlim static W8A8 (see `modelslim`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import UnsupportedConfigError

W8A8_INT8 = "w8a8_int8"

#: The float epsilon of the rule above: absmax below it is treated as it (all-zero tokens give q = 0).
ABSMAX_FLOOR = 1e-10
QMAX = 127


@dataclass(frozen=True)
class QuantSpec:
    """A quantized checkpoint's scheme and which linears it covers.

    scheme   a name of this module's schemes, e.g. "w8a8_int8"; what `Capabilities.quantization`
             lists.
    linears  HF module names of the quantized linears ("model.layers.0.self_attn.q_proj"):
             each has `<name>.weight` int8 [out, in] and `<name>.weight_scale` float32 [out, 1]
             in the weights `Checkpoint.load` returns. Every other linear stays float.
    """

    scheme: str
    linears: frozenset[str]

    def covers(self, weight_name: str) -> bool:
        """Whether an HF tensor name ("...q_proj.weight") is a quantized linear's weight."""
        return weight_name.endswith(".weight") and weight_name.removesuffix(".weight") in self.linears


# --------------------------------------------------------------------------------------------
# The rule, in NumPy (the reference every backend is checked against)
# --------------------------------------------------------------------------------------------


def quantize_activations(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x [..., in] float -> (q int8 [..., in], scale float32 [..., 1]) by the rule above."""
    x = np.asarray(x, dtype=np.float32)
    scale = np.maximum(np.abs(x).max(axis=-1, keepdims=True), np.float32(ABSMAX_FLOOR)) / np.float32(QMAX)
    q = np.clip(np.rint(x / scale), -QMAX, QMAX).astype(np.int8)
    return q, scale.astype(np.float32)


def quantize_weight(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A float weight [out, in] -> (int8 [out, in], scale float32 [out, 1]): the same rule per
    output channel (what `sglang-fx quantize` writes)."""
    return quantize_activations(w)


def w8a8_linear(x: np.ndarray, weight: np.ndarray, weight_scale: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    """The W8A8 linear: x [..., in] float, weight int8 [out, in], weight_scale [out, 1] ->
    float32 [..., out]. The int32 accumulation is exact; only the two scale products round."""
    q, x_scale = quantize_activations(x)
    acc = np.matmul(q.astype(np.int32), weight.astype(np.int32).T)  # [..., out] int32, exact
    y = acc.astype(np.float32) * x_scale * np.asarray(weight_scale, np.float32).reshape(-1)
    return y if bias is None else y + np.asarray(bias, np.float32)


# --------------------------------------------------------------------------------------------
# Reading quantization_config
# --------------------------------------------------------------------------------------------

_WEIGHTS = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel", "dynamic": False}
_ACTIVATIONS = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}
SUPPORTED = ("compressed-tensors W8A8 int8 (format 'int-quantized'; weights int8, symmetric, per channel; "
             "activations int8, symmetric, dynamic per token), e.g. written by `sglang-fx quantize SRC DST --scheme w8a8`")  # fmt: skip


def _mismatch(args: Mapping | None, want: Mapping) -> list[str]:
    if args is None:
        return ["none"]
    return [f"{k}={args.get(k)!r}" for k, v in want.items() if args.get(k, False if k == "dynamic" else None) != v]


def matches(name: str, cls: str, target: str) -> bool:
    """compressed-tensors' rule: a class name, an exact module name, or "re:" + a regex matched
    at the start of the name."""
    if target.startswith("re:"):
        return re.match(target.removeprefix("re:"), name) is not None
    return target == name or target == cls


def parse_config(qc: Mapping, linears: Mapping[str, str], float_only: Iterable[str], where: str) -> QuantSpec:
    """config.json's `quantization_config` -> QuantSpec, or UnsupportedConfigError naming what the
    checkpoint is and what runs. linears: every linear module name of the model -> its class name
    (as compressed-tensors would see it); float_only: those of them sglang-fx keeps float (the LM
    head, routers, MLA's kv_b_proj), which the checkpoint must not quantize."""
    method = qc.get("quant_method")
    if method != "compressed-tensors":
        raise UnsupportedConfigError(f"{where}: quantization method {method!r} is not supported; sglang-fx runs {SUPPORTED}")
    if qc.get("sparsity_config") or qc.get("kv_cache_scheme") or qc.get("transform_config"):
        raise UnsupportedConfigError(f"{where}: sparsity, transforms and quantized KV caches are not supported; sglang-fx runs {SUPPORTED}")
    groups = qc.get("config_groups") or {}
    if not groups:
        raise UnsupportedConfigError(f"{where}: quantization_config has no config_groups; sglang-fx runs {SUPPORTED}")
    ignore = list(qc.get("ignore") or [])
    quantized: set[str] = set()
    for gname, g in groups.items():
        fmt = g.get("format") or qc.get("format")
        bad = _mismatch(g.get("weights"), _WEIGHTS)
        bad_act = _mismatch(g.get("input_activations"), _ACTIVATIONS)
        if fmt != "int-quantized" or bad or bad_act or g.get("output_activations"):
            what = "; ".join(([f"format {fmt!r}"] if fmt != "int-quantized" else []) + ([f"weights {', '.join(bad)}"] if bad else [])
                             + ([f"input activations {', '.join(bad_act)}"] if bad_act else [])
                             + (["output activations quantized"] if g.get("output_activations") else []))  # fmt: skip
            raise UnsupportedConfigError(f"{where}: config group {gname!r} is not W8A8 int8 ({what}); sglang-fx runs {SUPPORTED}")
        targets = g.get("targets") or []
        quantized |= {n for n, c in linears.items() if any(matches(n, c, t) for t in targets)
                      and not any(matches(n, c, i) for i in ignore)}  # fmt: skip
    kept = sorted(quantized & set(float_only))
    if kept:
        raise UnsupportedConfigError(f"{where}: {kept[0]!r}{f' (and {len(kept) - 1} more)' if len(kept) > 1 else ''} is quantized, "
                                     f"but sglang-fx keeps the LM head, MoE routers and MLA's kv_b_proj float; "
                                     f"re-quantize with them in the ignore list (sglang-fx quantize does)")  # fmt: skip
    if not quantized:
        raise UnsupportedConfigError(f"{where}: quantization_config's targets match no linear layer of the model")
    return QuantSpec(W8A8_INT8, frozenset(quantized))


def modelslim(model_path: str | Path) -> str | None:
    """Why a ModelSlim checkpoint (a quant_model_description*.json beside the weights) is refused,
    or None when `model_path` is not one."""
    found = sorted(Path(model_path).glob("quant_model_description*.json"))
    if not found:
        return None
    return (f"{found[0]} marks a ModelSlim (Ascend) quantized checkpoint, which sglang-fx does not run: its W8A8 is static "
            f"(one calibrated activation scale and offset per tensor: input_scale/input_offset, with deq_scale and quant_bias "
            f"folded for Ascend's kernels), while sglang-fx runs dynamic per-token W8A8 (compressed-tensors int-quantized). "
            f"Quantize the float model with `sglang-fx quantize SRC DST --scheme w8a8` instead")  # fmt: skip
