"""Hook implementations of the JAX backend (entry point `jax`).

JAX is imported inside the hooks only: without it (or beside a NumPy it was not built for),
`sglang_fx_backend_info` reports the backend unavailable with the install command, and nothing
else is called. backend_info never initialises a JAX device: multi-process runs must call
`jax.distributed.initialize` before that, which the runner does first.
"""

from __future__ import annotations

import importlib.util

from sglang_fx import hookimpl
from sglang_fx.capabilities import Capabilities
from sglang_fx.quant import W8A8_INT8
from sglang_fx.spi import BackendInfo

NAME = "jax"
SPI = "1.4"  # the sglang-fx SPI version this backend is written for (sglang_fx.spi.SPI_VERSION)
JAX_VERSION = "0.7.1"
INSTALL = f"pip install jax=={JAX_VERSION} jaxlib=={JAX_VERSION} 'numpy<2'"
FLOATS = frozenset({"float32", "bfloat16", "float16"})

CAPABILITIES = Capabilities(
    # XLA's CPU backend computes all three (float16 and bfloat16 by widening); float32 is the
    # one the conformance suite checks against transformers.
    dtypes={"cpu": FLOATS},
    architectures=frozenset({"Qwen3ForCausalLM", "Qwen3MoeForCausalLM", "Qwen2ForCausalLM", "LlamaForCausalLM",
                             "DeepseekV3ForCausalLM", "LlamaForCausalLMEagle3"}),  # fmt: skip
    page_sizes=None,
    features=frozenset({"prefix_cache", "jit", "all_token_logits"}),
    parallelism=frozenset({"tp", "ep"}),
    verify=frozenset({"tree"}),  # speculative verify steps, any draft tree (attention.py's row_tree)
    quantization=frozenset({W8A8_INT8}),  # int8 weights in device memory, int8 x int8 -> int32 products (layers.linear)
    eagle3=True,  # JaxRunner.forward_hidden captures (one process, unrolled layers); llama_eagle3.py is the draft
    options={
        "decode_batches": "batch sizes of the decode programs, e.g. 1,2,4,8, or none (decode runs as extend steps)",
        "precompile": "programs to compile at the first step instead of on first use: none (default), all "
        "(prefill and every decode batch size), or decode batch sizes, e.g. 1,2,4,8",
        "layers": "unroll (default): one program with every layer's code; scan: lax.scan over weights stacked by layer",
        "extend": "layered (default with layers=unroll): extend steps run one small program per layer kind, called "
        "per layer (compiles a new shape bucket about as many times faster as there are layers); whole: one program",
        "compile_cache": "JAX's persistent compilation cache directory (default <sglang-fx cache>/jax), or none",
        "moe": "how MoE layers dispatch: auto (default: each token's k experts gathered for steps of few tokens, "
        "every expert densely above), dense, or gather",
    },
)


def unavailable() -> str | None:
    """Why the backend cannot run here (with the fix), or None."""
    import numpy

    if int(numpy.__version__.split(".")[0]) >= 2:
        return (f"the jax backend runs on jax {JAX_VERSION} with numpy<2 (the NumPy MindSpore and the rest of sglang-fx's "
                f"stack share a process with; every newer jax needs numpy>=2), but numpy {numpy.__version__} is installed: {INSTALL}")  # fmt: skip
    if importlib.util.find_spec("jax") is None or importlib.util.find_spec("jaxlib") is None:
        return f"jax is not installed: {INSTALL}"
    return None


@hookimpl
def sglang_fx_backend_info() -> BackendInfo:
    reason = unavailable()
    version = None
    if reason is None:
        try:
            import jax

            version = jax.__version__
        except Exception as e:  # broken install, e.g. a jaxlib that does not match jax
            reason = f"jax fails to import ({type(e).__name__}: {e}): {INSTALL}"
    return BackendInfo(name=NAME, spi_version=SPI, framework="jax", framework_version=version,
                       capabilities=None if reason else CAPABILITIES, unavailable=reason)  # fmt: skip


@hookimpl
def sglang_fx_make_exchange(device):
    from .exchange import JaxExchange
    from .runtime import check_device, configure

    configure()
    check_device(device)
    return JaxExchange()


@hookimpl
def sglang_fx_make_kv_cache(layout, k_buffers, v_buffers, device):
    from .kv_cache import JaxKVCache

    return JaxKVCache(layout, k_buffers, v_buffers, sglang_fx_make_exchange(device))


@hookimpl
def sglang_fx_make_attention(spec, layout, device):
    from .attention import JaxPagedAttention

    sglang_fx_make_exchange(device)
    return JaxPagedAttention(spec)


@hookimpl
def sglang_fx_make_runner(spec, weights, options):
    from .model import JaxRunner

    if spec.eagle3 is not None:
        from .llama_eagle3 import JaxEagle3

        return JaxEagle3(spec, weights, options)
    return JaxRunner(spec, weights, options)
