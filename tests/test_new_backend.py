"""`sglang-fx new-backend`: what a third party starts from. A fresh scaffold installs (into a
throwaway directory on PYTHONPATH, so the project's .venv is left as it was), passes the whole
conformance suite before a line is changed, and serves through SGLang's Engine; bad names and an
existing directory are refused with the fix."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sglang_fx.registry import default_registry
from sglang_fx.scaffold import SGLANG_IMPLS, ScaffoldError, new_backend

from .sglang_support import PYTHON, ROOT

NAME = "mybackend"


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """(the scaffold's directory, an environment whose PYTHONPATH holds its installed copy)."""
    root = tmp_path_factory.mktemp("new_backend")
    out = new_backend(NAME, root / "src")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "pyproject.toml", f"sglang_fx_{NAME}", "tests"]
    site = root / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps", "--no-build-isolation",
                    "--target", str(site), str(out)], check=True, capture_output=True, timeout=300)  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))}
    return out, env


@pytest.mark.parametrize("name,message", [
    ("My-Backend", "must be a lower-case Python identifier"),
    ("class", "must be a lower-case Python identifier"),
    ("sglang", "is one of SGLang's own --model-impl values"),
    ("transformers", "is one of SGLang's own --model-impl values"),
    ("reference_torch", "a backend named 'reference_torch' is already installed (sglang-fx-reference-torch)"),
])  # fmt: skip
def test_bad_names_are_refused(tmp_path, name, message):
    with pytest.raises(ScaffoldError, match=message.replace("(", r"\(").replace(")", r"\)")):
        new_backend(name, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_an_existing_directory_is_refused(tmp_path):
    (tmp_path / "out").mkdir()
    out = subprocess.run([sys.executable, "-m", "sglang_fx.cli", "new-backend", NAME, "--out", str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 2 and "already exists; pass --out with a new directory (nothing was written)" in out.stderr
    assert not any((tmp_path / "out").iterdir())


def test_the_reserved_names_are_sglangs_own():
    pytest.importorskip("sglang")
    from sglang_fx.sglang import compat

    assert SGLANG_IMPLS == compat.sglang_model_impls()


def test_the_scaffold_passes_conformance_before_a_line_is_changed(installed):
    out, env = installed
    run = subprocess.run([sys.executable, "-m", "sglang_fx.cli", "conformance", "--backend", NAME, "-q"], env=env,
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert f"{NAME}: " in run.stdout and " 0 failed" in run.stdout
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"], cwd=out, env=env,
                           capture_output=True, text=True, timeout=600)  # fmt: skip
    assert tests.returncode == 0 and " passed" in tests.stdout, tests.stdout[-3000:]
    assert NAME not in default_registry().names()  # the project's environment is as it was


def test_the_scaffold_serves_through_sglang(installed, tmp_path):
    pytest.importorskip("sglang")
    from sglang_fx.tiny import make_tiny_model

    _, env = installed
    model = make_tiny_model("qwen3", tmp_path / "qwen3")
    report = tmp_path / "report.json"
    proc = subprocess.run([PYTHON, str(ROOT / "examples" / "sglang_compare.py"), "--model", str(model), "--impls", "sglang", NAME,
                           "--repeats", "1", "--out", str(report)], env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)  # fmt: skip
    assert report.exists(), proc.stderr[-4000:]
    cmp = json.loads(report.read_text())["comparison"][NAME]
    assert all(cmp["tokens_identical"].values()) and cmp["max_abs_output_logprob_diff"] < 1e-4, cmp


def test_the_template_refuses_what_numpy_lacks():
    """NumPy has no bfloat16 and no device memory: the template's exchange says so, naming what
    it takes, rather than converting silently; a non-contiguous array under copy=False is a
    BufferError, as spi.Exchange asks."""
    import numpy as np
    import torch

    from sglang_fx_numpy.exchange import NumpyExchange

    ex = NumpyExchange()
    with pytest.raises(TypeError, match=r"NumPy has no torch.bfloat16; convert the tensor to one of \[.*'torch.float32'"):
        ex.from_torch(torch.zeros(4, dtype=torch.bfloat16))
    with pytest.raises(BufferError, match="is not contiguous"):
        ex.to_torch(np.zeros((4, 4), np.float32).T, copy=False)
    assert ex.to_torch(np.arange(6, dtype=np.float32).reshape(2, 3).T).tolist() == [[0, 3], [1, 4], [2, 5]]
