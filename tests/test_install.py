"""sglang-fx installed as its users install it: the sdists and wheels `make dist` builds
(tools/dist.py), the wheels installed by pip, not editable, into a fresh virtual environment,
and used from there: `sglang-fx backends`, `sglang-fx conformance --backend numpy`,
`sglang-fx new-backend` with the scaffold's own tests, one request through SGLang's own
launcher with --model-impl mindspore, and SGLang's own one_batch with it.

The fresh environment must see the project environment's heavy dependencies (torch, SGLang,
MindSpore, transformers: gigabytes, and SGLang is only installable with --no-deps) but none of
sglang-fx's own packages. `python -m venv --system-site-packages` would expose the base
interpreter's site-packages, not the project venv's (which is itself a venv). A .pth file naming
the project venv's site-packages would expose its sglang-fx dist-infos: importlib.metadata
would list the editable sglang-fx, sglang-fx-numpy, ... and their entry points next to the
wheels' (the .pth files in that directory, the editable finders among them, would not run, but
metadata is read from every sys.path entry). So the new venv's .pth names a view: a directory
of symlinks to every entry of the project venv's site-packages except sglang-fx's (`sglang_fx*`,
`__editable__*`) and the .pth files. pip and setuptools come from that view too (the project's
pinned ones), so the venv is made --without-pip. pip treats what the view holds as installed,
and installs with --no-index: nothing is downloaded, and a requirement the environment cannot
meet fails the install. Every command runs in a scratch directory with PYTHONPATH unset, so
nothing is imported from the checkout.

Budget: 317 s measured on a shared 2-core machine at load average 10 to 20 (one_batch at tp_size 2:
105 s, the server: 66 s, the builds and the installs: about 40 s); SGLang's start-ups are most of it.
"""

from __future__ import annotations

import contextlib
import email
import os
import re
import signal
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

from .sglang_support import ROOT, SERVER_FLAGS, Server

pytest.importorskip("sglang")

TIMEOUT = 600
CONSTRAINTS = ROOT / "requirements" / "constraints.txt"
DISTRIBUTIONS = ("sglang_fx", "sglang_fx_reference_torch", "sglang_fx_mindspore", "sglang_fx_jax", "sglang_fx_numpy")
VERSION = "0.1.0"


def project_view(view: Path) -> Path:
    """Symlinks to the running (project) environment's site-packages, without sglang-fx's
    packages, its editable finders and any .pth file (see the module docstring)."""
    view.mkdir()
    site = Path(sysconfig.get_paths()["purelib"])
    for entry in site.iterdir():
        if entry.name.startswith(("sglang_fx", "__editable__")) or entry.suffix == ".pth":
            continue
        (view / entry.name).symlink_to(entry)
    return view


class Venv:
    """The fresh environment: its Python, and `run` for commands in it."""

    def __init__(self, root: Path, view: Path):
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True, timeout=120)
        self.root, self.python = root, root / "bin" / "python"
        self.env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
        self.env.update(PATH=f"{root / 'bin'}{os.pathsep}{os.environ['PATH']}", HF_HUB_OFFLINE="1", GLOG_v="3")
        self.site = Path(self.run("import sysconfig; print(sysconfig.get_paths()['purelib'])", code=True).stdout.strip())
        # Sorted before sglang_fx_cpu_host.pth, which imports sglang_fx (and pluggy, from the view).
        (self.site / "00-project-venv-view.pth").write_text(f"{view}\n")

    def run(self, *args: str, code: bool = False, cwd: Path | None = None, check: bool = True, env: dict | None = None,
            timeout: float = TIMEOUT) -> subprocess.CompletedProcess:  # fmt: skip
        """`python -c CODE` (code=True) or `python -m ARGS` in the environment, in `cwd` (default
        its root: never the checkout)."""
        cmd = [str(self.python), "-c", args[0]] if code else [str(self.python), "-m", *args]
        out = subprocess.run(cmd, cwd=cwd or self.root, env=env or self.env, capture_output=True,
                             text=True, timeout=timeout)  # fmt: skip
        if check:
            assert out.returncode == 0, f"{' '.join(cmd)} -> {out.returncode}\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}"
        return out

    def pip_install(self, *args: str, find_links: Path) -> None:
        self.run("pip", "install", "-q", "--disable-pip-version-check", "--no-index", "--find-links", str(find_links),
                 "-c", str(CONSTRAINTS), *args)  # fmt: skip


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> Path:
    """The directory `tools/dist.py` (what `make dist` runs) filled: an sdist and a wheel each."""
    out = tmp_path_factory.mktemp("dist")
    run = subprocess.run([sys.executable, str(ROOT / "tools" / "dist.py"), "--out", str(out)], capture_output=True,
                         text=True, timeout=TIMEOUT)  # fmt: skip
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    print(run.stdout)  # the file list with sizes (pytest -s shows it)
    return out


@pytest.fixture(scope="module")
def venv(tmp_path_factory, dist) -> Venv:
    """A fresh environment with sglang-fx[conformance,mindspore] installed from the wheels."""
    root = tmp_path_factory.mktemp("install")
    env = Venv(root / "venv", project_view(root / "view"))
    env.pip_install("sglang-fx[conformance,mindspore]", find_links=dist)
    return env


def wheel(dist: Path, name: str) -> zipfile.ZipFile:
    return zipfile.ZipFile(dist / f"{name}-{VERSION}-py3-none-any.whl")


def metadata(dist: Path, name: str) -> email.message.Message:
    return email.message_from_bytes(wheel(dist, name).read(f"{name}-{VERSION}.dist-info/METADATA"))


def test_dist_builds_an_sdist_and_a_wheel_of_each_distribution(dist):
    assert sorted(p.name for p in dist.iterdir()) == sorted(
        [f"{d}-{VERSION}.tar.gz" for d in DISTRIBUTIONS] + [f"{d}-{VERSION}-py3-none-any.whl" for d in DISTRIBUTIONS]
    )
    for name in DISTRIBUTIONS:
        meta = metadata(dist, name)
        assert meta["License-Expression"] == "Apache-2.0", name
        assert f"{name}-{VERSION}.dist-info/licenses/LICENSE" in wheel(dist, name).namelist(), name
        with tarfile.open(dist / f"{name}-{VERSION}.tar.gz") as sdist:
            assert f"{name}-{VERSION}/LICENSE" in sdist.getnames(), name
        # Every requirement has a lower and an upper bound (or is exact): nothing resolves to
        # an untested release.
        for req in meta.get_all("Requires-Dist") or []:
            spec = req.split(";")[0]
            assert "==" in spec or ("<" in spec and ">=" in spec), f"{name}: {req}"


def test_the_sglang_fx_wheel_carries_the_suite_the_template_and_the_start_up_hook(dist):
    names = set(wheel(dist, "sglang_fx").namelist())
    assert "sglang_fx_cpu_host.pth" in names  # at the top: site-packages, run at start-up
    assert {"sglang_fx/conformance/cases.py", "sglang_fx/conformance/pytest_plugin.py"} <= names
    numpy_backend = {n.split("/")[-1] for n in wheel(dist, "sglang_fx_numpy").namelist() if n.startswith("sglang_fx_numpy/")}
    assert {n.split("/")[-1] for n in names if n.startswith("sglang_fx/backend_template/")} == numpy_backend
    meta = metadata(dist, "sglang_fx")
    assert meta.get_payload().startswith("# sglang-fx")  # README.md, the long description
    assert meta["Description-Content-Type"] == "text/markdown"
    requires = meta.get_all("Requires-Dist")
    assert not [r for r in requires if r.startswith("sglang") and "extra ==" not in r]  # SGLang: not a hard requirement
    assert 'sglang==0.5.23; extra == "sglang"' in requires
    assert {e for e in meta.get_all("Provides-Extra")} >= {"mindspore", "jax", "numpy", "conformance", "pd"}
    entry_points = wheel(dist, "sglang_fx").read(f"sglang_fx-{VERSION}.dist-info/entry_points.txt").decode()
    assert "[sglang.srt.plugins]\nsglang_fx = sglang_fx.sglang.plugin:register" in entry_points
    assert "[console_scripts]\nsglang-fx = sglang_fx.cli:main" in entry_points


def test_installed_from_the_wheels_with_every_requirement_met(venv):
    out = venv.run("import sglang_fx, sglang_fx_mindspore, sglang_fx.cpu_host as h, sys; print(sglang_fx.__file__); "
                   "print(sglang_fx_mindspore.__file__); print(any(isinstance(f, h._ImportHook) for f in sys.meta_path))",
                   code=True).stdout.split()  # fmt: skip
    assert Path(out[0]).is_relative_to(venv.site) and Path(out[1]).is_relative_to(venv.site), out
    assert out[2] == "True"  # the wheel's .pth ran at start-up
    # On this CPU host PyPI's torchvision (a CUDA build) fails to import without the hook's fix,
    # and SGLang's model configs import it.
    venv.run("import sglang, torchvision.transforms; print(sglang.__version__)", code=True)
    check = venv.run("pip", "check", check=False)
    # SGLang itself (installed --no-deps in the project environment) lacks its CUDA packages;
    # what matters here is that every sglang-fx distribution has what it asks for.
    ours = [line for line in check.stdout.splitlines() if re.match(r"sglang-fx", line, re.I)]
    assert not ours, check.stdout


def test_backends_lists_what_is_installed(venv):
    out = venv.run("sglang_fx.cli", "backends").stdout
    assert re.search(r"^mindspore\n  distribution: sglang-fx-mindspore\n", out, re.M), out
    assert re.search(r"^reference_torch\n  distribution: sglang-fx-reference-torch\n", out, re.M), out
    assert "numpy" not in re.findall(r"^(\w+)$", out, re.M), out


#: A cross-section of the conformance suite, for the runs below: every exchange and KV-cache
#: case, and the Llama model cases (transformers and the reference backend as ground truth).
#: The whole suite runs on the NumPy backend in tests/test_conformance.py and on a scaffold in
#: tests/test_new_backend.py (about 150 s each here); what is checked here is that the suite,
#: the template and their ground truth work as installed from the wheels.
CASES = ("exchange/", "kv_cache/", "logits/LlamaForCausalLM", "logits_vs_reference/LlamaForCausalLM",
         "greedy/LlamaForCausalLM")  # fmt: skip


def test_new_backend_from_sglang_fx_alone_then_its_own_tests(venv, dist, tmp_path):
    absent = venv.run("import importlib.util; print(importlib.util.find_spec('sglang_fx_numpy'))", code=True).stdout
    assert absent.strip() == "None"  # the template comes from the sglang-fx wheel
    out = tmp_path / "sglang-fx-mybackend"
    venv.run("sglang_fx.cli", "new-backend", "mybackend", "--out", str(out), cwd=tmp_path)
    venv.pip_install("--no-build-isolation", f"{out}[test]", find_links=dist)
    select = " or ".join(["exchange", "kv_cache", "(LlamaForCausalLM and not w8a8 and not verify)"])
    tests = venv.run("pytest", "-q", "-p", "no:cacheprovider", "tests", "-k", select, cwd=out)
    assert re.search(r"\b\d+ passed", tests.stdout) and not re.search(r"\b\d+ failed", tests.stdout), tests.stdout[-3000:]


def test_conformance_of_the_numpy_backend_installed_from_its_wheel(venv, dist):
    venv.pip_install("sglang-fx[numpy]", find_links=dist)
    out = venv.run("sglang_fx.cli", "conformance", "--backend", "numpy", "-q", *(a for c in CASES for a in ("--only", c))).stdout
    assert re.search(r"numpy: \d+ passed, 0 failed", out), out[-3000:]


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> str:
    """A tiny float32 Llama whose vocabulary (10000) holds the random ids one_batch sends."""
    from sglang_fx.tiny import make_tiny_model

    return str(make_tiny_model("llama", tmp_path_factory.mktemp("install-model") / "llama", vocab_size=10000))


def test_one_request_through_sglangs_launcher_with_mindspore(venv, llama, tmp_path):
    import requests

    server = Server("installed-mindspore", llama, ("--model-impl", "mindspore"), venv.env, tmp_path, python=str(venv.python),
                    cwd=tmp_path)  # fmt: skip
    try:
        server.wait_ready(TIMEOUT)
        answer = requests.post(server.url + "/generate", json={"text": "The capital of France is",
                               "sampling_params": {"max_new_tokens": 8, "temperature": 0}}, timeout=120)  # fmt: skip
    finally:
        server.stop()
    assert answer.status_code == 200, answer.text
    assert answer.json()["meta_info"]["completion_tokens"] == 8
    log = server.output(200000)
    assert "on backend 'mindspore'" in log, log[-4000:]


def test_sglangs_own_one_batch_runs_the_backend_in_every_rank(venv, llama, tmp_path):
    """SGLang's own one_batch, run as SGLang documents it on CPU (SGLANG_USE_CPU_ENGINE=1, a CPU
    set per rank in SGLANG_CPU_OMP_THREADS_BIND), loads no plugins: the wheel's start-up hook
    (sglang_fx/cpu_host.py) has each tensor-parallel rank load them before it builds its
    ModelRunner, so both run the sglang-fx backend, not SGLang's Ascend-only "mindspore" wrapper."""
    from types import SimpleNamespace

    from sglang_fx.sglang.compat import CPU_THREADS_BIND_ENV, cpu_threads_binding

    env = {**venv.env, "SGLANG_USE_CPU_ENGINE": "1", CPU_THREADS_BIND_ENV: cpu_threads_binding(SimpleNamespace(tp_size=2))}
    proc = subprocess.Popen([str(venv.python), "-m", "sglang.benchmark.one_batch", "--model-path", llama, "--model-impl",
                             "mindspore", "--tp-size", "2", *SERVER_FLAGS, "--batch-size", "2", "--input-len", "8",
                             "--output-len", "4"], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)  # fmt: skip
    try:
        log, _ = proc.communicate(timeout=TIMEOUT)
    finally:  # the ranks too, whatever happened
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, log[-4000:]
    assert log.count("type=SglangFx_mindspore_ForCausalLM") == 2, log[-4000:]  # TP0 and TP1
    assert "Decode 2. Batch size: 2," in log[log.index("Benchmark ..."):], log[-4000:]
