"""Decode throughput through sglang.Engine: SGLang's native Qwen3 vs sglang-fx backends, in one run.

    python benchmarks/sglang_decode.py [--impls sglang reference_torch mindspore jax numpy] [--steps 32]
    python benchmarks/sglang_decode.py --model smollm2 --batch 1 --batch 8 --batch 32 --steps 32   # real model

One float32 model: by default a tiny-but-not-trivial Qwen3 (the model of benchmarks/decode.py),
with --model smollm2 the real SmolLM2-135M-Instruct (`sglang-fx fetch-model`), or any HF
checkpoint directory. One sglang.Engine per --model-impl (CPU, torch_native attention, no CUDA graphs), one after the other. For each
batch size, `batch` prompts of `--prompt-len` tokens are generated greedily with ignore_eos,
once with max_new_tokens=1 (prefill only) and once with 1 + steps (prefill + `steps` decode
steps), `--repeats` times each; the decode step time is the difference of the fastest of each
(these machines are shared: the least disturbed runs) over `steps`, so it holds everything
SGLang does per step (scheduling, sampling, detokenizing) and the model.

The first call of each batch size is timed too: its extra time over the same call warm is what
compiling on first use costs (MindSpore's graphs, JAX's programs, the latter with a fresh
persistent compilation cache).

It also measures the sglang-fx layer's own share of a decode step, inside SGLang's scheduler
process: this file is declared (in a temporary dist-info) as an SGLang general plugin, and
when SGLANG_FX_BENCH_TIMINGS is set its `register()` wraps, from outside, the adapter's
forward (`SglangFxForCausalLM.forward`), `to_metadata`, the backend runner's `forward`, and
the backend's model compute where the backend exposes it (the MindSpore runner's step `_step`,
which also stores the step's K/V; for other backends the whole runner counts as compute).
Nothing is added to the hot path when the variable is unset. Per decode step:
    sglang-fx layer = adapter forward - model compute
                    = ForwardBatch -> ForwardMetadata, KV binding check, dispatch, output
                      wrapping, and, inside the runner, attention planning and DLPack exchange
and its share is printed against the whole decode step as the scheduler sees it (from one
decode forward to the next; target < 5%), medians over the same steps.

The bandwidth floor: a decode step reads every weight once (a tied embedding once, as the LM
head), so no step can be shorter than weight bytes / memory bandwidth. The read bandwidth is
measured in the same run (torch sums over a 1 GiB float32 tensor on all threads, best of 5);
"of floor" = floor / step time, the share of the memory-bound ideal a backend reaches.
Runs on shared machines vary: compare ratios and shares from one run.
"""

from __future__ import annotations

import json
import os
import sys
import time

from sglang_fx.sglang import use_cpu_engine

use_cpu_engine()  # before sglang is imported, here and in SGLang's subprocesses
os.environ.setdefault("GLOG_v", "3")  # MindSpore's log level in the scheduler: errors only

TIMINGS_ENV = "SGLANG_FX_BENCH_TIMINGS"  # path of the JSON the scheduler-side timers write
MODEL = dict(hidden_size=512, intermediate_size=1024, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4, head_dim=64)


# --------------------------------------------------------------------------------------------
# The timing plugin: runs in SGLang's scheduler process (entry point group sglang.srt.plugins)
# --------------------------------------------------------------------------------------------


FIELDS = ("mode", "batch", "start", "forward", "runner", "compute", "meta", "exchange", "plan")


def register() -> None:
    """Wrap the adapter's methods with timers when SGLANG_FX_BENCH_TIMINGS names a file. One
    record per step (FIELDS; times in ns, "start" a perf_counter_ns timestamp) is kept and
    written to that file at the first prefill step after `<file>.dump` appears, then cleared."""
    path = os.environ.get(TIMINGS_ENV)
    if not path:
        return
    import json
    from time import perf_counter_ns

    from sglang_fx.sglang import model as adapter

    if getattr(adapter.SglangFxForCausalLM.forward, "_bench_timed", False):
        return  # register() runs more than once in a process
    records: list[list] = []
    cur = dict.fromkeys(FIELDS[4:], 0)

    def timed(fn, key, then=None):
        def wrapper(*args, **kwargs):
            start = perf_counter_ns()
            try:
                out = fn(*args, **kwargs)
                if then is not None:
                    then()
                return out
            finally:
                cur[key] += perf_counter_ns() - start

        wrapper._bench_timed = True
        return wrapper

    def wrap_attr(obj, name, key, then=None) -> bool:
        fn = getattr(obj, name, None)
        if fn is None or not callable(fn):
            return False
        if not getattr(fn, "_bench_timed", False):
            setattr(obj, name, timed(fn, key, then))  # an instance attribute shadows the method
        return True

    def mindspore_sync() -> None:
        import mindspore

        mindspore.runtime.synchronize()

    adapter.to_metadata = timed(adapter.to_metadata, "meta")
    forward = adapter.SglangFxForCausalLM.forward

    def timed_forward(self, input_ids, positions, forward_batch, **kwargs):
        runner, cache = self.runner, self.cache
        split = runner is not None and wrap_attr(runner, "forward", "runner")
        # The model compute: the MindSpore runner's step (K/V stores included); else the runner.
        # MindSpore launches the step asynchronously: the timer waits for it to finish, so that the
        # wait is counted as compute, not as the DLPack hand-over of the logits that would block on it.
        fine = split and wrap_attr(runner, "_step", "compute", mindspore_sync)
        if fine:
            # Informative only: the runner's DLPack exchange and attention planning.
            for obj, name, key in ((getattr(runner, "exchange", None), "from_torch", "exchange"),
                                   (getattr(runner, "exchange", None), "to_torch", "exchange"),
                                   (getattr(runner, "attn", None), "plan", "plan")):  # fmt: skip
                if obj is not None:
                    wrap_attr(obj, name, key)
        for key in cur:
            cur[key] = 0
        start = perf_counter_ns()
        out = forward(self, input_ids, positions, forward_batch, **kwargs)
        total = perf_counter_ns() - start
        mode = forward_batch.forward_mode.name
        if split and self.runner is runner and self.cache is cache:  # not a step that (re)bound the KV cache
            compute = cur["compute"] if fine else cur["runner"]
            records.append([mode, int(forward_batch.batch_size), start, total, cur["runner"], compute, cur["meta"],
                            cur["exchange"], cur["plan"]])  # fmt: skip
        if self.parallel.tp_rank != 0:  # under tensor parallelism, rank 0 reports
            records.clear()
        elif mode != "DECODE" and os.path.exists(path + ".dump"):
            tmp = path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(records, f)
            os.replace(tmp, path)
            os.remove(path + ".dump")
            records.clear()
        return out

    timed_forward._bench_timed = True
    adapter.SglangFxForCausalLM.forward = timed_forward


# --------------------------------------------------------------------------------------------
# The benchmark (main process)
# --------------------------------------------------------------------------------------------


def declare_plugin(root: str) -> None:
    """Declare `register` above as an SGLang general plugin in a dist-info under root, visible
    to this process and to SGLang's subprocesses (sys.path and PYTHONPATH)."""
    here = os.path.dirname(os.path.abspath(__file__))
    dist = os.path.join(root, "sglang_fx_bench_timers-0.0.dist-info")
    os.makedirs(dist, exist_ok=True)
    with open(os.path.join(dist, "METADATA"), "w") as f:
        f.write("Metadata-Version: 2.1\nName: sglang-fx-bench-timers\nVersion: 0.0\n")
    with open(os.path.join(dist, "entry_points.txt"), "w") as f:
        f.write(f"[sglang.srt.plugins]\nsglang_fx_bench_timers = {os.path.splitext(os.path.basename(__file__))[0]}:register\n")
    for p in (here, root):
        if p not in sys.path:
            sys.path.insert(0, p)
    os.environ["PYTHONPATH"] = os.pathsep.join([here, root, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)


def median(xs: list[float]) -> float:
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2


def bench_impl(impl: str, model: str, batches: list[int], args, timings_path: str, tp_size: int = 1, then=None) -> dict:
    """Decode step times of `impl` on `model` (see the module's docstring); then(engine), if
    given, runs on the same engine after the timed runs and its result is out["then"]."""
    import sglang

    os.environ[TIMINGS_ENV] = timings_path  # read by register() in the scheduler process
    start = time.perf_counter()
    engine = sglang.Engine(
        model_path=model, model_impl=impl, device="cpu", attention_backend="torch_native", dtype="float32",
        disable_cuda_graph=True, max_total_tokens=65536, log_level="error", tp_size=tp_size,
    )  # fmt: skip
    out = {"startup_s": time.perf_counter() - start, "steps": {}}
    try:
        prompts = [[(7 * b + 3 * j) % 500 + 3 for j in range(args.prompt_len)] for b in range(max(batches))]

        def run(batch: int, new_tokens: int) -> float:
            params = {"temperature": 0, "max_new_tokens": new_tokens, "ignore_eos": True}
            t = time.perf_counter()
            res = engine.generate(input_ids=prompts[:batch], sampling_params=params)
            elapsed = time.perf_counter() - t
            assert all(len(r["output_ids"]) == new_tokens for r in res), "ignore_eos should give every token"
            return elapsed

        out["first"] = {}
        for batch in batches:
            first = run(batch, 1 + args.steps)  # compiles what this batch size needs, where a backend compiles
            for _ in range(args.warmup):
                run(batch, 1), run(batch, 1 + args.steps)
            prefills, wholes = [], []
            for _ in range(args.repeats):
                prefills.append(run(batch, 1))
                wholes.append(run(batch, 1 + args.steps))
            # The least disturbed run of each kind (these machines are shared). Not the least of the
            # differences, which picks the run whose prefill was disturbed most.
            out["steps"][batch] = (min(wholes) - min(prefills)) / args.steps
            out["first"][batch] = first - min(wholes)  # the first call's extra time: compiling on first use
        if then is not None:
            out["then"] = then(engine)
        # Collect the scheduler-side timers: a prefill-only request after the marker file.
        open(timings_path + ".dump", "w").close()
        engine.generate(input_ids=prompts[:1], sampling_params={"temperature": 0, "max_new_tokens": 1})
        deadline = time.monotonic() + 10
        while os.path.exists(timings_path + ".dump") and time.monotonic() < deadline:
            time.sleep(0.05)
        out["records"] = []
        if os.path.exists(timings_path):
            import json

            with open(timings_path) as f:
                out["records"] = json.load(f)
        return out
    finally:
        engine.shutdown()


def layer_figures(records: list[list], batch: int) -> dict | None:
    """Medians over this batch size's decode steps, in seconds. "period": the time from one
    decode step's forward to the next one's, in the scheduler (the whole step, SGLang's work
    included), over consecutive decode steps of this batch size."""
    rows = [dict(zip(FIELDS, r)) for r in records]
    steps = [r for r in rows if r["mode"] == "DECODE" and r["batch"] == batch]
    if not steps:
        return None
    periods = [b["start"] - a["start"] for a, b in zip(rows, rows[1:])
               if a["mode"] == b["mode"] == "DECODE" and a["batch"] == b["batch"] == batch]  # fmt: skip
    med = lambda xs: median(xs) / 1e9 if xs else float("nan")  # noqa: E731
    out = {key: med([r[key] for r in steps]) for key in FIELDS[3:]}
    out.update(n=len(steps), period=med(periods), layer=med([r["forward"] - r["compute"] for r in steps]),
               adapter=med([r["forward"] - r["runner"] for r in steps]))  # fmt: skip
    return out


def read_bandwidth(gib: float = 1.0, repeats: int = 5) -> float:
    """Memory read bandwidth in bytes/s: torch.sum over a `gib` GiB float32 tensor (too large
    for any cache), on torch's default threads, best of `repeats`."""
    import torch

    x = torch.ones(int(gib * 2**30) // 4, dtype=torch.float32)
    x.sum()  # page it in
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return x.numel() * 4 / best


def weight_bytes(model: str) -> int:
    """Bytes of the checkpoint's tensors (what one decode step reads)."""
    import glob

    from sglang_fx.checkpoint import SafetensorsFile

    total = 0
    for path in glob.glob(os.path.join(model, "*.safetensors")):
        total += sum(end - begin for begin, end in (t["data_offsets"] for t in SafetensorsFile(path).tensors.values()))
    return total


def main() -> int:
    import argparse
    import tempfile

    from sglang_fx.registry import default_registry
    from sglang_fx.tiny import make_tiny_model

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--impls", nargs="+", default=["sglang", "reference_torch", "mindspore", "jax", "numpy"],
                    help="--model-impl values; the first is the baseline of the ratios")  # fmt: skip
    ap.add_argument("--model", help="smollm2 (the real SmolLM2-135M-Instruct, fetched and cached) or an HF checkpoint "
                    "directory (default: a tiny Qwen3 made here)")  # fmt: skip
    ap.add_argument("--batch", type=int, action="append", help="batch sizes (default 1 and 8)")
    ap.add_argument("--steps", type=int, default=32, help="decode steps per timed run")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    args = ap.parse_args()
    batches = args.batch or [1, 8]
    reg = default_registry()
    with tempfile.TemporaryDirectory() as tmp:
        declare_plugin(os.path.join(tmp, "plugin"))
        # JAX's persistent compilation cache in a fresh directory, so the first calls show compile time.
        os.environ.setdefault("SGLANG_FX_OPTIONS", json.dumps({"jax": {"compile_cache": os.path.join(tmp, "jax-cache")}}))
        if args.model == "smollm2":
            from sglang_fx.models import fetch

            model, described = str(fetch("smollm2")), "SmolLM2-135M-Instruct"
        elif args.model:
            model, described = args.model, args.model
        else:
            model = str(make_tiny_model("qwen3", os.path.join(tmp, "qwen3"), seed=0, **MODEL))
            described = f"qwen3 {MODEL}, vocab 512"
        print(f"model: {described}, float32; SGLang {sglang_version()} sglang.Engine on CPU "
              f"(torch_native attention), greedy, prompt {args.prompt_len} tokens, {args.steps} decode steps "
              f"per run, best of {args.repeats}", flush=True)  # fmt: skip
        results = {}
        for impl in args.impls:
            if impl not in ("sglang", "transformers") and (impl not in reg.names() or reg.info(impl).unavailable):
                print(f"skip {impl}: sglang-fx backend unavailable here", flush=True)
                continue
            results[impl] = bench_impl(impl, model, batches, args, os.path.join(tmp, f"timings-{impl}.json"))
            print(f"  {impl}: started in {results[impl]['startup_s']:.1f}s; ms/step "
                  + ", ".join(f"b={b} {results[impl]['steps'][b] * 1e3:.2f}" for b in batches), flush=True)  # fmt: skip
        bandwidth, weights = read_bandwidth(), weight_bytes(model)
    if not results:
        return 1
    floor = weights / bandwidth
    base_name = next(iter(results))
    base = results[base_name]
    print(f"\nbandwidth floor: {weights / 1e6:.0f} MB of weights / {bandwidth / 1e9:.1f} GB/s read bandwidth (measured "
          f"now) = {floor * 1e3:.1f} ms per decode step")  # fmt: skip
    head = f"{'--model-impl':<18}" + "".join(f"{f'b={b} tok/s':>12}{'ms/step':>10}{'x native':>10}{'of floor':>10}" for b in batches)
    print("decode throughput through sglang.Engine\n" + head + "\n" + "-" * len(head))
    for impl, r in results.items():
        cells = "".join(f"{b / r['steps'][b]:>12.1f}{r['steps'][b] * 1e3:>10.2f}{base['steps'][b] / r['steps'][b]:>10.2f}"
                        f"{floor / r['steps'][b]:>10.0%}" for b in batches)  # fmt: skip
        print(f"{impl:<18}{cells}")
    print(f"x native = {base_name}'s step time / this step time (throughput ratio; higher is faster); "
          f"of floor = bandwidth floor / step time")  # fmt: skip
    print("\nfirst call of each batch size (prefill + decode at that size), seconds more than the same call warm: "
          "compiling on first use (jax: with an empty persistent cache)")  # fmt: skip
    print(f"{'--model-impl':<18}" + "".join(f"{f'b={b} 1st +s':>14}" for b in batches) + f"{'start-up s':>12}")
    for impl, r in results.items():
        print(f"{impl:<18}" + "".join(f"{r['first'][b]:>14.2f}" for b in batches) + f"{r['startup_s']:>12.1f}")

    shares = []
    print("\nsglang-fx layer per decode step (timers in SGLang's scheduler process; medians over the steps above)")
    head = (f"{'--model-impl':<16}{'batch':>6}{'steps':>6}{'step ms':>9}{'forward':>9}{'compute':>9}{'to_meta':>9}"
            f"{'adapter':>9}{'exch':>7}{'plan':>7}{'layer ms':>9}{'of step':>9}{'of fwd':>8}")  # fmt: skip
    print(head + "\n" + "-" * len(head))
    for impl, r in results.items():
        for b in batches:
            f = layer_figures(r.get("records", []), b)
            if f is None:
                continue
            share = f["layer"] / f["period"]
            shares.append((impl, b, share))
            ms = lambda key: f"{f[key] * 1e3:>9.3f}"  # noqa: E731
            print(f"{impl:<16}{b:>6}{f['n']:>6}{ms('period')}{ms('forward')}{ms('compute')}{ms('meta')}{ms('adapter')}"
                  f"{f['exchange'] * 1e3:>7.3f}{f['plan'] * 1e3:>7.3f}{ms('layer')}{share:>9.1%}{f['layer'] / f['forward']:>8.1%}")  # fmt: skip
    if shares:
        print("step = one decode step in the scheduler (forward start to next forward start); forward = the adapter's "
              "forward; compute = the backend's model compute (MindSpore: compiled step + KV write; other backends: "
              "the whole runner); to_meta = ForwardBatch -> ForwardMetadata; adapter = forward - runner.forward "
              "(to_meta, KV binding check, dispatch, output); exch, plan = the MindSpore runner's DLPack exchanges and "
              "attention planning; layer = forward - compute = adapter + the runner's own glue; of step = layer / step")  # fmt: skip
        worst = max(shares, key=lambda s: s[2])
        verdict = "meets" if worst[2] < 0.05 else "MISSES"
        print(f"largest sglang-fx layer share of a decode step: {worst[2]:.1%} ({worst[0]}, batch {worst[1]}); "
              f"{verdict} the < 5% target")  # fmt: skip
    return 0


def sglang_version() -> str:
    import importlib.metadata as md

    return md.version("sglang")


if __name__ == "__main__":
    sys.exit(main())
