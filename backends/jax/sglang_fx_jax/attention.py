"""Paged attention in JAX over the host's KV pool, with static shapes.

The pool is read, never written, inside a jitted step: attention reads the keys and values of
the step's sequences from the pool by slot, takes the step's own new K/V from the step instead
(the host stores them into the pool after the step: `kv_cache.JaxKVCache`), and masks by
position. Two layouts, chosen per step on the host (`plan`):

- `DecodeInputs`, one new token per sequence: the slots of its keys [B, L], L the context padded
  to a power of two (the program's bucket); the new token is the last of its sequence. Keys are
  read in blocks of K with an online softmax, only as many blocks as the step's longest context
  needs, so the work is B x that context, not B x L (gathering all of [B, L] made a step at
  B = 8 and 530 tokens of context 4.6x slower).
- `ExtendInputs`, any step: blocked, flash-style. The step's new tokens form query blocks of Q
  rows, each block from one sequence; the step's keys are listed flat, sequence after sequence
  (C of them). A tile is W (query block, key block) pairs, each pair a block's queries against K
  consecutive keys of its own sequence; tiles run one after another in a loop whose trip count is
  the step's, each updating its blocks' running max, sum and output (online softmax). So a query
  meets only its own sequence's keys, up to its last visible position, and memory is linear in
  the step's tokens: the loop's temporaries are one tile's [W, Hq, Q, K] scores.
  Which key a query sees is decided per pair of (query, key) by position (`key_pos <=
  query_pos`) within the pair's key range, never by token order. In a VERIFY step (speculative
  decoding) a query sees its sequence's committed keys and, among the step's own (draft) keys,
  those its row of the tree mask allows (`row_tree`, `key_draft`).

Scores and softmax in float32; a hidden score is HIDDEN. Shapes: T new tokens, B sequences, Hq/Hkv
heads, G = Hq // Hkv, D/Dv head dims, S pool slots. Latent attention (no V pool) reads its values
as the first Dv channels of the keys, Hkv == 1.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from sglang_fx.buckets import power_of_two
from sglang_fx.metadata import ForwardMetadata, ForwardMode
from sglang_fx.spi import AttentionSpec

from .kv_cache import JaxKVCache

HIDDEN = -1e30  # the score of a key a query may not see (finite: an all-hidden padding row stays finite)
MIN_CONTEXT = 64  # smallest context bucket of an extend step's keys
#: Smallest context bucket of a decode step. Its work follows the step's contexts, not the bucket
#: (`attend_decode`), so one bucket for every context up to 2048 costs only the slot table's
#: width ([B, 2048] int32, 8 KB a sequence) and spares a whole-model compile per new bucket and
#: batch size while serving: `precompile` then covers every decode step up to that context.
DECODE_CONTEXT = 2048
MIN_TOKENS = 16  # smallest token bucket of a step that is not a padded decode
QUERY_BLOCK = 128  # most query rows of a block (fewer when the step's longest extend is shorter)
KEY_BLOCK = 128  # keys of a block (fewer when the context bucket is smaller)
TILE = 8  # (query block, key block) pairs computed together


class DecodeInputs(NamedTuple):
    """One new token per sequence. slots [B, L] int32: pool slot of token j of sequence b (0 past
    its end); lengths [B] int32: its tokens after the step (the new one is at lengths - 1)."""

    slots: jax.Array
    lengths: jax.Array


class ExtendInputs(NamedTuple):
    """Any step, blocked. Keys, C of them, every sequence's in turn: key_slots [C] int32 pool slot,
    key_new [C] int32 the step row of a key this step writes (-1: read it from the pool), key_pos
    [C] int32 its position. Query blocks, NQ of Q rows each from one sequence: block_rows [NQ, Q]
    int32 the step row of each query (T or more: padding), block_pos [NQ, Q] int32 its position.
    Tiles, NT of W pairs: tile_block [NT, W] int32 the pair's query block (NQ: none, a padding
    pair), tile_key [NT, W] int32 the first of its K keys, tile_end [NT, W] int32 the end of its
    sequence's keys (keys at or past it are hidden); num_tiles [] int32: the tiles to run (the rest
    are padding). token_out [T] int32: where each step row's output is among the NQ x Q rows.
    VERIFY steps only (else R = 0): key_draft [C] int32 a key's index among its sequence's draft
    tokens (-1: a committed key); row_tree [T + 1, R] bool the draft tokens step row t may see
    (`ForwardMetadata.visible`; row T, the padding rows', sees none), R >= every D_b."""

    key_slots: jax.Array
    key_new: jax.Array
    key_pos: jax.Array
    block_rows: jax.Array
    block_pos: jax.Array
    tile_block: jax.Array
    tile_key: jax.Array
    tile_end: jax.Array
    num_tiles: jax.Array
    token_out: jax.Array
    key_draft: jax.Array
    row_tree: jax.Array


Inputs = DecodeInputs | ExtendInputs
#: read(slots [...] int32) -> (keys [..., Hkv, D], values [..., Hkv, Dv] or None): one layer's pool rows.
Read = Callable[[jax.Array], tuple[jax.Array, "jax.Array | None"]]


def decode_inputs(meta: ForwardMetadata, context: int) -> DecodeInputs:
    """For a step of one new token per sequence, the context padded to `context` >= max(seq_lens)."""
    lengths = meta.seq_lens.numpy().astype(np.int32)
    width = min(context, meta.req_to_token.shape[1])
    slots = np.zeros((meta.batch_size, context), np.int32)
    slots[:, :width] = meta.req_to_token[:, :width].numpy()
    slots[np.arange(context)[None, :] >= lengths[:, None]] = 0
    return DecodeInputs(slots, lengths)


def extend_shape(meta: ForwardMetadata) -> tuple[int, int, int, int]:
    """An extend step's bucket: (tokens T, keys C, query blocks NQ, rows per block Q, tree width
    R). Q is the longest extend's power of two (16 to QUERY_BLOCK); NQ is 2 T / Q, which holds
    the blocks of any step of at most T / Q sequences, or the blocks' power of two beyond that. R
    is 0 except in a VERIFY step (the most draft tokens of a sequence, as a power of two). So a
    step's program depends on its tokens, keys and longest extend, each rounded to a power of two."""
    tokens = power_of_two(meta.num_tokens, MIN_TOKENS)
    rows = min(QUERY_BLOCK, power_of_two(max(meta.extend_lens_cpu), MIN_TOKENS))
    blocks = power_of_two(max(sum(-(-n // rows) for n in meta.extend_lens_cpu), 2 * tokens // rows))
    tree = power_of_two(max(meta.extend_lens_cpu), 1) if meta.mode is ForwardMode.VERIFY else 0
    return tokens, power_of_two(sum(meta.seq_lens_cpu), MIN_CONTEXT), blocks, rows, tree


def extend_inputs(meta: ForwardMetadata, tokens: int, context: int, blocks: int, rows: int, tree: int = 0) -> ExtendInputs:
    """Any step, in the bucket of `extend_shape`."""
    table = meta.req_to_token.numpy()
    key_draft, row_tree = np.full(context if tree else 0, -1, np.int32), np.zeros((tokens + 1, tree), np.bool_)
    key_block, width = min(KEY_BLOCK, context), tile_width(blocks)
    key_slots, key_new, key_pos = np.zeros(context, np.int32), np.full(context, -1, np.int32), np.zeros(context, np.int32)
    block_rows, block_pos = np.full((blocks, rows), tokens, np.int32), np.zeros((blocks, rows), np.int32)
    token_out = np.zeros(tokens, np.int32)
    pairs: list[tuple[int, int, int, int]] = []  # (round, block, first key, end of keys)
    c = t = nq = 0
    for b, (length, prefix) in enumerate(zip(meta.seq_lens_cpu, meta.prefix_lens_cpu)):
        key_slots[c : c + length], key_pos[c : c + length] = table[b, :length], np.arange(length)
        key_new[c + prefix : c + length] = np.arange(t, t + length - prefix)
        if tree:
            key_draft[c + prefix : c + length] = np.arange(length - prefix)
            row_tree[t : t + length - prefix, : length - prefix] = meta.visible(b)[:, prefix:].numpy()
        for first in range(prefix, length, rows):  # one query block per `rows` new tokens
            n = min(rows, length - first)
            block_rows[nq, :n], block_pos[nq, :n] = np.arange(t, t + n), np.arange(first, first + n)
            token_out[t : t + n] = nq * rows + np.arange(n)
            visible = first + n  # keys at positions < first + n: the block's last query sees those
            pairs += [(r, nq, c + r * key_block, c + length) for r in range(-(-visible // key_block))]
            nq, t = nq + 1, t + n
        c += length
    pairs.sort()  # round by round: a tile's pairs are of distinct blocks
    tiles: list[list[tuple[int, int, int]]] = []
    for r in range(pairs[-1][0] + 1 if pairs else 0):
        active = [p[1:] for p in pairs if p[0] == r]
        tiles += [active[i : i + width] for i in range(0, len(active), width)]
    limit = tile_bound(context, blocks)
    tile = np.zeros((limit, width, 3), np.int32)
    tile[..., 0] = blocks  # padding pairs: the scratch block, no visible key
    for i, pairs_of_tile in enumerate(tiles):
        tile[i, : len(pairs_of_tile)] = pairs_of_tile
    return ExtendInputs(key_slots, key_new, key_pos, block_rows, block_pos, tile[..., 0], tile[..., 1], tile[..., 2],
                        np.int32(len(tiles)), token_out, key_draft, row_tree)  # fmt: skip


def tile_width(blocks: int) -> int:
    """Pairs per tile: TILE, or half the query blocks when fewer (NQ is 2 T / Q for a step of
    few sequences, so T / Q blocks are real), so that a step of one sequence computes few
    padding pairs."""
    return max(1, min(TILE, blocks // 2))


def tile_bound(context: int, blocks: int) -> int:
    """The most tiles a step of `blocks` query blocks over `context` keys runs: each round (key
    block) has at most `blocks` pairs, in tiles of W."""
    key_block, width = min(KEY_BLOCK, context), tile_width(blocks)
    rounds = -(-context // key_block)
    return rounds * -(-blocks // width)


def plan(meta: ForwardMetadata, decode: bool) -> tuple[Inputs, int]:
    """The step's attention inputs and its padded token count. decode: a one-token-per-sequence
    step whose batch is already padded to its bucket (`ForwardMetadata.padded_decode`)."""
    if decode:
        return decode_inputs(meta, power_of_two(max(meta.seq_lens_cpu), DECODE_CONTEXT)), meta.batch_size
    shape = extend_shape(meta)
    return extend_inputs(meta, *shape), shape[0]


def bucket(inputs: Inputs) -> tuple:
    """The static shapes a step's program depends on (besides the token count): decode (context,),
    extend (keys, query blocks, rows per block, tree width)."""
    if isinstance(inputs, DecodeInputs):
        return (inputs.slots.shape[1],)
    return (len(inputs.key_slots), *inputs.block_rows.shape, inputs.row_tree.shape[1])


def pool_reader(k_pool: jax.Array, v_pool: jax.Array | None) -> Read:
    """`Read` over one layer's pool [S, Hkv, D/Dv] (v_pool None without a V pool)."""
    return lambda slots: (k_pool[slots], None if v_pool is None else v_pool[slots])


def attend(q: jax.Array, k: jax.Array, v: jax.Array | None, read: Read, inputs: Inputs, scale: float, v_head_dim: int) -> jax.Array:
    """q [T, Hq, D], k [T, Hkv, D], v [T, Hkv, Dv] or None: the step's new tokens (padded); read:
    the layer's pool, which need not hold this step's k/v yet (they are taken from k/v). v None:
    latent attention, whose values are the keys' first v_head_dim channels. Returns [T, Hq, Dv]
    in q's dtype."""
    if isinstance(inputs, DecodeInputs):
        return attend_decode(q, k, v, read, inputs, scale, v_head_dim)
    return attend_extend(q, k, v, read, inputs, scale, v_head_dim)


def attend_decode(q, k, v, read: Read, inputs: DecodeInputs, scale: float, v_head_dim: int) -> jax.Array:
    """Blocked over the context: the new token's own key first, then the committed keys in blocks
    of K with an online softmax, for as many blocks as the step's longest context needs (a loop
    whose trip count is the step's), so the work follows the contexts, not their bucket L."""
    B, L = inputs.slots.shape
    Hkv, D, Dv = k.shape[1], k.shape[2], v_head_dim
    f32 = jnp.float32
    K = min(KEY_BLOCK, L)
    qf = q.reshape(B, Hkv, -1, D).astype(f32) * scale  # [B, Hkv, G, D]
    own_k = k.astype(f32)
    own_v = own_k[..., :Dv] if v is None else v.astype(f32)
    m = jnp.einsum("bkgd,bkd->bkg", qf, own_k)  # each sequence's new token sees itself
    state = (m, jnp.ones_like(m), jnp.broadcast_to(own_v[:, :, None, :], (*m.shape, Dv)))
    committed = inputs.lengths - 1  # keys at positions < committed are in the pool

    def block(i, state):
        m, l, acc = state  # [B, Hkv, G], likewise, [B, Hkv, G, Dv]
        first = i * K
        keys, values = read(lax.dynamic_slice_in_dim(inputs.slots, first, K, axis=1))  # [B, K, Hkv, D]
        keys = keys.astype(f32)
        values = keys[..., :Dv] if values is None else values.astype(f32)
        visible = (first + jnp.arange(K))[None, :] < committed[:, None]  # [B, K]
        s = jnp.where(visible[:, None, None, :], jnp.einsum("bkgd,bckd->bkgc", qf, keys), HIDDEN)
        m_new = jnp.maximum(m, s.max(-1))
        p = jnp.exp(s - m_new[..., None])
        alpha = jnp.exp(m - m_new)
        return m_new, alpha * l + p.sum(-1), alpha[..., None] * acc + jnp.einsum("bkgc,bckd->bkgd", p, values)

    _, l, acc = lax.fori_loop(0, (committed.max() + K - 1) // K, block, state)
    return (acc / l[..., None]).reshape(B, -1, Dv).astype(q.dtype)


def attend_extend(q, k, v, read: Read, inputs: ExtendInputs, scale: float, v_head_dim: int) -> jax.Array:
    T, Hkv, D = k.shape
    f32 = jnp.float32
    NQ, Q = inputs.block_rows.shape
    C = inputs.key_slots.shape[0]
    K = min(KEY_BLOCK, C)
    G = q.shape[1] // Hkv
    # Query blocks [NQ + 1, Hkv, G*Q, D] (rows g-major), scaled; block NQ is the padding pairs' scratch.
    qb = jnp.take(q.astype(f32) * scale, inputs.block_rows, axis=0, mode="fill", fill_value=0)  # [NQ, Q, Hq, D]
    qb = qb.reshape(NQ, Q, Hkv, G, D).transpose(0, 2, 3, 1, 4).reshape(NQ, Hkv, G * Q, D)
    qb = jnp.concatenate([qb, jnp.zeros((1, Hkv, G * Q, D), f32)])
    qpos = jnp.tile(jnp.concatenate([inputs.block_pos, jnp.zeros((1, Q), jnp.int32)]), (1, G))  # [NQ + 1, G*Q]
    T_pad = inputs.row_tree.shape[0] - 1
    qrow = jnp.tile(jnp.concatenate([inputs.block_rows, jnp.full((1, Q), T_pad, jnp.int32)]), (1, G))  # [NQ + 1, G*Q]
    Dv = v_head_dim

    def tile(i, state):
        m, l, acc = state  # [NQ + 1, Hkv, G*Q], likewise, [NQ + 1, Hkv, G*Q, Dv]
        blocks, first, end = inputs.tile_block[i], inputs.tile_key[i], inputs.tile_end[i]  # [W]
        wanted = first[:, None] + jnp.arange(K)[None, :]  # [W, K]: the pair's keys, some maybe past C
        index = jnp.minimum(wanted, C - 1)  # what is read; visibility is decided on `wanted`, so a
        #                                     key range ending at C does not see key C - 1 again
        new = inputs.key_new[index]
        keys, values = read(inputs.key_slots[index])  # [W, K, Hkv, D]
        own = (new >= 0)[..., None, None]
        keys = jnp.where(own, k[jnp.maximum(new, 0)].astype(keys.dtype), keys).astype(f32)
        if values is None:
            values = keys[..., :Dv]
        else:
            values = jnp.where(own, v[jnp.maximum(new, 0)].astype(values.dtype), values).astype(f32)
        visible = inputs.key_pos[index][:, None, :] <= qpos[blocks][:, :, None]  # [W, G*Q, K]
        if inputs.row_tree.shape[1]:  # VERIFY: a draft key is visible where the query's tree row says
            draft = inputs.key_draft[index][:, None, :]  # [W, 1, K]
            rows = inputs.row_tree[jnp.minimum(qrow[blocks], T_pad)]  # [W, G*Q, R]
            allowed = jnp.take_along_axis(rows, jnp.broadcast_to(jnp.maximum(draft, 0), visible.shape), axis=2)
            visible = jnp.where(draft >= 0, allowed, visible)
        visible &= (wanted < end[:, None])[:, None, :]
        s = jnp.where(visible[:, None], jnp.einsum("wkrd,wckd->wkrc", qb[blocks], keys), HIDDEN)  # [W, Hkv, G*Q, K]
        m_old = m[blocks]
        m_new = jnp.maximum(m_old, s.max(-1))
        p = jnp.exp(s - m_new[..., None])
        alpha = jnp.exp(m_old - m_new)
        l_new = alpha * l[blocks] + p.sum(-1)
        acc_new = alpha[..., None] * acc[blocks] + jnp.einsum("wkrc,wckd->wkrd", p, values)
        return m.at[blocks].set(m_new), l.at[blocks].set(l_new), acc.at[blocks].set(acc_new)

    state = (jnp.full((NQ + 1, Hkv, G * Q), HIDDEN, f32), jnp.zeros((NQ + 1, Hkv, G * Q), f32), jnp.zeros((NQ + 1, Hkv, G * Q, Dv), f32))
    _, l, acc = lax.fori_loop(0, inputs.num_tiles, tile, state)
    out = acc[:NQ] / jnp.where(l[:NQ] > 0, l[:NQ], 1)[..., None]  # a block no tile reached: zeros
    out = out.reshape(NQ, Hkv, G, Q, Dv).transpose(0, 3, 1, 2, 4).reshape(NQ * Q, Hkv * G, Dv)
    return out[inputs.token_out].astype(q.dtype)


class JaxPagedAttention:
    """`spi.Attention`: `attend` jitted per shape bucket, after the host has stored the new K/V."""

    def __init__(self, spec: AttentionSpec):
        self.spec = spec

        def run(q, k, v, k_pool, v_pool, inputs):
            return attend(q, k, v, pool_reader(k_pool, v_pool), inputs, spec.scale, spec.v_head_dim)

        self._run = jax.jit(run)

    def plan(self, meta: ForwardMetadata) -> None:
        self.slots = meta.out_cache_loc
        self.inputs, self.tokens = plan(meta, decode=meta.one_token_each)

    def forward(self, layer: int, q: jax.Array, k: jax.Array, v: jax.Array | None, cache: JaxKVCache) -> jax.Array:
        T = q.shape[0]
        cache.write(layer, cache.exchange.from_torch(self.slots), k, v)
        pad = lambda x: None if x is None else jnp.pad(x, ((0, self.tokens - T),) + ((0, 0),) * (x.ndim - 1))  # noqa: E731
        return self._run(pad(q), pad(k), pad(v), cache.k(layer), cache.v(layer), self.inputs)[:T]
