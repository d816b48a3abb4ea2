"""The pre-norm decoder every reference model shares: embed, then per layer
x += attention(norm(x)) and x += mlp(norm(x)), then norm and lm_head for the wanted tokens.
A model file supplies only its attention block (a `Block`), its RoPE and its AttentionSpec.

Under tensor parallelism the weights are this rank's shard (`sglang_fx.sharding`) and the
blocks see its local sizes; the decoder adds the four collectives of the sharding rules: the
vocabulary-parallel embedding's all-reduce, one all-reduce after each attention block and MLP
(their row-parallel output projections give partial sums), and the logits' all-gather."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

import torch
import torch.nn.functional as F

from sglang_fx.checkpoint import ModelSpec
from sglang_fx.eagle3 import check_capture
from sglang_fx.metadata import ForwardMetadata
from sglang_fx.sharding import Shard
from sglang_fx.spi import AttentionSpec, KVCache

from .attention import TorchPagedAttention
from .collectives import TorchCollectives
from .layers import MLP, MoE, Rope, linear, rms_norm


class Block(Protocol):
    """One layer's attention: x [T, H] (normed) -> [T, H], writing its K/V into the cache."""

    def __call__(self, layer: int, x: torch.Tensor, rope: Rope, cos: torch.Tensor, sin: torch.Tensor,
                 attn: TorchPagedAttention, cache: KVCache) -> torch.Tensor: ...


class Decoder:
    """spec: this rank's sizes (`Shard.local`); shard: what it holds; comm: its TP group."""

    def __init__(self, shard: Shard, weights: Mapping[str, torch.Tensor], device: torch.device, comm: TorchCollectives,
                 block: Callable[[ModelSpec, Mapping[str, torch.Tensor], str], Block], rope: Rope, attn_spec: AttentionSpec):
        spec = shard.local
        self.spec, self.rope, self.attn, self.comm = spec, rope, TorchPagedAttention(attn_spec), comm
        self.vocab = shard.vocab  # this rank's rows of the embedding and lm_head
        w = {n: t.to(device) for n, t in weights.items()}
        self.linears = {n: t for n, t in w.items() if n.endswith(".weight")}  # for apply_linear
        self.embed, self.norm, self.lm_head = w["model.embed_tokens.weight"], w["model.norm.weight"], w["lm_head.weight"]
        self.layers = []
        for i in range(spec.num_layers):
            p = f"model.layers.{i}."
            mlp = MoE(spec.moe, w, p + "mlp.", shard.experts) if spec.is_moe_layer(i) else MLP.from_weights(w, p + "mlp.")
            self.layers.append((w[p + "input_layernorm.weight"], block(spec, w, p + "self_attn."), w[p + "post_attention_layernorm.weight"], mlp))

    def forward(self, input_ids: torch.Tensor, meta: ForwardMetadata, cache: KVCache) -> torch.Tensor:
        return self._step(input_ids, meta, cache, ())[0]

    def forward_hidden(self, input_ids: torch.Tensor, meta: ForwardMetadata, cache: KVCache, *, capture: Sequence[int] = (),
                       hidden: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
        """spi.ModelRunner.forward_hidden of a target model: the logits and the captured layers' inputs."""
        if hidden is not None:
            raise ValueError(f"hidden was given to a {self.spec.architecture} target; only an EAGLE3 draft takes hidden states")
        check_capture(capture, self.spec.num_layers)
        return self._step(input_ids, meta, cache, tuple(capture))

    @torch.no_grad()  # not inference_mode: see ModelRunner.forward's contract
    def _step(self, input_ids: torch.Tensor, meta: ForwardMetadata, cache: KVCache, capture: tuple[int, ...]):
        eps = self.spec.rms_norm_eps
        cos, sin = self.rope.angles(meta.positions, self.spec.dtype)
        self.attn.plan(meta)
        x = self.embed_tokens(input_ids)  # [T, H]
        taken = []  # the residual stream entering each captured layer, [T, H] float32
        for i, (ln1, block, ln2, mlp) in enumerate(self.layers):
            if i in capture:
                taken.append(x.float())
            x = x + self.comm.all_reduce(block(i, rms_norm(x, ln1, eps), self.rope, cos, sin, self.attn, cache))
            x = x + self.comm.all_reduce(mlp(rms_norm(x, ln2, eps)))
        x = rms_norm(x[meta.logits_indices], self.norm, eps)  # [N, H]
        logits = self.comm.all_gather_rows(F.linear(x, self.lm_head))  # [N, tp * ceil(V / tp)]
        return logits[:, : self.spec.vocab_size].float(), torch.cat(taken, dim=1) if taken else None  # [N, V], [T, H * n]

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[T] -> [T, H]. Tokens outside this rank's vocabulary rows embed as zeros; the sum over
        the TP group is then the full embedding."""
        if len(self.vocab) == self.spec.vocab_size:
            return self.embed[input_ids]
        local = input_ids - self.vocab.start
        mine = (local >= 0) & (local < len(self.vocab))
        x = self.embed[local.clamp(0, len(self.vocab) - 1)] * mine[:, None].to(self.embed.dtype)
        return self.comm.all_reduce(x)

    @torch.no_grad()
    def apply_linear(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """The optional probe of spi.ModelRunner: linear `name` on x [T, in] -> float32 [T, out]."""
        return linear(x.to(self.embed.device, self.spec.dtype), self.linears[name + ".weight"]).float()
