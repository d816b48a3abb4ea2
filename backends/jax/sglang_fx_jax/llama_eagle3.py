"""The Llama EAGLE3 draft (`LlamaForCausalLMEagle3`) in JAX: fc over the target's captured hidden
states, one Llama decoder layer (llama.gqa_block) whose attention reads concat(norm(embeds),
norm(hidden)), its own head over the draft vocabulary; the computation is written in
sglang_fx/eagle3.py. One program per shape bucket, padded as the target's steps are (model.py):
decode to its batch bucket, any other step to powers of two. Shapes: T tokens, H hidden, W = n * Ht or H."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import torch

from sglang_fx import buckets
from sglang_fx.checkpoint import ModelSpec
from sglang_fx.eagle3 import check_draft_hidden, refuse_plain_forward
from sglang_fx.errors import UnsupportedConfigError
from sglang_fx.metadata import ForwardMetadata

from . import attention
from .exchange import JaxExchange
from .kv_cache import JaxKVCache
from .layers import Rope, is_linear, linear, mlp, rms_norm
from .llama import gqa_block


class JaxEagle3:
    """spi.ModelRunner of the draft. Options: decode_batches as JaxRunner's; the other keys of
    the backend (about the target's layers) do not apply to one layer and are ignored."""

    def __init__(self, spec: ModelSpec, weights: Mapping[str, torch.Tensor], options):
        if options.parallel.tp_size > 1:
            raise UnsupportedConfigError("jax backend: an EAGLE3 draft runs unsharded; use tp_size 1 for it")
        self.spec, D, ex = spec, spec.head_dim, JaxExchange()
        self.decode_batches = buckets.decode_batches(options.extra.get("decode_batches"), "jax")
        self.rope, self.scale = Rope(D, spec.rope_theta, interleaved=False), D**-0.5
        layer = {n.removeprefix("midlayer."): w for n, w in weights.items() if n.startswith("midlayer.")}
        tree = {n: (w.t().contiguous() if is_linear(n) else w) for n, w in layer.items()}  # linears as [in, out]
        tree |= {"embed": weights["embed_tokens.weight"], "fc": weights["fc.weight"].t().contiguous(),
                 "norm": weights["norm.weight"], "lm_head": weights["lm_head.weight"].t().contiguous()}  # fmt: skip
        self.w = jax.tree.map(ex.from_torch, tree)
        self._step = jax.jit(self.step, static_argnames="project")

    def forward(self, input_ids: torch.Tensor, meta: ForwardMetadata, cache: JaxKVCache) -> torch.Tensor:
        raise refuse_plain_forward(self.spec)

    def forward_hidden(self, input_ids: torch.Tensor, meta: ForwardMetadata, cache: JaxKVCache, *, capture: Sequence[int] = (),
                       hidden: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """spi.ModelRunner.forward_hidden of an EAGLE3 draft -> (logits [N, Vd], hidden_out [T, H])."""
        project = check_draft_hidden(self.spec, hidden, len(input_ids), capture)
        T, wanted, slots, rows = meta.num_tokens, len(meta.logits_indices), meta.out_cache_loc, hidden.float().numpy()
        batch = buckets.fit(meta.batch_size, self.decode_batches) if meta.one_token_each else None
        if batch is not None:
            meta, input_ids = meta.padded_decode(input_ids, batch)
            rows = np.concatenate([rows, np.repeat(rows[-1:], batch - T, axis=0)])  # the repeated sequence's row
        inputs, tokens = attention.plan(meta, decode=batch is not None)
        h = np.zeros((tokens, rows.shape[1]), np.float32)
        h[: len(rows)] = rows
        logits, out, k, v = self._step(self.w, cache.keys[0], cache.values[0], _pad(input_ids, tokens), _pad(meta.positions, tokens),
                                       h, _pad(meta.logits_indices, buckets.power_of_two(wanted)), inputs, project=project)  # fmt: skip
        cache.write_layers(slots, torch.from_dlpack(k)[None, :T], torch.from_dlpack(v)[None, :T])
        return torch.from_dlpack(logits)[:wanted], torch.from_dlpack(out)[:T]

    def step(self, w: dict, k_pool, v_pool, ids, positions, hidden, rows, inputs, project: bool):
        """(logits [rows, Vd], hidden_out [tokens, H]) float32, and the layer's new k, v [tokens, Hkv, D]."""
        s, eps = self.spec, self.spec.rms_norm_eps
        h = hidden.astype(w["embed"].dtype)
        h = linear(h, w["fc"]) if project else h  # [T, H]
        cos, sin = self.rope.angles(positions, h.dtype)
        x = jnp.concatenate([rms_norm(w["embed"][ids], w["input_layernorm.weight"], eps), rms_norm(h, w["hidden_norm.weight"], eps)], 1)
        read = attention.pool_reader(k_pool, v_pool)
        a, k, v = gqa_block(s, w, x, self.rope, cos, sin, lambda q, k, v: attention.attend(q, k, v, read, inputs, self.scale, s.head_dim))
        r = h + a
        r = r + mlp(w, rms_norm(r, w["post_attention_layernorm.weight"], eps))
        logits = linear(rms_norm(r[rows], w["norm"], eps), w["lm_head"])
        return logits.astype(jnp.float32), r.astype(jnp.float32), k, v


def _pad(t: torch.Tensor, n: int) -> np.ndarray:
    """[k] int torch tensor -> [n] int32 numpy, zero-padded (k <= n)."""
    out = np.zeros(n, np.int32)
    out[: len(t)] = t.numpy()
    return out
