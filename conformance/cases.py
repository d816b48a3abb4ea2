"""The conformance cases. Each is a function of a Context returning an Outcome with its figures;
`cases_for(ctx)` lists the ones that apply to the backend under test (its architectures).

Case names are stable ("attention/page16/decode"): known-gap lists refer to them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from sglang_fx.kv_pool import KVLayout, PagedKVPool
from sglang_fx.metadata import ForwardMetadata
from sglang_fx.parallel import SINGLE
from sglang_fx.spi import AttentionSpec

from .eagle3 import TOLERANCE as EAGLE3_TOLERANCE
from .context import MLA_ARCHES, REFERENCE_BACKEND, TOLERANCE, W8A8, Context, naive_attention


@dataclass(frozen=True)
class Outcome:
    passed: bool
    max_abs_diff: float | None = None
    token_agreement: float | None = None
    detail: str = ""


@dataclass(frozen=True)
class Case:
    """name: stable, e.g. "attention/page16/decode". checks: what it checks, one line.
    contract: the contract it tests and the file where it is written.
    skip: the reason it does not apply to the backend under test (by its declared capabilities),
    or None."""

    name: str
    run: Callable[[Context], Outcome]
    checks: str = ""
    contract: str = ""
    skip: Callable[[Context], str | None] | None = None

    def skip_reason(self, ctx: Context) -> str | None:
        return None if self.skip is None else self.skip(ctx)


def _close(diff: float, dtype: torch.dtype, what: str) -> Outcome:
    tol = TOLERANCE[dtype]
    return Outcome(diff <= tol, diff, None, f"{what}: max abs diff {diff:.3g} (tolerance {tol:g})")


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        raise AssertionError(f"shape {list(a.shape)} != expected {list(b.shape)}")
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


# --------------------------------------------------------------------------------------------
# Exchange
# --------------------------------------------------------------------------------------------

EXCHANGE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.int32, torch.int64)


def exchange_case(dtype: torch.dtype, contiguous: bool) -> Case:
    def run(ctx: Context) -> Outcome:
        ex = ctx.backend.exchange(ctx.device)
        g = torch.Generator().manual_seed(0)
        base = (torch.randn((6, 10), generator=g) * 100).to(dtype).to(ctx.device)
        t = base if contiguous else base[:, ::3].t()  # strided and transposed
        back = ex.to_torch(ex.from_torch(t))
        if back.dtype != t.dtype or back.shape != t.shape or back.device != t.device:
            return Outcome(False, None, None, f"round trip gave {back.dtype} {list(back.shape)} on {back.device}")
        diff = _max_diff(back, t)
        if diff != 0:
            return Outcome(False, diff, None, "values changed in the round trip")
        from sglang_fx.exchange import shares_memory

        if contiguous:
            if not shares_memory(back, t):
                return Outcome(False, 0.0, None, "contiguous round trip copied (must be zero-copy)")
            t.view(-1)[0] = 7
            if back.reshape(-1)[0].item() != 7:
                return Outcome(False, 0.0, None, "a write to the source is not seen through the exchanged tensor")
            return Outcome(True, 0.0, None, "zero-copy both ways; writes visible")
        try:
            ex.from_torch(t, copy=False)
        except BufferError:
            return Outcome(True, 0.0, None, "strided input copied to contiguous; copy=False refused")
        return Outcome(False, 0.0, None, "copy=False accepted a non-contiguous tensor (must raise BufferError)")

    name = str(dtype).removeprefix("torch.")

    def skip(ctx: Context) -> str | None:
        kind = ctx.device.split(":")[0]
        declared = ctx.backend.capabilities.dtypes.get(kind, frozenset())
        if dtype.is_floating_point and name not in declared:
            return f"{name} is not among the dtypes {ctx.backend.name} declares on {kind} ({', '.join(sorted(declared))})"
        return None

    checks = ("a contiguous tensor crosses to the framework and back without a copy, and a write to one is seen in the other"
              if contiguous else "a strided tensor is copied to contiguous (copy=None), and refused with BufferError under copy=False")
    return Case(f"exchange/{name}/{'contiguous' if contiguous else 'strided'}", run, checks, "Exchange in sglang_fx/spi.py", skip)


# --------------------------------------------------------------------------------------------
# KV pool
# --------------------------------------------------------------------------------------------


def _layout(page_size: int, num_pages: int, mla: bool = False) -> KVLayout:
    """A 2-layer float32 layout: GQA with 2 KV heads of 16, or MLA with one 40-wide latent."""
    k_shape, v_shape = ((1, 40), None) if mla else ((2, 16), (2, 16))
    return KVLayout(num_layers=2, num_pages=num_pages, page_size=page_size, k_shape=k_shape, v_shape=v_shape, dtype=torch.float32)


def kv_case(page_size: int, mla: bool = False) -> Case:
    def run(ctx: Context) -> Outcome:
        layout = _layout(page_size, num_pages=max(4, 512 // page_size), mla=mla)
        pool = PagedKVPool(layout, ctx.device)
        g = torch.Generator().manual_seed(page_size)
        v_buffers = pool.v_buffers or []
        for buf in pool.k_buffers + v_buffers:
            buf.copy_(torch.randn(buf.shape, generator=g))
        before = [b.clone() for b in pool.k_buffers + v_buffers]
        cache = ctx.backend.kv_cache(layout, pool.k_buffers, pool.v_buffers, ctx.device)
        ex = ctx.backend.exchange(ctx.device)
        from sglang_fx.exchange import shares_memory

        if not shares_memory(ex.to_torch(cache.k(1)), pool.k_buffers[1]):
            return Outcome(False, None, None, "KVCache.k(layer) does not alias the host buffer")
        slots = torch.randperm(layout.num_slots, generator=g)[:37].to(ctx.device)  # scattered
        k = torch.randn((37, *layout.k_shape), generator=g).to(ctx.device)
        v = None if mla else torch.randn((37, *layout.v_shape), generator=g).to(ctx.device)
        cache.write(1, ex.from_torch(slots), ex.from_torch(k), None if mla else ex.from_torch(v))
        diff = _max_diff(pool.k_buffers[1][slots], k)
        if not mla:
            diff = max(diff, _max_diff(pool.v_buffers[1][slots], v))
        untouched = torch.ones(layout.num_slots, dtype=torch.bool, device=ctx.device)
        untouched[slots] = False
        after = pool.k_buffers + v_buffers
        layer1 = {1} | ({3} if not mla else set())  # indices of layer 1's buffers in `after`
        stray = max(
            _max_diff(a[untouched], b[untouched]) if i in layer1 else _max_diff(a, b)
            for i, (a, b) in enumerate(zip(after, before))
        )
        if stray:
            return Outcome(False, stray, None, "write changed slots or layers it was not given")
        return Outcome(diff == 0, diff, None, "37 scattered slots written in place in host memory")

    checks = (f"KVCache.k aliases the host buffer; write() stores 37 scattered slots in place (page size {page_size}"
              f"{', latent layout without V' if mla else ''}) and touches nothing else")
    return Case(f"kv_cache/{'mla/' if mla else ''}page{page_size}", run, checks, "KVCache in sglang_fx/spi.py")


# --------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------

# (prefix lengths, new-token counts) of a ragged batch, per scenario
ATTENTION_BATCHES = {
    "prefill": ([0, 0, 0, 0], [1, 7, 33, 140]),
    "prefix": ([16, 5, 128, 3], [4, 30, 9, 1]),
    "decode": ([1, 15, 16, 200], [1, 1, 1, 1]),
    # The step's keys add up to exactly 64 (a power of two, a usual padding boundary), the last
    # sequence's ending there: a backend padding keys must not see its last key twice.
    "exact": ([35, 0, 0, 0], [1, 3, 15, 10]),
    # Long extends beside short ones, one after a cached prefix: a backend that splits a long
    # extend's queries (blocks, causal groups) must give each query exactly its keys.
    "long": ([0, 40, 3, 129], [260, 131, 2, 1]),
}


def attention_case(page_size: int, scenario: str, mla: bool = False) -> Case:
    def run(ctx: Context) -> Outcome:
        prefixes, news = ATTENTION_BATCHES[scenario]
        if mla:  # MQA over a latent: values are the first 32 of the key's 40 channels
            spec = AttentionSpec(num_heads=4, num_kv_heads=1, head_dim=40, v_head_dim=32, scale=24**-0.5)
        else:
            spec = AttentionSpec(num_heads=4, num_kv_heads=2, head_dim=16, v_head_dim=16, scale=16**-0.5)
        layout = _layout(page_size, num_pages=sum(-(-(p + n) // page_size) for p, n in zip(prefixes, news)) + 2, mla=mla)
        kv_heads, dim = layout.k_shape
        pool = PagedKVPool(layout, ctx.device)
        g = torch.Generator().manual_seed(page_size * 7 + len(scenario))
        # Fill each sequence's prefix straight into the pool (as an earlier step would have).
        full_k, full_v = [], []
        for b, (p, n) in enumerate(zip(prefixes, news)):
            full_k.append(torch.randn((p + n, kv_heads, dim), generator=g))
            full_v.append(full_k[b][..., : spec.v_head_dim] if mla else torch.randn((p + n, kv_heads, dim), generator=g))
            slots = torch.tensor(pool.reserve(b, p), dtype=torch.int64)
            pool.k_buffers[0][slots] = full_k[b][:p].to(ctx.device)
            if not mla:
                pool.v_buffers[0][slots] = full_v[b][:p].to(ctx.device)
        pool.reserve_many({b: n for b, n in enumerate(news)})
        meta = ForwardMetadata.from_lists(
            token_slots=[pool.slots(b) for b in range(len(news))], prefix_lens=prefixes, page_size=page_size, device=ctx.device
        )
        q = torch.randn((sum(news), spec.num_heads, spec.head_dim), generator=g)
        k_new = torch.cat([k[p:] for k, p in zip(full_k, prefixes)])
        v_new = torch.cat([v[p:] for v, p in zip(full_v, prefixes)])
        ex = ctx.backend.exchange(ctx.device)
        cache = ctx.backend.kv_cache(layout, pool.k_buffers, pool.v_buffers, ctx.device)
        attn = ctx.backend.attention(spec, layout, ctx.device)
        attn.plan(meta)
        q_, k_ = (ex.from_torch(t.to(ctx.device)) for t in (q, k_new))
        v_ = None if mla else ex.from_torch(v_new.to(ctx.device))
        out = ex.to_torch(attn.forward(0, q_, k_, v_, cache)).cpu()
        expected, row = [], 0
        for b, (p, n) in enumerate(zip(prefixes, news)):
            expected.append(naive_attention(q[row : row + n], full_k[b], full_v[b], p, spec.scale))
            row += n
        written = _max_diff(pool.k_buffers[0][meta.out_cache_loc].cpu(), k_new)
        if written:
            return Outcome(False, written, None, "new K was not written to the pool at out_cache_loc")
        return _close(_max_diff(out, torch.cat(expected).float()), torch.float32, f"{len(news)} ragged sequences vs naive attention")

    what = {"prefill": "4 ragged prompts, no cached prefix", "prefix": "4 sequences with cached prefixes and new tokens",
            "decode": "4 sequences, one new token each",
            "exact": "4 sequences whose keys add up to exactly 64, one a prefix hit with one new token",
            "long": "extends of 260 and 131 tokens (one after a 40-token prefix) beside two short ones"}[scenario]  # fmt: skip
    checks = f"plan + forward on {what} (page size {page_size}{', MLA' if mla else ''}): new K written at out_cache_loc, output within 1e-4 of dense attention"
    return Case(f"attention/{'mla/' if mla else ''}page{page_size}/{scenario}", run, checks, "Attention in sglang_fx/spi.py")


# --------------------------------------------------------------------------------------------
# Speculative verify steps (ForwardMode.VERIFY)
# --------------------------------------------------------------------------------------------

#: Draft trees as parent lists (-1: a root, child of the committed prefix), per sequence. "chain":
#: each draft token follows the previous one. "tree": branching drafts, as NGRAM's breadth-first
#: trees (node order is not depth order: node 2 is shallower than node 1's child 3).
VERIFY_TREES = {
    "chain": [[-1, 0, 1, 2], [-1], [-1, 0, 1, 2, 3, 4]],
    "tree": [[-1, 0, 0, 1, 2, 3], [-1, 0, 0, 0], [-1, -1, 1, 2, 2]],
}
VERIFY_PREFIXES = [16, 5, 40]


def tree_mask(parents: list[int]) -> list[list[bool]]:
    """[D, D] mask of a parent list: row i is True at i and its ancestors."""
    rows = []
    for i in range(len(parents)):
        row, j = [False] * len(parents), i
        while j >= 0:
            row[j], j = True, parents[j]
        rows.append(row)
    return rows


def _branches(parents: list[int]) -> list[list[int]]:
    """Every root-to-leaf path of the draft tree, as node lists (each node is on one at least)."""
    leaves = [i for i in range(len(parents)) if i not in parents]
    paths = []
    for leaf in leaves:
        path, j = [], leaf
        while j >= 0:
            path.append(j)
            j = parents[j]
        paths.append(path[::-1])
    return paths


def verify_attention_case(kind: str, page_size: int) -> Case:
    def run(ctx: Context) -> Outcome:
        trees, prefixes = VERIFY_TREES[kind], VERIFY_PREFIXES
        spec = AttentionSpec(num_heads=4, num_kv_heads=2, head_dim=16, v_head_dim=16, scale=16**-0.5)
        g = torch.Generator().manual_seed(31 + page_size)
        ex = ctx.backend.exchange(ctx.device)
        prefix_kv = [(torch.randn((p, 2, 16), generator=g), torch.randn((p, 2, 16), generator=g)) for p in prefixes]
        q = [torch.randn((len(t), 4, 16), generator=g) for t in trees]
        k = [torch.randn((len(t), 2, 16), generator=g) for t in trees]
        v = [torch.randn((len(t), 2, 16), generator=g) for t in trees]

        def step(seqs: list[tuple[int, list[int]]], masks: list[list[list[bool]]] | None):
            """Run one step in a fresh pool holding the prefixes of `seqs` (sequence b, its draft
            nodes): VERIFY with `masks`, or EXTEND when None. Returns (output, pool, meta)."""
            pages = sum(-(-(prefixes[b] + len(nodes)) // page_size) for b, nodes in seqs) + 2
            layout = _layout(page_size, num_pages=pages)
            pool = PagedKVPool(layout, ctx.device)
            for i, (b, nodes) in enumerate(seqs):
                slots = torch.tensor(pool.reserve(i, prefixes[b]), dtype=torch.int64)
                pool.k_buffers[0][slots], pool.v_buffers[0][slots] = (t.to(ctx.device) for t in prefix_kv[b])
            pool.reserve_many({i: len(nodes) for i, (b, nodes) in enumerate(seqs)})
            lists = dict(token_slots=[pool.slots(i) for i in range(len(seqs))], prefix_lens=[prefixes[b] for b, _ in seqs],
                         page_size=page_size, device=ctx.device)  # fmt: skip
            meta = (ForwardMetadata.from_lists(logits="all", **lists) if masks is None
                    else ForwardMetadata.verify_step(tree_masks=masks, **lists))  # fmt: skip
            cat = [torch.cat([t[b][nodes] for b, nodes in seqs]).to(ctx.device) for t in (q, k, v)]
            cache = ctx.backend.kv_cache(layout, pool.k_buffers, pool.v_buffers, ctx.device)
            attn = ctx.backend.attention(spec, layout, ctx.device)
            attn.plan(meta)
            out = attn.forward(0, *(ex.from_torch(t) for t in cat), cache)
            return ex.to_torch(out).cpu(), pool, meta, cat

        everything = [(b, list(range(len(t)))) for b, t in enumerate(trees)]
        out, pool, meta, (_, k_all, v_all) = step(everything, [tree_mask(t) for t in trees])
        written = max(_max_diff(pool.k_buffers[0][meta.out_cache_loc], k_all),
                      _max_diff(pool.v_buffers[0][meta.out_cache_loc], v_all))  # fmt: skip
        if written:
            return Outcome(False, written, None, f"the K/V of the {meta.num_tokens} draft tokens were not all written at out_cache_loc")
        rows = torch.tensor([0, *meta.extend_lens_cpu]).cumsum(0).tolist()
        diff, extends = 0.0, 0
        for b, parents in enumerate(trees):
            for path in _branches(parents):  # one EXTEND per branch, in a pool of its own
                expected, *_ = step([(b, path)], None)
                diff = max(diff, _max_diff(out[[rows[b] + i for i in path]], expected))
                extends += 1
        return _close(diff, torch.float32, f"VERIFY of {len(trees)} sequences vs {extends} EXTENDs of their branches")

    checks = (f"VERIFY step, {'chain' if kind == 'chain' else 'branching tree'} masks over 3 sequences with cached prefixes "
              f"(page size {page_size}): every draft token's K/V written at out_cache_loc, each draft token's output "
              f"within 1e-4 of an EXTEND of {'the same tokens' if kind == 'chain' else 'its branch alone'}")  # fmt: skip

    def skip(ctx: Context) -> str | None:
        caps = ctx.backend.capabilities
        if caps.can_verify(kind):
            return None
        return f"{ctx.backend.name} declares no {kind} verify steps (Capabilities.verify: {', '.join(sorted(caps.verify)) or 'none'})"

    return Case(f"verify/page{page_size}/{kind}", run, checks, "ForwardMetadata VERIFY in sglang_fx/metadata.py, Attention in sglang_fx/spi.py", skip)


def verify_model_case(arch: str) -> Case:
    """The whole model on a VERIFY step (RoPE at tree-depth positions, tree masks), against
    transformers on each draft token's own branch."""

    def run(ctx: Context) -> Outcome:
        session = ctx.session(arch, page_size=16)
        trees = VERIFY_TREES["tree"]
        prompts = [PROMPTS[0], PROMPTS[2], PROMPTS[3]]
        drafts = [[(7 * b + 13 * i) % 500 + 3 for i in range(len(t))] for b, t in enumerate(trees)]
        seqs = []
        for p in prompts:
            seq, _ = session.new_sequence(p)
            session.forward([seq], [p[session.pool.length(seq) if seq in session.pool else 0 :]])
            seqs.append(seq)
        prefix = [session.pool.length(s) for s in seqs]
        session.pool.reserve_many({s: len(d) for s, d in zip(seqs, drafts)})
        meta = ForwardMetadata.verify_step(token_slots=[session.pool.slots(s) for s in seqs], prefix_lens=prefix,
                                           tree_masks=[tree_mask(t) for t in trees], page_size=16, device=ctx.device)  # fmt: skip
        ids = torch.tensor([t for d in drafts for t in d], dtype=torch.int64, device=ctx.device)
        logits = session.runner.forward(ids, meta, session.cache).cpu()
        diff, row = 0.0, 0
        for p, parents, d in zip(prompts, trees, drafts):
            for i in range(len(parents)):
                branch = next(path for path in _branches(parents) if i in path)
                tokens = p + [d[j] for j in branch[: branch.index(i) + 1]]
                diff = max(diff, _max_diff(logits[row + i], ctx.hf_logits(arch, tokens)[-1]))
            row += len(parents)
        return _close(diff, torch.float32, f"VERIFY logits of {row} draft tokens vs transformers on each one's branch")

    def skip(ctx: Context) -> str | None:
        caps = ctx.backend.capabilities
        return None if caps.can_verify("tree") else f"{ctx.backend.name} declares no tree verify steps (Capabilities.verify)"

    return Case(f"verify_logits/{arch}", run,
                f"{arch}: logits of a tree VERIFY step (3 cached prompts, 15 draft tokens at tree-depth positions) within "
                "1e-4 of transformers on each draft token's branch",
                "ForwardMetadata VERIFY in sglang_fx/metadata.py, ModelRunner in sglang_fx/spi.py", skip)  # fmt: skip


# --------------------------------------------------------------------------------------------
# Whole model
# --------------------------------------------------------------------------------------------

# Ragged prompts; the second and fourth start with the first one's 20 tokens, so a session
# that has seen the first reuses its cached pages (a prefix hit).
BASE_PROMPT = [5, 17, 99, 250, 3, 42, 77, 301, 12, 8, 64, 128, 256, 31, 7, 400, 22, 11, 90, 45]
PROMPTS = [BASE_PROMPT, BASE_PROMPT + [9, 33, 71], [260, 14], BASE_PROMPT + [3] * 9 + [500, 1]]
GREEDY_STEPS = 32


def _model_name(kind: str, arch: str, variant: str) -> str:
    return f"{kind}/{arch}" + (f"+{variant}" if variant else "")


def _session_logits(ctx: Context, arch: str, variant: str = "", **session) -> tuple[torch.Tensor, list[int]]:
    """All-token logits of PROMPTS[1:] in one ragged step, after PROMPTS[0] filled the cache,
    and how many tokens of each prompt came from the cache. session: Context.session keywords.
    Computed once per backend, checkpoint and layout (Context.remember: several cases compare
    the same logits with different things); read only."""
    backend = session.get("backend") or ctx.backend.name
    key = ("session_logits", backend, str(ctx.checkpoint(arch, variant)), session.get("parallel", ctx.parallel))
    return ctx.remember(key, lambda: _compute_session_logits(ctx, arch, variant, **session))


def _compute_session_logits(ctx: Context, arch: str, variant: str, **session) -> tuple[torch.Tensor, list[int]]:
    session = ctx.session(arch, page_size=16, variant=variant, **session)
    first, _ = session.new_sequence(PROMPTS[0])
    session.forward([first], [PROMPTS[0]])
    seqs, new = [], []
    for p in PROMPTS[1:]:
        seq, shared = session.new_sequence(p)
        seqs.append(seq)
        new.append(p[shared:])
    if not any(session.pool.length(s) for s in seqs):
        raise AssertionError("no prefix hit happened; the case does not test what it claims")
    logits = session.forward(seqs, new, logits="all")
    if logits.is_inference() or logits.dtype != torch.float32:
        raise AssertionError(f"ModelRunner.forward must return ordinary float32 logits, got {logits.dtype}"
                             f"{' made under torch.inference_mode' if logits.is_inference() else ''}")
    return logits, [len(p) - len(n) for p, n in zip(PROMPTS[1:], new)]


def logits_case(arch: str, variant: str = "") -> Case:
    def run(ctx: Context) -> Outcome:
        logits, shared = _session_logits(ctx, arch, variant)
        diff, row = 0.0, 0
        for p, s in zip(PROMPTS[1:], shared):
            n = len(p) - s
            diff = max(diff, _max_diff(logits[row : row + n].cpu(), ctx.hf_logits(arch, p, variant)[s:]))
            row += n
        return _close(diff, torch.float32, "vs transformers, ragged batch with prefix hits")

    return Case(_model_name("logits", arch, variant), run,
                f"{arch}: all-token float32 logits of a ragged batch after a prefix hit, within 1e-4 of transformers",
                "ModelRunner in sglang_fx/spi.py, sglang_fx_make_runner in sglang_fx/hookspecs.py")  # fmt: skip


def logits_vs_reference_case(arch: str) -> Case:
    def run(ctx: Context) -> Outcome:
        ours, _ = _session_logits(ctx, arch)
        ref, _ = _session_logits(ctx, arch, backend=REFERENCE_BACKEND)
        return _close(_max_diff(ours.cpu(), ref.cpu()), torch.float32, f"vs {REFERENCE_BACKEND}")

    return Case(f"logits_vs_reference/{arch}", run, f"{arch}: the same logits within 1e-4 of the {REFERENCE_BACKEND} backend",
                "ModelRunner in sglang_fx/spi.py")  # fmt: skip


def logits_vs_tp1_case(arch: str, variant: str = "") -> Case:
    """Under tensor parallelism: the sharded model's logits against the same backend's, unsharded,
    in the same process."""

    def run(ctx: Context) -> Outcome:
        ours, _ = _session_logits(ctx, arch, variant)
        whole, _ = _session_logits(ctx, arch, variant, parallel=SINGLE)
        p = ctx.parallel
        return _close(_max_diff(ours.cpu(), whole.cpu()), torch.float32, f"tp={p.tp_size} ep={p.ep_size} vs tp=1")

    return Case(_model_name("logits_vs_tp1", arch, variant), run,
                f"{arch}: the sharded model's logits within 1e-4 of the same backend unsharded",
                "RunnerOptions.parallel in sglang_fx/spi.py, sglang_fx/sharding.py")  # fmt: skip


def greedy_case(arch: str, variant: str = "") -> Case:
    def run(ctx: Context) -> Outcome:
        session = ctx.session(arch, page_size=16, variant=variant)
        session.generate([PROMPTS[0]], 1)  # leaves PROMPTS[0] cached: the batch below hits it
        ours = session.generate(PROMPTS, GREEDY_STEPS)
        truth = [ctx.hf_greedy(arch, p, GREEDY_STEPS, variant) for p in PROMPTS]
        same = sum(a == b for o, t in zip(ours, truth) for a, b in zip(o, t))
        agreement = same / (GREEDY_STEPS * len(PROMPTS))
        first_diff = ""
        for i, (o, t) in enumerate(zip(ours, truth)):
            if o != t:
                j = next((j for j, (a, b) in enumerate(zip(o, t)) if a != b), min(len(o), len(t)))
                first_diff = f"prompt {i} differs at step {j}: expected tokens {t[j:j + 4]}..., got {o[j:j + 4]}..."
                break
        return Outcome(agreement == 1.0, None, agreement, first_diff or f"{len(PROMPTS)} ragged prompts x {GREEDY_STEPS} steps identical to transformers")

    return Case(_model_name("greedy", arch, variant), run,
                f"{arch}: {GREEDY_STEPS} greedy steps of 4 ragged prompts (one cached) identical to transformers",
                "ModelRunner, Attention, KVCache in sglang_fx/spi.py")  # fmt: skip


# --------------------------------------------------------------------------------------------
# EAGLE3 (SPI 1.4): hidden-state capture and the LlamaForCausalLMEagle3 draft
# --------------------------------------------------------------------------------------------


def _eagle3_skip(ctx: Context) -> str | None:
    return None if ctx.backend.capabilities.eagle3 else f"{ctx.backend.name} declares no eagle3 (Capabilities.eagle3)"


def eagle3_capture_case(arch: str) -> Case:
    def run(ctx: Context) -> Outcome:
        session = ctx.session(arch, page_size=16)
        capture = tuple(range(session.spec.num_layers))  # every layer's input; 0 is the embeddings
        first, _ = session.new_sequence(PROMPTS[0])
        session.forward([first], [PROMPTS[0]])
        seqs, new = zip(*[(seq, p[shared:]) for p in PROMPTS[1:] for seq, shared in [session.new_sequence(p)]])
        logits, hidden = session.forward_hidden(list(seqs), list(new), logits="all", capture=capture)
        width = session.spec.hidden_size * len(capture)
        if hidden is None or hidden.dtype != torch.float32 or list(hidden.shape) != [sum(map(len, new)), width]:
            got = None if hidden is None else f"{hidden.dtype} {list(hidden.shape)}"
            return Outcome(False, None, None, f"forward_hidden returned hidden {got}, expected float32 [{sum(map(len, new))}, {width}]")
        diff, logit_diff, row = 0.0, 0.0, 0
        for p, n in zip(PROMPTS[1:], new):
            s = len(p) - len(n)
            truth = torch.cat([h[s:] for h in ctx.hf_hidden(arch, p)[: len(capture)]], dim=1)
            diff = max(diff, _max_diff(hidden[row : row + len(n)].cpu(), truth))
            logit_diff = max(logit_diff, _max_diff(logits[row : row + len(n)].cpu(), ctx.hf_logits(arch, p)[s:]))
            row += len(n)
        ok = diff <= EAGLE3_TOLERANCE and logit_diff <= EAGLE3_TOLERANCE
        return Outcome(ok, diff, None, f"captured layers {list(capture)} vs transformers' output_hidden_states: max abs diff "
                                       f"{diff:.3g}, logits {logit_diff:.3g} (tolerance {EAGLE3_TOLERANCE:g})")  # fmt: skip

    return Case(f"eagle3/capture/{arch}", run,
                f"{arch}: forward_hidden capturing every layer's input (ragged batch after a prefix hit) equals transformers' "
                f"output_hidden_states[0..L-1] for the new tokens, float32 [T, H * L], logits as forward's, within {EAGLE3_TOLERANCE:g}",
                "ModelRunner.forward_hidden in sglang_fx/spi.py, capture in sglang_fx/eagle3.py", _eagle3_skip)  # fmt: skip


def eagle3_draft_case() -> Case:
    """The draft on a target's capture (an extend step of two sequences, EAGLE's shift: token i + 1
    with the hidden states of token i), then one draft decode step on its own hidden_out, against
    `eagle3.draft_reference` fed transformers' hidden states."""

    def run(ctx: Context) -> Outcome:
        from sglang_fx.eagle3 import capture_layers, hot_token_ids

        from .eagle3 import TARGET_VARIANT, draft_fc, draft_reference

        arch = "LlamaForCausalLM"
        target = ctx.session(arch, page_size=16, variant=TARGET_VARIANT)
        draft = ctx.draft_session(target)
        capture = capture_layers(target.spec.num_layers, draft.spec.eagle3.aux_layer_ids)
        prompts = [PROMPTS[0], PROMPTS[2]]
        t_logits, _ = target.forward_hidden([target.new_sequence(p)[0] for p in prompts], prompts, capture=capture)
        ids = [p[1:] + [t] for p, t in zip(prompts, t_logits.argmax(-1).tolist())]  # token i + 1 beside hidden of token i
        truth = [torch.cat([ctx.hf_hidden(arch, p, TARGET_VARIANT)[i] for i in capture], dim=1) for p in prompts]
        seqs = [draft.new_sequence(i)[0] for i in ids]
        logits, hidden = draft.forward_hidden(seqs, ids, logits="all", hidden=torch.cat(truth).to(ctx.device))
        w, hot = draft.weights, hot_token_ids(draft.weights["d2t"])
        refs, nxt = [], []
        for i, cap in zip(ids, truth):
            ref_logits, ref_hidden = draft_reference(draft.spec, w, i, draft_fc(w, cap))
            t = int(hot[ref_logits[-1].argmax()])  # the draft's guess, as a target id
            refs.append(draft_reference(draft.spec, w, i + [t], torch.cat([draft_fc(w, cap), ref_hidden[-1:]])))
            nxt.append(t)
        last = torch.tensor([len(i) for i in ids]).cumsum(0) - 1
        logits2, hidden2 = draft.forward_hidden(seqs, [[t] for t in nxt], logits="last", hidden=hidden[last.to(hidden.device)])
        want_logits = torch.cat([r[0][:-1] for r in refs])
        want_hidden = torch.cat([r[1][:-1] for r in refs])
        diff = max(_max_diff(logits.cpu(), want_logits), _max_diff(hidden.cpu(), want_hidden),
                   _max_diff(logits2.cpu(), torch.stack([r[0][-1] for r in refs])), _max_diff(hidden2.cpu(), torch.stack([r[1][-1] for r in refs])))  # fmt: skip
        vd = draft.spec.eagle3.draft_vocab_size
        if logits.shape[1] != vd:
            return Outcome(False, diff, None, f"draft logits are {logits.shape[1]} wide, expected the draft vocabulary {vd}")
        return _close(diff, torch.float32, f"draft logits [.., {vd}] and hidden_out of an extend on the target's capture "
                                           f"(layers {list(capture)}) and a decode on its own output, vs a float64 reference")  # fmt: skip

    def skip(ctx: Context) -> str | None:
        from sglang_fx.checkpoint import EAGLE3_ARCH

        caps = ctx.backend.capabilities
        return _eagle3_skip(ctx) or (None if EAGLE3_ARCH in caps.architectures and "LlamaForCausalLM" in caps.architectures
                                     else f"{ctx.backend.name} does not run both {EAGLE3_ARCH} and its LlamaForCausalLM target")  # fmt: skip

    return Case("eagle3/draft/LlamaForCausalLMEagle3", run,
                "the Llama EAGLE3 draft (fc over 3 captured target layers, sharing the target's embedding, 256-id draft "
                "vocabulary) on an extend of 2 sequences and a decode step on its own hidden_out: logits and hidden_out "
                "within 1e-4 of a plain float64 computation (conformance/eagle3.py) fed transformers' hidden states",
                "ModelRunner.forward_hidden in sglang_fx/spi.py, the draft in sglang_fx/eagle3.py", skip)  # fmt: skip


# --------------------------------------------------------------------------------------------
# Quantized checkpoints (W8A8 int8, sglang_fx/quant.py)
# --------------------------------------------------------------------------------------------

#: max |a - b| of W8A8 logits against the fake-quantized transformers model and between backends.
#: The integer math is the same, but float32 sums in another order can move an activation across
#: a rounding edge: one quantum of one channel, which then reaches every later token through the
#: KV cache. Measured: 2e-6 when nothing flips (Qwen3, Qwen2, Llama, Qwen3-MoE); 2.9e-2 on the tiny
#: DeepSeek-V3, where one value of token 10 lies 1.9e-6 from a tie (that model's W8A8 logits move
#: 2.9 from its float ones, so it amplifies any change). A wrong rule or scale moves them by > 1e-1.
W8A8_TOLERANCE = 5e-2


def _w8a8_skip(ctx: Context) -> str | None:
    if "w8a8_int8" not in ctx.backend.capabilities.quantization:
        return f"{ctx.backend.name} declares no w8a8_int8 in Capabilities.quantization"
    return None


def w8a8_linear_case(arch: str) -> Case:
    def run(ctx: Context) -> Outcome:
        from sglang_fx.quant import w8a8_linear

        from sglang_fx.checkpoint import Checkpoint

        session = ctx.session(arch, variant=W8A8)
        spec = session.spec
        weights = Checkpoint(ctx.checkpoint(arch, W8A8)).load(spec)
        g = torch.Generator().manual_seed(0)
        worst, names = 0.0, sorted(n for n in spec.quant.linears if n.startswith("model.layers.0."))
        for name in names:
            w, scale = weights[name + ".weight"], weights[name + ".weight_scale"]
            x = torch.randn((6, w.shape[1]), generator=g) * torch.logspace(-3, 2, 6)[:, None]  # tokens of very different sizes
            x[0] = 0  # an all-zero token: scale floors at 1e-10 / 127, q = 0
            x[1, 3] = 1e3  # an outlier channel
            # a token whose x / scale lands exactly on rounding edges (scale = 2^-4 exactly; x / scale in
            # -3.5 .. 3.5): halves round to even (-4, -2, -2, 0, 0, 2, 2, 4), not away from zero
            x[2] = (torch.arange(w.shape[1]) % 8 - 3.5) * 2**-4
            x[2, 0] = 127 * 2**-4
            ours = session.runner.apply_linear(name, x).cpu()
            ref = torch.from_numpy(w8a8_linear(x.numpy(), w.numpy(), scale.numpy()))
            worst = max(worst, (_max_diff(ours, ref) / max(ref.abs().max().item(), 1e-30)))
        return Outcome(worst <= 1e-6, worst, None, f"{len(names)} linears of layer 0: max diff {worst:.3g} of the largest output "
                       f"(tolerance 1e-6: the int32 sums are exact, only the scale products round)")  # fmt: skip

    def skip(ctx: Context) -> str | None:
        if _w8a8_skip(ctx) or hasattr(ctx.session(arch, variant=W8A8).runner, "apply_linear"):
            return _w8a8_skip(ctx)
        return "the runner has no apply_linear probe (optional, SPI 1.3)"

    return Case(f"w8a8/linear/{arch}", run, f"{arch}: each W8A8 linear of layer 0 (apply_linear probe) against sglang_fx.quant.w8a8_linear "
                "on tokens of very different sizes, an all-zero one, an outlier channel and activations exactly on rounding edges",
                "sglang_fx/quant.py, apply_linear in ModelRunner (sglang_fx/spi.py)", skip)  # fmt: skip


def w8a8_logits_case(arch: str) -> Case:
    def run(ctx: Context) -> Outcome:
        logits, shared = _session_logits(ctx, arch, W8A8)
        diff, moved, row = 0.0, 0.0, 0
        for p, s in zip(PROMPTS[1:], shared):
            n = len(p) - s
            diff = max(diff, _max_diff(logits[row : row + n].cpu(), ctx.hf_logits(arch, p, W8A8)[s:]))
            moved = max(moved, _max_diff(logits[row : row + n].cpu(), ctx.hf_logits(arch, p)[s:]))
            row += n
        return Outcome(diff <= W8A8_TOLERANCE, diff, None, f"vs fake-quantized transformers: max abs diff {diff:.3g} (tolerance "
                       f"{W8A8_TOLERANCE:g}); W8A8 vs the float model: max abs diff {moved:.3g} (a figure, no tolerance)")  # fmt: skip

    return Case(f"w8a8/logits/{arch}", run,
                f"{arch}: W8A8 all-token logits of a ragged batch after a prefix hit against transformers with dequantized "
                f"weights and per-token fake-quantized activations (and how far they move from the float model)",
                "sglang_fx/quant.py, ModelRunner in sglang_fx/spi.py", _w8a8_skip)  # fmt: skip


def w8a8_vs_reference_case(arch: str) -> Case:
    def run(ctx: Context) -> Outcome:
        ours, _ = _session_logits(ctx, arch, W8A8)
        ref, _ = _session_logits(ctx, arch, W8A8, backend=REFERENCE_BACKEND)
        diff = _max_diff(ours.cpu(), ref.cpu())
        return Outcome(diff <= W8A8_TOLERANCE, diff, None, f"vs {REFERENCE_BACKEND}: max abs diff {diff:.3g} (tolerance {W8A8_TOLERANCE:g})")

    return Case(f"w8a8/logits_vs_reference/{arch}", run, f"{arch}: W8A8 logits against the {REFERENCE_BACKEND} backend's",
                "sglang_fx/quant.py, ModelRunner in sglang_fx/spi.py", _w8a8_skip)  # fmt: skip


def w8a8_greedy_case(arch: str) -> Case:
    base = greedy_case(arch, W8A8)
    return Case(f"w8a8/greedy/{arch}", base.run,
                f"{arch}: {GREEDY_STEPS} greedy W8A8 steps of 4 ragged prompts (one cached) identical to fake-quantized transformers",
                "sglang_fx/quant.py, ModelRunner in sglang_fx/spi.py", _w8a8_skip)  # fmt: skip


def w8a8_vs_tp1_case(arch: str) -> Case:
    """Under tensor parallelism: the sharded W8A8 model's logits against the same backend's,
    unsharded, within twice how far W8A8 moves that model's logits from its float ones; and the
    greedy tokens of both, counted (a figure).

    Why that tolerance: a row-parallel linear (o_proj, down_proj; `sglang_fx.sharding`) receives
    each rank's slice of its input and quantizes it per token with that slice's own absmax, so
    its activations are quantized otherwise than unsharded (on a finer grid: a slice's absmax is
    at most the row's). Both are W8A8 quantizations of the same model, each about as far from the
    float model (every value within half a quantum of its grid), so their distance is at most
    about the sum of the two: 2x the tp=1 W8A8-vs-float distance. A scale sharded wrongly (split
    where it must stay whole, or the reverse) scales whole output channels and lands far outside."""

    def run(ctx: Context) -> Outcome:
        ours, shared = _session_logits(ctx, arch, W8A8)
        whole, _ = _session_logits(ctx, arch, W8A8, parallel=SINGLE)
        diff, moved, row = _max_diff(ours.cpu(), whole.cpu()), 0.0, 0
        for p, s in zip(PROMPTS[1:], shared):  # W8A8 at tp=1 against the float model (transformers)
            moved = max(moved, _max_diff(whole[row : row + len(p) - s].cpu(), ctx.hf_logits(arch, p)[s:]))
            row += len(p) - s
        sharded = ctx.session(arch, variant=W8A8).generate(PROMPTS, GREEDY_STEPS)
        single = ctx.session(arch, variant=W8A8, parallel=SINGLE).generate(PROMPTS, GREEDY_STEPS)
        agreement = sum(a == b for o, t in zip(sharded, single) for a, b in zip(o, t)) / (GREEDY_STEPS * len(PROMPTS))
        p = ctx.parallel
        return Outcome(diff <= 2 * moved, diff, agreement,
                       f"tp={p.tp_size} ep={p.ep_size} vs tp=1, W8A8: max abs diff {diff:.3g} (tolerance {2 * moved:.3g}: twice "
                       f"W8A8's own move from the float model at tp=1, {moved:.3g}); greedy tokens {agreement:.0%} the same "
                       f"(a figure: quantization noise may flip a near-tie)")  # fmt: skip

    return Case(f"w8a8/logits_vs_tp1/{arch}", run,
                f"{arch}: the sharded W8A8 model's logits against the same backend unsharded (row-parallel inputs quantized "
                f"per rank), within 2x W8A8's own move from the float model; greedy agreement counted",
                "sglang_fx/quant.py, sglang_fx/sharding.py, RunnerOptions.parallel in sglang_fx/spi.py", _w8a8_skip)  # fmt: skip


#: Under tensor parallelism, these architectures also run with one KV head (replicated per rank).
KV_REPLICATION_ARCHES = ("Qwen3ForCausalLM",)

#: Under tensor parallelism, these run W8A8 too (w8a8/logits_vs_tp1, skipped where no W8A8 is declared):
#: dense GQA, routed experts, latent attention. Each case runs four sessions, so not every architecture.
W8A8_TP_ARCHES = ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM", "DeepseekV3ForCausalLM")


def model_checkpoints(ctx: Context, tp_size: int) -> list[tuple[str, str]]:
    """(architecture, variant) of every tiny checkpoint the model cases use at tp_size."""
    models = [(arch, "") for arch in ctx.architectures()]
    if tp_size > 1:
        models += [(a, "kv1") for a in KV_REPLICATION_ARCHES if a in ctx.architectures()]
        models += [(a, W8A8) for a in W8A8_TP_ARCHES if a in ctx.architectures()]  # w8a8/logits_vs_tp1
    return models


def cases_for(ctx: Context) -> list[Case]:
    if ctx.parallel.tp_size > 1:  # the model cases, sharded; the others run in one process
        cases = []
        for arch, variant in model_checkpoints(ctx, ctx.parallel.tp_size):
            if variant == W8A8:
                cases.append(w8a8_vs_tp1_case(arch))
                continue
            cases += [logits_case(arch, variant), logits_vs_tp1_case(arch, variant), greedy_case(arch, variant)]
            if not variant:
                cases.append(logits_vs_reference_case(arch))
        return cases
    cases = [exchange_case(d, c) for d in EXCHANGE_DTYPES for c in (True, False)]
    cases += [kv_case(p) for p in (1, 16, 128)]
    cases += [attention_case(p, s) for p in (1, 16, 128) for s in ATTENTION_BATCHES]
    cases += [verify_attention_case(kind, p) for p in (1, 16) for kind in VERIFY_TREES]
    if MLA_ARCHES & set(ctx.architectures()):
        cases += [kv_case(16, mla=True)] + [attention_case(p, s, mla=True) for p in (1, 16) for s in ATTENTION_BATCHES]
    for arch in ctx.architectures():
        cases += [logits_case(arch), logits_vs_reference_case(arch), greedy_case(arch), verify_model_case(arch)]
    cases += [eagle3_capture_case(arch) for arch in ctx.architectures()] + [eagle3_draft_case()]
    if ctx.architectures():
        cases.append(w8a8_linear_case(ctx.architectures()[0]))
    for arch in ctx.architectures():
        cases += [w8a8_logits_case(arch), w8a8_vs_reference_case(arch), w8a8_greedy_case(arch)]
    return cases
