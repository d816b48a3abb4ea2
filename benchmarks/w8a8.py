"""W8A8 int8 against float32 on the real SmolLM2-135M-Instruct, every backend that runs W8A8, one run.

    python benchmarks/w8a8.py [--impls mindspore jax reference_torch numpy] [--batch 1 --batch 8 --batch 32]
    python benchmarks/w8a8.py --quick        # batch 1 and 8, 8 decode steps, best of 2: a check that it runs

The W8A8 checkpoint is `sglang-fx fetch-model smollm2 --quantize w8a8` (compressed-tensors,
int8 weights per channel, activations int8 per token; the embedding, norms and the tied LM head
stay float). For each --model-impl, float32 then W8A8, one sglang.Engine each (CPU, torch_native
attention, --dtype float32), one after the other:
- decode step time at each batch size (benchmarks/sglang_decode.py's method: the fastest
  prefill-plus-decode run minus the fastest prefill-only run, over the decode steps);
- peak resident memory of the engine's processes (scheduler, detokenizer; this process
  excluded), sampled every 0.5 s from start-up to shutdown;
- greedy answers to the demo's prompts through the same engine, with top-2 logprobs: W8A8
  tokens against the first backend's W8A8 tokens, judged as tests/test_sglang_engine.py's
  W8A8 test does (tests/sglang_support: identical, a near-tie, a rounding flip within twice the
  two runs' logprob spread, or different; counted), and how many leading tokens agree with float.
Also the checkpoint's weight bytes, float32 vs W8A8. Timings on shared machines swing by 2x:
compare the ratios of one run. Every engine process is ended before the script exits, also when
a run fails.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]
import sglang_decode  # noqa: E402  (sets SGLANG_USE_CPU_ENGINE for this process and its children)
from processes import Memory, end_children  # noqa: E402
from tests.sglang_support import flip_verdict, leading_agreement, logprob_spread  # noqa: E402

PROMPTS = ["The capital of France is", "What is the capital of France?", "def fibonacci(n):"]


def answers(model: str):
    """then(engine): greedy answers to PROMPTS (the question in the chat template) in /generate's
    format: {"output_ids", "text", "meta_info": {"output_top_logprobs": top 2 per token}}."""
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(model)
    ids = [tok.encode(PROMPTS[0]),
           tok.apply_chat_template([{"role": "user", "content": PROMPTS[1]}], add_generation_prompt=True, return_dict=False),
           tok.encode(PROMPTS[2])]  # fmt: skip

    def run(engine) -> list[dict]:
        res = engine.generate(input_ids=ids, sampling_params={"temperature": 0, "max_new_tokens": 16}, return_logprob=True,
                              top_logprobs_num=2)  # fmt: skip
        return [{"output_ids": r["output_ids"], "text": tok.decode(r["output_ids"]),
                 "meta_info": {"output_top_logprobs": [top[:2] for top in r["meta_info"]["output_top_logprobs"]]}}
                for r in res]  # fmt: skip

    return run


def main() -> int:
    from sglang_fx.models import fetch
    from sglang_fx.quant import W8A8_INT8
    from sglang_fx.registry import default_registry

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--impls", nargs="+", default=["mindspore", "jax", "reference_torch", "numpy"])
    ap.add_argument("--batch", type=int, action="append", help="batch sizes (default 1, 8 and 32)")
    ap.add_argument("--steps", type=int, default=16, help="decode steps per timed run")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="batch 1 and 8 (unless --batch), 8 steps, best of 2, no warm-up")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.repeats, args.warmup = 8, 2, 0
    batches = args.batch or ([1, 8] if args.quick else [1, 8, 32])
    reg = default_registry()
    models = {"float32": str(fetch("smollm2")), "w8a8": str(fetch("smollm2", quantize="w8a8"))}
    impls = [i for i in args.impls if i in reg.names() and not reg.info(i).unavailable
             and W8A8_INT8 in reg.info(i).capabilities.quantization]  # fmt: skip
    for skipped in sorted(set(args.impls) - set(impls)):
        print(f"skip {skipped}: unavailable here, or it does not run {W8A8_INT8}", flush=True)
    print(f"SmolLM2-135M-Instruct, sglang.Engine on CPU (torch_native attention, --dtype float32), greedy, prompt "
          f"{args.prompt_len} tokens, {args.steps} decode steps per run, best of {args.repeats}", flush=True)  # fmt: skip
    results: dict[tuple[str, str], dict] = {}
    started = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            sglang_decode.declare_plugin(os.path.join(tmp, "plugin"))
            for impl in impls:
                for kind, model in models.items():
                    memory, start = Memory(os.getpid(), include_root=False), time.perf_counter()
                    try:
                        r = sglang_decode.bench_impl(impl, model, batches, args, os.path.join(tmp, f"t-{impl}-{kind}.json"),
                                                     then=answers(model))  # fmt: skip
                    finally:
                        peak = memory.stop()
                    results[impl, kind] = {**r, "memory": peak}
                    print(f"  {impl} {kind}: {time.perf_counter() - start:.0f} s; ms/step "
                          + ", ".join(f"b={b} {r['steps'][b] * 1e3:.1f}" for b in batches), flush=True)  # fmt: skip
    finally:
        left = end_children()  # an engine that failed to start or to shut down
        if left:
            print(f"ended {len(left)} leftover engine process(es): {left}", flush=True)
    print(f"all engines: {time.perf_counter() - started:.0f} s", flush=True)
    if not results:
        return 1
    f_bytes, q_bytes = (sglang_decode.weight_bytes(m) for m in models.values())
    print(f"\nweight bytes: float32 {f_bytes / 1e6:.1f} MB, W8A8 {q_bytes / 1e6:.1f} MB ({q_bytes / f_bytes:.2f}x; the "
          f"embedding, norms and the tied LM head stay float)")  # fmt: skip
    head = f"{'--model-impl':<16}" + "".join(f"{f'b={b} f32 ms':>13}{'W8A8 ms':>9}{'speed-up':>9}" for b in batches)
    head += f"{'f32 MiB':>9}{'W8A8 MiB':>10}{'ratio':>7}"
    print("decode step time and engine memory, float32 vs W8A8\n" + head + "\n" + "-" * len(head))
    for impl in impls:
        f, q = results[impl, "float32"], results[impl, "w8a8"]
        cells = "".join(f"{f['steps'][b] * 1e3:>13.1f}{q['steps'][b] * 1e3:>9.1f}{f['steps'][b] / q['steps'][b]:>8.2f}x" for b in batches)
        print(f"{impl:<16}{cells}{f['memory'] / 2**20:>9.0f}{q['memory'] / 2**20:>10.0f}{q['memory'] / max(f['memory'], 1):>6.2f}x")
    print("speed-up = float32 step time / W8A8 step time; memory = peak RSS of the engine's processes")
    first = impls[0]
    print(f"\ngreedy answers through SGLang (16 tokens): W8A8 vs {first}'s W8A8, and leading tokens equal to float32")
    base = results[first, "w8a8"]["then"]
    spreads = {impl: logprob_spread(results[impl, "w8a8"]["then"], base) for impl in impls}
    print("  logprob spread vs " + first + " where the tokens agree: " + ", ".join(f"{i} {s:.3g}" for i, s in spreads.items()))
    counts = dict.fromkeys(("same", "near-tie", "rounding flip", "other"), 0)
    for p, prompt in enumerate(PROMPTS):
        print(f"  {prompt!r}: W8A8 {base[p]['text']!r}; float32 {results[first, 'float32']['then'][p]['text']!r}")
        for impl in impls:
            got, flt = results[impl, "w8a8"]["then"][p], results[impl, "float32"]["then"][p]
            kind, v = flip_verdict(got, base[p], spreads[impl])
            counts[kind] += 1
            print(f"    {impl:<16} vs {first}: {kind:<13} {v if v != kind else '':<36} agrees with its float32 on the first "
                  f"{leading_agreement(got['output_ids'], flt['output_ids'])} of {len(got['output_ids'])} tokens")  # fmt: skip
    print(f"W8A8 across backends: {counts} (per-token int8 activations on this checkpoint flip at rounding boundaries "
          "under float rounding noise: tests/test_sglang_engine.py::test_engine_backends_serve_the_w8a8_real_model)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
