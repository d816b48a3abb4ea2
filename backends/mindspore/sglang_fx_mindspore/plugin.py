"""Hook implementations of the MindSpore backend (entry point `mindspore`).

MindSpore is imported inside the hooks only: without it, `sglang_fx_backend_info` reports the
backend unavailable with the install command, and nothing else is called.
"""

from __future__ import annotations

import os

from sglang_fx import hookimpl
from sglang_fx.capabilities import Capabilities
from sglang_fx.quant import W8A8_INT8
from sglang_fx.spi import BackendInfo

#: The tiny DeepSeek-V3 at W8A8 has an activation 1.9e-6 from a rounding tie (token 10 of the first
#: prompt): float32 sums in transformers' order and in ours round it apart, and 32 greedy steps of
#: that amplifying model part ways (80% of tokens agree, as for reference_torch and numpy; its logits
#: cases pass within 5e-2, and its logits match reference_torch's within 1.3e-6).
KNOWN_GAPS = {"w8a8/greedy/DeepseekV3ForCausalLM": "one activation 1.9e-6 from a rounding tie rounds apart from "
              "fake-quantized transformers (float summation order); greedy parts at step 7"}  # fmt: skip

NAME = "mindspore"
SPI = "1.4"  # the sglang-fx SPI version this backend is written for (sglang_fx.spi.SPI_VERSION)
INSTALL = "pip install mindspore==2.10.0 'numpy<2' (CPU; for Ascend or GPU, the MindSpore build for that device)"

CAPABILITIES = Capabilities(
    dtypes={
        # Measured on MindSpore 2.10 CPU: float16 MatMul runs; bfloat16 MatMul and scatter have
        # no CPU kernel ("Select CPU operator[MatMul] fail! Unsupported data type").
        "cpu": frozenset({"float32", "float16"}),
        "cuda": frozenset({"float32", "float16"}),
        "npu": frozenset({"float32", "float16", "bfloat16"}),
    },
    # The keys of model.ARCHITECTURES (not imported here: that imports MindSpore).
    architectures=frozenset({"Qwen3ForCausalLM", "Qwen3MoeForCausalLM", "Qwen2ForCausalLM", "LlamaForCausalLM",
                             "DeepseekV3ForCausalLM", "LlamaForCausalLMEagle3"}),
    page_sizes=None,
    features=frozenset({"prefix_cache", "jit", "all_token_logits"}),
    # MindSpore's own collectives inside the step's graph: mccl on CPU, HCCL on Ascend
    # (`collectives.py`); no GPU collectives are wired up.
    parallelism=frozenset({"tp", "ep"}),
    verify=frozenset({"tree"}),  # speculative verify steps, any draft tree (attention.py: the bias, the lookahead mask)
    # int8 weights kept int8; the int8 product by the device's kernels (int8.py: Ascend's QuantBatchMatmul;
    # elsewhere, MindSpore's CPU having no int8 x int8 -> int32 matmul, an exact float32 or int32 MatMul)
    quantization=frozenset({W8A8_INT8}),
    eagle3=True,  # Decoder.construct's capture; llama_eagle3.py is the draft (model.MindSporeRunner.forward_hidden)
    options={
        "mode": "jit (default): the step as compiled graphs; pynative: op by op",
        "decode_batches": "batch sizes of the decode graphs, e.g. 1,2,4,8, or none (jit only)",
        "precompile": "graphs to compile before the first step instead of on first use: none (default), all "
        "(the prefill graph and every decode batch size), or decode batch sizes, e.g. 1,2,4,8 (jit only)",
        "compile_cache": "a directory that keeps the precompiled graphs across restarts (needs precompile)",
        "attention_scores": "the most attention score values (B * heads * new tokens * keys) one step may hold per "
        "layer before it runs as several steps; default 8388608 (32 MB float32): linear attention memory",
    },
)


@hookimpl
def sglang_fx_backend_info() -> BackendInfo:
    # MindSpore's default log level prints several warnings per compiled graph to stderr; keep
    # errors only unless the user chose a level. Read once, when mindspore is first imported.
    os.environ.setdefault("GLOG_v", "3")
    try:
        import mindspore
    except Exception as e:  # not installed, or broken (e.g. built against NumPy 1.x under NumPy 2)
        return BackendInfo(
            name=NAME,
            spi_version=SPI,
            framework="mindspore",
            framework_version=None,
            capabilities=None,
            unavailable=f"mindspore is not installed or fails to import ({type(e).__name__}: {e}): {INSTALL}",
        )
    return BackendInfo(name=NAME, spi_version=SPI, framework="mindspore", framework_version=mindspore.__version__, capabilities=CAPABILITIES,
                       known_gaps=KNOWN_GAPS)


@hookimpl
def sglang_fx_make_exchange(device):
    from .exchange import MindSporeExchange
    from .runtime import activate

    activate(device)
    return MindSporeExchange()


@hookimpl
def sglang_fx_make_kv_cache(layout, k_buffers, v_buffers, device):
    from .kv_cache import MindSporeKVCache

    return MindSporeKVCache(layout, k_buffers, v_buffers, sglang_fx_make_exchange(device))


@hookimpl
def sglang_fx_make_attention(spec, layout, device):
    from .attention import make_attention

    return make_attention(spec, layout, device, layout.dtype, sglang_fx_make_exchange(device))


@hookimpl
def sglang_fx_make_runner(spec, weights, options):
    from .model import MindSporeRunner

    return MindSporeRunner(spec, weights, options, sglang_fx_make_exchange(options.device))
