"""Paged attention over a MindSporeKVCache, in two tiers picked by `runtime.choose_tier`.

Both tiers split a step the same way. `plan(meta)` builds the step's index tensors on the host
with plain torch functions (`portable_inputs`, `ascend_inputs`: unit-tested on CPU) and hands
them to MindSpore once per step. `run(q, k, v, k_cache, v_cache, inputs, variant)` attends, and
first writes the new K/V when the tier's `writes_kv` says so (else its caller stores them). It is
graph-callable, so the model's jit graph inlines it; `forward` (the SPI entry) calls it with the
planned inputs. `variant` is a Python int that picks a kernel path: a compile-time constant in a
jit graph. `cache_views(cache)` gives the per-layer KV tuples `run` takes. Latent attention (a
layout without V, `spi.Attention`'s v=None) reads its values as the first Dv key channels.

Shapes: T new tokens, B sequences, E = max new tokens of a sequence, L = max sequence length,
Hq/Hkv heads, G = Hq // Hkv, D/Dv head dims, S pool slots, P page size.
"""

from __future__ import annotations

from dataclasses import dataclass

import mindspore as ms
import torch
from mindspore import Tensor, mutable, nn, ops

from sglang_fx.kv_pool import KVLayout
from sglang_fx.metadata import ForwardMetadata, ForwardMode
from sglang_fx.spi import AttentionSpec

from .exchange import MindSporeExchange
from .kernels import cast
from .kv_cache import MindSporeKVCache
from .runtime import Tier, choose_tier, ms_dtype

# ---------------------------------------------------------------------------------------------
# Portable tier: gather each sequence's K/V by slot, masked softmax, over ops that run anywhere
# ---------------------------------------------------------------------------------------------


_bmm, _bmm_t = ops.BatchMatMul(), ops.BatchMatMul(transpose_b=True)

# Which portable kernel path a step runs (plain ints: jit-graph constants, one graph each).
GENERAL = 0  # any mix of prefills, prefix hits, draft-token verification and decodes: queries in groups
ONE_TOKEN = 1  # every sequence has exactly one new token (decode): queries and outputs are plain
#                reshapes, so the graph skips two gathers

#: A GENERAL step's new-token rows run in this many groups of consecutive ones, each against only
#: the keys its last query sees: on a prompt of E tokens, (1 + 2 + 3 + 4) / 16 = 62% of the score
#: work of one E x E block, and each group's scores a quarter of that block's memory. Every
#: multi-token step runs grouped, short ones too, so that one dynamic graph serves them all: a
#: second one (ungrouped, for short extends) held about 230 MB more for SmolLM2 on CPU.
QUERY_GROUPS = 4


@dataclass(frozen=True)
class PortableInputs:
    """The portable tier's step tensors (torch, on the step's device), in the shapes the graph
    uses them, so that it needs no dynamic transposes. Each sequence's keys, this step's
    included (they are stored before attention reads them), are gathered from the pool straight
    into [B, Hkv, L, D]. Queries are padded per sequence to E rows (GENERAL: QUERY_GROUPS * S, below),
    and each KV head's G query heads are stacked with them (R = rows * G per KV head).

    variant     GENERAL or ONE_TOKEN.
    q_index     [B, Hkv, R] int32. Row of q.reshape(T * Hq, D) for (sequence, KV head, e * G + g).
    kv_index    [B, Hkv, L] int32. Row of the pool viewed as [S * Hkv, D] holding token j of
                sequence b, KV head h (slot * Hkv + h), for j < seq_len_b; else 0 (masked).
    bias        [B, Hkv, R, L] float32. 0 where query row r may see key j, -inf elsewhere; the
                same for every KV head, repeated so that the graph adds tensors of one shape
                (MindSpore's CPU Add is several times slower when it broadcasts).
    out_index   [T, Hq] int32. Row of the attention output [B * Hkv * R, Dv] for (token, head).
    ONE_TOKEN steps (T == B, E == 1, R == G) use neither q_index nor out_index (they would be
    the identity there): both are [1, ...] zero placeholders, not built. Indices are int32
    because MindSpore's CPU Gather casts int64 indices with an extra kernel.

    GENERAL steps split the E new-token rows into QUERY_GROUPS groups of S = ceil(E / QUERY_GROUPS)
    consecutive rows (`groups`; rows past E are padding, so a short step's last groups may be
    padding only): group i has its own q_index [B, Hkv, S * G], kv_index [B, Hkv, L_i] (the first
    L_i keys: those its last query sees; all L in a VERIFY step, whose draft tokens see by their
    tree mask) and bias [B, Hkv, S * G, L_i]; the outputs of the groups are stacked in order, and
    out_index is a row of that stack [QUERY_GROUPS * B * Hkv * S * G, Dv]. ONE_TOKEN steps are
    one group.
    """

    variant: int
    groups: tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], ...]  # (q_index, kv_index, bias) per group
    out_index: torch.Tensor

    @property
    def q_index(self) -> torch.Tensor:
        return self.groups[0][0]

    @property
    def kv_index(self) -> torch.Tensor:
        return self.groups[0][1]

    @property
    def bias(self) -> torch.Tensor:
        return self.groups[0][2]

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """(q_index, kv_index, bias) of each group in turn, then out_index."""
        return (*(t for group in self.groups for t in group), self.out_index)


def portable_inputs(meta: ForwardMetadata, num_heads: int, num_kv_heads: int) -> PortableInputs:
    dev, Hq, Hkv, G, i32 = meta.positions.device, num_heads, num_kv_heads, num_heads // num_kv_heads, torch.int32
    B, E, L, T = meta.batch_size, max(meta.extend_lens_cpu), max(meta.seq_lens_cpu), meta.num_tokens
    j = torch.arange(L, device=dev)[None, :]
    in_seq = j < meta.seq_lens[:, None]  # [B, L]
    slots = torch.where(in_seq, meta.req_to_token[:, :L].long(), 0)  # [B, L]
    kv_index = (slots[:, None, :] * Hkv + torch.arange(Hkv, device=dev)[None, :, None]).to(i32)  # [B, Hkv, L]
    if E == 1:  # each query sees its whole sequence
        bias = torch.zeros((B, L), dtype=torch.float32, device=dev).masked_fill_(~in_seq, float("-inf"))
        bias = bias[:, None, None, :].expand(B, Hkv, G, L).contiguous()
        unused = torch.zeros((1, Hkv, 1), dtype=i32, device=dev), torch.zeros((1, Hq), dtype=i32, device=dev)
        return PortableInputs(ONE_TOKEN, ((unused[0], kv_index, bias),), unused[1])
    S = -(-E // QUERY_GROUPS)  # new-token rows per group
    ext, prefix = meta.extend_lens.long(), meta.prefix_lens.long()
    starts = ext.cumsum(0) - ext  # [B] first row of each sequence
    e = torch.arange(S * QUERY_GROUPS, device=dev)  # every group's new-token rows; those past E are padding
    query_pos = (prefix[:, None] + e[None, :]).repeat_interleave(G, dim=1)  # [B, R]; padding rows see a superset
    hidden = j[:, None, :] > query_pos[:, :, None]  # [B, R, L]
    verify = meta.mode is ForwardMode.VERIFY
    if verify:  # draft tokens see the prefix and what their tree-mask row allows
        for b, (n, length) in enumerate(zip(meta.extend_lens_cpu, meta.seq_lens_cpu)):
            hidden[b, : n * G, :length] = ~meta.visible(b).to(dev).repeat_interleave(G, dim=0)
    q_rows = torch.where(e[None, :] < ext[:, None], starts[:, None] + e[None, :], 0)  # [B, S * groups], padding -> 0
    q_index = (q_rows[:, None, :, None] * Hq + torch.arange(Hq, device=dev).view(Hkv, 1, G)).reshape(B, Hkv, -1).to(i32)
    groups = []
    for i in range(QUERY_GROUPS):
        rows = slice(i * S * G, (i + 1) * S * G)
        # Keys the group's last query sees (a group of only padding rows still reads one key).
        width = L if verify else max(1, max(min(p + (i + 1) * S, n) for p, n in zip(meta.prefix_lens_cpu, meta.seq_lens_cpu)))
        bias = torch.zeros((B, Hkv, S * G, width), dtype=torch.float32, device=dev).masked_fill_(hidden[:, None, rows, :width], float("-inf"))
        groups.append((q_index[:, :, rows].contiguous(), kv_index[:, :, :width].contiguous(), bias))
    seq = torch.repeat_interleave(torch.arange(B, device=dev), ext, output_size=T)  # [T]
    e_of_row = torch.arange(T, device=dev) - starts[seq]
    group, e_in = e_of_row // S, e_of_row % S
    h = torch.arange(Hq, device=dev)
    out_index = B * Hkv * S * G * group[:, None] + ((seq[:, None] * Hkv + h // G) * S + e_in[:, None]) * G + h % G
    return PortableInputs(GENERAL, tuple(groups), out_index.to(i32))


class PortablePagedAttention(nn.Cell):
    """Pads the step to [B, Hkv, E * G] queries x [B, Hkv, L] keys, so one batched matmul covers
    ragged sequences, cached prefixes and decode alike, for any page size, and grouped-query
    heads without repeating K/V. Scores and softmax in float32. Keys and values are gathered
    straight into the layout the matmuls want (rows of the pool viewed as [S * Hkv, D]), so a
    step launches no transpose, scatter or concatenation.

    run() reads this step's K/V from the pool, like every other key: its caller stores them
    first (writes_kv is False: MindSpore copies a whole buffer that one graph both reads and
    writes as one tensor, so the writes go through other views of the pool:
    MindSporeKVCache.write, or the model graph's in-place scatter into `cache.keys`/`values`)."""

    writes_kv = False
    pads_scores = True  # scores of B * Hq * E * L values: the runner splits steps that exceed its limit

    def __init__(self, spec: AttentionSpec, layout: KVLayout, device: str, exchange: MindSporeExchange):
        super().__init__()
        self.num_heads, self.num_kv_heads = spec.num_heads, spec.num_kv_heads
        self.head_dim, self.v_head_dim, self.scale = spec.head_dim, spec.v_head_dim, spec.scale
        self.exchange = exchange
        self.slots: torch.Tensor | None = None  # [T] int64, the step's out_cache_loc (for `forward` only)
        self.inputs: tuple = ()
        self.variant = GENERAL

    def signature(self, batch: int | None = None, variant: int = GENERAL) -> tuple[Tensor, ...]:
        """The shapes of `inputs` for mindspore.enable_dynamic, None where steps differ. batch:
        the fixed size of the one-token steps a graph runs (`ForwardMetadata.padded_decode`), whose
        q_index and out_index are placeholders; None: any step. variant: the steps' variant (its
        number of query groups sets the length of `inputs`)."""
        Hq, Hkv, i32 = self.num_heads, self.num_kv_heads, ms.int32
        R = None if batch is None else Hq // Hkv
        group = (
            Tensor(shape=[None, Hkv, None] if batch is None else [1, Hkv, 1], dtype=i32),  # q_index [B, Hkv, R]
            Tensor(shape=[batch, Hkv, None], dtype=i32),  # kv_index [B, Hkv, L]
            Tensor(shape=[batch, Hkv, R, None], dtype=ms.float32),  # bias [B, Hkv, R, L]
        )
        out_index = Tensor(shape=[None, Hq] if batch is None else [1, Hq], dtype=i32)  # [T, Hq]
        return group * (QUERY_GROUPS if variant == GENERAL else 1) + (out_index,)

    @staticmethod
    def cache_views(cache: MindSporeKVCache) -> tuple[tuple, tuple | None]:
        return cache.key_rows, cache.value_rows

    def plan(self, meta: ForwardMetadata) -> None:
        p = portable_inputs(meta, self.num_heads, self.num_kv_heads)
        self.slots = meta.out_cache_loc
        self.inputs = mutable(tuple(self.exchange.from_torch(t) for t in p.tensors()))
        self.variant = p.variant

    def forward(self, layer: int, q: Tensor, k: Tensor, v: Tensor | None, cache: MindSporeKVCache) -> Tensor:
        cache.write(layer, self.exchange.from_torch(self.slots), k, v)
        v_rows = None if cache.value_rows is None else cache.value_rows[layer]
        return self.run(q, k, v, cache.key_rows[layer], v_rows, self.inputs, self.variant)

    def run(self, q, k, v, k_rows, v_rows, inputs, variant):
        """q [T, Hq, D]; k_rows/v_rows: the pool as [S * Hkv, D/Dv] (`cache_views`), holding this
        step's k/v already; v_rows None: latent attention, whose values are the keys' first Dv
        channels -> [T, Hq, Dv] in q's dtype. k and v are not read (the pool has them)."""
        Hkv, D, Dv = self.num_kv_heads, self.head_dim, self.v_head_dim
        outs = []
        for i in range(0, len(inputs) - 1, 3):  # each query group (a graph constant: unrolled)
            q_index, kv_index, bias = inputs[i], inputs[i + 1], inputs[i + 2]
            if variant == ONE_TOKEN:
                qp = q.reshape(-1, Hkv, self.num_heads // Hkv, D)  # [B, Hkv, G, D]
            else:
                qp = ops.gather(q.reshape(-1, D), q_index, 0)  # [B, Hkv, R, D]
            keys = cast(ops.gather(k_rows, kv_index, 0), ms.float32)  # [B, Hkv, L, D]
            if v_rows is None:
                vals = keys[..., :Dv]
            else:
                vals = cast(ops.gather(v_rows, kv_index, 0), ms.float32)  # [B, Hkv, L, Dv]
            # The scale on the queries (R x D values) rather than on the scores (R x L): one pass less
            # over the step's largest tensor per layer (exact when the scale is a power of two, as 1/8 is).
            probs = ops.softmax(_bmm_t(cast(qp, ms.float32) * self.scale, keys) + bias, -1)  # [B, Hkv, R, L]
            outs.append(_bmm(probs, vals).reshape(-1, Dv))  # [B * Hkv * R, Dv]
        if variant == ONE_TOKEN:
            return cast(outs[0].reshape(-1, self.num_heads, Dv), q.dtype)  # [B, Hq, Dv]
        out = outs[0] if len(outs) == 1 else ops.cat(outs, 0)
        return cast(ops.gather(out, inputs[-1], 0), q.dtype)  # [T, Hq, Dv]


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
    """[T, L]: 0 where new token t may see key j (j <= positions[t]; in a VERIFY step, the
    committed prefix and the draft tokens its tree-mask row allows), MASK_VALUE elsewhere."""
    j = torch.arange(max(meta.seq_lens_cpu), device=meta.positions.device)
    hidden = j[None, :] > meta.positions[:, None]
    if meta.mode is ForwardMode.VERIFY:
        row = 0
        for b, (n, length) in enumerate(zip(meta.extend_lens_cpu, meta.seq_lens_cpu)):
            hidden[row : row + n] = True
            hidden[row : row + n, :length] = ~meta.visible(b).to(j.device)
            row += n
    return torch.zeros(hidden.shape, dtype=dtype, device=j.device).masked_fill_(hidden, MASK_VALUE)


def flash_causal_mask(device: torch.device | str = "cpu") -> torch.Tensor:
    """flash_attention_score's compressed causal mask for sparse_mode 3: [2048, 2048] uint8,
    1 (discard) strictly above the diagonal."""
    return torch.ones(FLASH_MASK_SIZE, FLASH_MASK_SIZE, dtype=torch.uint8, device=device).triu_(1)


def ascend_inputs(meta: ForwardMetadata, dtype: torch.dtype, flash: bool = True) -> AscendInputs:
    """flash=False: never the FLASH variant (latent attention, whose values are part of the keys,
    runs every prefill through paged_attention after reshape_and_cache)."""
    dev = meta.positions.device
    if flash and not any(meta.prefix_lens_cpu):
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
    writes the new K/V itself (reshape_and_cache), before paged_attention reads them. Latent
    attention (no V pool) caches keys only and passes the key pages as paged_attention's values,
    of which it reads the first Dv channels (mla_v_dim)."""

    writes_kv = True
    pads_scores = False  # the fused kernels hold no [new tokens, keys] scores

    def __init__(self, spec: AttentionSpec, layout: KVLayout, device: str, exchange: MindSporeExchange):
        super().__init__()
        self.num_heads, self.scale, self.dtype = spec.num_heads, spec.scale, layout.dtype
        self.kv_width = spec.num_kv_heads * spec.head_dim  # reshape_and_cache takes k, v as [T, Hkv * D]
        self.latent = layout.v_shape is None
        self.exchange = exchange
        self.reshape_and_cache = ops.auto_generate.ReshapeAndCache()
        mla_v_dim = spec.v_head_dim if self.latent else 0
        self.paged_attention = ops.auto_generate.PagedAttention(spec.num_heads, spec.scale, spec.num_kv_heads, mla_v_dim=mla_v_dim)
        self.causal_mask = exchange.from_torch(flash_causal_mask(device))
        self.inputs: tuple = ()
        self.variant = FLASH

    def signature(self, batch: int | None = None, variant: int = FLASH) -> tuple[Tensor, ...]:
        """As `PortablePagedAttention.signature` (every variant's inputs have these shapes); a
        one-token step's lookahead_mask is a placeholder."""
        i32, B = ms.int32, batch
        return (
            Tensor(shape=[B], dtype=i32),  # slot_mapping [T]
            Tensor(shape=[B, None], dtype=i32),  # block_tables [B, pages]
            Tensor(shape=[B], dtype=i32),  # context_lens [B]
            Tensor(shape=[B], dtype=i32),  # q_seq_lens [B]
            Tensor(shape=[B], dtype=i32),  # actual_seq_qlen [B]
            Tensor(shape=[None, None] if B is None else [1, 1], dtype=ms_dtype(self.dtype)),  # lookahead_mask [T, L]
        )

    @staticmethod
    def cache_views(cache: MindSporeKVCache) -> tuple[tuple, tuple]:
        return cache.key_pages, cache.value_pages

    def plan(self, meta: ForwardMetadata) -> None:
        a = ascend_inputs(meta, self.dtype, flash=not self.latent)
        self.inputs = mutable(tuple(self.exchange.from_torch(t) for t in a.tensors()))
        self.variant = a.variant

    def forward(self, layer: int, q: Tensor, k: Tensor, v: Tensor | None, cache: MindSporeKVCache) -> Tensor:
        v_pages = None if cache.value_pages is None else cache.value_pages[layer]
        return self.run(q, k, v, cache.key_pages[layer], v_pages, self.inputs, self.variant)

    def run(self, q, k, v, k_pages, v_pages, inputs, variant):
        q = ops.depend(q, self.store(k, v, k_pages, v_pages, inputs))  # the kernels read what store wrote
        return self.attend(q, k, v, k_pages, v_pages, inputs, variant)

    def store(self, k, v, k_pages, v_pages, inputs):
        v = None if v is None else v.reshape(-1, self.kv_width)
        return self.reshape_and_cache(k.reshape(-1, self.kv_width), v, k_pages, v_pages, inputs[0])

    def attend(self, q, k, v, k_pages, v_pages, inputs, variant):
        _, tables, context_lens, q_seq_lens, actual_seq_qlen, mask = inputs
        if variant == FLASH:
            return ops.flash_attention_score(
                q, k, v, self.num_heads, attn_mask=self.causal_mask, actual_seq_qlen=actual_seq_qlen,
                actual_seq_kvlen=actual_seq_qlen, scalar_value=self.scale, next_tokens=0, input_layout="TND", sparse_mode=3,
            )
        if v_pages is None:  # latent attention: paged_attention reads the values from the key pages
            v_pages = k_pages
        if variant == DECODE:
            return self.paged_attention(q, k_pages, v_pages, tables, context_lens)
        return self.paged_attention(q, k_pages, v_pages, tables, context_lens, None, None, mask, q_seq_lens)


def make_attention(spec: AttentionSpec, layout: KVLayout, device: str, dtype: torch.dtype, exchange: MindSporeExchange):
    """The tier `choose_tier` picks for `device`, compute `dtype` and `layout`."""
    cls = AscendPagedAttention if choose_tier(device, layout, dtype) is Tier.ASCEND else PortablePagedAttention
    return cls(spec, layout, device, exchange)
