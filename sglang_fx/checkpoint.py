"""Framework-neutral checkpoint reading: HF config.json -> ModelSpec, safetensors -> weights.

Backends get a typed `ModelSpec` and a dict of torch tensors keyed by the Hugging Face
parameter names (host memory); they convert with their exchange and never parse files.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import CheckpointError, UnsupportedConfigError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class ModelSpec:
    """The shape of a decoder-only transformer, read from its HF config.

    Sizes are counts (heads, layers) or widths in elements. head_dim is per attention head.
    qk_norm: Qwen3's RMSNorm over each q/k head before RoPE. attention_bias: biases on the
    q/k/v projections (Qwen2). dtype: the parameter dtype the model runs in.
    """

    architecture: str
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qk_norm: bool
    attention_bias: bool
    dtype: torch.dtype

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")


def _rope_theta(cfg: dict) -> float:
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or {}
    for source in (params, scaling):
        kind = source.get("rope_type", source.get("type", "default"))
        if kind not in ("default", None):
            raise UnsupportedConfigError(
                f"RoPE scaling {kind!r} is not supported yet; only plain RoPE ('default') is"
            )
    theta = cfg.get("rope_theta", params.get("rope_theta"))
    if theta is None:
        raise CheckpointError("config.json has no rope_theta (nor rope_parameters.rope_theta)")
    return float(theta)


def _llama_family(*, qk_norm: bool, bias_default: bool) -> Callable[[dict, str, torch.dtype], ModelSpec]:
    def parse(cfg: dict, arch: str, dtype: torch.dtype) -> ModelSpec:
        heads = cfg["num_attention_heads"]
        return ModelSpec(
            architecture=arch,
            model_type=cfg.get("model_type", ""),
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=_rope_theta(cfg),
            max_position_embeddings=cfg.get("max_position_embeddings", 32768),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qk_norm=qk_norm,
            attention_bias=bool(cfg.get("attention_bias", bias_default)),
            dtype=dtype,
        )

    return parse


#: HF architecture name -> config parser. The one place that knows which configs we read.
ARCHITECTURES: dict[str, Callable[[dict, str, torch.dtype], ModelSpec]] = {
    "Qwen3ForCausalLM": _llama_family(qk_norm=True, bias_default=False),
    "Qwen2ForCausalLM": _llama_family(qk_norm=False, bias_default=True),
    "LlamaForCausalLM": _llama_family(qk_norm=False, bias_default=False),
}


def resolve_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    name = name.removeprefix("torch.")
    if name not in DTYPES:
        raise UnsupportedConfigError(f"dtype {name!r} is not supported; use one of: {', '.join(DTYPES)}")
    return DTYPES[name]


def load_spec(model_path: str | Path, dtype: str | torch.dtype | None = None) -> ModelSpec:
    """Read <model_path>/config.json into a ModelSpec. dtype overrides the config's dtype
    ("auto" or None keeps it; float32 if the config names none)."""
    path = Path(model_path) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path} not found: a model directory needs an HF config.json")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    archs = cfg.get("architectures") or []
    arch = next((a for a in archs if a in ARCHITECTURES), None)
    if arch is None:
        raise UnsupportedConfigError(
            f"{path}: architecture {archs or cfg.get('model_type')!r} is not supported; "
            f"supported: {', '.join(ARCHITECTURES)}"
        )
    if dtype in (None, "auto"):
        dtype = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
    try:
        return ARCHITECTURES[arch](cfg, arch, resolve_dtype(dtype))
    except KeyError as e:
        raise CheckpointError(f"{path}: missing required field {e.args[0]!r} for {arch}") from None


def expected_weights(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """HF parameter name -> shape, for every tensor the model needs (lm_head.weight included
    even when tied; `Checkpoint.load` fills it from the embedding)."""
    H, I, D = spec.hidden_size, spec.intermediate_size, spec.head_dim
    q, kv = spec.num_heads * D, spec.num_kv_heads * D
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (spec.vocab_size, H),
        "model.norm.weight": (H,),
        "lm_head.weight": (spec.vocab_size, H),
    }
    for i in range(spec.num_layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (H,),
            p + "post_attention_layernorm.weight": (H,),
            p + "self_attn.q_proj.weight": (q, H),
            p + "self_attn.k_proj.weight": (kv, H),
            p + "self_attn.v_proj.weight": (kv, H),
            p + "self_attn.o_proj.weight": (H, q),
            p + "mlp.gate_proj.weight": (I, H),
            p + "mlp.up_proj.weight": (I, H),
            p + "mlp.down_proj.weight": (H, I),
        }
        if spec.attention_bias:
            shapes |= {p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,), p + "self_attn.v_proj.bias": (kv,)}
        if spec.qk_norm:
            shapes |= {p + "self_attn.q_norm.weight": (D,), p + "self_attn.k_norm.weight": (D,)}
    return shapes


class Checkpoint:
    """An HF checkpoint directory: config.json plus model.safetensors, or shards listed in
    model.safetensors.index.json."""

    def __init__(self, model_path: str | Path):
        self.path = Path(model_path)
        if not self.path.is_dir():
            raise CheckpointError(f"model path {self.path} is not a directory")
        self.weight_map = self._weight_map()

    def _weight_map(self) -> dict[str, Path]:
        index = self.path / "model.safetensors.index.json"
        single = self.path / "model.safetensors"
        if index.is_file():
            try:
                entries = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index} is malformed ({e}); it needs a 'weight_map' object") from None
            files = {f: self.path / f for f in set(entries.values())}
            for f, p in files.items():
                if not p.is_file():
                    raise CheckpointError(f"{index} lists shard {f!r}, which is missing from {self.path}")
            return {name: files[f] for name, f in entries.items()}
        if single.is_file():
            return {name: single for name in self._keys(single)}
        raise CheckpointError(
            f"no weights in {self.path}: expected model.safetensors or model.safetensors.index.json"
        )

    @staticmethod
    def _keys(file: Path) -> list[str]:
        from safetensors import safe_open

        try:
            with safe_open(str(file), framework="pt") as f:
                return list(f.keys())
        except Exception as e:  # safetensors raises its own SafetensorError for bad headers
            raise CheckpointError(f"cannot read {file}: {e} (truncated or not a safetensors file?)") from None

    def load(self, spec: ModelSpec) -> dict[str, torch.Tensor]:
        """Every tensor in `expected_weights(spec)`, checked and cast to spec.dtype.
        Raises CheckpointError naming the tensor and file on a missing, truncated or
        mis-shaped tensor. A tied lm_head.weight is the embedding tensor itself."""
        from safetensors import safe_open

        expected = expected_weights(spec)
        tied = spec.tie_word_embeddings and "lm_head.weight" not in self.weight_map
        wanted = [n for n in expected if not (tied and n == "lm_head.weight")]
        missing = [n for n in wanted if n not in self.weight_map]
        if missing:
            files = sorted({p.name for p in self.weight_map.values()})
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise CheckpointError(
                f"tensor {missing[0]!r}{more} is missing from {', '.join(files)} in {self.path}; "
                f"the checkpoint does not match its config ({spec.architecture})"
            )
        by_file: dict[Path, list[str]] = {}
        for n in wanted:
            by_file.setdefault(self.weight_map[n], []).append(n)
        out = {}
        for file, names in by_file.items():
            try:
                with safe_open(str(file), framework="pt") as f:
                    for n in names:
                        out[n] = self._read(f, n, file, expected[n], spec.dtype)
            except CheckpointError:
                raise
            except Exception as e:
                raise CheckpointError(f"cannot read {file}: {e} (truncated or corrupt?)") from None
        if tied:
            out["lm_head.weight"] = out["model.embed_tokens.weight"]
        return out

    @staticmethod
    def _read(f, name: str, file: Path, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        got = tuple(f.get_slice(name).get_shape())
        if got != shape:
            raise CheckpointError(f"tensor {name!r} in {file} has shape {list(got)}, expected {list(shape)} from config.json")
        try:
            t = f.get_tensor(name)
        except Exception as e:
            raise CheckpointError(f"tensor {name!r} in {file} cannot be read: {e} (file truncated?)") from None
        return t.to(dtype)
