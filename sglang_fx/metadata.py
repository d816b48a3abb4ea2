"""ForwardMetadata: everything a backend needs to know about one forward step, as plain data.

Built once per step by the host (SGLang's adapter, or the standalone `Generator`) and handed to
the backend's runner, which hands it to its attention's `plan`. No global context: a backend
reads this and nothing else about the batch.

Notation used in the shapes below:
    B  number of sequences in the step
    T  number of new tokens in the step, sum(extend_lens); T == B in decode
    L  max(seq_lens)
    N  number of tokens whose logits are wanted (len(logits_indices))
    D_b  new tokens of sequence b (extend_lens[b]); in a VERIFY step, its draft tokens
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Sequence
from dataclasses import dataclass

import torch


class ForwardMode(enum.Enum):
    EXTEND = "extend"  # one or more new tokens per sequence, possibly after a cached prefix
    DECODE = "decode"  # exactly one new token per sequence
    VERIFY = "verify"  # speculative verification: D_b draft tokens per sequence, a tree mask among them


@dataclass(frozen=True, eq=False)
class ForwardMetadata:
    """One step of a batch. All tensors are torch tensors on the step's device.

    New tokens are packed sequence by sequence: sequence b owns rows
    [cu_extend[b], cu_extend[b] + extend_lens[b]) of every [T, ...] tensor.

    Fields:
        mode            EXTEND or DECODE.
        positions       [T] int64. Absolute position of each new token in its sequence: new token
                        i of sequence b is at prefix_lens[b] + i.
        out_cache_loc   [T] int64. KV-pool slot each new token's K/V is written to.
        seq_lens        [B] int32. Tokens in each sequence after this step (prefix + new).
        prefix_lens     [B] int32. Tokens already in the KV pool before this step.
        extend_lens     [B] int32. New tokens per sequence; seq_lens == prefix_lens + extend_lens.
        req_to_token    [B, >=L] int32. KV-pool slot of token j of sequence b, valid for
                        j < seq_lens[b] (includes this step's new tokens); entries past
                        seq_lens[b] are undefined (SGLang leaves other requests' slots or
                        garbage there): mask them before gathering with them. With page size P,
                        slots of one page are contiguous: slot // P is the page, slot % P the
                        offset, and req_to_token[b, j] % P == j % P.
        logits_indices  [N] int64. Rows of the T new tokens whose logits are returned, in order.
        page_size       KV pool page size in tokens.
        seq_lens_cpu, prefix_lens_cpu, extend_lens_cpu
                        The same lengths as Python ints, for shape decisions without a device
                        sync. Must agree with the tensors.
        tree_mask       None, except in a VERIFY step: [sum_b D_b * D_b] bool, sequence by
                        sequence, each a row-major [D_b, D_b] block: entry (i, j) of sequence b
                        is True iff its new token i sees its new token j (j is i itself or an
                        ancestor of i in the draft tree; always True for i == j).

    VERIFY (speculative decoding's verify step; only for a backend whose Capabilities.verify
    declares it): sequence b has prefix_lens[b] committed tokens, all of which every new token
    sees, and D_b draft tokens forming a tree (a chain when each token's mask row is its
    predecessors). The new tokens' K/V go to out_cache_loc (and req_to_token[b, prefix_lens[b] +
    i] == out_cache_loc of new token i), like an EXTEND; only two things differ:
        positions   new token i is at prefix_lens[b] + depth_i, its depth in the tree (the
                    number of other new tokens it sees), not prefix_lens[b] + i;
        visibility  new token i sees the committed prefix and the new tokens its tree_mask row
                    allows, not all earlier new tokens. `visible(b)` builds that mask.
    logits_indices lists every new token (N == T). With a chain mask (token i sees tokens
    0..i) a VERIFY step computes exactly the EXTEND of the same tokens.
    """

    mode: ForwardMode
    positions: torch.Tensor
    out_cache_loc: torch.Tensor
    seq_lens: torch.Tensor
    prefix_lens: torch.Tensor
    extend_lens: torch.Tensor
    req_to_token: torch.Tensor
    logits_indices: torch.Tensor
    page_size: int
    seq_lens_cpu: tuple[int, ...]
    prefix_lens_cpu: tuple[int, ...]
    extend_lens_cpu: tuple[int, ...]
    tree_mask: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def num_tokens(self) -> int:
        return sum(self.extend_lens_cpu)

    def visible(self, b: int) -> torch.Tensor:
        """[D_b, seq_lens[b]] bool: which tokens of sequence b (by index in req_to_token[b]) each
        of its new tokens attends to. EXTEND/DECODE: causal (new token i sees tokens
        0..prefix_lens[b] + i). VERIFY: the whole committed prefix, plus the new tokens its row
        of the tree mask allows."""
        length, prefix, new = self.seq_lens_cpu[b], self.prefix_lens_cpu[b], self.extend_lens_cpu[b]
        device = self.req_to_token.device
        if self.mode is not ForwardMode.VERIFY:
            return torch.arange(length, device=device)[None, :] <= torch.arange(prefix, length, device=device)[:, None]
        start = sum(e * e for e in self.extend_lens_cpu[:b])
        tree = self.tree_mask[start : start + new * new].view(new, new).to(device=device, dtype=torch.bool)
        return torch.cat([torch.ones((new, prefix), dtype=torch.bool, device=device), tree], dim=1)

    @classmethod
    def verify_step(
        cls,
        *,
        token_slots: Sequence[Sequence[int]],
        prefix_lens: Sequence[int],
        tree_masks: Sequence[Sequence[Sequence[bool]]],
        page_size: int = 1,
        device: torch.device | str = "cpu",
    ) -> ForwardMetadata:
        """A VERIFY step (host-side helper): token_slots and prefix_lens as in `from_lists` (the
        slots after prefix_lens[b] are the draft tokens'), tree_masks[b] the [D_b, D_b] mask of
        sequence b (row i: the draft tokens new token i sees, itself included). Positions are
        prefix + depth; logits for every new token."""
        base = cls.from_lists(token_slots=token_slots, prefix_lens=prefix_lens, logits="all", page_size=page_size, device=device)
        masks = [torch.tensor(m, dtype=torch.bool).reshape(e, e) for m, e in zip(tree_masks, base.extend_lens_cpu)]
        if any(not bool(m.diagonal().all()) for m in masks):
            raise ValueError("every draft token must see itself: each tree mask needs True on its diagonal")
        depth = [int(p) + (m.sum(1) - 1) for m, p in zip(masks, prefix_lens)]
        return dataclasses.replace(
            base,
            mode=ForwardMode.VERIFY,
            positions=torch.cat(depth).to(device=device, dtype=torch.int64),
            tree_mask=torch.cat([m.flatten() for m in masks]).to(device),
        )

    @classmethod
    def from_lists(
        cls,
        *,
        token_slots: Sequence[Sequence[int]],
        prefix_lens: Sequence[int],
        logits: str = "last",
        page_size: int = 1,
        device: torch.device | str = "cpu",
    ) -> ForwardMetadata:
        """Build the metadata of a step from per-sequence slot lists (host-side helper).

        token_slots[b] lists the KV slots of every token of sequence b after this step
        (prefix then new tokens); prefix_lens[b] of them are already in the pool.
        logits: "last" (last new token of each sequence) or "all" (every new token).
        """
        if len(token_slots) != len(prefix_lens):
            raise ValueError("token_slots and prefix_lens must have one entry per sequence")
        seq_lens = [len(s) for s in token_slots]
        extend_lens = [s - p for s, p in zip(seq_lens, prefix_lens)]
        if any(e < 1 for e in extend_lens):
            raise ValueError(f"every sequence needs at least one new token, got {extend_lens}")
        positions = [j for s, p in zip(seq_lens, prefix_lens) for j in range(p, s)]
        out_loc = [slot for slots, p in zip(token_slots, prefix_lens) for slot in slots[p:]]
        width = max(seq_lens)
        table = torch.zeros((len(seq_lens), width), dtype=torch.int32)
        for b, slots in enumerate(token_slots):
            table[b, : len(slots)] = torch.tensor(slots, dtype=torch.int32)
        if logits == "last":
            ends = torch.tensor(extend_lens).cumsum(0) - 1
            indices = ends.tolist()
        elif logits == "all":
            indices = list(range(sum(extend_lens)))
        else:
            raise ValueError(f"logits must be 'last' or 'all', got {logits!r}")
        mode = ForwardMode.DECODE if all(e == 1 for e in extend_lens) and all(prefix_lens) else ForwardMode.EXTEND

        def t(values, dtype):
            return torch.tensor(values, dtype=dtype, device=device)

        return cls(
            mode=mode,
            positions=t(positions, torch.int64),
            out_cache_loc=t(out_loc, torch.int64),
            seq_lens=t(seq_lens, torch.int32),
            prefix_lens=t(list(prefix_lens), torch.int32),
            extend_lens=t(extend_lens, torch.int32),
            req_to_token=table.to(device),
            logits_indices=t(indices, torch.int64),
            page_size=page_size,
            seq_lens_cpu=tuple(seq_lens),
            prefix_lens_cpu=tuple(prefix_lens),
            extend_lens_cpu=tuple(extend_lens),
        )

    @property
    def one_token_each(self) -> bool:
        """Whether every sequence has exactly one new token and this is not a VERIFY step: the
        steps `padded_decode` may pad to a fixed-batch decode program."""
        return self.mode is not ForwardMode.VERIFY and all(n == 1 for n in self.extend_lens_cpu)

    def padded_decode(self, input_ids: torch.Tensor, batch_size: int) -> tuple[ForwardMetadata, torch.Tensor]:
        """This step and its input_ids [T] padded to `batch_size` sequences, for a backend that
        runs graphs of fixed batch size (one per bucket of sizes, as SGLang captures CUDA graphs).
        Only for a step where every sequence has one new token (T == B <= batch_size).

        The padding repeats the last sequence: its token, position, slot, req_to_token row and
        lengths. Each copy computes what that sequence does and stores the same K/V in the same
        slot, so the pool ends as without padding and no slot need be kept free for it.
        logits_indices is padded to batch_size entries by repeating its last one: rows
        [0, N) of the padded step's logits are this step's."""
        B, pad = self.batch_size, batch_size - self.batch_size
        if any(e != 1 for e in self.extend_lens_cpu) or pad < 0 or self.mode is ForwardMode.VERIFY:
            raise ValueError(f"padded_decode pads a one-token-per-sequence step of at most {batch_size} sequences, not a VERIFY step")
        if pad == 0 and len(self.logits_indices) == batch_size:
            return self, input_ids

        def last(t: torch.Tensor, n: int = pad) -> torch.Tensor:
            return torch.cat([t, t[-1:].expand(n, *t.shape[1:])])

        padded = ForwardMetadata(
            mode=self.mode,
            positions=last(self.positions),
            out_cache_loc=last(self.out_cache_loc),
            seq_lens=last(self.seq_lens),
            prefix_lens=last(self.prefix_lens),
            extend_lens=last(self.extend_lens),
            req_to_token=last(self.req_to_token[:B]),
            logits_indices=last(self.logits_indices, batch_size - len(self.logits_indices)),
            page_size=self.page_size,
            seq_lens_cpu=self.seq_lens_cpu + self.seq_lens_cpu[-1:] * pad,
            prefix_lens_cpu=self.prefix_lens_cpu + self.prefix_lens_cpu[-1:] * pad,
            extend_lens_cpu=self.extend_lens_cpu + (1,) * pad,
        )
        return padded, last(input_ids)
