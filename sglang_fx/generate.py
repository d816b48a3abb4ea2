"""A small standalone engine: one backend runner over a PagedKVPool, greedy decoding, with
prefix reuse between the sequences of a session. Used outside SGLang by the conformance suite,
the benchmarks and the demo; inside SGLang, SGLang's scheduler plays this part.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from .checkpoint import Checkpoint, load_spec
from .eagle3 import SHAREABLE, draft_weights
from .errors import KVPoolFullError
from .kv_pool import PagedKVPool, layout_for
from .metadata import ForwardMetadata
from .parallel import SINGLE, Parallel
from .registry import Backend, load_backend
from .sharding import Shard
from .spi import RunnerOptions


class Session:
    """A model loaded by one backend, with its own KV pool.

    Sequences live in the pool while a session keeps them; after `generate` they stay cached
    (prefix reuse) until the pool needs their pages.
    """

    def __init__(
        self,
        backend: Backend | str,
        model_path: str | Path,
        *,
        dtype: str | None = None,
        device: str = "cpu",
        page_size: int = 16,
        max_total_tokens: int = 8192,
        options: Mapping[str, str] | None = None,
        parallel: Parallel = SINGLE,
        target: Session | None = None,
    ):
        """parallel: this process's rank in a tensor-parallel world (`sglang_fx.distributed`
        starts one); every rank of it runs the same Session calls in step. target: for an EAGLE3
        draft checkpoint, its target's Session, whose embedding (and head, where the draft has
        none) it shares (`eagle3.draft_weights`)."""
        self.backend = load_backend(backend) if isinstance(backend, str) else backend
        self.spec = load_spec(model_path, dtype)
        self.backend.check(architecture=self.spec.architecture, dtype=self.spec.dtype_name, device=device, page_size=page_size,
                           tp_size=parallel.tp_size, ep_size=parallel.ep_size,
                           quantization=self.spec.quant.scheme if self.spec.quant else None)  # fmt: skip
        shard = Shard.of(self.spec, parallel)
        weights = Checkpoint(model_path).load(self.spec, shard)
        if self.spec.eagle3 is not None:
            if target is None:
                raise ValueError(f"{model_path} is an EAGLE3 draft; give its target's Session (target=...)")
            weights = draft_weights(self.spec, weights, target.weights)
        # What an EAGLE3 draft may share with this Session as its target (embedding, head), or a
        # draft's own weights; a target keeps no others, which are the runner's to keep or drop
        # (holding all of them kept the checkpoint's unfused tensors alive: +270 MB on SmolLM2).
        self.weights = weights if self.spec.eagle3 is not None else {k: weights[k] for k in SHAREABLE if k in weights}
        self.layout = layout_for(shard.local, num_pages=-(-max_total_tokens // page_size), page_size=page_size)
        self.device = device
        self.pool = PagedKVPool(self.layout, device)
        # The runner first, as in SGLang: under tensor parallelism it starts the backend's collective
        # library, which some frameworks (JAX) must do before any other work in the process.
        self.runner = self.backend.runner(self.spec, weights, RunnerOptions(device, dict(options or {}), parallel))
        self.cache = self.backend.kv_cache(self.layout, self.pool.k_buffers, self.pool.v_buffers, device)
        self._tokens: dict[int, list[int]] = {}  # live or cached sequence -> its tokens in the pool
        self._ids = itertools.count()

    def forward(self, seqs: Sequence[int], new_tokens: Sequence[Sequence[int]], logits: str = "last") -> torch.Tensor:
        """Append new_tokens[i] to sequence seqs[i] (all in one step) and return the logits
        ([num_seqs, vocab] for "last", [total_new, vocab] for "all")."""
        ids, meta = self._step(seqs, new_tokens, logits)
        return self.runner.forward(ids, meta, self.cache)

    def forward_hidden(self, seqs: Sequence[int], new_tokens: Sequence[Sequence[int]], logits: str = "last", *,
                       capture: Sequence[int] = (), hidden: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
        """`forward` through ModelRunner.forward_hidden (SPI 1.4, a backend declaring eagle3):
        (logits, hidden_out [total_new, ...]) with a target's `capture` or a draft's `hidden`."""
        ids, meta = self._step(seqs, new_tokens, logits)
        return self.runner.forward_hidden(ids, meta, self.cache, capture=capture, hidden=hidden)

    def _step(self, seqs: Sequence[int], new_tokens: Sequence[Sequence[int]], logits: str) -> tuple[torch.Tensor, ForwardMetadata]:
        prefix = [self.pool.length(s) if s in self.pool else 0 for s in seqs]
        self.pool.reserve_many({s: len(t) for s, t in zip(seqs, new_tokens)})
        meta = ForwardMetadata.from_lists(
            token_slots=[self.pool.slots(s) for s in seqs],
            prefix_lens=prefix,
            logits=logits,
            page_size=self.layout.page_size,
            device=self.device,
        )
        for s, t in zip(seqs, new_tokens):
            self._tokens.setdefault(s, []).extend(t)
        ids = torch.tensor([t for ts in new_tokens for t in ts], dtype=torch.int64, device=self.device)
        return ids, meta

    def new_sequence(self, prompt: Sequence[int]) -> tuple[int, int]:
        """Create a sequence for `prompt`, sharing the pages of the longest cached prefix.
        Returns (sequence id, number of prompt tokens already in the pool). At least one
        prompt token is always left to compute, so that its logits exist."""
        seq = next(self._ids)
        best, best_len = None, 0
        for other, toks in self._tokens.items():
            n = _common_prefix(toks, prompt[:-1])
            if n > best_len:
                best, best_len = other, n
        shared = self.pool.fork(seq, best, best_len) if best is not None else 0
        if shared:
            self._tokens[seq] = list(prompt[:shared])
        return seq, shared

    def release(self, seq: int) -> None:
        self.pool.release(seq)
        self._tokens.pop(seq, None)

    def clear(self) -> None:
        for seq in list(self._tokens):
            self.release(seq)

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, keep_cached: bool = True) -> list[list[int]]:
        """Greedy-decode max_new_tokens for each prompt: one ragged extend step for all
        prompts (reusing cached prefixes), then one decode step per token for the batch."""
        if any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        try:
            return self._generate(prompts, max_new_tokens, keep_cached)
        except KVPoolFullError:
            if not self._tokens:
                raise
            self.clear()  # drop the prefix cache and try once more with an empty pool
            return self._generate(prompts, max_new_tokens, keep_cached)

    def _generate(self, prompts, max_new_tokens, keep_cached):
        seqs, new = [], []
        try:
            for p in prompts:
                seq, shared = self.new_sequence(p)
                seqs.append(seq)
                new.append(list(p[shared:]))
            out: list[list[int]] = [[] for _ in prompts]
            logits = self.forward(seqs, new)
            for step in range(max_new_tokens):
                nxt = logits.argmax(-1).tolist()
                for o, t in zip(out, nxt):
                    o.append(t)
                if step + 1 < max_new_tokens:
                    logits = self.forward(seqs, [[t] for t in nxt])
            return out
        except BaseException:
            keep_cached = False
            raise
        finally:
            if not keep_cached:
                for s in seqs:
                    if s in self.pool:
                        self.release(s)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
