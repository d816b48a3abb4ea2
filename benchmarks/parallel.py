"""Tensor parallelism on this machine: decode step time at tp=1 and tp=2 through sglang.Engine for
SGLang native, reference_torch and mindspore, and the collectives' share of a tp=2 step, in one run.

    python benchmarks/parallel.py [--impls sglang reference_torch mindspore] [--batch 1 --batch 8]

The model is benchmarks/sglang_decode.py's Qwen3 (hidden 512, 8 layers, 8 heads, 4 KV heads,
float32), whose heads split two ways. Step times: the decode step of `sglang_decode.bench_impl`
(prefill + N decode steps minus prefill alone, over N; best of --repeats), one engine per
(--model-impl, tp_size), one after the other.

The collectives' share is measured directly, in a two-process world of its own (the standalone
runner, `sglang_fx.distributed`): one decode step's collectives — an all-reduce of [B, H] after
the embedding and after every attention block and MLP (2 L + 1) and an all-gather of the
[B, V/2] logits — run alone, on each library as its backend runs them: torch.distributed over
gloo (what SGLang native and reference_torch call per collective, from eager code), and
MindSpore's mccl inside one compiled graph (what the mindspore backend's step graph holds).
share = that time / the tp=2 step time of the impl using that library.

These machines have 2 cores: tp=2 gives each rank one core, and the ranks' compute no longer
overlaps anything else. Read the ratios, not the absolute times.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

from sglang_decode import MODEL, bench_impl, declare_plugin  # noqa: E402  (this directory)

from sglang_fx.sglang import use_cpu_engine

use_cpu_engine()
os.environ.setdefault("GLOG_v", "3")

VOCAB = 512


def collective_pattern(parallel, batches: list[int], rounds: int, calls: int) -> dict:
    """ms per decode step's collectives, per library and batch, on this rank (best of rounds)."""
    import numpy as np
    import torch
    import torch.distributed as dist

    H, L = MODEL["hidden_size"], MODEL["num_hidden_layers"]
    block = VOCAB // parallel.tp_size
    group = parallel.tp.torch_group
    out = {"gloo": {}, "mccl": {}}

    def gloo_step(b):
        x = torch.randn(b, H)
        for _ in range(2 * L + 1):
            dist.all_reduce(x, group=group)
        parts = [torch.empty(b, block) for _ in range(parallel.tp_size)]
        dist.all_gather(parts, torch.randn(b, block), group=group)

    import mindspore as ms
    from mindspore import Tensor
    from sglang_fx_mindspore import collectives

    comm = collectives.start(parallel, "cpu")

    @ms.jit
    def mccl_step(x, logits):
        for _ in range(2 * L + 1):
            x = comm.all_reduce(x) * 0.5  # chained, as in the step: each waits for the last
        return x, comm.gather_columns(logits)

    def mccl_done(x, logits):
        y, gathered = mccl_step(x, logits)
        y.asnumpy(), gathered.asnumpy()  # the graph runs asynchronously: wait for its results

    for b in batches:
        x, logits = Tensor(np.random.randn(b, H).astype(np.float32)), Tensor(np.random.randn(b, block).astype(np.float32))
        mccl_done(x, logits)  # compile
        for name, step in (("gloo", lambda: gloo_step(b)), ("mccl", lambda: mccl_done(x, logits))):
            best = float("inf")
            for _ in range(rounds):
                dist.barrier(group=group)
                t = time.perf_counter()
                for _ in range(calls):
                    step()
                best = min(best, (time.perf_counter() - t) / calls)
            out[name][b] = best * 1e3
    return out


def main() -> int:
    import argparse

    from sglang_fx.distributed import run_parallel
    from sglang_fx.registry import default_registry
    from sglang_fx.tiny import make_tiny_model

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--impls", nargs="+", default=["sglang", "reference_torch", "mindspore"])
    ap.add_argument("--batch", type=int, action="append", help="batch sizes (default 1 and 8)")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    args = ap.parse_args()
    batches = args.batch or [1, 8]
    reg = default_registry()
    impls = [i for i in args.impls if i == "sglang" or (i in reg.names() and not reg.info(i).unavailable)]
    print(f"model: qwen3 {MODEL}, vocab {VOCAB}, float32; {os.cpu_count()} cores; sglang.Engine on CPU, greedy, prompt "
          f"{args.prompt_len} tokens, {args.steps} decode steps per run, best of {args.repeats}", flush=True)  # fmt: skip
    steps: dict[tuple[str, int], dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        declare_plugin(os.path.join(tmp, "plugin"))
        model = str(make_tiny_model("qwen3", os.path.join(tmp, "qwen3"), seed=0, **MODEL))
        for tp in (1, 2):
            for impl in impls:
                r = bench_impl(impl, model, batches, args, os.path.join(tmp, f"t-{impl}-{tp}.json"), tp_size=tp)
                steps[impl, tp] = r["steps"]
                print(f"  {impl} tp={tp}: started in {r['startup_s']:.1f}s; ms/step "
                      + ", ".join(f"b={b} {r['steps'][b] * 1e3:.2f}" for b in batches), flush=True)  # fmt: skip
    pattern = run_parallel(collective_pattern, 2, args=(batches, 3, 20))
    coll = {lib: {b: max(rank[lib][b] for rank in pattern) for b in batches} for lib in ("gloo", "mccl")}

    head = f"{'--model-impl':<16}" + "".join(f"{f'b={b} tp1 ms':>12}{'tp2 ms':>9}{'tp2/tp1':>9}" for b in batches)
    print("\ndecode step through sglang.Engine\n" + head + "\n" + "-" * len(head))
    for impl in impls:
        cells = "".join(f"{steps[impl, 1][b] * 1e3:>12.2f}{steps[impl, 2][b] * 1e3:>9.2f}{steps[impl, 2][b] / steps[impl, 1][b]:>9.2f}"
                        for b in batches)  # fmt: skip
        print(f"{impl:<16}{cells}")
    L = MODEL["num_hidden_layers"]
    print(f"\none tp=2 decode step's collectives alone ({2 * L + 1} all-reduces of [B, {MODEL['hidden_size']}] + an "
          f"all-gather of [B, {VOCAB // 2}]), slowest rank, and their share of the impl's tp=2 step")  # fmt: skip
    head = f"{'--model-impl':<16}{'library':<34}" + "".join(f"{f'b={b} ms':>10}{'share':>8}" for b in batches)
    print(head + "\n" + "-" * len(head))
    libraries = {"mindspore": ("mccl", "mccl, in the step graph"), "reference_torch": ("gloo", "torch.distributed gloo, eager"),
                 "sglang": ("gloo", "torch.distributed gloo, eager")}  # fmt: skip
    for impl in impls:
        lib, label = libraries[impl]
        print(f"{impl:<16}{label:<34}" + "".join(f"{coll[lib][b]:>10.2f}{coll[lib][b] / (steps[impl, 2][b] * 1e3):>8.1%}" for b in batches))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    sys.exit(main())
