"""Serving speed and memory with SGLang's own tools: SGLang native vs sglang-fx backends, one run.

    python benchmarks/serving.py                   # SmolLM2-135M-Instruct, every stage, every impl (~40 min)
    python benchmarks/serving.py --quick           # fewer prompts and repeats, for iterating (~15 min)
    python benchmarks/serving.py --impls sglang jax --stages prefill serving --model DIR

One float32 checkpoint (default: the real SmolLM2-135M-Instruct, `sglang-fx fetch-model`), one
--model-impl after the other (the first is the baseline of every ratio), nothing else running.
SGLang's chunked-prefill size is pinned (`--chunked-prefill-size`, default 2048): SGLang sizes it
from host memory otherwise. Stages (`--stages`):

- prefill: `python -m sglang_fx.sglang.bench_one_batch` (SGLang's one_batch with the plugins
  loaded) at batch 1 and 8, input 128 and 512. Each shape runs twice in the sweep (the batch
  sizes are listed twice) and the faster run counts: the first may compile (MindSpore graphs,
  JAX programs). Prefill tokens/s is also shown as a share of the compute floor: 2 x parameters
  FLOPs per token at the float32 matmul rate measured in this run.
- serving: one server per impl (`python -m sglang_fx.sglang.launch_server`, --sleep-on-idle),
  SGLang's `bench_serving` with random ids: chat (in 512 / out 64, 48 prompts, 8 concurrent) and
  decode-heavy (in 64 / out 192, 32 prompts, 16 concurrent), each after an untimed warm-up round
  of the same shapes (as many prompts, another seed). A backend that compiles per decode batch
  size and has a `precompile` option gets the sizes up to the workloads' concurrency compiled at
  start-up, as SGLang captures CUDA graphs at start-up: otherwise a batch size the warm-up round
  happened not to form compiles inside the timed round. Memory: the resident set of the server's processes (launcher, scheduler,
  detokenizer) summed, sampled every 0.5 s; the peak over the timed rounds is reported.
- offline: `python -m sglang.benchmark.offline_throughput`, generated-shared-prefix dataset.
- decode: steady decode at batch 1, 8 and 32 through sglang.Engine, against the bandwidth floor
  (weight bytes / read bandwidth measured in this run), with the sglang-fx layer's share of a
  decode step (benchmarks/sglang_decode.py measures both; this stage calls it).

The last table prints every figure with its ratio to the baseline, and the issue's target for
it where there is one (met / MISSED). Timings on shared machines swing by 2x: compare ratios
from one run only.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sglang_decode  # noqa: E402  (sets SGLANG_USE_CPU_ENGINE for this process and its children)
from processes import Memory  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
LOCAL_SHAREGPT = ROOT / "examples" / "data" / "prompts.sharegpt.json"
CPU = ["--device", "cpu", "--attention-backend", "torch_native", "--dtype", "float32", "--disable-cuda-graph",
       "--max-total-tokens", "65536"]  # fmt: skip
#: Every server and offline engine runs SGLang's plain scheduler loop: sglang-fx chooses it on CPU
#: (sglang_fx/sglang/plugin.py `synchronous_schedule`: the overlap loop only holds each step's
#: tokens back one step there), and native gets the same loop so that the figures compare steps.
SCHEDULE = ["--disable-overlap-schedule"]
STAGES = ("prefill", "serving", "offline", "decode")
PREFILL_SHAPES = [(1, 128), (1, 512), (8, 128), (8, 512)]  # (batch, input tokens)


@dataclass(frozen=True)
class Workload:
    name: str
    input_len: int
    output_len: int
    prompts: int
    concurrency: int


WORKLOADS = (Workload("chat", 512, 64, 48, 8), Workload("decode-heavy", 64, 192, 32, 16))


@dataclass
class Result:
    """Every figure of one --model-impl, by row name (see ROWS)."""

    impl: str
    figures: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------
# Running SGLang's tools
# ------------------------------------------------------------------------------------------


def env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "SGLANG_USE_CPU_ENGINE": "1", "GLOG_v": "3"}


def tool(args: list[str], cwd: str, timeout: float, log: Path) -> None:
    """`python -m ARGS` in its own session (a timeout ends the whole group), output to `log`;
    raises with the log's tail when it fails."""
    with open(log, "a") as f:
        proc = subprocess.Popen([PYTHON, "-m", *args], env=env(), cwd=cwd, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            code = "timeout"
    if code != 0:
        raise RuntimeError(f"{args[0]} failed ({code}); see {log}:\n{log.read_text(errors='replace')[-3000:]}")


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


# ------------------------------------------------------------------------------------------
# Stages
# ------------------------------------------------------------------------------------------


def prefill_stage(impl: str, model: str, args, work: Path, r: Result) -> None:
    out = work / f"one_batch-{impl}.jsonl"
    batches = sorted({b for b, _ in PREFILL_SHAPES})
    lens = sorted({n for _, n in PREFILL_SHAPES})
    tool(["sglang_fx.sglang.bench_one_batch", "--model-path", model, "--model-impl", impl, *CPU,
          "--chunked-prefill-size", str(args.chunked_prefill_size),
          "--batch-size", *map(str, batches + batches), "--input-len", *map(str, lens), "--output-len", "4",
          "--result-filename", str(out)], str(work), 1800, work / f"one_batch-{impl}.log")  # fmt: skip
    for rec in jsonl(out):
        key = f"prefill b={rec['batch_size']} in={rec['input_len']} s"
        r.figures[key] = min(r.figures.get(key, float("inf")), rec["prefill_latency"])


def precompile_options(impl: str) -> dict[str, str]:
    """SGLANG_FX_OPTIONS for `impl`'s server: its `precompile` option (where it has one) set to the
    default decode batch sizes up to the most concurrent requests of WORKLOADS."""
    from sglang_fx.buckets import DECODE_BATCHES
    from sglang_fx.registry import default_registry

    reg = default_registry()
    if impl not in reg.names() or "precompile" not in reg.info(impl).capabilities.options:
        return {}
    sizes = [b for b in DECODE_BATCHES if b <= max(w.concurrency for w in WORKLOADS)]
    options = json.loads(os.environ.get("SGLANG_FX_OPTIONS", "{}"))
    options[impl] = {**options.get(impl, {}), "precompile": ",".join(map(str, sizes))}
    return {"SGLANG_FX_OPTIONS": json.dumps(options)}


def serving_stage(impl: str, model: str, args, work: Path, r: Result) -> None:
    from sglang_fx.distributed import free_ports

    port = free_ports(1)[0]
    log = work / f"server-{impl}.log"
    with open(log, "w") as f:
        server = subprocess.Popen(
            [PYTHON, "-m", "sglang_fx.sglang.launch_server", "--model-path", model, "--model-impl", impl, *CPU, *SCHEDULE,
             "--chunked-prefill-size", str(args.chunked_prefill_size), "--sleep-on-idle", "--host", "127.0.0.1",
             "--port", str(port)], env={**env(), **precompile_options(impl)}, cwd=str(work), stdout=f, stderr=subprocess.STDOUT,
            start_new_session=True)  # fmt: skip
    memory = None
    try:
        wait_ready(f"http://127.0.0.1:{port}", server, log, timeout=900)
        memory = Memory(server.pid)
        peak = 0
        for w in WORKLOADS:
            prompts = max(w.concurrency, w.prompts // (3 if args.quick else 1))
            base = ["sglang.bench_serving", "--backend", "sglang", "--base-url", f"http://127.0.0.1:{port}",
                    "--dataset-name", "random-ids", "--random-input-len", str(w.input_len), "--random-output-len",
                    str(w.output_len), "--random-range-ratio", "1", "--max-concurrency", str(w.concurrency),
                    "--disable-tqdm"]  # fmt: skip
            tool([*base, "--num-prompts", str(prompts), "--seed", "7"], str(work), 1800, work / f"warmup-{impl}.log")
            out = work / f"serving-{impl}-{w.name}.jsonl"
            memory.reset()
            tool([*base, "--num-prompts", str(prompts), "--seed", "1", "--output-file", str(out)], str(work), 3600,
                 work / f"serving-{impl}.log")  # fmt: skip
            peak = max(peak, memory.peak())
            rec = jsonl(out)[-1]
            r.figures[f"{w.name}: output tok/s"] = rec["output_throughput"]
            r.figures[f"{w.name}: mean TTFT s"] = rec["mean_ttft_ms"] / 1e3
            r.figures[f"{w.name}: median TPOT ms"] = rec["median_tpot_ms"]
        r.figures["server peak memory GiB"] = peak / 2**30
    finally:
        if memory is not None:
            memory.stop()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    import requests

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}; see {log}:\n{log.read_text(errors='replace')[-3000:]}")
        with contextlib.suppress(requests.RequestException):
            if requests.get(url + "/health_generate", timeout=10).status_code == 200:
                return
        time.sleep(1)
    raise RuntimeError(f"server not ready after {timeout:.0f} s; see {log}")


def offline_stage(impl: str, model: str, args, work: Path, r: Result) -> None:
    out = work / f"offline-{impl}.jsonl"
    groups = 4 if args.quick else 8
    tool(["sglang.benchmark.offline_throughput", "--model-path", model, "--model-impl", impl, *CPU, *SCHEDULE,
          "--chunked-prefill-size", str(args.chunked_prefill_size), "--dataset-name", "generated-shared-prefix",
          "--gsp-num-groups", str(groups), "--gsp-prompts-per-group", "8", "--gsp-system-prompt-len", "512",
          "--gsp-question-len", "64", "--gsp-output-len", "64", "--dataset-path", str(LOCAL_SHAREGPT),
          "--result-filename", str(out)], str(work), 3600, work / f"offline-{impl}.log")  # fmt: skip
    r.figures["offline: output tok/s"] = jsonl(out)[-1]["output_throughput"]


def decode_stage(impl: str, model: str, args, work: Path, r: Result) -> None:
    opts = argparse.Namespace(prompt_len=32, steps=32, warmup=1, repeats=1 if args.quick else 3)
    batches = [1, 8, 32]
    out = sglang_decode.bench_impl(impl, model, batches, opts, str(work / f"timings-{impl}.json"))
    for b in batches:
        r.figures[f"decode b={b} ms/step"] = out["steps"][b] * 1e3
        layer = sglang_decode.layer_figures(out.get("records", []), b)
        if layer is not None and impl != "sglang":
            r.figures[f"sglang-fx layer share b={b} %"] = 100 * layer["layer"] / layer["period"]


# ------------------------------------------------------------------------------------------
# Machine limits and the table
# ------------------------------------------------------------------------------------------


def matmul_rate(n: int = 2048, repeats: int = 5) -> float:
    """float32 FLOP/s of torch.mm on [n, n] x [n, n] (all threads), best of `repeats`."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * n**3 / best


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


#: (row, higher is better, target ratio to the baseline or None). A target "x" means this impl's
#: figure / the baseline's figure must be >= x (higher is better) or <= x (lower is better).
ROWS: list[tuple[str, bool, float | None]] = [
    *[(f"prefill b={b} in={n} s", False, 1.0) for b, n in PREFILL_SHAPES],
    *[(f"prefill b={b} in={n} % of compute floor", True, None) for b, n in PREFILL_SHAPES],
    *[(f"{w.name}: {m}", hi, t) for w in WORKLOADS
      for m, hi, t in (("output tok/s", True, 1.3), ("mean TTFT s", False, 1.0), ("median TPOT ms", False, None))],
    ("offline: output tok/s", True, 1.3),
    ("decode b=1 ms/step", False, None),
    ("decode b=1 % of bandwidth floor", True, None),
    ("decode b=8 ms/step", False, 1 / 1.5),
    ("decode b=32 ms/step", False, 1 / 1.5),
    ("server peak memory GiB", False, 1.2),
    *[(f"sglang-fx layer share b={b} %", False, None) for b in (1, 8, 32)],
]  # fmt: skip


def derive(r: Result, params: int, flops: float, floor_s: float) -> None:
    """Figures computed from measured ones and this run's machine limits."""
    for b, n in PREFILL_SHAPES:
        s = r.figures.get(f"prefill b={b} in={n} s")
        if s:
            r.figures[f"prefill b={b} in={n} % of compute floor"] = 100 * (b * n / s) * 2 * params / flops
    step = r.figures.get("decode b=1 ms/step")
    if step:
        r.figures["decode b=1 % of bandwidth floor"] = 100 * floor_s * 1e3 / step


def table(results: list[Result]) -> str:
    base = results[0]
    width = 16
    lines = [f"{'figure':<40}" + "".join(f"{r.impl:>{width}}" for r in results) + "   target (vs " + base.impl + ")"]
    lines.append("-" * len(lines[0]))
    verdicts = []
    for row, higher, target in ROWS:
        if not any(row in r.figures for r in results):
            continue
        cells, b = [], base.figures.get(row)
        for r in results:
            v = r.figures.get(row)
            if v is None:
                cells.append(f"{'-':>{width}}")
                continue
            ratio = f" ({v / b:.2f}x)" if b and r is not base else ""
            cells.append(f"{f'{v:.3g}{ratio}':>{width}}")
            if target is not None and b and r is not base:
                met = v / b >= target if higher else v / b <= target
                verdicts.append(f"{r.impl} {row}: {v / b:.2f}x, target {'>=' if higher else '<='} {target:.2f}x: "
                                f"{'met' if met else 'MISSED'}")  # fmt: skip
        goal = "" if target is None else f"   {'>=' if higher else '<='} {target:.2f}x"
        lines.append(f"{row:<40}" + "".join(cells) + goal)
    return "\n".join(lines + ["", *verdicts])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--impls", nargs="+", default=["sglang", "mindspore", "jax", "reference_torch"],
                    help="--model-impl values; the first is the baseline")  # fmt: skip
    ap.add_argument("--model", default="smollm2", help="smollm2 (fetched and cached) or an HF checkpoint directory")
    ap.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    ap.add_argument("--chunked-prefill-size", type=int, default=2048)
    ap.add_argument("--quick", action="store_true", help="a third of the prompts, fewer repeats")
    ap.add_argument("--json", help="also write every figure to this file")
    ap.add_argument("--logs", help="keep the servers' and tools' logs in this directory (default: a temporary one)")
    args = ap.parse_args()

    from sglang_fx.registry import default_registry

    model = str(__import__("sglang_fx.models", fromlist=["fetch"]).fetch("smollm2")) if args.model == "smollm2" else args.model
    reg, results = default_registry(), []
    stages = {"prefill": prefill_stage, "serving": serving_stage, "offline": offline_stage, "decode": decode_stage}
    with tempfile.TemporaryDirectory(prefix="sglang-fx-serving-") as tmp:
        work = Path(args.logs or tmp)
        work.mkdir(parents=True, exist_ok=True)
        if "decode" in args.stages:
            sglang_decode.declare_plugin(str(work / "plugin"))
        # JAX's persistent compilation cache in a fresh directory: first-use compiles count.
        os.environ.setdefault("SGLANG_FX_OPTIONS", json.dumps({"jax": {"compile_cache": str(work / "jax-cache")}}))
        print(f"model {model}, float32, SGLang {sglang_decode.sglang_version()} on CPU, chunked prefill "
              f"{args.chunked_prefill_size}, stages {' '.join(args.stages)}{' (quick)' if args.quick else ''}", flush=True)
        for impl in args.impls:
            if impl not in ("sglang", "transformers") and (impl not in reg.names() or reg.info(impl).unavailable):
                print(f"skip {impl}: sglang-fx backend unavailable here", flush=True)
                continue
            r = Result(impl)
            for name in args.stages:
                start = time.perf_counter()
                try:
                    stages[name](impl, model, args, work, r)
                except Exception as e:  # one failed stage must not lose the others' figures
                    r.notes.append(f"{name} failed: {e}")
                print(f"  {impl} {name}: {time.perf_counter() - start:.0f} s", flush=True)
            results.append(r)
        flops, bandwidth = matmul_rate(), sglang_decode.read_bandwidth()
        weights = sglang_decode.weight_bytes(model)
    if not results:
        return 1
    params = weights // 4
    for r in results:
        derive(r, params, flops, weights / bandwidth)
    print(f"\nmachine (measured now): float32 matmul {flops / 1e9:.0f} GFLOP/s, read bandwidth {bandwidth / 1e9:.1f} GB/s; "
          f"{params / 1e6:.0f} M parameters: compute floor {2 * params / flops * 1e3:.3f} ms per prefill token, "
          f"bandwidth floor {weights / bandwidth * 1e3:.1f} ms per decode step\n")  # fmt: skip
    print(table(results))
    for r in results:
        for note in r.notes:
            print(f"{r.impl}: {note}")
    if args.json:
        Path(args.json).write_text(json.dumps({r.impl: r.figures for r in results}, indent=1))
    return 0 if not any(r.notes for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
