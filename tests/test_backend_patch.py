"""The guide's worked example (docs/writing-a-backend.md, section 11): the patch a new user wrote
with only the guide and a fresh scaffold still applies to a fresh scaffold, and the patched
backend passes the whole conformance suite (installed into a throwaway directory on PYTHONPATH,
so the project's .venv is left as it was)."""

from __future__ import annotations

import os
import subprocess
import sys

from sglang_fx.registry import default_registry
from sglang_fx.scaffold import new_backend

from .sglang_support import ROOT

PATCH = ROOT / "examples" / "backend-patches" / "own-attention.patch"
NAME = "trialbackend"  # the scaffold the patch was written against


def test_the_worked_example_applies_and_passes_conformance(tmp_path):
    out = new_backend(NAME, tmp_path / "src")
    template = (out / f"sglang_fx_{NAME}" / "attention.py").read_text()
    applied = subprocess.run(["git", "apply", "-p1", str(PATCH)], cwd=out, capture_output=True, text=True, timeout=60)
    assert applied.returncode == 0, applied.stdout + applied.stderr
    assert (out / f"sglang_fx_{NAME}" / "attention.py").read_text() != template
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps", "--no-build-isolation",
                    "--target", str(site), str(out)], check=True, capture_output=True, timeout=300)  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))}
    run = subprocess.run([sys.executable, "-m", "sglang_fx.cli", "conformance", "--backend", NAME, "-q"], env=env,
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert run.returncode == 0 and " 0 failed" in run.stdout, run.stdout[-3000:] + run.stderr[-3000:]
    assert NAME not in default_registry().names()
