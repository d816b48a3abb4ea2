"""EAGLE3 conformance (SPI 1.4, backends declaring Capabilities.eagle3): a target's captured hidden
states against transformers' `output_hidden_states`, and the LlamaForCausalLMEagle3 draft against
`draft_reference`, a plain-torch float64 computation of the draft written here from SGLang's
models/llama_eagle3.py, independent of every backend (no paging: one dense causal pass per sequence).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from sglang_fx.checkpoint import ModelSpec

#: max |a - b| of float32 hidden states and draft logits (values of order 1-10): the logits' tolerance.
TOLERANCE = 1e-4
#: The tiny target of the draft cases: the tiny Llama with 4 layers, so a draft reads 3 of them.
TARGET_VARIANT = "l4"
AUX_LAYER_IDS = (0, 1, 2)  # the draft reads layers 0-2's outputs: the target captures layers 1, 2, 3


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w.double()


def draft_fc(w: Mapping[str, torch.Tensor], capture: torch.Tensor) -> torch.Tensor:
    """The draft's fc on a target's capture [T, n * Ht] -> [T, H] float64."""
    return capture.double() @ w["fc.weight"].double().T


def draft_reference(spec: ModelSpec, w: Mapping[str, torch.Tensor], ids: list[int], h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence through the draft from position 0: token ids [T] and its input hidden h [T, H]
    (`draft_fc` of a capture, or the draft's own earlier output) -> (logits [T, Vd], hidden_out
    [T, H]), float64. w: the draft's complete weights (embedding included)."""
    eps, H, D = spec.rms_norm_eps, spec.hidden_size, spec.head_dim
    Hq, Hkv, T = spec.num_heads, spec.num_kv_heads, len(ids)
    W = {n: t.double() for n, t in w.items() if t.is_floating_point()}
    p = "midlayer."
    h = h.double()
    x = torch.cat([_rms(W["embed_tokens.weight"][ids], W[p + "input_layernorm.weight"], eps), _rms(h, W[p + "hidden_norm.weight"], eps)], 1)
    q = (x @ W[p + "self_attn.q_proj.weight"].T).view(T, Hq, D)
    k = (x @ W[p + "self_attn.k_proj.weight"].T).view(T, Hkv, D)
    v = (x @ W[p + "self_attn.v_proj.weight"].T).view(T, Hkv, D)
    inv = 1.0 / spec.rope_theta ** (torch.arange(0, D, 2, dtype=torch.float64) / D)
    ang = torch.arange(T, dtype=torch.float64)[:, None] * inv[None, :]  # [T, D/2]
    cos, sin = torch.cat([ang.cos()] * 2, 1)[:, None], torch.cat([ang.sin()] * 2, 1)[:, None]

    def rot(t):  # rotate-half RoPE (Llama)
        a, b = t[..., : D // 2], t[..., D // 2 :]
        return t * cos + torch.cat([-b, a], -1) * sin

    q, k = rot(q), rot(k)
    k, v = k.repeat_interleave(Hq // Hkv, 1), v.repeat_interleave(Hq // Hkv, 1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * D**-0.5
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    a = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(T, Hq * D) @ W[p + "self_attn.o_proj.weight"].T
    r = h + a
    m = _rms(r, W[p + "post_attention_layernorm.weight"], eps)
    gate, up = m @ W[p + "mlp.gate_proj.weight"].T, m @ W[p + "mlp.up_proj.weight"].T
    r = r + (torch.nn.functional.silu(gate) * up) @ W[p + "mlp.down_proj.weight"].T
    return _rms(r, W["norm.weight"], eps) @ W["lm_head.weight"].T, r
