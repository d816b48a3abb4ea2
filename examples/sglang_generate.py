"""Generate with SGLang through an sglang-fx backend, on the CPU.

    python examples/sglang_generate.py --model /tmp/sg/qwen3 --model-impl reference_torch
    python examples/sglang_generate.py --model /tmp/sg/qwen3 --model-impl mindspore

The same through SGLang's HTTP server:
    python -m sglang_fx.sglang.launch_server --model-path /tmp/sg/qwen3 --model-impl reference_torch \\
        --device cpu --attention-backend torch_native --dtype float32 --disable-cuda-graph \\
        --max-total-tokens 65536
"""

from __future__ import annotations

import argparse

from sglang_fx.sglang import use_cpu_engine

use_cpu_engine()  # SGLang decides its device path when imported

if __name__ == "__main__":  # sglang.Engine starts subprocesses
    import sglang

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--model-impl", default="reference_torch")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("prompts", nargs="*", default=["hello world", "a b c"])
    args = ap.parse_args()
    engine = sglang.Engine(
        model_path=args.model, model_impl=args.model_impl, device="cpu", attention_backend="torch_native",
        dtype="float32", disable_cuda_graph=True, max_total_tokens=65536, log_level="warning",
    )
    try:
        for prompt, out in zip(args.prompts, engine.generate(args.prompts, {"temperature": 0, "max_new_tokens": args.max_new_tokens})):
            print(f"{prompt!r} -> {out['text']!r} {out['output_ids']}")
    finally:
        engine.shutdown()
