"""The pre-norm decoder every JAX model shares, as two pure functions the runner jits per shape
bucket: `Decoder.body` (embed, then per layer x += attention(norm(x)) and x += mlp(norm(x)))
and `Decoder.head` (norm and lm_head of the wanted rows). A model file supplies its attention
block (`Block`), its RoPE and its AttentionSpec.

Layers are unrolled by default: each layer's code, over its own weights, is in the program.
With `scan=True` they run under `lax.scan` over weights stacked by layer, so one layer is
compiled instead of all (about 3x faster to compile SmolLM2's 30 layers), but XLA then slices
each layer's weights out of the stack, a copy, which made batch-1 decode 3x slower. Layers of
different kinds (DeepSeek-V3's dense layers before its MoE ones) form consecutive segments, one
scan each, and a `lax.switch` on the layer index picks the read of that layer's KV pool
(the pools stay separate host buffers; stacking them would copy the whole pool every step).

The body returns the new K/V of every layer, [layers, T, Hkv, D] (V likewise, or None), which
the runner stores into the pool from the host (`JaxKVCache.write_layers`).

Under tensor parallelism the weights are this rank's shard (`sglang_fx.sharding`), and the body
and head run under `shard_map`; `Collectives` adds the collectives of the sharding rules: the
vocabulary-parallel embedding's psum, one after each attention block and MLP, and the logits'
all-gather.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

import jax
import jax.numpy as jnp
import torch
from jax import lax

from sglang_fx.checkpoint import ModelSpec
from sglang_fx.sharding import Shard
from sglang_fx.spi import AttentionSpec

from .attention import Inputs, attend, pool_reader
from .layers import Collectives, Int8Weight, Rope, is_linear, mlp, moe, rms_norm

Weights = Mapping[str, jax.Array]
AttentionCall = Callable[[jax.Array, jax.Array, "jax.Array | None"], jax.Array]


class Block(Protocol):
    """One layer's attention: x [T, H] (normed) -> (out [T, H], k [T, Hkv, D], v [T, Hkv, Dv]
    or None), calling attn(q, k, v) -> [T, Hq, Dv] for the attention itself."""

    def __call__(self, spec: ModelSpec, w: Weights, x: jax.Array, rope: Rope, cos: jax.Array, sin: jax.Array,
                 attn: AttentionCall) -> tuple[jax.Array, jax.Array, jax.Array | None]: ...  # fmt: skip


@dataclass(frozen=True)
class Segment:
    """Consecutive layers [start, stop) of one kind (MoE or dense MLP), scanned together."""

    start: int
    stop: int
    moe: bool


def segments(spec: ModelSpec) -> tuple[Segment, ...]:
    out: list[Segment] = []
    for i in range(spec.num_layers):
        if out and out[-1].moe == spec.is_moe_layer(i):
            out[-1] = Segment(out[-1].start, i + 1, out[-1].moe)
        else:
            out.append(Segment(i, i + 1, spec.is_moe_layer(i)))
    return tuple(out)


class Decoder:
    """spec: this rank's sizes (`Shard.local`); shard: what it holds; block/rope/attn_spec: the
    architecture's. Holds only static facts: the weights are an argument of body and head."""

    def __init__(self, shard: Shard, block: Block, rope: Rope, attn_spec: AttentionSpec, comm: Collectives, scan: bool = False):
        self.spec, self.shard, self.block, self.rope, self.attn_spec, self.comm = shard.local, shard, block, rope, attn_spec, comm
        self.scan = scan
        self.segments = segments(self.spec)
        self.moe_gather: bool | None = None  # how `layers.moe` dispatches: None by its crossover (the runner's "moe" option)

    # --- weights: HF names -> the pytree body and head take --------------------------------------

    def arrange(self, weights: Mapping[str, torch.Tensor]) -> dict:
        """Torch weights (this rank's) -> {"embed" (absent when tied to lm_head), "norm", "lm_head"
        (transposed): tensors, "layers": ...}, the
        layers by `self.scan`: False, one dict per layer of its tensors by HF name without the
        "model.layers.{i}." prefix; True, one dict per segment of its layers' tensors stacked on a
        new leading axis. Linear weights are transposed copies ([in, out], `layers.is_linear`),
        a quantized one's (spec.quant) an `Int8Weight` of its int8 weight and its weight_scale
        under the weight's name; the held experts' stacked by expert ("mlp.experts.gate_proj.weight"
        [experts, H, I]); the others are the host's tensors. Torch tensors still: the runner places them."""
        embed, lm_head = weights["model.embed_tokens.weight"], weights["lm_head.weight"]
        out = {"norm": weights["model.norm.weight"], "lm_head": lm_head.t().contiguous()}  # [H, V]: a copy
        if lm_head is not embed:  # tied: `embed` reads the embedding from lm_head's copy, and the host's may go
            out["embed"] = embed
        layers = [self._layer_weights(weights, i) for i in range(self.spec.num_layers)]
        if self.scan:
            layers = [{n: _stack([layers[i][n] for i in range(seg.start, seg.stop)]) for n in layers[seg.start]} for seg in self.segments]
        out["layers"] = layers
        return out

    def _layer_weights(self, weights: Mapping[str, torch.Tensor], i: int) -> dict[str, torch.Tensor | Int8Weight]:
        prefix, held, out = f"model.layers.{i}.", self.shard.experts, {}
        for name, t in weights.items():
            if not name.startswith(prefix) or name.endswith(".weight_scale"):  # a scale goes with its weight
                continue
            name = name.removeprefix(prefix)
            if ".experts." not in name:
                out[name] = self._linear(weights, prefix + name) if is_linear(name) else t
                continue
            rest = name.split(".experts.", 1)[1].split(".", 1)[1]  # "gate_proj.weight" of "mlp.experts.E.gate_proj.weight"
            if "mlp.experts." + rest not in out:
                out["mlp.experts." + rest] = _stack([self._linear(weights, f"{prefix}mlp.experts.{e}.{rest}") for e in held])
        return out

    def _linear(self, weights: Mapping[str, torch.Tensor], name: str) -> torch.Tensor | Int8Weight:
        """The linear weight `name` [out, in] as `linear` takes it: [in, out] (a copy), and for a
        quantized linear an Int8Weight of it (int8) and its weight_scale [out, 1] as [out]."""
        if self.spec.quant is not None and self.spec.quant.covers(name):
            return Int8Weight(weights[name].t().contiguous(), weights[name + "_scale"].reshape(-1))
        return weights[name].t().contiguous()

    def linear_weight(self, w: dict, name: str):
        """The placed weight (array or Int8Weight, as `linear` takes it) of the linear `name`, an HF
        module name ("model.layers.0.mlp.down_proj", "model.layers.1.mlp.experts.3.up_proj",
        "lm_head"), out of `arrange`'s tree w (one process's)."""
        if name == "lm_head":
            return w["lm_head"]
        i, rest = name.removeprefix("model.layers.").split(".", 1)
        i, rest, index = int(i), rest + ".weight", ()
        if self.scan:
            seg = next(k for k, s in enumerate(self.segments) if s.start <= i < s.stop)
            layer, index = w["layers"][seg], (i - self.segments[seg].start,)
        else:
            layer = w["layers"][i]
        if ".experts." in rest:  # "mlp.experts.3.up_proj.weight": row 3 - held.start of "mlp.experts.up_proj.weight"
            head, tail = rest.split(".experts.")
            e, proj = tail.split(".", 1)
            rest, index = f"{head}.experts.{proj}", (*index, int(e) - self.shard.experts.start)
        return jax.tree.map(lambda a: a[index] if index else a, layer[rest])

    # --- the step --------------------------------------------------------------------------------

    def body(self, w: dict, k_pools: tuple[jax.Array, ...], v_pools: tuple[jax.Array, ...] | None, input_ids: jax.Array,
             positions: jax.Array, inputs: Inputs, capture: tuple[int, ...] = ()) -> tuple:  # fmt: skip
        """input_ids, positions [T] (padded); pools: every layer's [S, Hkv, D] pool (read only).
        Returns (hidden [T, H] before the final norm, k [layers, T, Hkv, D], v likewise or None),
        and with `capture` (static; unrolled layers only) the inputs of those layers, [T, H * n] float32."""
        x, cos, sin = self.start(w, input_ids, positions)
        reads = [pool_reader(k_pools[i], None if v_pools is None else v_pools[i]) for i in range(self.spec.num_layers)]

        def layer(x, p, read, moe_layer):
            x, k, v = self._layer(p, read, x, cos, sin, inputs, moe_layer)
            return x, (k, v)

        new_k, new_v, taken = [], [], []
        if not self.scan:
            for i, p in enumerate(w["layers"]):
                if i in capture:
                    taken.append(x.astype(jnp.float32))
                x, (k, v) = layer(x, p, reads[i], self.spec.is_moe_layer(i))
                new_k.append(k)
                new_v.append(v)
            out = x, jnp.stack(new_k), None if v_pools is None else jnp.stack(new_v)
            return (*out, jnp.concatenate(taken, axis=1)) if capture else out
        for seg, lw in zip(self.segments, w["layers"]):
            mine = reads[seg.start : seg.stop]

            def scanned(x, args, seg=seg, mine=mine):
                p, index = args
                return layer(x, p, (lambda slots: lax.switch(index, mine, slots)) if len(mine) > 1 else mine[0], seg.moe)

            x, (k, v) = lax.scan(scanned, x, (lw, jnp.arange(seg.stop - seg.start)))
            new_k.append(k)
            new_v.append(v)
        cat = lambda parts: parts[0] if len(parts) == 1 else jnp.concatenate(parts)  # noqa: E731
        return x, cat(new_k), None if v_pools is None else cat(new_v)

    def start(self, w: dict, input_ids: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """input_ids, positions [T] -> (x [T, H] embedded, cos, sin: RoPE's angles of the positions)."""
        x = self.embed(w, input_ids)
        return (x, *self.rope.angles(positions, x.dtype))

    def layer(self, p: Weights, k_pool: jax.Array, v_pool: jax.Array | None, x: jax.Array, cos: jax.Array, sin: jax.Array,
              inputs: Inputs, moe_layer: bool) -> tuple[jax.Array, jax.Array, jax.Array | None]:  # fmt: skip
        """One layer on its own (the runner's layered extend steps; moe_layer static): its
        weights p (one entry of arrange()'s unrolled "layers"), its pool -> (x, k, v) as `body`
        computes them for that layer. Layers of a kind share one program per shape bucket."""
        return self._layer(p, pool_reader(k_pool, v_pool), x, cos, sin, inputs, moe_layer)

    def _layer(self, p: Weights, read, x, cos, sin, inputs: Inputs, moe_layer: bool):
        def attn(q, k, v):
            return attend(q, k, v, read, inputs, self.attn_spec.scale, self.attn_spec.v_head_dim)

        spec, eps, comm = self.spec, self.spec.rms_norm_eps, self.comm
        h, k, v = self.block(spec, p, rms_norm(x, p["input_layernorm.weight"], eps), self.rope, cos, sin, attn)
        x = x + comm.psum(h)
        h = rms_norm(x, p["post_attention_layernorm.weight"], eps)
        return x + comm.psum(moe(spec.moe, self.shard.experts, p, h, self.moe_gather) if moe_layer else mlp(p, h)), k, v

    def head(self, w: dict, hidden: jax.Array, rows: jax.Array) -> jax.Array:
        """hidden [T, H], rows [N] -> float32 logits [N, V] of those rows."""
        x = rms_norm(hidden[rows], w["norm"], self.spec.rms_norm_eps)
        logits = self.comm.gather_columns(x @ w["lm_head"])  # [N, tp * ceil(V / tp)]
        return logits[:, : self.spec.vocab_size].astype(jnp.float32)

    def embed(self, w: dict, input_ids: jax.Array) -> jax.Array:
        """[T] -> [T, H], from w["embed"] [V, H], or when tied from the columns of w["lm_head"]
        [H, V] (the one copy of the table kept: XLA's logits matmul wants [H, V], 1.3-1.6x
        faster than contracting [V, H]'s last axis at 1-64 rows; the column gather costs 0.2 ms
        for 64 tokens, 42 ms for 4096, 2 cores). Tokens outside this rank's vocabulary rows embed
        as zeros; the sum over the TP group is then the full embedding."""
        rows = (lambda ids: w["embed"][ids]) if "embed" in w else (lambda ids: w["lm_head"][:, ids].T)  # noqa: E731
        vocab = self.shard.vocab
        if len(vocab) == self.spec.vocab_size:
            return rows(input_ids)
        local = input_ids - vocab.start
        mine = (local >= 0) & (local < len(vocab))
        return self.comm.psum(rows(jnp.clip(local, 0, len(vocab) - 1)) * mine[:, None].astype(w["lm_head"].dtype))


def _stack(items: list) -> torch.Tensor | Int8Weight:
    """Torch tensors, or Int8Weights of them, stacked on a new leading axis (a copy)."""
    return jax.tree.map(lambda *ts: torch.stack(ts), *items)
