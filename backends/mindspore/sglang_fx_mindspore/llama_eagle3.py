"""The Llama EAGLE3 draft (`LlamaForCausalLMEagle3`) in MindSpore: fc over the target's captured
hidden states, one Llama decoder layer (LlamaFamily's attention block) whose attention reads
concat(norm(embeds), norm(hidden)), its own head over the draft vocabulary. The computation is
written down in sglang_fx/eagle3.py. Shapes: T new tokens, H hidden, W = n * Ht or H."""

from __future__ import annotations

from collections.abc import Mapping

import mindspore as ms
import torch
from mindspore import Tensor, ops

from sglang_fx.sharding import Shard

from .kernels import cast
from .layers import linear, mlp, mlp_weights, rms_norm, rope_angles, rope_matrices, rope_rotations
from .llama import LlamaFamily


class LlamaEagle3(LlamaFamily):
    dynamic_inputs = {"hidden": Tensor(shape=[None, None], dtype=ms.float32)}

    @classmethod
    def weights(cls, w: Mapping[str, torch.Tensor], shard: Shard) -> tuple:
        """(embed, (lm_head, final norm), (inv_freq, P, R) for RoPE, (attention: fused q/k/v [*, 2H]
        and o_proj, MLP: gate, up, down, norms: input, hidden, post-attention), fc). No norm is
        folded: the input norms meet in one concatenation."""
        spec, p = shard.local, "midlayer."
        dim = spec.head_dim
        inv_freq = 1.0 / (spec.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        rot = tuple(m.to(spec.dtype) for m in rope_matrices(dim, False))
        norms = tuple(w[p + n + ".weight"] for n in ("input_layernorm", "hidden_norm", "post_attention_layernorm"))
        layer = (cls.attention_weights(w, p + "self_attn.", spec), mlp_weights(w, p + "mlp."), norms)
        return (w["embed_tokens.weight"], (w["lm_head.weight"], w["norm.weight"]), (inv_freq, *rot), layer, w["fc.weight"])

    def construct(self, keys, values, kv_store, input_ids, positions, logits_indices, slots, attn_inputs, attn_variant,
                  gather_experts, few_tokens, hidden, project):  # fmt: skip
        """The Decoder's step inputs, then hidden [T, W] float32 and project (a Python constant:
        whether fc projects hidden, a target's capture) -> (logits [N, Vd], hidden_out [T, H]) float32."""
        embed, (lm_head, norm), (inv_freq, p, r), (attn_w, mlp_w, norms), fc = self.params
        cos, sin = rope_angles(positions, inv_freq, embed.dtype)
        rot = (rope_rotations(cos, sin, p, r),) if few_tokens else (cos, sin, p, r)
        h = cast(hidden, embed.dtype)
        if project:
            h = linear(h, fc)  # [T, H]
        x = ops.cat((rms_norm(self.embed(embed, input_ids), norms[0], self.eps), rms_norm(h, norms[1], self.eps)), 1)  # [T, 2H]
        kv = (0, keys[0], values[0] if self.has_values else None, kv_store, slots, attn_inputs, attn_variant)
        h = h + self.block(attn_w, x, rot, kv)
        h = h + mlp(rms_norm(h, norms[2], self.eps), *mlp_w)
        logits = linear(rms_norm(ops.gather(h, logits_indices, 0), norm, self.eps), lm_head)  # [N, Vd]
        return cast(logits, ms.float32), cast(h, ms.float32)
