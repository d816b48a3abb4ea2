"""Decode step time per backend, measured in one run on one tiny-but-not-trivial Qwen3.

    python benchmarks/decode.py [--model qwen3|qwen3_moe] [--model-path DIR] [--w8a8] [--variant LABEL=BACKEND[:KEY=VALUE,...]] [--steps N]

Default variants: mindspore-jit, mindspore-jit-dynamic (jit without the fixed-batch decode
graphs: decode_batches=none), mindspore-pynative, jax, jax-scan (layers=scan), reference_torch,
numpy (those whose backend is available). `--model qwen3_moe`: a Qwen3-MoE-shaped model (64 experts,
top-8), e.g. with `--variant jax=jax --variant jax-dense=jax:moe=dense` for the JAX backend's
expert dispatch against running every expert densely. `--model-path DIR`: a checkpoint of your own (e.g. SmolLM2 from
`sglang-fx fetch-model smollm2`) instead of the tiny model. `--w8a8`: every variant also runs on the
checkpoint quantized by `sglang-fx quantize --scheme w8a8` (label suffix -w8a8), and the quantized
linears' weight bytes are printed, float32 against int8 + scales. Each variant prefills `--prompt-len` tokens per sequence, warms up, then times
`--steps` decode steps at each batch size (median step time). That repeats for `--rounds`
rounds, the variants taking turns, and the table gives each variant's best round and its ratio
to the first variant's. Shared machines slow down for seconds at a time: the best of rounds
taken in turns compares the variants at their least disturbed; compare ratios from one run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sglang_fx.checkpoint import expected_weights, load_spec
from sglang_fx.generate import Session
from sglang_fx.quantize import quantize
from sglang_fx.registry import default_registry
from sglang_fx.tiny import make_tiny_model

MODEL = dict(hidden_size=512, intermediate_size=1024, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4, head_dim=64)
MOE_MODEL = dict(MODEL, num_hidden_layers=4, moe_intermediate_size=256, num_experts=64, num_experts_per_tok=8)
MODELS = {"qwen3": MODEL, "qwen3_moe": MOE_MODEL}
DEFAULT_VARIANTS = ["mindspore-jit=mindspore:mode=jit", "mindspore-jit-dynamic=mindspore:mode=jit,decode_batches=none",
                    "mindspore-pynative=mindspore:mode=pynative", "jax=jax", "jax-scan=jax:layers=scan", "reference_torch=reference_torch",
                    "numpy=numpy"]  # fmt: skip


def parse_variant(text: str) -> tuple[str, str, dict[str, str]]:
    label, _, target = text.partition("=")
    backend, _, opts = target.partition(":")
    options = dict(kv.split("=", 1) for kv in opts.split(",") if kv)
    return label, backend, options


def time_decode(session: Session, batch: int, prompt_len: int, steps: int, warmup: int) -> float:
    """Median seconds per decode step for `batch` sequences."""
    prompts = [[(7 * b + j) % 500 + 3 for j in range(prompt_len)] for b in range(batch)]
    seqs = [session.new_sequence(p)[0] for p in prompts]
    logits = session.forward(seqs, prompts)
    times = []
    for i in range(warmup + steps):
        nxt = logits.argmax(-1).tolist()
        start = time.perf_counter()
        logits = session.forward(seqs, [[t] for t in nxt])
        if i >= warmup:
            times.append(time.perf_counter() - start)
    for s in seqs:
        session.release(s)
    return statistics.median(times)


def measure(variant: str, path: str, args: argparse.Namespace) -> dict:
    """One variant, in this process: load, first call, median decode step per batch size."""
    label, backend, options = parse_variant(variant)
    start = time.perf_counter()
    session = Session(backend, path, dtype="float32", page_size=16, options=options)
    load = time.perf_counter() - start
    first = time.perf_counter()
    session.generate([[5, 6, 7]], 2, keep_cached=False)  # first call: compiles graphs if any
    first = time.perf_counter() - first
    steps = [time_decode(session, b, args.prompt_len, args.steps, args.warmup) for b in args.batch]
    return {"label": label, "load": load, "first": first, "steps": steps}


def weight_bytes(quantized: Path) -> str:
    """The quantized linears' weight bytes: float32 against int8 plus float32 scales."""
    spec = load_spec(quantized, "float32")
    shapes = expected_weights(spec)
    elements = sum(shapes[n + ".weight"][0] * shapes[n + ".weight"][1] for n in spec.quant.linears)
    scales = sum(shapes[n + ".weight"][0] for n in spec.quant.linears)
    return (f"W8A8: {len(spec.quant.linears)} quantized linears, {4 * elements / 2**20:.1f} MiB as float32, "
            f"{(elements + 4 * scales) / 2**20:.1f} MiB as int8 + scales ({(elements + 4 * scales) / (4 * elements):.2f}x)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=MODELS, default="qwen3", help="the tiny architecture and its sizes (default qwen3)")
    ap.add_argument("--variant", action="append", help="LABEL=BACKEND[:KEY=VALUE,...] (repeatable)")
    ap.add_argument("--batch", type=int, action="append", help="batch sizes (default 1 and 8)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3, help="times each variant is measured, in turns (best kept)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--model-path", help="a checkpoint directory instead of the tiny --model")
    ap.add_argument("--w8a8", action="store_true", help="also run every variant on the checkpoint quantized to W8A8")
    ap.add_argument("--measure", nargs=2, metavar=("VARIANT", "MODEL"), help=argparse.SUPPRESS)  # child mode
    args = ap.parse_args()
    args.batch = args.batch or [1, 8]
    if args.measure:
        print(json.dumps(measure(*args.measure, args)))
        return
    reg = default_registry()
    variants = []
    for variant in args.variant or DEFAULT_VARIANTS:
        label, backend, _ = parse_variant(variant)
        if backend not in reg.names() or reg.info(backend).unavailable:
            print(f"skip {label}: backend {backend!r} unavailable here")
        else:
            variants.append(variant)
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        if args.model_path:
            path = Path(args.model_path)
            print(f"model: {path}, float32, page size 16; {args.steps} timed decode steps after {args.warmup} warm-up;")
        else:
            path = make_tiny_model(args.model, Path(tmp) / "float", seed=0, **MODELS[args.model])
            print(f"model: {args.model} {MODELS[args.model]}, float32, page size 16; {args.steps} timed decode steps after {args.warmup} warm-up;")
        print(f"best of {args.rounds} rounds; each variant runs in its own process (torch's and MindSpore's thread pools interfere in one)")
        jobs = [(v, path) for v in variants]
        if args.w8a8:
            quantized = quantize(path, Path(tmp) / "w8a8")
            jobs += [(v.replace("=", "-w8a8=", 1), quantized) for v in variants]
            print(weight_bytes(quantized))
        for _ in range(args.rounds):
            for variant, model in jobs:
                child = [sys.executable, __file__, "--measure", variant, str(model), "--steps", str(args.steps),
                         "--warmup", str(args.warmup), "--prompt-len", str(args.prompt_len)]  # fmt: skip
                child += [a for b in args.batch for a in ("--batch", str(b))]
                proc = subprocess.run(child, capture_output=True, text=True)
                if proc.returncode:
                    raise SystemExit(f"{variant} on {model} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
                out = proc.stdout
                r = json.loads(out.strip().splitlines()[-1])
                best = rows.setdefault(r["label"], r)
                for key in ("load", "first"):
                    best[key] = min(best[key], r[key])
                best["steps"] = [min(a, b) for a, b in zip(best["steps"], r["steps"])]
    rows = list(rows.values())
    if not rows:
        return
    base = rows[0]["steps"]
    head = f"{'variant':<22}{'load s':>8}{'1st call s':>12}" + "".join(f"{f'b={b} ms/step':>16}{'ratio':>8}" for b in args.batch)
    print(head + "\n" + "-" * len(head))
    for r in rows:
        cells = "".join(f"{t * 1e3:>16.2f}{t / b0:>8.2f}" for t, b0 in zip(r["steps"], base))
        print(f"{r['label']:<22}{r['load']:>8.2f}{r['first']:>12.2f}{cells}")
    print(f"ratio = step time / {rows[0]['label']}'s step time at the same batch size (lower is faster)")


if __name__ == "__main__":
    main()
