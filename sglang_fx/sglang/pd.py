"""Prefill-decode (PD) disaggregation on a CPU host: what SGLang's PD code needs there.

SGLang does PD itself: its transfer engine (Mooncake) reads SGLang's own KV pool, which the
sglang-fx backends alias, and a decode server never runs the prompt's forward. So PD needs no
backend code, and prefill and decode may even run different frameworks. What a CPU host needs
is a few settings that SGLang 0.5.23's CUDA-minded PD code assumes away. `configure` runs in the
launcher (from the plugin's check_server_args, for every --model-impl, native `sglang` too)
when --disaggregation-mode is prefill or decode, before any scheduler is spawned; the
schedulers inherit the environment it sets and the fields it declares. A choice the user made
(a flag, or the environment variable already set) is always kept.

On a CPU host (--device cpu):
- decode: the default retraction backup builds a pinned host pool through
  `torch.cuda.cudart()` at start-up, so the backup defaults to `cpu_tensor` (per-request CPU
  tensors) when --disaggregation-decode-retraction-backup is not given.
- prefill: sending a request's KV takes SGLang's "host tensor indices" path
  (disaggregation/prefill.py:1746, for senders declaring `supports_host_tensor_indices`, as
  Mooncake's does), which allocates `pin_memory=True` and records a `torch.cuda.Event`: it
  fails at the first real request (the health check passes, its warm-up uses a fake sender).
  SGLANG_DISAGGREGATION_ALL_CP_RANKS_TRANSFER=1 makes SGLang take its plain path instead (at
  --attn-cp-size 1 it changes nothing else: every rank of a CP group of one is the sender).
- prefill: the overlap schedule with a prefix-cache hit builds a CUDA event too ("Tried to
  instantiate dummy base class Event"), so the prefill server runs --disable-overlap-schedule.
- Mooncake's engine needs an address to advertise: SGLANG_HOST_IP defaults to 127.0.0.1 when
  neither it nor HOST_IP is set and the server listens on loopback (a server on another
  address is reachable from other hosts, and SGLang's own NIC detection is right for it).
- `--disaggregation-transfer-backend mooncake` on a host without an RDMA device (nothing in
  /sys/class/infiniband) takes Mooncake's TCP transport (MC_FORCE_TCP=1, what SGLang's own
  `mooncake_tcp` choice sets), unless the user named IB devices or set MC_FORCE_TCP.

Refused at start-up, with the reason: the `nixl` backend on a CPU host (it registers the KV
as GPU memory), and PD with speculative decoding on a CPU host or with an sglang-fx backend
(prefill also ships the draft model's KV; neither runs speculative decoding here).

The `ascend` transfer backend (any device) is checked at start-up instead of at the first
transfer: SGLang 0.5.23 imports `memfabric_hybrid` (the package `memfabric-hybrid`) in each
scheduler, hands its engine ASCEND_MF_STORE_URL (the config store both sides share,
SCHEME://HOST:PORT; unset, the engine fails to initialise with no reason given) and maps
ASCEND_MF_TRANSFER_PROTOCOL to a member of `TransferEngine.TransDataOpType` (an unknown one
silently becomes sdma).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from pathlib import Path
from typing import Any, Callable, Mapping

from . import compat

logger = logging.getLogger(__name__)

MODES = ("prefill", "decode")
LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})
RDMA_SYSFS = Path("/sys/class/infiniband")

HOST_IP_ENVS = ("SGLANG_HOST_IP", "HOST_IP")  # read in this order by srt/utils/network.py
FORCE_TCP_ENV = "MC_FORCE_TCP"  # Mooncake: TCP transport instead of RDMA
ALL_CP_RANKS_ENV = "SGLANG_DISAGGREGATION_ALL_CP_RANKS_TRANSFER"


@dataclasses.dataclass
class Plan:
    """What `configure` applies: environment variables (set only where unset), ServerArgs
    fields to declare, and one log line per decision."""

    env: dict[str, str] = dataclasses.field(default_factory=dict)
    fields: dict[str, Any] = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)


def has_rdma_device(sysfs: Path = RDMA_SYSFS) -> bool:
    return sysfs.is_dir() and any(sysfs.iterdir())


def problems(view: Any, *, sglang_fx_backend: bool) -> list[str]:
    """Why this PD configuration cannot run (empty when it can). `view`: resolved ServerArgs."""
    out = []
    cpu = _on_cpu(view)
    if cpu and view.disaggregation_transfer_backend == "nixl":
        out.append("--disaggregation-transfer-backend nixl registers the KV cache as GPU memory and cannot move "
                   "a CPU host's KV; use mooncake (its TCP transport is taken when there is no RDMA device)")  # fmt: skip
    spec = getattr(view, "speculative_algorithm", None)
    if spec is not None and (cpu or sglang_fx_backend):
        where = "on a CPU host" if cpu else "with an sglang-fx backend"
        out.append(f"PD disaggregation with speculative decoding (--speculative-algorithm {spec}) is not supported "
                   f"{where}: prefill would also ship the draft model's KV, and speculative decoding does not run "
                   "here; drop --speculative-algorithm")  # fmt: skip
    return out


ASCEND_STORE_ENV = "ASCEND_MF_STORE_URL"
ASCEND_PROTOCOL_ENV = "ASCEND_MF_TRANSFER_PROTOCOL"
STORE_URL = re.compile(r"[a-z][a-z0-9+.-]*://[^\s/:]+:\d+/?", re.I)


def ascend_problems(environ: Mapping[str, str], protocols: Callable[[], frozenset[str] | None]) -> list[str]:
    """What keeps SGLang's `ascend` transfer backend from starting. `protocols()`: the lower-cased
    TransDataOpType names of the installed memfabric_hybrid, None when it is not importable."""
    out = []
    url = environ.get(ASCEND_STORE_ENV, "").strip()
    if not url:
        out.append(f"--disaggregation-transfer-backend ascend needs {ASCEND_STORE_ENV}, the address of memfabric's "
                   "config store that the prefill and decode servers share (e.g. tcp://10.0.0.1:24669)")  # fmt: skip
    elif not STORE_URL.fullmatch(url):
        out.append(f"{ASCEND_STORE_ENV}={url!r} is not of the form SCHEME://HOST:PORT (e.g. tcp://10.0.0.1:24669)")
    known = protocols()
    if known is None:
        out.append("--disaggregation-transfer-backend ascend needs the package memfabric-hybrid (SGLang 0.5.23 imports "
                   "memfabric_hybrid; the guide's mf_adapter wheel is not it): pip install memfabric-hybrid")  # fmt: skip
    protocol = environ.get(ASCEND_PROTOCOL_ENV, "").strip().lower()
    if known is not None and protocol and protocol not in known:
        out.append(f"{ASCEND_PROTOCOL_ENV}={environ[ASCEND_PROTOCOL_ENV]!r} is not a transfer protocol of the installed "
                   f"memfabric_hybrid ({', '.join(sorted(known))})")  # fmt: skip
    return out


def memfabric_protocols() -> frozenset[str] | None:
    """The installed memfabric_hybrid's TransferEngine.TransDataOpType names, lower-cased (None
    when it cannot be imported)."""
    try:
        from memfabric_hybrid import TransferEngine
    except ImportError:
        return None
    op_types = TransferEngine.TransDataOpType
    names = getattr(op_types, "__members__", None) or {n: v for n, v in vars(op_types).items() if n.isupper()}
    return frozenset(n.lower() for n in names)


def plan(view: Any, raw: Mapping[str, Any], environ: Mapping[str, str], *, rdma: bool) -> Plan:
    """The settings a CPU host's PD server needs. `view`: the resolved ServerArgs; `raw`: what the
    user passed (ServerArgs fields before SGLang resolved them); `environ`: the environment."""
    p = Plan()
    if not _on_cpu(view) or view.disaggregation_mode not in MODES:
        return p
    if view.disaggregation_mode == "decode" and raw.get("disaggregation_decode_retraction_backup") is None \
            and view.disaggregation_decode_retraction_backup is None:  # fmt: skip
        p.fields["disaggregation_decode_retraction_backup"] = "cpu_tensor"
        p.notes.append("--disaggregation-decode-retraction-backup cpu_tensor (the host_pool backup needs CUDA; "
                       "pass the flag to choose)")  # fmt: skip
    if view.disaggregation_mode == "prefill":
        if ALL_CP_RANKS_ENV not in environ:
            p.env[ALL_CP_RANKS_ENV] = "1"
            p.notes.append(f"{ALL_CP_RANKS_ENV}=1 (SGLang's host-tensor-indices send path pins memory and records "
                           "a CUDA event)")  # fmt: skip
        elif environ[ALL_CP_RANKS_ENV].strip().lower() not in ("1", "true", "yes"):
            p.notes.append(f"{ALL_CP_RANKS_ENV}={environ[ALL_CP_RANKS_ENV]} kept as set: sending KV will fail on CPU "
                           "(pin_memory / torch.cuda.Event)")  # fmt: skip
        if not view.disable_overlap_schedule:
            p.fields["disable_overlap_schedule"] = True
            p.notes.append("--disable-overlap-schedule on the prefill server (its overlap schedule builds a CUDA "
                           "event on a prefix hit)")  # fmt: skip
    if not any(environ.get(name) for name in HOST_IP_ENVS) and str(view.host) in LOOPBACK:
        p.env["SGLANG_HOST_IP"] = "127.0.0.1"
        p.notes.append("SGLANG_HOST_IP=127.0.0.1 (the transfer engine's address; the server listens on loopback)")
    if view.disaggregation_transfer_backend == "mooncake" and FORCE_TCP_ENV not in environ and not rdma \
            and not raw.get("disaggregation_ib_device"):  # fmt: skip
        p.env[FORCE_TCP_ENV] = "1"
        p.notes.append(f"{FORCE_TCP_ENV}=1: Mooncake's TCP transport (no RDMA device in {RDMA_SYSFS})")
    return p


def configure(server_args: Any, *, sglang_fx_backend: bool) -> Plan | None:
    """Check and complete a PD server's arguments (launcher, before the schedulers start).
    Raises ValueError naming every problem; returns the applied Plan (None outside PD mode)."""
    view = compat.server_view(server_args)
    if getattr(view, "disaggregation_mode", "null") not in MODES:
        return None
    found = problems(view, sglang_fx_backend=sglang_fx_backend)
    if view.disaggregation_transfer_backend == "ascend":
        found += ascend_problems(os.environ, memfabric_protocols)
    if found:
        raise ValueError(f"--disaggregation-mode {view.disaggregation_mode}: " + "; ".join(found))
    p = plan(view, compat.raw_server_args(server_args), os.environ, rdma=has_rdma_device())
    for name, value in p.env.items():
        os.environ.setdefault(name, value)
    if p.fields:
        compat.declare_server_args(server_args, "sglang_fx.pd", **p.fields)
    for note in p.notes:
        logger.info("sglang-fx PD (%s, CPU host): %s", view.disaggregation_mode, note)
    return p


def _on_cpu(view: Any) -> bool:
    return str(getattr(view, "device", None) or "cpu") == "cpu"
