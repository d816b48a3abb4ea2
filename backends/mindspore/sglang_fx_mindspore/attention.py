"""Paged attention over a MindSporeKVCache, in two tiers picked by `runtime.choose_tier`.

Both tiers split a step the same way. `plan(meta)` builds the step's index tensors on the host
with plain torch functions (`portable_inputs`, `ascend_inputs`: unit-tested on CPU) and hands
them to MindSpore once per step. `run(q, k, v, k_cache, v_cache, inputs, variant)` attends, and
first writes the new K/V when the tier's `writes_kv` says so (else its caller stores them). It is
graph-callable, so the model's jit graph inlines it; `forward` (the SPI entry) calls it with the
planned inputs. `variant` is a Python int that picks a kernel path: a compile-time constant in a
jit graph. `cache_views(cache)` gives the per-layer KV tuples `run` takes.

Shapes: T new tokens, B sequences, E = max new tokens of a sequence, L = max sequence length,
Hq/Hkv heads, G = Hq // Hkv, D/Dv head dims, S pool slots, P page size.
"""

from __future__ import annotations

from dataclasses import dataclass

import mindspore as ms
import torch
from mindspore import Tensor, mutable, nn, ops

from sglang_fx.kv_pool import KVLayout
from sglang_fx.metadata import ForwardMetadata
from sglang_fx.spi import AttentionSpec

from .exchange import MindSporeExchange
from .kv_cache import MindSporeKVCache
from .runtime import Tier, choose_tier, ms_dtype

# ---------------------------------------------------------------------------------------------
# Portable tier: gather each sequence's K/V by slot, masked softmax, over ops that run anywhere
# ---------------------------------------------------------------------------------------------


_bmm, _bmm_t = ops.BatchMatMul(), ops.BatchMatMul(transpose_b=True)


@dataclass(frozen=True)
class PortableInputs:
    """The portable tier's step tensors (torch, on the step's device). Keys j < prefix_b come
    from the pool; this step's keys come straight from k/v, so a step never reads what it writes.

    q_rows    [B, E] int64. Row of new token e of sequence b in the packed [T] tensors (0 if padding).
    kv_slots  [B, L] int64. Pool slot of cached token j of sequence b (j < prefix_b), else 0.
    new_rows  [B, L] int64. Row in [T] of this step's token j (prefix_b <= j < seq_len_b), else 0.
    is_new    [B, L] bool. Key j comes from this step's k/v (new_rows), not the pool (kv_slots).
    bias      [B, E, L] float32. 0 where new token e of b may see key j, -inf elsewhere.
    out_rows  [T] int64. Row b * E + e of each new token in the padded [B * E] layout.
    """

    q_rows: torch.Tensor
    kv_slots: torch.Tensor
    new_rows: torch.Tensor
    is_new: torch.Tensor
    bias: torch.Tensor
    out_rows: torch.Tensor


def portable_inputs(meta: ForwardMetadata) -> PortableInputs:
    dev = meta.positions.device
    E, L, T = max(meta.extend_lens_cpu), max(meta.seq_lens_cpu), meta.num_tokens
    ext, prefix = meta.extend_lens.long(), meta.prefix_lens.long()
    starts = ext.cumsum(0) - ext  # [B] first row of each sequence
    e = torch.arange(E, device=dev)
    q_rows = torch.where(e[None, :] < ext[:, None], starts[:, None] + e[None, :], 0)
    seq_of_row = torch.repeat_interleave(torch.arange(len(ext), device=dev), ext, output_size=T)  # [T]
    out_rows = seq_of_row * E + torch.arange(T, device=dev) - starts[seq_of_row]
    j = torch.arange(L, device=dev)[None, :]
    cached = j < prefix[:, None]  # [B, L]
    is_new = ~cached & (j < meta.seq_lens[:, None])
    kv_slots = torch.where(cached, meta.req_to_token[:, :L].long(), 0)
    new_rows = torch.where(is_new, starts[:, None] + j - prefix[:, None], 0)
    query_pos = prefix[:, None] + e[None, :]  # [B, E]; padding rows see a superset
    visible = j[:, None, :] <= query_pos[:, :, None]  # [B, E, L]
    bias = torch.zeros(visible.shape, dtype=torch.float32, device=dev).masked_fill_(~visible, float("-inf"))
    return PortableInputs(q_rows, kv_slots, new_rows, is_new, bias, out_rows)


class PortablePagedAttention(nn.Cell):
    """Pads the step to [B, E] queries x [B, L] keys, so one batched matmul covers ragged
    sequences, cached prefixes and decode alike, for any page size. Scores and softmax in float32.

    run() only reads the pool (writes_kv is False): MindSpore copies a whole buffer that one
    graph both reads and writes, so the caller stores the new K/V separately
    (MindSporeKVCache.write / write_layers)."""

    writes_kv = False

    def __init__(self, spec: AttentionSpec, layout: KVLayout, device: str, exchange: MindSporeExchange):
        super().__init__()
        self.num_heads, self.num_kv_heads = spec.num_heads, spec.num_kv_heads
        self.head_dim, self.v_head_dim, self.scale = spec.head_dim, spec.v_head_dim, spec.scale
        self.group = spec.num_heads // spec.num_kv_heads
        self.exchange = exchange
        i64 = ms.int64
        self.dynamic_inputs = (
            Tensor(shape=[None, None], dtype=i64),  # q_rows [B, E]
            Tensor(shape=[None, None], dtype=i64),  # kv_slots [B, L]
            Tensor(shape=[None, None], dtype=i64),  # new_rows [B, L]
            Tensor(shape=[None, None], dtype=ms.bool_),  # is_new [B, L]
            Tensor(shape=[None, None, None], dtype=ms.float32),  # bias [B, E, L]
            Tensor(shape=[None], dtype=i64),  # out_rows [T]
        )
        self.slots: Tensor | None = None  # [T] int64, the step's out_cache_loc
        self.inputs: tuple = ()
        self.variant = 0

    @staticmethod
    def cache_views(cache: MindSporeKVCache) -> tuple[tuple, tuple]:
        return cache.keys, cache.values

    def plan(self, meta: ForwardMetadata) -> None:
        p = portable_inputs(meta)
        tensors = (p.q_rows, p.kv_slots, p.new_rows, p.is_new, p.bias, p.out_rows)
        self.slots = self.exchange.from_torch(meta.out_cache_loc)
        self.inputs = mutable(tuple(self.exchange.from_torch(t) for t in tensors))

    def forward(self, layer: int, q: Tensor, k: Tensor, v: Tensor, cache: MindSporeKVCache) -> Tensor:
        cache.write(layer, self.slots, k, v)
        return self.run(q, k, v, cache.k(layer), cache.v(layer), self.inputs, self.variant)

    def run(self, q, k, v, k_cache, v_cache, inputs, variant):
        q_rows, kv_slots, new_rows, is_new, bias, out_rows = inputs
        B, E = q_rows.shape
        L = kv_slots.shape[1]
        Hkv, G, D, Dv = self.num_kv_heads, self.group, self.head_dim, self.v_head_dim
        qp = ops.gather(q, q_rows.reshape(-1), 0).astype(ms.float32)  # [B*E, Hq, D]
        qp = qp.reshape(B, E, Hkv, G, D).transpose(0, 2, 3, 1, 4).reshape(B, Hkv, G * E, D)
        keys = _sequence_rows(k_cache, k, kv_slots, new_rows, is_new).reshape(B, L, Hkv, D).transpose(0, 2, 1, 3)
        vals = _sequence_rows(v_cache, v, kv_slots, new_rows, is_new).reshape(B, L, Hkv, Dv).transpose(0, 2, 1, 3)
        scores = _bmm_t(qp, keys).reshape(B, Hkv, G, E, L) * self.scale  # keys, vals: [B, Hkv, L, D|Dv]
        probs = ops.softmax(scores + bias.reshape(B, 1, 1, E, L), -1).reshape(B, Hkv, G * E, L)
        out = _bmm(probs, vals).reshape(B, Hkv, G, E, Dv).transpose(0, 3, 1, 2, 4)  # [B, E, Hkv, G, Dv]
        out = ops.gather(out.reshape(B * E, Hkv * G, Dv), out_rows, 0)  # [T, Hq, Dv]
        return out.astype(q.dtype)


def _sequence_rows(pool, new, kv_slots, new_rows, is_new):
    """[B*L, H, D] float32: row j of sequence b from the pool (cached) or from new (this step)."""
    from_pool = ops.gather(pool, kv_slots.reshape(-1), 0).astype(ms.float32)
    from_step = ops.gather(new, new_rows.reshape(-1), 0).astype(ms.float32)
    return ops.where(is_new.reshape(-1, 1, 1), from_step, from_pool)


# ---------------------------------------------------------------------------------------------
# Ascend tier: reshape_and_cache + flash_attention_score / paged_attention (NPU only)
# ---------------------------------------------------------------------------------------------


# Which fused kernel path a step runs (plain ints: they are jit-graph constants).
FLASH = 0  # no sequence has a cached prefix: flash_attention_score over the new tokens
DECODE = 1  # one new token per sequence: paged_attention
PAGED_EXTEND = 2  # prefix hits with several new tokens: paged_attention with a lookahead mask


MASK_VALUE = -10000.0  # what paged_attention's lookahead mask adds to hidden keys (fp16 and bf16)
FLASH_MASK_SIZE = 2048  # flash_attention_score's compressed causal mask for sparse_mode 3


@dataclass(frozen=True)
class AscendInputs:
    """The fused kernels' arguments for one step (torch, on the step's device).

    variant          FLASH, DECODE or PAGED_EXTEND.
    slot_mapping     [T] int32. reshape_and_cache's destination slot of each new token.
    block_tables     [B, ceil(L / P)] int32. Page id of each page of each sequence (0 past its end).
    context_lens     [B] int32. Tokens per sequence after the step (seq_lens).
    q_seq_lens       [B] int32. New tokens per sequence (extend_lens).
    actual_seq_qlen  [B] int32. Cumulative new tokens: flash_attention_score's TND boundaries.
    lookahead_mask   [T, L] in the model dtype: 0 where new token t may see key j (j <= its
                     position), MASK_VALUE elsewhere; a [1, 1] zero unless PAGED_EXTEND.
    """

    variant: int
    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    context_lens: torch.Tensor
    q_seq_lens: torch.Tensor
    actual_seq_qlen: torch.Tensor
    lookahead_mask: torch.Tensor

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.slot_mapping, self.block_tables, self.context_lens, self.q_seq_lens, self.actual_seq_qlen, self.lookahead_mask)


def block_tables(meta: ForwardMetadata) -> torch.Tensor:
    """[B, ceil(L / P)] int32 page ids from req_to_token: the slots of a page are contiguous,
    so page i of sequence b is req_to_token[b, i * P] // P."""
    P, L = meta.page_size, max(meta.seq_lens_cpu)
    starts = torch.arange(0, L, P, device=meta.req_to_token.device)  # first token of each page
    pages = meta.req_to_token[:, :L:P].long() // P
    return torch.where(starts[None, :] < meta.seq_lens[:, None], pages, 0).int()


def lookahead_mask(meta: ForwardMetadata, dtype: torch.dtype) -> torch.Tensor:
    """[T, L]: 0 where new token t may see key j (j <= positions[t]), MASK_VALUE elsewhere."""
    j = torch.arange(max(meta.seq_lens_cpu), device=meta.positions.device)
    hidden = j[None, :] > meta.positions[:, None]
    return torch.zeros(hidden.shape, dtype=dtype, device=j.device).masked_fill_(hidden, MASK_VALUE)


def flash_causal_mask(device: torch.device | str = "cpu") -> torch.Tensor:
    """flash_attention_score's compressed causal mask for sparse_mode 3: [2048, 2048] uint8,
    1 (discard) strictly above the diagonal."""
    return torch.ones(FLASH_MASK_SIZE, FLASH_MASK_SIZE, dtype=torch.uint8, device=device).triu_(1)


def ascend_inputs(meta: ForwardMetadata, dtype: torch.dtype) -> AscendInputs:
    dev = meta.positions.device
    if not any(meta.prefix_lens_cpu):
        variant, mask = FLASH, None
    elif all(e == 1 for e in meta.extend_lens_cpu):
        variant, mask = DECODE, None
    else:
        variant, mask = PAGED_EXTEND, lookahead_mask(meta, dtype)
    return AscendInputs(
        variant=variant,
        slot_mapping=meta.out_cache_loc.int(),
        block_tables=block_tables(meta),
        context_lens=meta.seq_lens.int(),
        q_seq_lens=meta.extend_lens.int(),
        actual_seq_qlen=meta.extend_lens.cumsum(0).int(),
        lookahead_mask=torch.zeros((1, 1), dtype=dtype, device=dev) if mask is None else mask,
    )


class AscendPagedAttention(nn.Cell):
    """Ascend's fused kernels over the pool viewed as pages: [num_pages, P, Hkv, D]. run()
    writes the new K/V itself (reshape_and_cache), before paged_attention reads them."""

    writes_kv = True

    def __init__(self, spec: AttentionSpec, layout: KVLayout, device: str, exchange: MindSporeExchange):
        super().__init__()
        self.num_heads, self.scale, self.dtype = spec.num_heads, spec.scale, layout.dtype
        self.exchange = exchange
        self.reshape_and_cache = ops.auto_generate.ReshapeAndCache()
        self.paged_attention = ops.auto_generate.PagedAttention(spec.num_heads, spec.scale, spec.num_kv_heads)
        self.causal_mask = exchange.from_torch(flash_causal_mask(device))
        i32, mask_dtype = ms.int32, ms_dtype(layout.dtype)
        self.dynamic_inputs = (
            Tensor(shape=[None], dtype=i32),  # slot_mapping [T]
            Tensor(shape=[None, None], dtype=i32),  # block_tables [B, pages]
            Tensor(shape=[None], dtype=i32),  # context_lens [B]
            Tensor(shape=[None], dtype=i32),  # q_seq_lens [B]
            Tensor(shape=[None], dtype=i32),  # actual_seq_qlen [B]
            Tensor(shape=[None, None], dtype=mask_dtype),  # lookahead_mask [T, L]
        )
        self.inputs: tuple = ()
        self.variant = FLASH

    @staticmethod
    def cache_views(cache: MindSporeKVCache) -> tuple[tuple, tuple]:
        return cache.key_pages, cache.value_pages

    def plan(self, meta: ForwardMetadata) -> None:
        a = ascend_inputs(meta, self.dtype)
        self.inputs = mutable(tuple(self.exchange.from_torch(t) for t in a.tensors()))
        self.variant = a.variant

    def forward(self, layer: int, q: Tensor, k: Tensor, v: Tensor, cache: MindSporeKVCache) -> Tensor:
        return self.run(q, k, v, cache.key_pages[layer], cache.value_pages[layer], self.inputs, self.variant)

    def run(self, q, k, v, k_pages, v_pages, inputs, variant):
        slot_mapping, tables, context_lens, q_seq_lens, actual_seq_qlen, mask = inputs
        self.reshape_and_cache(k, v, k_pages, v_pages, slot_mapping)
        if variant == FLASH:
            return ops.flash_attention_score(
                q, k, v, self.num_heads, attn_mask=self.causal_mask, actual_seq_qlen=actual_seq_qlen,
                actual_seq_kvlen=actual_seq_qlen, scalar_value=self.scale, next_tokens=0, input_layout="TND", sparse_mode=3,
            )
        if variant == DECODE:
            return self.paged_attention(q, k_pages, v_pages, tables, context_lens)
        return self.paged_attention(q, k_pages, v_pages, tables, context_lens, None, None, mask, q_seq_lens)


def make_attention(spec: AttentionSpec, layout: KVLayout, device: str, dtype: torch.dtype, exchange: MindSporeExchange):
    """The tier `choose_tier` picks for `device`, compute `dtype` and `layout`."""
    cls = AscendPagedAttention if choose_tier(device, layout, dtype) is Tier.ASCEND else PortablePagedAttention
    return cls(spec, layout, device, exchange)
