"""`sglang-fx quantize SRC DST --scheme w8a8`: a compressed-tensors W8A8 int8 checkpoint from a
float one, with no calibration data.

Every linear of the decoder layers is quantized (`sglang_fx.quant`'s rule per output channel:
scale = max(absmax, 1e-10) / 127, round half to even, int8 [out, in] plus float32
weight_scale [out, 1]); the embedding, norms, LM head, MoE routers and MLA's kv_b_proj stay
float, as sglang-fx requires, and are listed by name in `ignore`. config.json gets the
`quantization_config` llmcompressor writes for its W8A8 recipe (one config group targeting
"Linear": weights int8 symmetric per channel, input activations int8 symmetric dynamic per
token, format "int-quantized"), which compressed-tensors, transformers and SGLang's
compressed-tensors loader read. Tokenizer and other files are copied unchanged.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from .checkpoint import Checkpoint, expected_weights, load_spec
from .errors import CheckpointError, UnsupportedConfigError
from .models import MARKER
from .quant import quantize_weight

SCHEMES = ("w8a8",)

#: The quantization_config of a W8A8 int8 checkpoint (ignore is filled per model).
W8A8_CONFIG = {
    "quant_method": "compressed-tensors",
    "format": "int-quantized",
    "quantization_status": "compressed",
    "config_groups": {
        "group_0": {
            "targets": ["Linear"],
            "weights": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel", "dynamic": False,
                        "group_size": None, "block_structure": None, "actorder": None, "observer": "minmax", "observer_kwargs": {}},
            "input_activations": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True,
                                  "group_size": None, "block_structure": None, "actorder": None, "observer": None, "observer_kwargs": {}},
            "output_activations": None,
            "format": "int-quantized",
        }
    },
    "kv_cache_scheme": None,
    "sparsity_config": {},
}  # fmt: skip


def _kept_float(name: str) -> bool:
    return name == "lm_head" or name.endswith((".mlp.gate", ".kv_b_proj"))


def quantize(src: str | Path, dst: str | Path, scheme: str = "w8a8") -> Path:
    """Write the quantized checkpoint of float checkpoint `src` into `dst` (new or empty).
    Raises UnsupportedConfigError for an already quantized source or an unknown scheme."""
    if scheme not in SCHEMES:
        raise UnsupportedConfigError(f"unknown quantization scheme {scheme!r}; sglang-fx quantize writes: {', '.join(SCHEMES)}")
    src, dst = Path(src), Path(dst)
    spec = load_spec(src)
    if spec.quant is not None:
        raise UnsupportedConfigError(f"{src} is already quantized ({spec.quant.scheme}); give a float checkpoint")
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise CheckpointError(f"{dst} exists and is not empty; give a new or empty directory")
    ckpt = Checkpoint(src)
    shapes = expected_weights(spec)
    linears = [n.removesuffix(".weight") for n, s in shapes.items() if n.endswith(".weight") and len(s) == 2 and n != "model.embed_tokens.weight"]
    quantized = {n for n in linears if not _kept_float(n)}
    out: dict[str, torch.Tensor] = {}
    for name, path in ckpt.weight_map.items():
        t = ckpt._file(path).read(name)
        module = name.removesuffix(".weight")
        if name.endswith(".weight") and module in quantized:
            q, scale = quantize_weight(t.float().numpy())
            out[name], out[module + ".weight_scale"] = torch.from_numpy(q), torch.from_numpy(scale)
        else:
            out[name] = t
    dst.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    save_file({n: t.contiguous() for n, t in out.items()}, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    # Named even when absent from the files (a tied lm_head): transformers still builds its Linear.
    cfg["quantization_config"] = {**W8A8_CONFIG, "ignore": sorted(n for n in linears if n not in quantized)}
    (dst / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    for f in src.iterdir():
        if f.is_file() and f.name not in ("config.json", MARKER) and not f.name.startswith("model.safetensors") and f.suffix != ".safetensors":
            shutil.copy2(f, dst / f.name)
    return dst
