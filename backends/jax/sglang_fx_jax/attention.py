"""Paged attention in JAX over the host's KV pool, with static shapes.

The pool is read, never written, inside a jitted step: each layer gathers the keys and values of
the step's sequences from the pool by slot, puts the step's own new K/V at their places in what
it gathered (the host stores them into the pool after the step: `kv_cache.JaxKVCache`), and
attends with a mask. Two layouts, chosen per step on the host (`plan`):

- `DecodeInputs`, one new token per sequence: keys [B, L] per sequence, L the context padded to
  a power of two; the new token is the last of its sequence. Work: B x L.
- `ExtendInputs`, any step: the step's keys flattened, C = sum of the sequences' lengths padded
  to a power of two, and T new tokens padded likewise; a query sees the keys of its own sequence
  up to its position. Work: T x C, which for the usual prefill (few sequences) is near the
  causal minimum, and needs two bucket sizes, not three (batch, tokens, context).

Scores and softmax in float32. Shapes: T new tokens, B sequences, Hq/Hkv heads, G = Hq // Hkv,
D/Dv head dims, S pool slots. Latent attention (no V pool) reads its values as the first Dv
channels of the keys, Hkv == 1.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sglang_fx.buckets import power_of_two
from sglang_fx.metadata import ForwardMetadata
from sglang_fx.spi import AttentionSpec

from .kv_cache import JaxKVCache

HIDDEN = -1e30  # the score of a key a query may not see (finite: an all-hidden padding row stays finite)
MIN_CONTEXT = 64  # smallest context bucket
MIN_TOKENS = 16  # smallest token bucket of a step that is not a padded decode


class DecodeInputs(NamedTuple):
    """One new token per sequence. slots [B, L] int32: pool slot of token j of sequence b (0 past
    its end); lengths [B] int32: its tokens after the step (the new one is at lengths - 1)."""

    slots: jax.Array
    lengths: jax.Array


class ExtendInputs(NamedTuple):
    """Any step, flattened. C keys: key_slots [C] int32 pool slots, key_seq [C] int32 sequence
    (-1: padding), key_pos [C] int32 position. T queries: query_seq [T] int32 (-1: padding, which
    sees only padding keys), query_pos [T] int32, new_index [T] int32: where the token's own key
    is among the C (C for padding: dropped)."""

    key_slots: jax.Array
    key_seq: jax.Array
    key_pos: jax.Array
    query_seq: jax.Array
    query_pos: jax.Array
    new_index: jax.Array


Inputs = DecodeInputs | ExtendInputs


def decode_inputs(meta: ForwardMetadata, context: int) -> DecodeInputs:
    """For a step of one new token per sequence, the context padded to `context` >= max(seq_lens)."""
    lengths = meta.seq_lens.numpy().astype(np.int32)
    width = min(context, meta.req_to_token.shape[1])
    slots = np.zeros((meta.batch_size, context), np.int32)
    slots[:, :width] = meta.req_to_token[:, :width].numpy()
    slots[np.arange(context)[None, :] >= lengths[:, None]] = 0
    return DecodeInputs(slots, lengths)


def extend_inputs(meta: ForwardMetadata, tokens: int, context: int) -> ExtendInputs:
    """Any step, its T new tokens padded to `tokens` and its sum(seq_lens) keys to `context`."""
    seq_lens, prefix_lens = meta.seq_lens_cpu, meta.prefix_lens_cpu
    table = meta.req_to_token.numpy()
    key_slots, key_seq, key_pos = (np.zeros(context, np.int32) for _ in range(3))
    key_seq[:] = -1
    query_seq, query_pos = np.full(tokens, -1, np.int32), np.zeros(tokens, np.int32)
    new_index = np.full(tokens, context, np.int32)
    c = t = 0
    for b, (length, prefix) in enumerate(zip(seq_lens, prefix_lens)):
        new = length - prefix
        key_slots[c : c + length], key_seq[c : c + length], key_pos[c : c + length] = table[b, :length], b, np.arange(length)
        query_seq[t : t + new], query_pos[t : t + new] = b, np.arange(prefix, length)
        new_index[t : t + new] = np.arange(c + prefix, c + length)
        c, t = c + length, t + new
    return ExtendInputs(key_slots, key_seq, key_pos, query_seq, query_pos, new_index)


def plan(meta: ForwardMetadata, decode: bool) -> tuple[Inputs, int]:
    """The step's attention inputs and its padded token count. decode: a one-token-per-sequence
    step whose batch is already padded to its bucket (`ForwardMetadata.padded_decode`)."""
    if decode:
        return decode_inputs(meta, power_of_two(max(meta.seq_lens_cpu), MIN_CONTEXT)), meta.batch_size
    tokens = power_of_two(meta.num_tokens, MIN_TOKENS)
    return extend_inputs(meta, tokens, power_of_two(sum(meta.seq_lens_cpu), MIN_CONTEXT)), tokens


def gather(k_pool: jax.Array, v_pool: jax.Array | None, inputs: Inputs) -> tuple[jax.Array, jax.Array | None]:
    """The step's keys and values read from one layer's pool [S, Hkv, D/Dv]: [B, L, Hkv, D/Dv]
    (DecodeInputs) or [C, Hkv, D/Dv] (ExtendInputs); values None without a V pool."""
    slots = inputs.slots if isinstance(inputs, DecodeInputs) else inputs.key_slots
    return k_pool[slots], None if v_pool is None else v_pool[slots]


def attend(q: jax.Array, k: jax.Array, v: jax.Array | None, keys: jax.Array, values: jax.Array | None, inputs: Inputs,
           scale: float, v_head_dim: int) -> jax.Array:  # fmt: skip
    """q [T, Hq, D], k [T, Hkv, D], v [T, Hkv, Dv] or None: the step's new tokens (padded);
    keys/values: `gather`'s, which need not hold this step's k/v yet (they are put in here).
    values None: latent attention, whose values are the keys' first v_head_dim channels.
    Returns [T, Hq, Dv] in q's dtype."""
    T, Hkv, D = k.shape
    f32 = jnp.float32
    if isinstance(inputs, DecodeInputs):
        B, L = inputs.slots.shape
        new = (jnp.arange(B), inputs.lengths - 1)  # each sequence's new token is its last
        keys = keys.at[new].set(k.astype(keys.dtype))  # [B, L, Hkv, D]
        values = keys[..., :v_head_dim] if values is None else values.at[new].set(v.astype(values.dtype))
        visible = jnp.arange(L)[None, :] < inputs.lengths[:, None]  # [B, L]
        s = jnp.einsum("bkgd,blkd->bkgl", q.reshape(B, Hkv, -1, D).astype(f32), keys.astype(f32)) * scale
        p = jax.nn.softmax(jnp.where(visible[:, None, None, :], s, HIDDEN), axis=-1)
        return jnp.einsum("bkgl,blkd->bkgd", p, values.astype(f32)).reshape(B, -1, v_head_dim).astype(q.dtype)
    keys = keys.at[inputs.new_index].set(k.astype(keys.dtype), mode="drop")  # [C, Hkv, D]
    values = keys[..., :v_head_dim] if values is None else values.at[inputs.new_index].set(v.astype(values.dtype), mode="drop")
    visible = (inputs.key_seq[None, :] == inputs.query_seq[:, None]) & (inputs.key_pos[None, :] <= inputs.query_pos[:, None])
    s = jnp.einsum("tkgd,ckd->tkgc", q.reshape(T, Hkv, -1, D).astype(f32), keys.astype(f32)) * scale  # [T, Hkv, G, C]
    p = jax.nn.softmax(jnp.where(visible[:, None, None, :], s, HIDDEN), axis=-1)
    return jnp.einsum("tkgc,ckd->tkgd", p, values.astype(f32)).reshape(T, -1, v_head_dim).astype(q.dtype)


class JaxPagedAttention:
    """`spi.Attention`: `attend` jitted per shape bucket, after the host has stored the new K/V."""

    def __init__(self, spec: AttentionSpec):
        self.spec = spec

        def run(q, k, v, k_pool, v_pool, inputs):
            return attend(q, k, v, *gather(k_pool, v_pool, inputs), inputs, spec.scale, spec.v_head_dim)

        self._run = jax.jit(run)

    def plan(self, meta: ForwardMetadata) -> None:
        self.slots = meta.out_cache_loc
        self.inputs, self.tokens = plan(meta, decode=all(n == 1 for n in meta.extend_lens_cpu))

    def forward(self, layer: int, q: jax.Array, k: jax.Array, v: jax.Array | None, cache: JaxKVCache) -> jax.Array:
        T = q.shape[0]
        cache.write(layer, cache.exchange.from_torch(self.slots), k, v)
        pad = lambda x: None if x is None else jnp.pad(x, ((0, self.tokens - T),) + ((0, 0),) * (x.ndim - 1))  # noqa: E731
        return self._run(pad(q), pad(k), pad(v), cache.k(layer), cache.v(layer), self.inputs)[:T]
