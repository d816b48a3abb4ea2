"""Run the same greedy requests through SGLang with several --model-impl values and compare.

    python examples/sglang_compare.py --model /tmp/sg/qwen3 --impls sglang reference_torch
    python examples/sglang_compare.py --model /tmp/sg/qwen3 --impls sglang mindspore --tp-size 2 --hf

Each implementation gets its own sglang.Engine (CPU, float32, torch_native attention), one
after the other, and runs: a batch of prompts of different lengths; prompts sharing a prefix
with the first batch (radix-cache hits); a long prompt split by chunked prefill; random
sampling (SGLang's sampler path; only the lengths are compared); and input logprobs with
top-k. Prints a JSON report (tokens, logprob differences, timings) and exits 1 if the greedy
tokens differ. --tp-size/--ep-size run every engine tensor-parallel (experts split ep ways);
--hf also reports each engine's input logprobs against transformers on the same checkpoint.

With --answers N each engine instead answers only the --prompt texts (default the demo's
questions), greedily, N tokens each, with the top-2 logprobs of every output token (SGLang's
/generate format), and the script compares nothing itself: the caller judges, for instance
counting near-ties (tests/sglang_support.verdict) where rounding may flip a greedy token.

    python examples/sglang_compare.py --model DIR --impls reference_torch jax --answers 16
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from sglang_fx.sglang import use_cpu_engine
from sglang_fx.tiny import SAMPLE_PROMPTS

use_cpu_engine()  # before sglang is imported, here and in SGLang's subprocesses

PROMPTS = SAMPLE_PROMPTS
SHARED = [p + " and then some more words" for p in PROMPTS[:5]]  # prefixes cached by the first batch
LONG = " ".join(f"word{i % 17} w{i % 5}" for i in range(60))  # > chunked_prefill_size tokens
#: --answers' default prompts: the demo's real-model questions (tests/test_models.py's too)
DEMO_PROMPTS = ["The capital of France is", "def fibonacci(n):", "Water boils at a temperature of"]


def answers(engine, prompts: list[str], max_new_tokens: int) -> list[dict]:
    """Greedy answers of max_new_tokens tokens: per prompt {"output_ids", "text", "meta_info":
    {"output_top_logprobs": per output token [[logprob, token id, None] x 2], best first}}."""
    params = {"temperature": 0.0, "max_new_tokens": max_new_tokens, "ignore_eos": True}
    res = engine.generate(prompts, params, return_logprob=True, top_logprobs_num=2)
    return [{"output_ids": r["output_ids"], "text": r["text"],
             "meta_info": {"output_top_logprobs": [list(top[:2]) for top in r["meta_info"]["output_top_logprobs"]]}}
            for r in res]  # fmt: skip


def run(impl: str, model: str, max_new_tokens: int, repeats: int, page_size: int = 1, tp_size: int = 1, ep_size: int = 1,
        answer_prompts: list[str] | None = None) -> dict:  # fmt: skip
    """The requests of the module's docstring on one engine; with answer_prompts, only
    answers(engine, answer_prompts, max_new_tokens)."""
    import sglang

    greedy = {"temperature": 0.0, "max_new_tokens": max_new_tokens, "ignore_eos": True}
    t0 = time.perf_counter()
    engine = sglang.Engine(
        model_path=model,
        model_impl=impl,
        device="cpu",
        attention_backend="torch_native",
        dtype="float32",
        disable_cuda_graph=True,
        max_total_tokens=8192,
        chunked_prefill_size=64,
        page_size=page_size,
        tp_size=tp_size,
        ep_size=ep_size,
        log_level="error",
    )
    startup = time.perf_counter() - t0
    try:
        out = {"startup_s": round(startup, 2)}
        if answer_prompts:
            t = time.perf_counter()
            out["answers"] = answers(engine, answer_prompts, max_new_tokens)
            out["timings"] = {"answers_ms": round(1000 * (time.perf_counter() - t), 1)}
            return out
        out["batch"] = [o["output_ids"] for o in engine.generate(PROMPTS, greedy)]
        shared = engine.generate(SHARED, greedy)
        out["shared"] = [o["output_ids"] for o in shared]
        out["cached_tokens"] = [o["meta_info"]["cached_tokens"] for o in shared]
        out["long"] = engine.generate(LONG, greedy)["output_ids"]
        # temperature > 0 (and top_k != 1) takes the sampler's softmax path, which updates the
        # logits in place; random tokens, so only the lengths are compared
        sample = {"temperature": 1.0, "top_p": 0.9, "max_new_tokens": 8, "ignore_eos": True}
        out["sampled_lens"] = [len(o["output_ids"]) for o in engine.generate(PROMPTS[:4], sample)]
        lp = engine.generate(PROMPTS[2], {**greedy, "max_new_tokens": 4}, return_logprob=True,
                             logprob_start_len=0, top_logprobs_num=3)["meta_info"]
        out["input_ids"] = [x[1] for x in lp["input_token_logprobs"]]
        out["input_logprobs"] = [x[0] for x in lp["input_token_logprobs"]]
        out["input_top_ids"] = [[t[1] for t in top] if top else None for top in lp["input_top_logprobs"]]
        out["output_logprobs"] = [x[0] for x in lp["output_token_logprobs"]]
        times = {}
        for bs in (1, 8):
            samples = []
            for _ in range(repeats):
                t = time.perf_counter()
                engine.generate(PROMPTS[:bs], {"temperature": 0.0, "max_new_tokens": 32, "ignore_eos": True})
                samples.append(time.perf_counter() - t)
            times[f"bs{bs}_32tok_ms"] = round(1000 * statistics.median(samples), 1)
        out["timings"] = times
        return out
    finally:
        engine.shutdown()


def hf_input_logprobs(model: str, ids: list[int]) -> list[float | None]:
    """transformers' logprob of each token given the ones before it (None for the first)."""
    import torch
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    with torch.inference_mode():
        logp = hf(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    return [None] + [logp[i, t].item() for i, t in enumerate(ids[1:])]


def max_diff(a: list, b: list) -> float:
    pairs = [(x, y) for x, y in zip(a, b) if x is not None and y is not None]
    return max((abs(x - y) for x, y in pairs), default=0.0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--impls", nargs="+", default=["sglang", "reference_torch"])
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--page-size", type=int, default=1, help="SGLang's KV page size in tokens (default 1)")
    ap.add_argument("--tp-size", type=int, default=1, help="tensor-parallel size of every engine (default 1)")
    ap.add_argument("--ep-size", type=int, default=1, help="expert-parallel size of every engine (default 1)")
    ap.add_argument("--hf", action="store_true", help="also compare input logprobs with transformers")
    ap.add_argument("--answers", type=int, metavar="N", help="only greedy answers of N tokens to the --prompt texts, "
                    "with top-2 logprobs; no comparison (the caller judges)")  # fmt: skip
    ap.add_argument("--prompt", action="append", help="with --answers: a prompt (repeat; default the demo's)")
    ap.add_argument("--out", help="also write the JSON report here")
    args = ap.parse_args()
    if args.prompt and not args.answers:
        ap.error("--prompt goes with --answers N")
    if args.hf and args.answers:
        ap.error("--hf compares the standard requests' input logprobs; leave it out with --answers")
    if args.answers:
        args.max_new_tokens = args.answers

    prompts = (args.prompt or DEMO_PROMPTS) if args.answers else None
    results = {impl: run(impl, args.model, args.max_new_tokens, args.repeats, args.page_size, args.tp_size, args.ep_size, prompts)
               for impl in args.impls}  # fmt: skip
    base_name, base = args.impls[0], results[args.impls[0]]
    report = {"model": args.model, "baseline": base_name, "tp_size": args.tp_size, "ep_size": args.ep_size,
              "results": results, "comparison": {}}  # fmt: skip
    if args.hf:
        truth = hf_input_logprobs(args.model, base["input_ids"])
        report["vs_transformers"] = {impl: max_diff(r["input_logprobs"], truth) for impl, r in results.items()}
    ok = True
    if args.answers:
        report["prompts"] = prompts  # the caller judges the answers
    for impl in [] if args.answers else args.impls[1:]:
        r = results[impl]
        same = {k: r[k] == base[k] for k in ("batch", "shared", "long", "sampled_lens", "input_top_ids")}
        ok &= all(same.values())
        report["comparison"][impl] = {
            "tokens_identical": same,
            "max_abs_input_logprob_diff": max_diff(r["input_logprobs"], base["input_logprobs"]),
            "max_abs_output_logprob_diff": max_diff(r["output_logprobs"], base["output_logprobs"]),
        }
    report["ok"] = ok
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
