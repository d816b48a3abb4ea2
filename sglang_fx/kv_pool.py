"""The paged KV pool: its layout (shared with backends), and a standalone pool with a page
allocator for running outside SGLang (conformance, benchmarks, the demo).

Memory layout, the same as SGLang's token-to-KV pools so that a backend written against this
pool also works on SGLang's buffers: per layer, one K buffer of shape
[num_slots, *k_shape] and (unless MLA) one V buffer of shape [num_slots, *v_shape], where
num_slots = num_pages * page_size and the slots of page p are p*P .. p*P + P - 1. The host
(torch) owns the buffers; backends alias them through DLPack and never copy them per step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from .errors import KVPoolFullError

if TYPE_CHECKING:
    from .checkpoint import ModelSpec


@dataclass(frozen=True)
class KVLayout:
    """Shape of a paged KV pool.

    num_layers  attention layers, one K (and V) buffer each.
    num_pages   pages in the pool; page_size tokens per page.
    k_shape     per-token shape of a K entry, e.g. (num_kv_heads, head_dim); for MLA
                (1, kv_lora_rank + qk_rope_head_dim), the compressed latent.
    v_shape     per-token shape of a V entry, or None when the layer keeps K only (MLA).
    dtype       element dtype, a torch dtype.
    """

    num_layers: int
    num_pages: int
    page_size: int
    k_shape: tuple[int, ...]
    v_shape: tuple[int, ...] | None
    dtype: torch.dtype

    @property
    def num_slots(self) -> int:
        return self.num_pages * self.page_size

    def bytes_per_token(self) -> int:
        per_layer = _numel(self.k_shape) + (_numel(self.v_shape) if self.v_shape else 0)
        return per_layer * self.num_layers * self.dtype.itemsize

    def check_buffers(self, k_buffers: list[torch.Tensor], v_buffers: list[torch.Tensor] | None) -> None:
        """ValueError unless there is one K buffer per layer, and one V buffer per layer exactly
        when the layout has V (what a backend's KVCache checks before aliasing them)."""
        if len(k_buffers) != self.num_layers or (v_buffers is not None and len(v_buffers) != self.num_layers):
            raise ValueError(f"expected {self.num_layers} K (and V) buffers, one per layer")
        if (v_buffers is None) != (self.v_shape is None):
            raise ValueError("v_buffers must be given exactly when layout.v_shape is not None")


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


class PageAllocator:
    """Hands out page ids from a free list, with reference counts so that sequences can share
    prefix pages. alloc() either returns all pages asked for or raises KVPoolFullError
    without changing anything."""

    def __init__(self, num_pages: int):
        if num_pages < 1:
            raise ValueError(f"num_pages must be >= 1, got {num_pages}")
        self.num_pages = num_pages
        self._free = list(range(num_pages - 1, -1, -1))  # pop() hands out page 0 first
        self._refs = [0] * num_pages

    @property
    def num_free(self) -> int:
        return len(self._free)

    def alloc(self, n: int) -> list[int]:
        if n > len(self._free):
            raise KVPoolFullError(
                f"KV pool out of pages: {n} needed, {len(self._free)} free of {self.num_pages}. "
                "Release finished sequences, or create the pool with more pages "
                "(num_pages / --max-total-tokens)."
            )
        pages = [self._free.pop() for _ in range(n)]
        for p in pages:
            self._refs[p] = 1
        return pages

    def share(self, pages: list[int]) -> None:
        for p in pages:
            if self._refs[p] == 0:
                raise ValueError(f"page {p} is not allocated")
            self._refs[p] += 1

    def free(self, pages: list[int]) -> None:
        for p in pages:
            if self._refs[p] == 0:
                raise ValueError(f"page {p} freed twice")
            self._refs[p] -= 1
            if self._refs[p] == 0:
                self._free.append(p)


@dataclass
class _Sequence:
    pages: list[int] = field(default_factory=list)
    length: int = 0  # tokens with a slot


class PagedKVPool:
    """A standalone paged KV pool: torch buffers in the layout above, plus per-sequence page
    lists. Sequences are identified by any hashable id chosen by the caller.

    Typical step: `reserve(seq, n)` gives the slots of n new tokens; `slots(seq)` lists every
    slot of the sequence for ForwardMetadata.req_to_token.
    """

    def __init__(self, layout: KVLayout, device: torch.device | str = "cpu"):
        self.layout = layout
        self.device = torch.device(device)
        n = layout.num_slots
        self.k_buffers = [torch.zeros((n, *layout.k_shape), dtype=layout.dtype, device=device) for _ in range(layout.num_layers)]
        self.v_buffers = (
            [torch.zeros((n, *layout.v_shape), dtype=layout.dtype, device=device) for _ in range(layout.num_layers)]
            if layout.v_shape is not None
            else None
        )
        self.allocator = PageAllocator(layout.num_pages)
        self._seqs: dict[object, _Sequence] = {}

    def __contains__(self, seq_id: object) -> bool:
        return seq_id in self._seqs

    def length(self, seq_id: object) -> int:
        return self._seqs[seq_id].length

    def slots(self, seq_id: object, start: int = 0) -> list[int]:
        """KV slot of every token of the sequence from token `start` on, in order."""
        seq, p = self._seqs[seq_id], self.layout.page_size
        return [seq.pages[j // p] * p + j % p for j in range(start, seq.length)]

    def reserve(self, seq_id: object, num_tokens: int) -> list[int]:
        """Give the next num_tokens tokens of the sequence (created if new) their slots.
        Raises KVPoolFullError, changing nothing, if the pool lacks the pages."""
        return self.reserve_many({seq_id: num_tokens})[seq_id]

    def reserve_many(self, requests: dict[object, int]) -> dict[object, list[int]]:
        """reserve() for several sequences at once: all succeed, or nothing changes."""
        p = self.layout.page_size
        need = {}
        for seq_id, n in requests.items():
            if n < 0:
                raise ValueError(f"cannot reserve {n} tokens")
            length = self._seqs[seq_id].length if seq_id in self._seqs else 0
            have = len(self._seqs[seq_id].pages) if seq_id in self._seqs else 0
            need[seq_id] = -(-(length + n) // p) - have
        pages = self.allocator.alloc(sum(need.values()))
        out = {}
        for seq_id, n in requests.items():
            seq = self._seqs.setdefault(seq_id, _Sequence())
            seq.pages += [pages.pop() for _ in range(need[seq_id])]
            start = seq.length
            seq.length += n
            out[seq_id] = self.slots(seq_id, start)
        return out

    def fork(self, new_id: object, src_id: object, num_tokens: int) -> int:
        """Start sequence new_id sharing the first pages of src_id (a prefix-cache hit).
        Only whole pages are shared; returns the number of tokens shared (a multiple of
        page_size, at most num_tokens)."""
        if new_id in self._seqs:
            raise ValueError(f"sequence {new_id!r} already exists")
        src, p = self._seqs[src_id], self.layout.page_size
        num_pages = min(num_tokens, src.length) // p
        shared = src.pages[:num_pages]
        self.allocator.share(shared)
        self._seqs[new_id] = _Sequence(pages=list(shared), length=num_pages * p)
        return num_pages * p

    def release(self, seq_id: object) -> None:
        self.allocator.free(self._seqs.pop(seq_id).pages)


def layout_for(spec: ModelSpec, *, num_pages: int, page_size: int, dtype: torch.dtype | None = None) -> KVLayout:
    """The KV layout a model of `spec` needs: per token and layer, one K and one V entry of
    (num_kv_heads, head_dim); with MLA, one latent K entry (1, kv_lora_rank + qk_rope_head_dim)
    and no V (values are the latent's first kv_lora_rank channels)."""
    if spec.mla is not None:
        k_shape, v_shape = (1, spec.mla.kv_lora_rank + spec.mla.qk_rope_head_dim), None
    else:
        k_shape = v_shape = (spec.num_kv_heads, spec.head_dim)
    return KVLayout(spec.num_layers, num_pages, page_size, k_shape, v_shape, dtype or spec.dtype)
