"""The pre-norm decoder every MindSpore model shares, as one Cell whose `construct` is a whole
step: embed, then per layer x += attention(norm(x)) and x += mlp(norm(x)) (dense or routed
experts), then norm and lm_head for the tokens that want logits. A model file subclasses it with
its attention `block`, the weights that block takes, its AttentionSpec and its RoPE.

The weights are the Cell's: Parameters over the runner's placed tensors (no copy), which a
compiled graph reads in place at no per-call cost. KV buffers and step tensors come in as
arguments (MindSpore tensors aliasing the host's torch memory). Shapes: T new tokens, H hidden,
V vocab, N tokens that want logits.
"""

from __future__ import annotations

from collections.abc import Mapping

import mindspore as ms
import torch
from mindspore import ParameterTuple, Tensor, nn, ops

from sglang_fx.checkpoint import ModelSpec
from sglang_fx.errors import UnsupportedConfigError
from sglang_fx.sharding import Shard
from sglang_fx.spi import AttentionSpec

from . import int8
from .collectives import Collectives
from .kernels import cast, flat_parameters, write_rows
from .layers import (
    fold_norm, linear, mlp, mlp_weights, moe, moe_weights, rms_norm, rope_angles, rope_matrices, rope_rotations,
    widened,
)  # fmt: skip


class Decoder(nn.Cell):
    """construct returns logits [N, V] float32. When the attention leaves K/V writes to its
    caller (not attention.writes_kv), each layer stores its K (and V, when the cache has them)
    before its attention reads the pool (`attend`)."""

    def __init__(self, shard: Shard, weights: tuple, attention: nn.Cell, comm: Collectives, kv_dtype, has_values: bool,
                 in_graph: bool):  # fmt: skip
        """shard: what this rank holds (`Shard.local` are the sizes the blocks see); weights:
        `weights()`'s tree as MindSpore Parameters (`kernels.parameters`); comm: the TP group's
        collectives, which the step adds where the sharding rules say (the identity at tp=1)."""
        super().__init__()
        spec = shard.local
        self.spec, self.attn, self.kv_dtype, self.has_values = spec, attention, kv_dtype, has_values
        self.comm, self.held, self.vocab = comm, shard.experts, shard.vocab
        self.params = weights
        # The same Parameters registered on the Cell (named by their place in the tree): a graph
        # loaded from MindSpore's compile cache gets its weights from these.
        self.registered = ParameterTuple(flat_parameters(weights))
        self.stores_kv, self.in_graph = not attention.writes_kv, in_graph
        self.num_layers, self.eps = spec.num_layers, spec.rms_norm_eps
        self.moe_layers = tuple(spec.is_moe_layer(i) for i in range(spec.num_layers))
        self.interleaved = self.rope_dims(spec)[1]
        self.unfolded = spec.quant is not None  # the norms keep their weights (`weights`)

    # --- what a model file supplies -----------------------------------------------------------

    #: Inputs of `construct` beyond the step's, declared dynamic in the graph for any step
    #: (name -> MindSpore Tensor placeholder): none here; the EAGLE3 draft adds its hidden states.
    dynamic_inputs: dict = {}

    @staticmethod
    def attention_spec(spec: ModelSpec) -> AttentionSpec:
        raise NotImplementedError

    @staticmethod
    def rope_dims(spec: ModelSpec) -> tuple[int, bool]:
        """(channels RoPE rotates, interleaved pairs)."""
        raise NotImplementedError

    @staticmethod
    def attention_weights(w: Mapping[str, torch.Tensor], prefix: str, spec: ModelSpec) -> tuple[torch.Tensor, ...]:
        """The tensors `block` takes for the layer whose attention weights start with prefix; the
        first is the one projection of its (normed) input x, [N, H]."""
        raise NotImplementedError

    @staticmethod
    def attention_linear(spec: ModelSpec, name: str) -> tuple[int, range | None]:
        """Where the attention's linear `name` ("q_proj") sits in `attention_weights`: (index, its
        rows of that projection, or None for all of them)."""
        raise NotImplementedError

    def block(self, w: tuple, x: Tensor, rope: tuple, kv: tuple) -> Tensor:
        """One layer's attention: x [T, H] (normed) -> [T, H]. rope: what `layers.rope` takes
        as rot; kv: what `attend` takes besides q, k and v."""
        raise NotImplementedError

    # --- shared -------------------------------------------------------------------------------

    @classmethod
    def weights(cls, w: Mapping[str, torch.Tensor], shard: Shard) -> tuple:
        """All weights of this rank (`shard`; w holds its slices), in the nested order construct
        unpacks: (embed, head, (inv_freq, P, R) for RoPE, layers); layer i is
        (`attention_weights`, MLP weights: `mlp_weights`, or the post-attention norm's weight
        followed by `moe_weights`, norms). Each RMSNorm's weight is folded
        into the projections that read its output (`layers.fold_norm`): the input norm into the
        attention's input projection, the post-attention norm into a dense MLP's, the final norm
        into lm_head: head is (lm_head,), or (embed, final norm weight) when the embedding is
        tied, which stays shared rather than copied (a vocabulary-sized matrix) and has the norm
        applied to the N logit rows. (Not into an MoE layer's: its router would see the normed activations
        rounded otherwise than the reference's, and in half precision a near-tie between two
        experts would then route differently.) Fusing and folding copy those tensors once here
        and save kernel launches on every step. A quantized checkpoint's int8 projections cannot
        take a norm's weight: there norms is (input norm, post-attention norm) and the norms run
        with their weights; otherwise it is ()."""
        spec = shard.local
        dim, interleaved = cls.rope_dims(spec)
        inv_freq = 1.0 / (spec.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        p, r = (m.to(spec.dtype) for m in rope_matrices(dim, interleaved))
        fold = spec.quant is None
        layers = []
        for i in range(spec.num_layers):
            pre = f"model.layers.{i}."
            first, *attn_w = cls.attention_weights(w, pre + "self_attn.", spec)
            norm_in, norm = w[pre + "input_layernorm.weight"], w[pre + "post_attention_layernorm.weight"]
            attn_w = (fold_norm(first, norm_in) if fold else first, *attn_w)
            if spec.is_moe_layer(i):
                mlp_w = (norm, *moe_weights(w, pre + "mlp.", spec.moe, shard.experts, spec.quant))
            else:
                mlp_w = mlp_weights(w, pre + "mlp.", norm if fold else None, spec.quant)
            layers.append((attn_w, mlp_w, () if fold else (norm_in, norm)))
        embed, lm_head, norm = w["model.embed_tokens.weight"], w["lm_head.weight"], w["model.norm.weight"]
        head = (embed, norm) if lm_head is embed else (fold_norm(lm_head, norm),)  # Checkpoint.load ties by identity
        return (embed, head, (inv_freq, p, r), tuple(layers))

    @classmethod
    def find_linear(cls, tree: tuple, shard: Shard, name: str) -> tuple:
        """(weight, rows): the linear `name` (HF module name, "model.layers.0.mlp.down_proj") in
        `weights`' tree as placed, a tensor [N, K] or a (q, scale) pair, and its rows of that
        projection (a range, or None for all). UnsupportedConfigError for one whose weight a norm's
        is folded into (float checkpoints) or that is not a layer's."""
        spec, mlp = shard.local, ("gate_proj", "up_proj", "down_proj")
        layer, rest = name.removeprefix("model.layers.").split(".", 1) if name.startswith("model.layers.") else (None, name)
        if layer is None:
            raise UnsupportedConfigError(f"mindspore backend: no apply_linear for {name!r} (only the layers' linears)")
        attn_w, mlp_w, norms = tree[3][int(layer)]
        folded = not norms
        if rest.startswith("self_attn."):
            index, rows = cls.attention_linear(spec, rest.removeprefix("self_attn."))
            w, folded = attn_w[index], folded and index == 0
        elif ".experts." in rest and "shared_experts" not in rest:
            e, proj = rest.removeprefix("mlp.experts.").split(".")
            e, I = int(e) - shard.experts.start, spec.moe.intermediate_size
            gate_up, down = mlp_w[3], mlp_w[4]
            if proj == "down_proj":
                w, rows = ((down[0][e], down[1][e]) if int8.is_int8(down) else down[e * I : (e + 1) * I].T), None
            else:
                w, rows = gate_up, range((2 * e + mlp.index(proj)) * I, (2 * e + mlp.index(proj) + 1) * I)
            folded = False
        else:
            proj = rest.split(".")[-1]
            shared = rest.startswith("mlp.shared_experts.")
            w, rows = mlp_w[(5 if shared else 0) + mlp.index(proj)], None
            folded = folded and not shared and proj != "down_proj"
        if folded:
            raise UnsupportedConfigError(f"mindspore backend: no apply_linear for {name!r}: the RMSNorm weight before it is folded "
                                         f"into its weight (float checkpoints)")  # fmt: skip
        return w, rows

    def construct(self, keys, values, kv_store, input_ids, positions, logits_indices, slots, attn_inputs, attn_variant,
                  gather_experts, few_tokens, capture=()):  # fmt: skip
        """keys/values: the pool views the attention reads (its `cache_views`; values None without
        V); kv_store: the cache's [S, *shape] views (`MindSporeKVCache.slot_views`: keys and, with V,
        `values`), where this step's K/V go at `slots` [T] int64. gather_experts: how MoE layers
        compute (`layers.gathers_experts`); few_tokens: RoPE by per-token rotation matrices
        (`layers.rope_rotations`). Like attn_variant, both are Python constants that pick a path
        of the graph, and so is capture: the layers whose input is also returned (EAGLE3,
        `spi.ModelRunner.forward_hidden`), as (logits, [T, H * len(capture)] float32)."""
        embed, head, (inv_freq, p, r), layers = self.params
        cos, sin = rope_angles(positions, inv_freq, embed.dtype)
        rot = (rope_rotations(cos, sin, p, r),) if few_tokens else (cos, sin, p, r)
        x = self.embed(embed, input_ids)  # [T, H]
        comm = self.comm
        taken = []
        for i in range(self.num_layers):
            if i in capture:
                taken.append(cast(x, ms.float32))
            attn_w, mlp_w, norms = layers[i]  # norms (): their weights are folded into attn_w and mlp_w (but an MoE layer's)
            v_pool = values[i] if self.has_values else None
            kv = (i, keys[i], v_pool, kv_store, slots, attn_inputs, attn_variant)
            x = x + comm.all_reduce(self.block(attn_w, rms_norm(x, norms[0] if self.unfolded else None, self.eps), rot, kv))
            if self.moe_layers[i]:
                x = x + comm.all_reduce(moe(rms_norm(x, mlp_w[0], self.eps), mlp_w[1:], self.spec.moe, gather_experts, self.held))
            else:
                x = x + comm.all_reduce(mlp(rms_norm(x, norms[1] if self.unfolded else None, self.eps), *mlp_w))
        x = rms_norm(ops.gather(x, logits_indices, 0), head[1] if len(head) > 1 else None, self.eps)  # [N, H]
        logits = comm.gather_columns(cast(linear(x, head[0]), ms.float32))  # [N, tp * ceil(V / tp)]
        logits = logits if comm.size == 1 else logits[:, : self.spec.vocab_size]  # [N, V]
        return (logits, ops.cat(taken, 1)) if capture else logits

    def embed(self, table: Tensor, input_ids: Tensor) -> Tensor:
        """input_ids [T] int32 -> [T, H]. Under TP the table holds this rank's vocabulary rows:
        other tokens embed as zeros, and the sum over the group is the full embedding."""
        if self.comm.size == 1:
            return ops.gather(table, input_ids, 0)
        local = input_ids - self.vocab.start
        mine = ((local >= 0) & (local < len(self.vocab))).astype(table.dtype).reshape(-1, 1)
        rows = ops.gather(table, ops.clamp(local, 0, len(self.vocab) - 1), 0)
        return self.comm.all_reduce(rows * widened(mine, rows))

    def attend(self, q: Tensor, k: Tensor, v, kv: tuple) -> Tensor:
        """Layer kv[0]'s attention over the pool, after storing this step's k and v (v None
        without V) when the attention leaves that to its caller: q [T, Hq, D], k [T, Hkv, D],
        v [T, Hkv, Dv] -> [T, Hq, Dv].

        kv_store holds MindSpore tensors distinct from the views the attention reads, though over
        the same memory, so a compiled graph (in_graph) scatters into them in place (a graph that
        reads and writes one input tensor copies it whole); ops.depend makes the reads wait for
        the writes. PyNative's scatter_update returns new storage, so there each write runs the
        in-place `kernels.write_rows` graph."""
        i, k_pool, v_pool, kv_store, slots, attn_inputs, attn_variant = kv
        if self.stores_kv:
            for pool, new in zip(kv_store, (k, v)):  # (keys, values), or (keys,) without V
                if not self.in_graph:
                    write_rows(pool[i], slots, new)
                    continue
                done = ops.scatter_update(pool[i], slots, cast(new, self.kv_dtype))
                k_pool = ops.depend(k_pool, done)
                if v_pool is not None:
                    v_pool = ops.depend(v_pool, done)
        return self.attn.run(q, k, v, k_pool, v_pool, attn_inputs, attn_variant)
