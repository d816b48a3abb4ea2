"""Offline inference with sglang.Engine and --model-impl mindspore (the sglang-fx backend).

    python examples/sglang_generate.py                                  # tiny checkpoint, CPU
    python examples/sglang_generate.py --model-path /path/to/model --model-impl reference_torch
    python examples/sglang_generate.py --model-path /path/to/Qwen3-8B --device npu   # Ascend (not run here)

The script SGLang's MindSpore guide gives its users, unchanged but for the device flags:

    import sglang as sgl
    llm = sgl.Engine(model_path="/path/to/model", device="npu", model_impl="mindspore",
                     attention_backend="ascend", tp_size=1, dp_size=1)
    outputs = llm.generate(prompts, {"temperature": 0.01, "top_p": 0.9})

On the CPU SGLang needs SGLANG_USE_CPU_ENGINE=1 before it is imported (`use_cpu_engine()`
below) and runs with device="cpu", attention_backend="torch_native"; float32 and no CUDA graphs
give outputs token-identical to SGLang's native Qwen3 (--model-impl sglang). On an Ascend NPU,
install SGLang for Ascend (torch_npu, CANN) and sglang-fx with its mindspore backend; the
flags are those of the guide. The HTTP server: examples/sglang_server.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sglang_fx.sglang import use_cpu_engine

PROMPTS = ["Hello, my name is", "The capital of France is", "The future of AI is"]


def engine_args(device: str) -> dict:
    if device == "cpu":
        return dict(device="cpu", attention_backend="torch_native", dtype="float32", disable_cuda_graph=True,
                    max_total_tokens=65536)  # fmt: skip
    if device == "npu":
        return dict(device="npu", attention_backend="ascend", tp_size=1, dp_size=1)
    raise ValueError(f"device {device!r}: this example knows cpu and npu")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-path", "--model", help="default: a tiny random Qwen3 made in .cache/demo-qwen3")
    ap.add_argument("--model-impl", default="mindspore")
    ap.add_argument("--device", default="cpu", choices=["cpu", "npu"])
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy (the guide uses 0.01 with top_p 0.9)")
    ap.add_argument("prompts", nargs="*", default=PROMPTS)
    args = ap.parse_args()
    if args.device == "cpu":
        use_cpu_engine()  # SGLang decides its device path when imported
    import sglang as sgl

    model = args.model_path
    if model is None:
        from sglang_fx.tiny import make_tiny_model

        model = ".cache/demo-qwen3"
        if not Path(model, "config.json").is_file():
            make_tiny_model("qwen3", model, seed=0)
    llm = sgl.Engine(model_path=model, model_impl=args.model_impl, log_level="warning", **engine_args(args.device))
    try:
        params = {"temperature": args.temperature, "top_p": 0.9, "max_new_tokens": args.max_new_tokens}
        for prompt, out in zip(args.prompts, llm.generate(args.prompts, params)):
            print(f"{prompt!r} -> {out['text']!r}")
    finally:
        llm.shutdown()
    return 0


if __name__ == "__main__":  # sglang.Engine starts subprocesses
    sys.exit(main())
