"""The Llama EAGLE3 draft (`LlamaForCausalLMEagle3`) in plain PyTorch: fc over the target's
captured hidden states, one Llama decoder layer whose attention reads concat(embeds, hidden),
its own head over the draft vocabulary. The computation is written down in sglang_fx/eagle3.py.
Shapes: T new tokens, H hidden, n captured layers of width Ht, Vd draft vocabulary."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from sglang_fx.checkpoint import ModelSpec
from sglang_fx.eagle3 import check_draft_hidden, refuse_plain_forward
from sglang_fx.metadata import ForwardMetadata
from sglang_fx.spi import AttentionSpec, KVCache

from .attention import TorchPagedAttention
from .layers import MLP, Rope, linear, rms_norm
from .llama import GQABlock


class LlamaEagle3:
    def __init__(self, spec: ModelSpec, weights: Mapping[str, torch.Tensor], device: torch.device):
        w = {n: t.to(device) for n, t in weights.items()}
        D, p = spec.head_dim, "midlayer."
        self.spec, self.d2t = spec, w["d2t"]
        self.embed, self.fc, self.norm, self.lm_head = w["embed_tokens.weight"], w["fc.weight"], w["norm.weight"], w["lm_head.weight"]
        self.norm_in, self.norm_hidden = w[p + "input_layernorm.weight"], w[p + "hidden_norm.weight"]
        self.norm_post, self.mlp = w[p + "post_attention_layernorm.weight"], MLP.from_weights(w, p + "mlp.")
        self.block = GQABlock(spec, w, p + "self_attn.")  # q/k/v [*, 2H]
        self.rope = Rope(D, spec.rope_theta, interleaved=False, device=device)
        self.attn = TorchPagedAttention(AttentionSpec(spec.num_heads, spec.num_kv_heads, D, D, D**-0.5))

    def forward(self, input_ids: torch.Tensor, meta: ForwardMetadata, cache: KVCache) -> torch.Tensor:
        raise refuse_plain_forward(self.spec)

    @torch.no_grad()
    def forward_hidden(self, input_ids: torch.Tensor, meta: ForwardMetadata, cache: KVCache, *, capture: Sequence[int] = (),
                       hidden: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """spi.ModelRunner.forward_hidden of an EAGLE3 draft -> (logits [N, Vd], hidden_out [T, H])."""
        project = check_draft_hidden(self.spec, hidden, len(input_ids), capture)
        eps = self.spec.rms_norm_eps
        h = hidden.to(self.embed.device, self.spec.dtype)
        h = linear(h, self.fc) if project else h  # [T, H]
        cos, sin = self.rope.angles(meta.positions, self.spec.dtype)
        self.attn.plan(meta)
        x = torch.cat([rms_norm(self.embed[input_ids], self.norm_in, eps), rms_norm(h, self.norm_hidden, eps)], dim=1)  # [T, 2H]
        r = h + self.block(0, x, self.rope, cos, sin, self.attn, cache)
        r = r + self.mlp(rms_norm(r, self.norm_post, eps))
        logits = linear(rms_norm(r[meta.logits_indices], self.norm, eps), self.lm_head)  # [N, Vd]
        return logits.float(), r.float()
