"""Quantized checkpoints under SGLang: the plugin hook `serve_quantized_at_any_dtype`.

SGLang builds a quantization config from config.json's `quantization_config` before any model
code runs (`model_loader/loader.py::_get_quantization_config`) and refuses the checkpoint when
--dtype is not among the scheme's activation dtypes (compressed-tensors: float16, bfloat16 only;
its int8 kernels are CUDA/AMX ones). For an sglang-fx --model-impl that config is not used:
sglang-fx reads the scheme from config.json itself (`sglang_fx.checkpoint.load_spec`), the
backend runs the integer math at the activation dtype it declares (float32 on CPU included), and
the backend's `Capabilities.quantization` decides what runs (checked at start-up by the plugin's
check_server_args hook and again when the model is built). So the hook, AROUND
`_get_quantization_config`, returns None for sglang-fx backends and leaves every other
--model-impl (native SGLang included) to SGLang's own rule, unchanged.
"""

from __future__ import annotations

from typing import Any

from . import compat


def serve_quantized_at_any_dtype(original, model_config: Any, *args: Any, **kwargs: Any):
    from .plugin import backend_names

    if compat.impl_name(getattr(model_config, "model_impl", None)) in backend_names():
        return None  # sglang-fx reads the quantization itself; see the module docstring
    return original(model_config, *args, **kwargs)
