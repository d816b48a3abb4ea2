"""Speculative decoding on the real SmolLM2-135M-Instruct: tokens/s with and without NGRAM and
STANDALONE, one run.

    python benchmarks/speculative.py [--impls mindspore jax] [--batch 1 --batch 8] [--no-standalone]
                                     [--modes NGRAM STANDALONE EAGLE3]

Per --model-impl, three SGLang servers in turn on the same checkpoint, with the same
--max-running-requests cap (speculation sets one otherwise): plain, --speculative-algorithm
NGRAM (SGLang's defaults: a breadth-10 tree of 12 draft tokens; n-gram corpus capacity lowered
so the corpus does not take 2 GB), and STANDALONE with the checkpoint as its own draft on the
same backend (chains of 3 draft tokens, topk 1; SGLang's EAGLE worker feeds the draft the
sequence shifted by one, so even a self-draft misses tokens: see the README). Prompts that copy text (repeat a list, rewrite code with
one change) and one that does not, chat-templated, greedy, 64 new tokens each. EAGLE3 (only when
--modes names it): a random-weight LlamaForCausalLMEagle3 draft for SmolLM2 (`make_tiny_eagle3`,
an 8192-token draft vocabulary; no trained one exists for it), on the same backend, chains of 3:
it accepts next to nothing, so it measures what EAGLE3's drafting and verification cost, not
what a trained draft would gain. At batch 1 the
prompts are sent one after another, at batch N N at a time (the prompts repeated to fill the
batch); after one untimed round. Printed per impl and batch: output tokens/s plain and NGRAM,
the speed-up, and SGLang's spec_accept_length (tokens per verify step, the bonus token included)
averaged over the requests. Greedy outputs of the speculative servers must agree with plain's
(near-ties counted).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
from sglang_server import server_command, start_server, stop_server, wait_ready  # noqa: E402

PROMPTS = [
    "Repeat this list exactly, one item per line: apples, pears, plums, cherries, grapes, lemons, limes, peaches.",
    "Rewrite this code with the function renamed to total:\n\ndef add_all(values):\n    result = 0\n    for v in values:\n"
    "        result = result + v\n    return result\n\nprint(add_all([1, 2, 3]))",
    "Copy this sentence twice: The quick brown fox jumps over the lazy dog near the river bank.",
    "Write a short poem about the sea.",
]
CAP = ["--max-running-requests", "8"]
NGRAM = ["--speculative-algorithm", "NGRAM", "--speculative-ngram-capacity", "200000"]
STANDALONE = ["--speculative-algorithm", "STANDALONE", "--speculative-num-steps", "3", "--speculative-eagle-topk", "1",
              "--speculative-num-draft-tokens", "4"]  # fmt: skip
EAGLE3 = ["--speculative-algorithm", "EAGLE3", *STANDALONE[2:]]
NEW_TOKENS = 64


def run_round(url: str, ids: list[list[int]], batch: int) -> tuple[float, list[dict]]:
    def one(p: list[int]) -> dict:
        body = {"input_ids": p, "sampling_params": {"temperature": 0, "max_new_tokens": NEW_TOKENS},
                "return_logprob": True, "top_logprobs_num": 2}  # fmt: skip
        r = requests.post(url + "/generate", json=body, timeout=600)
        r.raise_for_status()
        return r.json()

    work = [ids[i % len(ids)] for i in range(max(batch, len(ids)))]
    start = time.perf_counter()
    with ThreadPoolExecutor(batch) as pool:
        out = list(pool.map(one, work))
    return time.perf_counter() - start, out


def bench(impl: str, model: str, mode: str, batches: list[int], ids, work: Path, port: int) -> dict:
    """mode: "plain", "NGRAM", "STANDALONE" (the checkpoint as its own draft) or "EAGLE3" (a random
    EAGLE3 draft, written under `work`)."""
    if mode == "EAGLE3" and not (work / "eagle3-draft").exists():
        from sglang_fx.tiny import make_tiny_eagle3

        make_tiny_eagle3(model, work / "eagle3-draft", draft_vocab_size=8192)
    extra = {"plain": [], "NGRAM": NGRAM, "STANDALONE": [*STANDALONE, "--speculative-draft-model-path", model],
             "EAGLE3": [*EAGLE3, "--speculative-draft-model-path", str(work / "eagle3-draft")]}[mode]  # fmt: skip
    spec = mode != "plain"
    cmd = server_command(model, impl, port=port) + CAP + extra
    log = work / f"{impl}-{mode}.log"
    proc = start_server(cmd, log)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc, timeout=900, log=log)
        out = {}
        for b in batches:
            run_round(url, ids, b)  # untimed: compiles what this batch needs
            elapsed, res = run_round(url, ids, b)
            tokens = sum(len(r["output_ids"]) for r in res)
            accept = [r["meta_info"].get("spec_accept_length") for r in res]
            out[b] = {"tok_s": tokens / elapsed, "results": res,
                      "accept": sum(accept) / len(accept) if spec and all(a is not None for a in accept) else None}  # fmt: skip
        return out
    finally:
        stop_server(proc)


def main() -> int:
    import transformers

    from sglang_fx.models import fetch

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--impls", nargs="+", default=["mindspore", "jax"])
    ap.add_argument("--batch", type=int, action="append", help="batch sizes (default 1 and 8)")
    ap.add_argument("--port", type=int, default=31870)
    ap.add_argument("--no-standalone", action="store_true", help="measure plain and NGRAM only")
    ap.add_argument("--modes", nargs="+", choices=["NGRAM", "STANDALONE", "EAGLE3"], help="the speculative runs "
                    "(default NGRAM and STANDALONE)")  # fmt: skip
    args = ap.parse_args()
    batches = args.batch or [1, 8]
    model = str(fetch("smollm2"))
    tok = transformers.AutoTokenizer.from_pretrained(model)
    ids = [list(tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, return_dict=False))
           for p in PROMPTS]
    print(f"SmolLM2-135M-Instruct, SGLang server on CPU (float32), greedy, {NEW_TOKENS} new tokens, {len(PROMPTS)} prompts "
          f"(3 copy text), max-running-requests 8", flush=True)  # fmt: skip
    modes = args.modes or ["NGRAM"] + ([] if args.no_standalone else ["STANDALONE"])
    rows, mismatches = [], 0
    with tempfile.TemporaryDirectory() as tmp:
        for impl in args.impls:
            plain = bench(impl, model, "plain", batches, ids, Path(tmp), args.port)
            specs = {m: bench(impl, model, m, batches, ids, Path(tmp), args.port) for m in modes}
            for b in batches:
                for m in modes:
                    for p, s in zip(plain[b]["results"], specs[m][b]["results"]):
                        if p["output_ids"] != s["output_ids"]:
                            i = next(k for k, (x, y) in enumerate(zip(p["output_ids"], s["output_ids"])) if x != y)
                            top = p["meta_info"]["output_top_logprobs"][i]
                            gap = top[0][0] - top[1][0]
                            print(f"  {impl} b={b}: {m} differs from plain at token {i} (plain's top-2 gap {gap:.3g}"
                                  f"{', a near-tie' if gap < 1e-3 else ''})")  # fmt: skip
                            mismatches += gap >= 1e-3
                    rows.append((impl, b, m, plain[b]["tok_s"], specs[m][b]["tok_s"], specs[m][b]["accept"]))
            print(f"  {impl} done", flush=True)
    head = f"{'--model-impl':<14}{'batch':>6}{'algorithm':>12}{'plain tok/s':>13}{'spec tok/s':>12}{'speed-up':>10}{'accept len':>12}"
    print("\n" + head + "\n" + "-" * len(head))
    for impl, b, m, p, s, a in rows:
        print(f"{impl:<14}{b:>6}{m:>12}{p:>13.1f}{s:>12.1f}{s / p:>9.2f}x{a if a is None else round(a, 2):>12}")
    print("accept len = SGLang's spec_accept_length, mean over the requests (tokens per verify step, bonus included)")
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
