"""What the conformance cases share: the backend under test, tiny checkpoints, ground truth.

Ground truth is Hugging Face `transformers` run on the same checkpoint, plus the naive dense
attention in `naive_attention`; the torch reference backend is compared the same way.
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import torch

from sglang_fx.generate import Session
from sglang_fx.parallel import SINGLE, Parallel
from sglang_fx.registry import Backend, Registry, default_registry

REFERENCE_BACKEND = "reference_torch"

#: HF architecture -> `sglang-fx make-tiny-model --arch` name of its tiny checkpoint.
TINY_ARCHES = {
    "Qwen3ForCausalLM": "qwen3",
    "Qwen2ForCausalLM": "qwen2",
    "LlamaForCausalLM": "llama",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "DeepseekV3ForCausalLM": "deepseek_v3",
}

#: Architectures whose attention is MLA (a latent K cache, no V): the attention and KV cases
#: also run in that layout for backends that claim one of them.
MLA_ARCHES = frozenset({"DeepseekV3ForCausalLM"})

#: Checkpoint variants (config overrides) some cases use. "kv1": one KV head, which tensor
#: parallelism must replicate on every rank. "l4": four layers (the EAGLE3 draft cases' target).
VARIANTS: dict[str, dict] = {"": {}, "kv1": {"num_key_value_heads": 1}, "l4": {"num_hidden_layers": 4}}

#: The quantized variant: the tiny checkpoint through `sglang-fx quantize --scheme w8a8`. Its
#: ground truth is transformers on the float checkpoint with each quantized linear's weight
#: replaced by weight * weight_scale and its input fake-quantized per token by sglang_fx.quant's
#: rule (written again below in torch, independent of every backend).
W8A8 = "w8a8"

#: max |a - b| accepted per dtype, for logits and attention outputs.
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 1e-1}


class Context:
    """One conformance run against one backend. Expensive things are built once and cached."""

    def __init__(self, backend: str, *, device: str = "cpu", workdir: str | Path | None = None, registry: Registry | None = None,
                 parallel: Parallel = SINGLE, truth: dict | None = None):  # fmt: skip
        """parallel: run the model cases as this rank of a tensor-parallel world (every rank
        runs the same cases in step; `runner.run(..., tp_size=N)` starts the world). truth: where
        results are kept that a backend's Context computes once and other backends' would compute
        alike (transformers' models, logits and greedy tokens, and each backend's Session logits
        `cases._session_logits`), keyed by checkpoint path and backend name; Contexts of several
        backends given one dict and one workdir compute them once (the pytest plugin does)."""
        self.registry = registry or default_registry()
        self.backend: Backend = self.registry.load(backend)
        self.device, self.parallel = device, parallel
        self._tmp = None if workdir else tempfile.TemporaryDirectory(prefix="sglang-fx-conformance-")
        self.workdir = Path(workdir or self._tmp.name)
        self.truth = {} if truth is None else truth

    def remember(self, key: tuple, make):
        """self.truth[key], made by make() on first use. What it returns is shared: read only."""
        if key not in self.truth:
            self.truth[key] = make()
        return self.truth[key]

    def architectures(self) -> list[str]:
        """The tiny-checkpoint architectures this backend claims to run, in a stable order."""
        return [a for a in TINY_ARCHES if a in self.backend.capabilities.architectures]

    @functools.cache
    def checkpoint(self, arch: str, variant: str = "") -> Path:
        """The tiny checkpoint of `arch` (a VARIANTS key changes its config), made once per
        workdir: a directory that already holds one (made by the parent of a TP run) is reused."""
        from sglang_fx.tiny import make_tiny_model

        name = TINY_ARCHES[arch] + (f"-{variant}" if variant else "")
        out = self.workdir / name
        if (out / "config.json").is_file():
            return out
        if variant == W8A8:
            from sglang_fx.quantize import quantize

            return quantize(self.checkpoint(arch), out, "w8a8")
        return make_tiny_model(TINY_ARCHES[arch], out, seed=0, **VARIANTS[variant])

    @functools.cache
    def eagle3_draft(self) -> Path:
        """The tiny EAGLE3 draft (`make_tiny_eagle3`) of the tiny Llama's "l4" variant, reading the
        outputs of layers eagle3.AUX_LAYER_IDS, with no embedding of its own (it shares the target's)."""
        from sglang_fx.tiny import make_tiny_eagle3

        from .eagle3 import AUX_LAYER_IDS, TARGET_VARIANT

        out = self.workdir / "llama-eagle3"
        if (out / "config.json").is_file():
            return out
        return make_tiny_eagle3(self.checkpoint("LlamaForCausalLM", TARGET_VARIANT), out, seed=1, aux_layer_ids=AUX_LAYER_IDS)

    def hf_hidden(self, arch: str, prompt: list[int], variant: str = "") -> tuple[torch.Tensor, ...]:
        """transformers' output_hidden_states of one prompt: num_layers + 1 tensors [len(prompt), H]
        float32 (entry i < num_layers: the input of layer i; the last one is after the final norm)."""
        with torch.inference_mode():
            out = self.hf_model(arch, variant)(torch.tensor([prompt]), output_hidden_states=True)
        return tuple(h[0].float() for h in out.hidden_states)

    def hf_model(self, arch: str, variant: str = ""):
        import transformers

        def make():
            if variant == W8A8:
                return fake_quantized(self.hf_model(arch), self.checkpoint(arch, W8A8))
            return transformers.AutoModelForCausalLM.from_pretrained(self.checkpoint(arch, variant), dtype=torch.float32).eval()

        return self.remember(("hf_model", str(self.checkpoint(arch, variant))), make)

    def session(self, arch: str, *, page_size: int = 16, backend: str | None = None, variant: str = "",
                parallel: Parallel | None = None) -> Session:  # fmt: skip
        """A Session of the backend under test (or `backend`) at this context's parallel layout
        (or `parallel`)."""
        b = self.backend if backend is None else self.registry.load(backend)
        return Session(b, self.checkpoint(arch, variant), dtype="float32", device=self.device, page_size=page_size,
                       max_total_tokens=4096, parallel=self.parallel if parallel is None else parallel)  # fmt: skip

    def draft_session(self, target: Session, *, page_size: int = 16) -> Session:
        """A Session of the backend under test on `eagle3_draft`, sharing `target`'s embedding."""
        return Session(self.backend, self.eagle3_draft(), dtype="float32", device=self.device, page_size=page_size,
                       max_total_tokens=4096, target=target)  # fmt: skip

    def hf_logits(self, arch: str, prompt: list[int], variant: str = "") -> torch.Tensor:
        """[len(prompt), vocab] float32 logits of transformers, one prompt, no padding (read only)."""

        def make():
            with torch.inference_mode():
                return self.hf_model(arch, variant)(torch.tensor([prompt])).logits[0].float()

        return self.remember(("hf_logits", str(self.checkpoint(arch, variant)), tuple(prompt)), make)

    def hf_greedy(self, arch: str, prompt: list[int], steps: int, variant: str = "") -> list[int]:
        def make():
            with torch.inference_mode():
                out = self.hf_model(arch, variant).generate(
                    torch.tensor([prompt]), max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                    eos_token_id=None, pad_token_id=0,
                )
            return tuple(out[0, len(prompt):].tolist())

        return list(self.remember(("hf_greedy", str(self.checkpoint(arch, variant)), tuple(prompt), steps), make))

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix: int, scale: float) -> torch.Tensor:
    """Dense causal attention of one sequence, in float64: q [e, Hq, D] for positions
    prefix..prefix+e-1, k/v [prefix+e, Hkv, D] for every position. Returns [e, Hq, Dv]."""
    q, k, v = q.double(), k.double(), v.double()
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    qpos = torch.arange(prefix, prefix + q.shape[0])[:, None]
    kpos = torch.arange(k.shape[0])[None, :]
    scores = scores.masked_fill(kpos > qpos, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


def fake_quantize_tokens(x: torch.Tensor) -> torch.Tensor:
    """x [..., in] -> the float values its per-token int8 quantization stands for, by the rule of
    sglang_fx/quant.py: scale = max(absmax, 1e-10) / 127 in float32, q = round half to even of
    x / scale clipped to +-127, back to q * scale."""
    x32 = x.float()
    scale = x32.abs().amax(-1, keepdim=True).clamp_min(1e-10) / 127
    return (torch.round(x32 / scale).clamp(-127, 127) * scale).to(x.dtype)


def fake_quantized(float_model, quantized_path: Path):
    """A copy of transformers `float_model` computing W8A8 in float: each linear the quantized
    checkpoint covers gets weight * weight_scale as its weight and fake-quantized inputs."""
    import copy

    from sglang_fx.checkpoint import Checkpoint, load_spec

    spec = load_spec(quantized_path, "float32")
    weights = Checkpoint(quantized_path).load(spec)
    model = copy.deepcopy(float_model)
    dequant = {n: weights[n + ".weight"].float() * weights[n + ".weight_scale"] for n in spec.quant.linears}
    experts = sorted({n.split(".experts.")[0] for n in dequant if ".mlp.experts." in n})
    for prefix in experts:  # transformers fuses routed experts into 3-D parameters (no nn.Linear per expert)
        _fake_quantized_experts(model.get_submodule(prefix + ".experts"), dequant, prefix + ".experts.")
    for name in sorted(n for n in spec.quant.linears if ".mlp.experts." not in n):
        linear = model.get_submodule(name)
        linear.weight.data = dequant[name]
        linear.register_forward_pre_hook(lambda module, args: (fake_quantize_tokens(args[0]), *args[1:]))
    return model.eval()


def _fake_quantized_experts(experts, dequant: dict[str, torch.Tensor], prefix: str) -> None:
    """transformers' fused experts module (gate_up_proj [E, 2I, H], down_proj [E, H, I]) with
    dequantized weights, and its forward replaced by the same loop with both expert linears'
    inputs fake-quantized per token."""
    import torch.nn.functional as F

    n = experts.gate_up_proj.shape[0]
    experts.gate_up_proj.data = torch.stack([torch.cat([dequant[f"{prefix}{e}.gate_proj"], dequant[f"{prefix}{e}.up_proj"]]) for e in range(n)])
    experts.down_proj.data = torch.stack([dequant[f"{prefix}{e}.down_proj"] for e in range(n)])

    def forward(hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        for e in top_k_index.unique().tolist():
            token, slot = torch.where(top_k_index == e)
            gate, up = F.linear(fake_quantize_tokens(hidden_states[token]), experts.gate_up_proj[e]).chunk(2, dim=-1)
            h = F.linear(fake_quantize_tokens(experts.act_fn(gate) * up), experts.down_proj[e])
            out.index_add_(0, token, (h * top_k_weights[token, slot, None]).to(out.dtype))
        return out

    experts.forward = forward