"""The Llama EAGLE3 draft (`LlamaForCausalLMEagle3`) in NumPy: fc over the target's captured hidden
states, one Llama decoder layer whose attention reads concat(norm(embeds), norm(hidden)), its own
head over the draft vocabulary (the computation: sglang_fx/eagle3.py). T tokens, H hidden."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from sglang_fx.checkpoint import ModelSpec
from sglang_fx.eagle3 import check_draft_hidden, refuse_plain_forward
from sglang_fx.metadata import ForwardMetadata
from sglang_fx.spi import AttentionSpec

from .attention import NumpyPagedAttention
from .kv_cache import NumpyKVCache
from .layers import Rope, Weights, linear, mlp, rms_norm
from .llama import gqa_block


class LlamaEagle3:
    def __init__(self, spec: ModelSpec, weights: Weights):
        D = spec.head_dim
        self.spec, self.w, self.rope = spec, weights, Rope(D, spec.rope_theta, interleaved=False)
        self.attn = NumpyPagedAttention(AttentionSpec(spec.num_heads, spec.num_kv_heads, D, D, D**-0.5))

    def forward(self, input_ids: torch.Tensor, meta: ForwardMetadata, cache: NumpyKVCache) -> torch.Tensor:
        raise refuse_plain_forward(self.spec)

    def forward_hidden(self, input_ids: torch.Tensor, meta: ForwardMetadata, cache: NumpyKVCache, *, capture: Sequence[int] = (),
                       hidden: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """spi.ModelRunner.forward_hidden of an EAGLE3 draft -> (logits [N, Vd], hidden_out [T, H])."""
        project = check_draft_hidden(self.spec, hidden, len(input_ids), capture)
        s, w, eps, p = self.spec, self.w, self.spec.rms_norm_eps, "midlayer."
        e = w["embed_tokens.weight"][input_ids.numpy()]  # [T, H]
        h = hidden.numpy().astype(e.dtype)
        h = linear(h, w["fc.weight"]) if project else h  # [T, H]
        cos, sin = self.rope.angles(meta.positions.numpy(), e.dtype)
        self.attn.plan(meta)
        x = np.concatenate([rms_norm(e, w[p + "input_layernorm.weight"], eps), rms_norm(h, w[p + "hidden_norm.weight"], eps)], axis=1)
        r = h + gqa_block(s, w, p + "self_attn.", 0, x, self.rope, cos, sin, self.attn, cache)
        r = r + mlp(w, p + "mlp.", rms_norm(r, w[p + "post_attention_layernorm.weight"], eps))
        logits = linear(rms_norm(r[meta.logits_indices.numpy()], w["norm.weight"], eps), w["lm_head.weight"])  # [N, Vd]
        return torch.from_numpy(logits.astype(np.float32)), torch.from_numpy(r.astype(np.float32))
