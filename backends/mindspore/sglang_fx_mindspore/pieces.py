"""Splitting an extend step whose attention would be too large into pieces run one after another.

The portable attention computes one [B, Hkv, E * G, L] score tensor per layer (`attention.py`):
B * Hq * E * L float32 values, with its mask and probabilities beside it. That is quadratic in a
long prompt's tokens (an 8192-token prompt of SmolLM2: 2.4 GB per tensor). So a step whose
scores would exceed a limit runs as several steps, in order, each a valid step of its own:
whole sequences grouped while their scores fit, and a sequence too long for the limit cut into
chunks of consecutive new tokens, each chunk a step whose cached prefix includes the chunks
before it (stored by the time it runs). That is SGLang's chunked prefill, done inside the step:
the pool ends as after the whole step, each token sees exactly the keys it saw, and the memory
of a step's attention is bounded by the limit (linear in its tokens). It runs on the graphs
the runner has anyway (the dynamic graph takes any step), so it compiles nothing new.

The same split spares the work padding wastes on a ragged step: every sequence's queries are
padded to the longest's (E) and its keys to L, so a 512-token prompt beside three short ones
costs four 512 x 512 score blocks. Sequences go together only while that padding costs less
than WASTE score values per layer (below that, one more step's fixed cost outweighs it).

Framework-neutral (torch and ForwardMetadata only): any backend whose attention pads per step
can use it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sglang_fx.metadata import ForwardMetadata


#: Score values per layer that padding may waste before sequences run as separate pieces: about
#: the attention work of one step's fixed cost (kernel launches, host planning) on SmolLM2, CPU.
WASTE = 1 << 20


def attention_scores(meta: ForwardMetadata, num_heads: int) -> int:
    """Values in the portable attention's score tensor for this step: B * Hq * E * L."""
    return meta.batch_size * num_heads * max(meta.extend_lens_cpu) * max(meta.seq_lens_cpu)


@dataclass(frozen=True)
class Piece:
    """One sub-step: its metadata and input_ids [T'], and which of the whole step's logits rows
    it computes. logits_rows [N'] int64: positions in the whole step's logits_indices of the
    piece's first N' logits; the piece may compute one more (its last token's, when it needs
    none: a step always returns at least one row), which the caller drops."""

    meta: ForwardMetadata
    input_ids: torch.Tensor
    logits_rows: torch.Tensor


def split(meta: ForwardMetadata, input_ids: torch.Tensor, num_heads: int, limit: int) -> list[Piece]:
    """meta's step as pieces whose `attention_scores` are at most `limit` (a sequence chunk of
    one token is the least piece: then its own B * Hq * L is the bound), and whose padding wastes
    at most WASTE score values per layer more than running its sequences apart would. One
    piece, meta itself, when the step needs no split."""

    def scores(group: list[tuple[int, int, int]]) -> int:
        E = max(c - a for _, a, c in group)
        return len(group) * num_heads * E * max(meta.prefix_lens_cpu[b] + c for b, _, c in group)

    # (sequence, first new token, end new token) items: a sequence cut into chunks that fit alone
    items: list[tuple[int, int, int]] = []
    for b, (ext, seq_len) in enumerate(zip(meta.extend_lens_cpu, meta.seq_lens_cpu)):
        chunk = max(1, limit // (num_heads * seq_len))
        items += [(b, a, min(a + chunk, ext)) for a in range(0, ext, chunk)]
    groups: list[list[tuple[int, int, int]]] = [[items[0]]]
    for item in items[1:]:  # consecutive items (a sequence appears once per group)
        group = groups[-1] + [item]
        merged = scores(group)
        if merged > limit or item[0] == groups[-1][-1][0] or merged > scores(groups[-1]) + scores([item]) + WASTE:
            groups.append([item])
        else:
            groups[-1] = group
    if len(groups) == 1:
        return [Piece(meta, input_ids, torch.arange(len(meta.logits_indices)))]
    starts = [0]
    for e in meta.extend_lens_cpu:
        starts.append(starts[-1] + e)
    return [_piece(meta, input_ids, group, starts) for group in groups]


def _piece(meta: ForwardMetadata, input_ids: torch.Tensor, group: list[tuple[int, int, int]], starts: list[int]) -> Piece:
    dev = meta.positions.device
    seqs = [b for b, _, _ in group]
    rows = torch.cat([torch.arange(starts[b] + a, starts[b] + c, device=dev) for b, a, c in group])  # of the whole step
    prefix = [meta.prefix_lens_cpu[b] + a for b, a, _ in group]
    ext = [c - a for _, a, c in group]
    seq_lens = [p + e for p, e in zip(prefix, ext)]
    local = torch.full((meta.num_tokens,), -1, dtype=torch.int64, device=dev)
    local[rows] = torch.arange(len(rows), device=dev)
    wanted = local[meta.logits_indices]  # each logit row's place in this piece, -1 elsewhere
    logits_rows = torch.nonzero(wanted >= 0).flatten()
    logits_indices = wanted[logits_rows]
    if len(logits_indices) == 0:  # the step computes at least one logit row; it is dropped
        logits_indices = torch.tensor([len(rows) - 1], dtype=torch.int64, device=dev)

    def i32(values):
        return torch.tensor(values, dtype=torch.int32, device=dev)

    index = torch.tensor(seqs, device=dev)
    piece = ForwardMetadata(
        mode=meta.mode,
        positions=meta.positions[rows],
        out_cache_loc=meta.out_cache_loc[rows],
        seq_lens=i32(seq_lens),
        prefix_lens=i32(prefix),
        extend_lens=i32(ext),
        req_to_token=meta.req_to_token[index],
        logits_indices=logits_indices,
        page_size=meta.page_size,
        seq_lens_cpu=tuple(seq_lens),
        prefix_lens_cpu=tuple(prefix),
        extend_lens_cpu=tuple(ext),
    )
    return Piece(piece, input_ids[rows], logits_rows)
