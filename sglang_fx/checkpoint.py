"""Framework-neutral checkpoint reading: HF config.json -> ModelSpec, safetensors -> weights.

Backends get a typed `ModelSpec` and a dict of torch tensors keyed by the Hugging Face
parameter names (host memory); they convert with their exchange and never parse files.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .errors import CheckpointError, UnsupportedConfigError
from .quant import QuantSpec, modelslim, parse_config

if TYPE_CHECKING:
    from .sharding import Shard

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class MoESpec:
    """Routed experts (replacing the dense MLP on the layers not in dense_layers).

    scoring         "softmax" (Qwen3-MoE: softmax over router logits) or "sigmoid"
                    (DeepSeek-V3: sigmoid scores, experts chosen with score_correction_bias
                    added, group-limited to the topk_groups best of num_groups groups, each
                    group scored by its two best experts).
    top_k           experts per token; norm_topk_prob renormalises their weights to sum to 1,
                    then routed_scaling_factor multiplies them.
    num_shared_experts  experts every token also goes through, fused in HF as one MLP of
                    width intermediate_size * num_shared_experts (DeepSeek-V3).
    dense_layers    indices of layers that keep a dense MLP of ModelSpec.intermediate_size.
    """

    num_experts: int
    top_k: int
    intermediate_size: int
    scoring: str
    norm_topk_prob: bool
    routed_scaling_factor: float = 1.0
    num_shared_experts: int = 0
    num_groups: int = 1
    topk_groups: int = 1
    score_correction_bias: bool = False
    dense_layers: frozenset[int] = frozenset()


@dataclass(frozen=True)
class MLASpec:
    """Multi-head latent attention (DeepSeek-V2/V3). Each token caches one latent vector:
    kv_lora_rank normalised channels plus qk_rope_head_dim rotated key channels, shared by all
    heads. q_lora_rank None means a plain q_proj. rope_interleave: RoPE pairs are adjacent
    channels (x0,x1),(x2,x3)... rather than the two halves."""

    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    rope_interleave: bool

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim


@dataclass(frozen=True)
class Eagle3Spec:
    """An EAGLE3 draft (`LlamaForCausalLMEagle3`; its computation is written in sglang_fx/eagle3.py):
    fc projects num_aux captured target hidden states, target_hidden_size wide each, to the draft's
    hidden size; one Llama decoder layer attends over concat(norm(embeds), norm(hidden)); its own
    lm_head scores draft_vocab_size draft ids, which its `d2t` maps to target ids.
    aux_layer_ids: the target layers whose outputs it was trained on (config.json's
    eagle_config.eagle_aux_hidden_state_layer_ids), or None for SGLang's default choice.
    head_from_target: config.json names no draft_vocab_size, so (as SGLang does) the draft scores
    the target's whole vocabulary with the target's lm_head."""

    draft_vocab_size: int
    target_hidden_size: int
    num_aux: int
    aux_layer_ids: tuple[int, ...] | None = None
    head_from_target: bool = False


#: An EAGLE3 draft's architecture name, and its tensors a checkpoint may leave out: the
#: embedding (the target's is used: `eagle3.draft_weights`), the head and d2t (with no
#: draft_vocab_size in config.json: the target's head, identity d2t).
EAGLE3_ARCH = "LlamaForCausalLMEagle3"
EAGLE3_OPTIONAL = frozenset({"embed_tokens.weight", "lm_head.weight", "d2t"})


@dataclass(frozen=True)
class ModelSpec:
    """The shape of a decoder-only transformer, read from its HF config.

    Sizes are counts (heads, layers) or widths in elements. head_dim is per attention head.
    qk_norm: Qwen3's RMSNorm over each q/k head before RoPE. attention_bias: biases on the
    q/k/v projections (Qwen2). dtype: the parameter dtype the model runs in.
    moe: routed experts, or None for a dense model. mla: latent attention, or None for GQA
    (then head_dim/num_kv_heads describe the KV cache). quant: the quantization scheme and the
    linears it covers (`sglang_fx.quant`), or None for a float checkpoint; dtype is then the
    dtype of everything left float and of the activations. eagle3: set for an EAGLE3 draft
    (SPI 1.4; then num_layers is 1 and vocab_size is the target's), else None.
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
    moe: MoESpec | None = None
    mla: MLASpec | None = None
    quant: QuantSpec | None = None
    eagle3: Eagle3Spec | None = None

    def is_moe_layer(self, i: int) -> bool:
        return self.moe is not None and i not in self.moe.dense_layers

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


def _field(cfg: dict, *names: str):
    """The first of `names` present in cfg (HF renamed some fields across versions)."""
    for n in names:
        if cfg.get(n) is not None:
            return cfg[n]
    raise KeyError(" or ".join(names))


def _qwen3_moe(cfg: dict, arch: str, dtype: torch.dtype) -> ModelSpec:
    n, step, only = cfg["num_hidden_layers"], cfg.get("decoder_sparse_step", 1), set(cfg.get("mlp_only_layers") or [])
    moe = MoESpec(
        num_experts=_field(cfg, "num_experts", "num_local_experts"),
        top_k=cfg["num_experts_per_tok"],
        intermediate_size=cfg["moe_intermediate_size"],
        scoring="softmax",
        norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
        dense_layers=frozenset(i for i in range(n) if i in only or (i + 1) % step != 0),
    )
    return replace(_llama_family(qk_norm=True, bias_default=False)(cfg, arch, dtype), moe=moe)


def _deepseek_v3(cfg: dict, arch: str, dtype: torch.dtype) -> ModelSpec:
    if cfg.get("scoring_func", "sigmoid") != "sigmoid" or cfg.get("topk_method", "noaux_tc") != "noaux_tc":
        raise UnsupportedConfigError("only DeepSeek-V3 routing (scoring_func 'sigmoid', topk_method 'noaux_tc') is supported")
    mla = MLASpec(
        q_lora_rank=cfg.get("q_lora_rank"),
        kv_lora_rank=cfg["kv_lora_rank"],
        qk_nope_head_dim=cfg["qk_nope_head_dim"],
        qk_rope_head_dim=cfg["qk_rope_head_dim"],
        v_head_dim=cfg["v_head_dim"],
        rope_interleave=bool(cfg.get("rope_interleave", True)),
    )
    moe = MoESpec(
        num_experts=_field(cfg, "n_routed_experts", "num_local_experts"),
        top_k=cfg["num_experts_per_tok"],
        intermediate_size=cfg["moe_intermediate_size"],
        scoring="sigmoid",
        norm_topk_prob=bool(cfg.get("norm_topk_prob", True)),
        routed_scaling_factor=float(cfg.get("routed_scaling_factor", 1.0)),
        num_shared_experts=cfg.get("n_shared_experts") or 0,
        num_groups=cfg.get("n_group") or 1,
        topk_groups=cfg.get("topk_group") or 1,
        score_correction_bias=True,
        dense_layers=frozenset(range(cfg.get("first_k_dense_replace", 0))),
    )
    base = _llama_family(qk_norm=False, bias_default=False)(cfg, arch, dtype)
    return replace(base, num_kv_heads=1, head_dim=mla.qk_head_dim, moe=moe, mla=mla)


def _llama_eagle3(cfg: dict, arch: str, dtype: torch.dtype) -> ModelSpec:
    """SGLang's reading of an EAGLE3 draft config (models/llama_eagle3.py), minus what we refuse."""
    eagle = cfg.get("eagle_config") or {}
    refused = [k for k in ("norm_before_fc", "fc_norm", "use_aux_norm", "norm_output", "bias") if cfg.get(k) or eagle.get(k)]
    if refused or cfg.get("num_hidden_layers") != 1 or cfg.get("tie_word_embeddings"):
        why = (f"{', '.join(refused)} set" if refused else f"num_hidden_layers {cfg.get('num_hidden_layers')}"
               if cfg.get("num_hidden_layers") != 1 else "tie_word_embeddings set")  # fmt: skip
        raise UnsupportedConfigError(f"this {arch} draft has {why}; sglang-fx runs EAGLE3 drafts of one decoder layer with an "
                                     "untied head of their own, no bias on fc and no norms around fc (the EAGLE3 layout)")  # fmt: skip
    base = _llama_family(qk_norm=False, bias_default=False)(cfg, arch, dtype)
    ids = eagle.get("eagle_aux_hidden_state_layer_ids")
    draft = Eagle3Spec(
        draft_vocab_size=cfg.get("draft_vocab_size") or base.vocab_size,
        target_hidden_size=cfg.get("target_hidden_size") or base.hidden_size,
        num_aux=cfg.get("num_aux_hidden_states") or (len(ids) if ids else 3),
        aux_layer_ids=tuple(ids) if ids else None,
        head_from_target=cfg.get("draft_vocab_size") is None,
    )
    return replace(base, attention_bias=False, eagle3=draft)


#: HF architecture name -> config parser. The one place that knows which configs we read.
ARCHITECTURES: dict[str, Callable[[dict, str, torch.dtype], ModelSpec]] = {
    "Qwen3ForCausalLM": _llama_family(qk_norm=True, bias_default=False),
    "Qwen2ForCausalLM": _llama_family(qk_norm=False, bias_default=True),
    "LlamaForCausalLM": _llama_family(qk_norm=False, bias_default=False),
    "Qwen3MoeForCausalLM": _qwen3_moe,
    "DeepseekV3ForCausalLM": _deepseek_v3,
}
#: Speculative draft architectures (SPI 1.4): readable by every backend, run by those declaring them.
DRAFT_ARCHITECTURES: dict[str, Callable[[dict, str, torch.dtype], ModelSpec]] = {EAGLE3_ARCH: _llama_eagle3}


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
    parsers = ARCHITECTURES | DRAFT_ARCHITECTURES
    arch = next((a for a in archs if a in parsers), None)
    if arch is None:
        raise UnsupportedConfigError(
            f"{path}: architecture {archs or cfg.get('model_type')!r} is not supported; "
            f"supported: {', '.join(parsers)}"
        )
    refused = modelslim(model_path)
    if refused:
        raise UnsupportedConfigError(refused)
    if dtype in (None, "auto"):
        dtype = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
    try:
        spec = parsers[arch](cfg, arch, resolve_dtype(dtype))
    except KeyError as e:
        raise CheckpointError(f"{path}: missing required field {e.args[0]!r} for {arch}") from None
    if cfg.get("quantization_config"):
        spec = replace(spec, quant=_quant_spec(spec, cfg["quantization_config"], str(path)))
    return spec


def _quant_spec(spec: ModelSpec, qc: dict, where: str) -> QuantSpec:
    """The linears `qc` quantizes. Their class names are what compressed-tensors matches "Linear"
    against: every projection is an nn.Linear in transformers, and so is Qwen3-MoE's router, but
    DeepSeek-V3's router is a module of its own."""
    names = [n.removesuffix(".weight") for n, s in expected_weights(spec).items()
             if n.endswith(".weight") and len(s) == 2 and n != "model.embed_tokens.weight"]  # fmt: skip
    router = "DeepseekV3TopkRouter" if spec.mla is not None else "Linear"
    linears = {n: router if n.endswith(".mlp.gate") else "Linear" for n in names}
    float_only = [n for n in names if n == "lm_head" or n.endswith((".mlp.gate", ".kv_b_proj"))]
    return parse_config(qc, linears, float_only, where)


def expected_weights(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """HF parameter name -> shape, for every tensor the model needs (lm_head.weight included
    even when tied; `Checkpoint.load` fills it from the embedding). A quantized linear X adds
    X.weight_scale [out, 1] (spec.quant). An EAGLE3 draft: its own names (`_eagle3_weights`)."""
    if spec.eagle3 is not None:
        return _eagle3_weights(spec, spec.eagle3)
    H = spec.hidden_size
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (spec.vocab_size, H),
        "model.norm.weight": (H,),
        "lm_head.weight": (spec.vocab_size, H),
    }
    for i in range(spec.num_layers):
        p = f"model.layers.{i}."
        shapes |= {p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,)}
        attention = _mla_weights(spec, spec.mla) if spec.mla else _gqa_weights(spec)
        shapes |= {p + "self_attn." + n: s for n, s in attention.items()}
        if spec.is_moe_layer(i):
            shapes |= {p + "mlp." + n: s for n, s in _moe_weights(H, spec.moe).items()}
        else:
            shapes |= {p + "mlp." + n: s for n, s in _mlp_weights(H, spec.intermediate_size).items()}
    if spec.quant is not None:
        shapes |= {n + "_scale": (s[0], 1) for n, s in list(shapes.items()) if spec.quant.covers(n)}
    return shapes


def _eagle3_weights(spec: ModelSpec, e: Eagle3Spec) -> dict[str, tuple[int, ...]]:
    """The EAGLE3 draft's tensors under the names its checkpoints use (EAGLE's, as SGLang reads
    them): no "model." prefix, the decoder layer as "midlayer.", d2t [draft_vocab] int64."""
    H = spec.hidden_size
    attention = _gqa_weights(replace(spec, hidden_size=2 * H))  # q/k/v read concat(embeds, hidden)
    attention["o_proj.weight"] = (H, spec.num_heads * spec.head_dim)
    p = "midlayer."
    return {
        "embed_tokens.weight": (spec.vocab_size, H),
        "fc.weight": (H, e.num_aux * e.target_hidden_size),
        p + "input_layernorm.weight": (H,), p + "hidden_norm.weight": (H,), p + "post_attention_layernorm.weight": (H,),
        **{p + "self_attn." + n: s for n, s in attention.items()},
        **{p + "mlp." + n: s for n, s in _mlp_weights(H, spec.intermediate_size).items()},
        "norm.weight": (H,),
        "lm_head.weight": (e.draft_vocab_size, H),
        "d2t": (e.draft_vocab_size,),
    }  # fmt: skip


def _mlp_weights(H: int, I: int) -> dict[str, tuple[int, ...]]:
    return {"gate_proj.weight": (I, H), "up_proj.weight": (I, H), "down_proj.weight": (H, I)}


def _gqa_weights(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    H, D = spec.hidden_size, spec.head_dim
    q, kv = spec.num_heads * D, spec.num_kv_heads * D
    shapes = {"q_proj.weight": (q, H), "k_proj.weight": (kv, H), "v_proj.weight": (kv, H), "o_proj.weight": (H, q)}
    if spec.attention_bias:
        shapes |= {"q_proj.bias": (q,), "k_proj.bias": (kv,), "v_proj.bias": (kv,)}
    if spec.qk_norm:
        shapes |= {"q_norm.weight": (D,), "k_norm.weight": (D,)}
    return shapes


def _mla_weights(spec: ModelSpec, m: MLASpec) -> dict[str, tuple[int, ...]]:
    H, n = spec.hidden_size, spec.num_heads
    shapes = {
        "kv_a_proj_with_mqa.weight": (m.kv_lora_rank + m.qk_rope_head_dim, H),
        "kv_a_layernorm.weight": (m.kv_lora_rank,),
        "kv_b_proj.weight": (n * (m.qk_nope_head_dim + m.v_head_dim), m.kv_lora_rank),
        "o_proj.weight": (H, n * m.v_head_dim),
    }
    if m.q_lora_rank is None:
        return shapes | {"q_proj.weight": (n * m.qk_head_dim, H)}
    return shapes | {
        "q_a_proj.weight": (m.q_lora_rank, H),
        "q_a_layernorm.weight": (m.q_lora_rank,),
        "q_b_proj.weight": (n * m.qk_head_dim, m.q_lora_rank),
    }


def _moe_weights(H: int, moe: MoESpec) -> dict[str, tuple[int, ...]]:
    shapes = {"gate.weight": (moe.num_experts, H)}
    if moe.score_correction_bias:
        shapes["gate.e_score_correction_bias"] = (moe.num_experts,)
    for e in range(moe.num_experts):
        shapes |= {f"experts.{e}.{n}": s for n, s in _mlp_weights(H, moe.intermediate_size).items()}
    if moe.num_shared_experts:
        shared = _mlp_weights(H, moe.intermediate_size * moe.num_shared_experts)
        shapes |= {f"shared_experts.{n}": s for n, s in shared.items()}
    return shapes


#: safetensors dtype names -> torch dtypes.
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip


class SafetensorsFile:
    """One .safetensors file, read with plain positioned reads (os.preadv) of exactly the bytes
    asked for, so a rank that reads a slice reads only that slice from disk (the OS counts it:
    /proc/self/io rchar). Format: an 8-byte little-endian header length, a JSON header
    {name: {dtype, shape, data_offsets: [begin, end]}}, then the data, little-endian, row-major."""

    def __init__(self, path: Path):
        self.path = path
        try:
            with open(path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
        except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"cannot read {path}: {e} (truncated or not a safetensors file?)") from None
        header.pop("__metadata__", None)
        self.tensors: dict[str, dict] = header
        self.data_start = 8 + n

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.tensors[name]["shape"])

    def read(self, name: str, split: tuple[int, range] | None = None) -> torch.Tensor:
        """Tensor `name`, or only elements `split[1]` of its dimension `split[0]` (0, or 1 of a 2-D
        tensor), in its stored dtype. Raises CheckpointError when the file ends early."""
        entry = self.tensors[name]
        dtype, shape = SAFETENSORS_DTYPES.get(entry["dtype"]), list(entry["shape"])
        if dtype is None:
            raise CheckpointError(f"tensor {name!r} in {self.path} has dtype {entry['dtype']}, which sglang-fx does not read")
        base, item = self.data_start + entry["data_offsets"][0], dtype.itemsize
        row = item * math.prod(shape[1:])
        if split is None:
            ranges = [(base, row * shape[0] if shape else item)]
        elif split[0] == 0:
            rows = split[1]
            ranges, shape[0] = [(base + rows.start * row, len(rows) * row)], len(rows)
        elif split[0] == 1 and len(shape) == 2:
            cols = split[1]
            ranges = [(base + i * row + cols.start * item, len(cols) * item) for i in range(shape[0])]
            shape[1] = len(cols)
        else:
            raise ValueError(f"cannot split {name!r} {shape} along dimension {split[0]}")
        buf = bytearray(sum(n for _, n in ranges))
        view, at = memoryview(buf), 0
        with open(self.path, "rb", buffering=0) as f:
            for offset, n in ranges:
                if n and os.preadv(f.fileno(), [view[at : at + n]], offset) != n:
                    raise CheckpointError(f"tensor {name!r} in {self.path} cannot be read: the file ends early (file truncated?)")
                at += n
        if not buf:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(buf, dtype=dtype).reshape(shape)


def _load_dtype(spec: ModelSpec, name: str, file: SafetensorsFile) -> torch.dtype:
    """The dtype tensor `name` is handed to backends in; CheckpointError when a quantized linear's
    tensors are not stored as the scheme says."""
    stored = file.tensors[name]["dtype"]
    if name == "d2t":  # EAGLE3's draft -> target id offsets
        if stored not in ("I64", "I32"):
            raise CheckpointError(f"tensor 'd2t' in {file.path} is {stored}; EAGLE3's d2t holds integer id offsets (I64)")
        return torch.int64
    if spec.quant is None:
        return spec.dtype
    if spec.quant.covers(name):
        if stored != "I8":
            raise CheckpointError(f"tensor {name!r} in {file.path} is {stored}, but config.json's quantization_config makes it an "
                                  f"int8 ({spec.quant.scheme}) weight (I8); the checkpoint does not match its config")  # fmt: skip
        return torch.int8
    if name.endswith(".weight_scale"):
        if stored not in ("F32", "F16", "BF16"):
            raise CheckpointError(f"tensor {name!r} in {file.path} is {stored}; a weight scale must be F32, F16 or BF16")
        return torch.float32
    return spec.dtype


class Checkpoint:
    """An HF checkpoint directory: config.json plus model.safetensors, or shards listed in
    model.safetensors.index.json."""

    def __init__(self, model_path: str | Path):
        self.path = Path(model_path)
        if not self.path.is_dir():
            raise CheckpointError(f"model path {self.path} is not a directory")
        self._files: dict[Path, SafetensorsFile] = {}
        self.weight_map = self._weight_map()

    def _file(self, path: Path) -> SafetensorsFile:
        if path not in self._files:
            self._files[path] = SafetensorsFile(path)
        return self._files[path]

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
            return {name: single for name in self._file(single).tensors}
        raise CheckpointError(
            f"no weights in {self.path}: expected model.safetensors or model.safetensors.index.json"
        )

    def load(self, spec: ModelSpec, shard: Shard | None = None) -> dict[str, torch.Tensor]:
        """Every tensor in `expected_weights(spec)`, checked and cast to spec.dtype (a quantized
        linear's weight stays int8 and its weight_scale becomes float32, an exact widening); with a
        `shard`, only the tensors and slices that rank holds (`Shard.expected()` shapes), read
        from disk slice by slice. Raises CheckpointError naming the tensor and file on a missing,
        truncated or mis-shaped tensor. A tied lm_head.weight is the embedding tensor itself. An
        EAGLE3 draft's EAGLE3_OPTIONAL tensors are left out when absent (`eagle3.draft_weights`
        completes them from the target)."""
        expected = expected_weights(spec)
        local = expected if shard is None else shard.expected()
        tied = spec.tie_word_embeddings and "lm_head.weight" not in self.weight_map
        optional = EAGLE3_OPTIONAL if spec.eagle3 is not None else frozenset()
        wanted = [n for n in local if not (tied and n == "lm_head.weight") and (n not in optional or n in self.weight_map)]
        missing = [n for n in wanted if n not in self.weight_map]
        if missing:
            files = sorted({p.name for p in self.weight_map.values()})
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise CheckpointError(
                f"tensor {missing[0]!r}{more} is missing from {', '.join(files)} in {self.path}; "
                f"the checkpoint does not match its config ({spec.architecture})"
            )
        out = {}
        for n in wanted:
            file = self._file(self.weight_map[n])
            got = file.shape(n)
            if got != expected[n]:
                raise CheckpointError(f"tensor {n!r} in {file.path} has shape {list(got)}, expected {list(expected[n])} from config.json")
            cut = None if shard is None else shard.split(n)
            if cut is not None and len(cut[1]) == got[cut[0]]:
                cut = None  # all of it: one read
            t = file.read(n, cut).to(_load_dtype(spec, n, file))
            if t.shape != local[n]:  # a vocabulary block of the last rank: pad with zero rows
                t = torch.cat([t, t.new_zeros((local[n][0] - t.shape[0], *t.shape[1:]))])
            out[n] = t
        if tied:
            out["lm_head.weight"] = out["model.embed_tokens.weight"]
        return out
