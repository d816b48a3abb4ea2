"""Prompt in, text out, through every available sglang-fx backend (standalone, no SGLang).

Builds a tiny random-weight Qwen3 checkpoint locally (no downloads), then greedy-decodes the same
prompts with each backend and with Hugging Face transformers, and shows whether they agree.
The model is random, so the text is gibberish; identical gibberish is the point.

    python examples/demo.py [--model-path DIR] [--max-new-tokens N]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import transformers

from sglang_fx.generate import Session
from sglang_fx.registry import default_registry
from sglang_fx.tiny import make_tiny_model

PROMPTS = ["The quick brown fox", "Once upon a time there was", "def forward(self, input_ids"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-path", type=Path, default=Path(".cache/demo-qwen3"))
    ap.add_argument("--max-new-tokens", type=int, default=16)
    args = ap.parse_args()
    if not (args.model_path / "config.json").is_file():
        make_tiny_model("qwen3", args.model_path, seed=0)
        print(f"made a tiny Qwen3 checkpoint in {args.model_path}")
    tok = transformers.AutoTokenizer.from_pretrained(args.model_path)
    prompts = [tok.encode(p) for p in PROMPTS]

    hf = transformers.AutoModelForCausalLM.from_pretrained(args.model_path, dtype=torch.float32)
    truth = [hf.generate(torch.tensor([p]), max_new_tokens=args.max_new_tokens, do_sample=False, eos_token_id=None)[0, len(p):].tolist() for p in prompts]

    reg = default_registry()
    for name in reg.names():
        info = reg.info(name)
        if info.unavailable:
            print(f"\n== {name}: unavailable: {info.unavailable}")
            continue
        start = time.perf_counter()
        session = Session(name, args.model_path, dtype="float32", page_size=16)
        loaded = time.perf_counter()
        outs = session.generate(prompts, args.max_new_tokens)
        done = time.perf_counter()
        print(f"\n== {name} ({info.framework} {info.framework_version}): load {loaded - start:.2f}s, "
              f"generate {len(prompts)}x{args.max_new_tokens} tokens {done - loaded:.2f}s")
        for text, out, want in zip(PROMPTS, outs, truth):
            verdict = "same as transformers" if out == want else "DIFFERS from transformers"
            print(f"  {text!r} -> {tok.decode(out)!r}  [{verdict}]")


if __name__ == "__main__":
    main()
