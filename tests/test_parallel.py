"""Tensor and expert parallelism outside SGLang: the sharding rules, slice-by-slice checkpoint
reads, the standalone multi-process runner, and every backend sharded over two real processes
with real collectives (torch's gloo for reference_torch, MindSpore's mccl for mindspore).
Budget: about 4 minutes on a 2-core machine, most of it the MindSpore conformance runs."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from sglang_fx.checkpoint import Checkpoint, load_spec
from sglang_fx.distributed import free_ports, run_parallel
from sglang_fx.errors import UnsupportedConfigError
from sglang_fx.kv_pool import layout_for
from sglang_fx.parallel import Group, Parallel, Rendezvous
from sglang_fx.sharding import Shard, problems

from .sglang_support import available

ARCHES = ("qwen3", "qwen2", "llama", "qwen3_moe", "deepseek_v3")


def layout(rank: int, tp: int = 2, ep: int = 1) -> Parallel:
    return Parallel(Group("tp:0", tuple(range(tp)), rank), ep, rendezvous=Rendezvous("127.0.0.1", 1, tp, rank))


# ---------------------------------------------------------------------------------------------
# Sharding rules
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHES)
@pytest.mark.parametrize("ep", [1, 2])
def test_the_shards_of_every_tensor_make_it_whole(tiny, arch, ep):
    """Each tensor split by the rules, read by rank, and put back together is the checkpoint's
    tensor: no element missing, none read twice (vocabulary padding and replicated KV aside)."""
    path = tiny(arch)
    spec = load_spec(path)
    whole = Checkpoint(path).load(spec)
    shards = [Shard.of(spec, layout(r, 2, ep)) for r in range(2)]
    parts = [Checkpoint(path).load(spec, s) for s in shards]
    for name, full in whole.items():
        holders = [(s, p[name]) for s, p in zip(shards, parts) if s.holds(name)]
        cut = shards[0].split(name)
        if cut is None:
            assert all(torch.equal(t, full) for _, t in holders), name
            continue
        dim = cut[0]
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            holders = [(s, t.narrow(0, 0, len(s.vocab))) for s, t in holders]
        if ".mlp.experts." in name and ep == 2:  # one rank holds each expert, whole
            assert len(holders) == 1 and torch.equal(holders[0][1], full), name
            continue
        assert torch.equal(torch.cat([t for _, t in holders], dim), full), name
        assert [s.split(name)[1] for s, _ in holders] == sorted((s.split(name)[1] for s, _ in holders), key=lambda r: r.start)


def test_each_rank_reads_half_of_the_bytes_from_disk(tiny):
    """Measured by the OS (/proc/self/io rchar): a rank reads its slices, not the whole model."""
    path = tiny("qwen3_moe", hidden_size=128)
    spec = load_spec(path)

    def bytes_read(shard):
        ckpt = Checkpoint(path)
        before = _rchar()
        ckpt.load(spec, shard)
        return _rchar() - before

    full = bytes_read(None)
    for ep in (1, 2):
        for rank in (0, 1):
            share = bytes_read(Shard.of(spec, layout(rank, 2, ep))) / full
            assert 0.48 < share < 0.53, (ep, rank, share)  # replicated norms and routers: a little over half


def _rchar() -> int:
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar"))


def test_local_sizes_and_kv_layout(tiny):
    spec = load_spec(tiny("qwen3"))  # 4 heads, 2 KV heads, MLP 128
    local = Shard.of(spec, layout(1)).local
    assert (local.num_heads, local.num_kv_heads, local.intermediate_size, local.vocab_size) == (2, 1, 64, spec.vocab_size)
    assert layout_for(local, num_pages=4, page_size=16).k_shape == (1, 16)
    one_kv = load_spec(tiny("qwen3", num_key_value_heads=1))
    assert [Shard.of(one_kv, layout(r)).kv_heads for r in (0, 1)] == [range(0, 1), range(0, 1)]  # replicated
    four = [Shard.of(spec, layout(r, 4)).kv_heads for r in range(4)]
    assert four == [range(0, 1), range(0, 1), range(1, 2), range(1, 2)]  # each query group's own KV head
    ds = Shard.of(load_spec(tiny("deepseek_v3")), layout(0))
    assert (ds.local.num_heads, ds.local.num_kv_heads, ds.local.moe.intermediate_size) == (2, 1, 16)
    assert Shard.of(ds.spec, layout(1, 2, 2)).experts == range(4, 8)
    assert Shard.of(ds.spec, layout(1, 2, 2)).local.moe.intermediate_size == 32  # whole experts under EP


def test_splits_that_do_not_divide_are_refused_with_the_numbers(tiny):
    smol_like = load_spec(tiny("llama", num_attention_heads=8, num_key_value_heads=2, head_dim=8))
    assert problems(smol_like, 2) == []
    nine = load_spec(tiny("llama", hidden_size=72, num_attention_heads=9, num_key_value_heads=3))
    with pytest.raises(UnsupportedConfigError, match=r"tp_size 2 does not divide the 9 attention heads of LlamaForCausalLM; use a tp_size among 1, 3, 9"):
        Shard.of(nine, layout(0))
    moe = load_spec(tiny("qwen3_moe"))  # 8 experts
    assert any("ep_size 4 must divide tp_size 2" in p for p in problems(moe, 2, 4))
    assert problems(moe, 3, 3)[-1].startswith("ep_size 3 does not divide the 8 routed experts")


def test_a_backend_without_tp_is_refused_at_start(tiny):
    from sglang_fx.capabilities import Capabilities

    caps = Capabilities(dtypes={"cpu": frozenset({"float32"})}, architectures=frozenset({"Qwen3ForCausalLM"}))
    assert caps.validate(tp_size=2, ep_size=2) == [
        "tensor parallelism (tp_size 2) is not supported: this backend runs one process per model; use tp_size 1, "
        "or a backend that declares 'tp' in its parallelism",
        "expert parallelism (ep_size 2) is not supported; use ep_size 1",
    ]


# ---------------------------------------------------------------------------------------------
# The standalone world: failures end it, with the rank named, never a hang
# ---------------------------------------------------------------------------------------------


def _fail_on_rank_1(parallel: Parallel, how: str) -> int:
    import torch.distributed as dist

    if parallel.tp_rank == 1:
        if how == "raise":
            raise ValueError("rank 1 gave up")
        os._exit(7)
    dist.barrier(group=parallel.tp.torch_group)  # waits on the rank that is gone
    return 0


def test_a_port_is_handed_out_once():
    """A port handed out is not bound until its server starts (minutes later): later calls must
    not hand it out again, although it still looks free."""
    for low in (30000, 65536):  # below the ephemeral range; none there: what bind(0) gives
        first = free_ports(40, low=low)
        again = free_ports(40, low=low)
        assert len(set(first)) == len(set(again)) == 40 and not set(first) & set(again)


@pytest.mark.parametrize("how,message", [("raise", r"(?s)rank 1 of 2 failed:.*ValueError: rank 1 gave up"),
                                         ("die", r"rank 1 of 2 died \(exit code 7\)")])  # fmt: skip
def test_a_failing_rank_ends_the_world(how, message):
    import time

    start = time.monotonic()
    with pytest.raises(RuntimeError, match=message):
        run_parallel(_fail_on_rank_1, 2, args=(how,), timeout=120)
    assert time.monotonic() - start < 60


# ---------------------------------------------------------------------------------------------
# Every backend, sharded over two processes with real collectives
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["reference_torch", "mindspore", "jax"])
def test_conformance_at_tp2(backend):
    """Every architecture (and a one-KV-head Qwen3, replicated per rank) at tp=2, then the MoE
    architectures with their experts split over the two ranks: logits within 1e-4 of transformers,
    of the reference and of the same backend at tp=1; greedy tokens identical to transformers."""
    if not available(backend):
        pytest.skip(f"{backend} is not available here")
    from sglang_fx.conformance.runner import run, starting_with

    report = run(backend, tp_size=2, progress=None)
    print(report.table())
    assert report.passed, report.table()
    names = {c.name for c in report.cases}
    assert {"logits_vs_tp1/Qwen3ForCausalLM+kv1", "greedy/DeepseekV3ForCausalLM", "logits_vs_tp1/Qwen3MoeForCausalLM"} <= names
    moe = ("logits_vs_tp1/Qwen3Moe", "logits_vs_tp1/Deepseek", "greedy/Qwen3Moe", "greedy/Deepseek")
    ep = run(backend, tp_size=2, ep_size=2, progress=None, select=starting_with(moe))
    print(ep.table())
    assert ep.passed and len(ep.cases) == 4, ep.table()


def _collective_calls(parallel: Parallel, backend: str, model: str) -> tuple[list[list[int]], int]:
    """Greedy tokens of a sharded session, and how many torch.distributed collectives ran."""
    import torch.distributed as dist

    from sglang_fx.generate import Session

    calls = 0
    originals = {n: getattr(dist, n) for n in ("all_reduce", "all_gather", "broadcast", "reduce_scatter")}

    def counted(fn):
        def call(*args, **kwargs):
            nonlocal calls
            calls += 1
            return fn(*args, **kwargs)

        return call

    for n, fn in originals.items():
        setattr(dist, n, counted(fn))
    try:
        session = Session(backend, model, dtype="float32", parallel=parallel, max_total_tokens=512)
        return session.generate([[5, 17, 99, 250], [3, 42]], 4), calls
    finally:
        for n, fn in originals.items():
            setattr(dist, n, fn)


@pytest.mark.parametrize("backend", ["mindspore", "jax"])
def test_framework_collectives_are_the_frameworks_own(tiny, backend):
    """A framework backend's all-reduces and all-gathers run on its own library inside its
    compiled step (MindSpore: mccl; JAX: XLA's gloo collectives): no torch.distributed collective
    is called, yet both ranks agree with reference_torch (whose collectives are torch's, counted
    by the same probe)."""
    if not available(backend):
        pytest.skip(f"{backend} is not available here")
    model = str(tiny("qwen3"))
    ms_ranks = run_parallel(_collective_calls, 2, args=(backend, model))
    ref_ranks = run_parallel(_collective_calls, 2, args=("reference_torch", model))
    assert [calls for _, calls in ms_ranks] == [0, 0]
    assert all(calls > 0 for _, calls in ref_ranks)
    assert ms_ranks[0][0] == ms_ranks[1][0] == ref_ranks[0][0]


# ---------------------------------------------------------------------------------------------
# What runs only on Ascend or inside SGLang: argument building, unit-tested on CPU
# ---------------------------------------------------------------------------------------------


def test_mindspore_reuses_the_hosts_hccl_communicator():
    """On an NPU, create_group gets GroupOptions carrying the host group's HCCL handle (as SGLang's
    own MindSpore runner passes it); without one, MindSpore makes its own communicator."""
    if not available("mindspore"):
        pytest.skip("mindspore is not available here")
    from sglang_fx_mindspore.collectives import hccl_group_options

    opts = hccl_group_options(Group("tp:0", (0, 1), 1, native=0x7F00DEAD))
    assert opts.hccl_config == {"hccl_comm": 0x7F00DEAD}
    assert hccl_group_options(Group("tp:0", (0, 1), 1)) is None


@pytest.mark.skipif(importlib.util.find_spec("torch_npu") is None, reason="needs Ascend NPUs (torch_npu): MindSpore's HCCL world")
def test_mindspore_tp2_on_ascend():
    """On an Ascend host: the model cases at tp=2 over MindSpore's HCCL world."""
    from sglang_fx.conformance.runner import run

    report = run("mindspore", device="npu", tp_size=2, progress=None)  # ranks on npu:0 and npu:1
    assert report.passed, report.table()


def test_mindspore_cluster_variables(monkeypatch):
    if not available("mindspore"):
        pytest.skip("mindspore is not available here")
    from sglang_fx_mindspore.collectives import cluster_env

    monkeypatch.delenv("MS_TOPO_TIMEOUT", raising=False)
    rank1 = Parallel(Group("tp:0", (0, 1), 1), rendezvous=Rendezvous("10.0.0.5", 4242, 2, 1))
    assert cluster_env(rank1) == {"MS_ROLE": "MS_WORKER", "MS_WORKER_NUM": "2", "MS_SCHED_HOST": "10.0.0.5",
                                  "MS_SCHED_PORT": "4242", "MS_TOPO_TIMEOUT": "300", "MS_NODE_ID": "1"}  # fmt: skip
    monkeypatch.setenv("MS_TOPO_TIMEOUT", "60")  # the user's value wins
    assert cluster_env(rank1)["MS_TOPO_TIMEOUT"] == "60"
    assert "MS_NODE_ID" not in cluster_env(rank1, "MS_SCHED")


class _FakeCoordinator:
    """SGLang's GroupCoordinator, as far as compat.parallel_layout reads it."""

    unique_name, ranks, rank_in_group, world_size, local_rank = "tp:0", [0, 1], 1, 2, 1
    cpu_group = device_group = object()


def test_the_layout_sglang_publishes(monkeypatch):
    """compat.parallel_layout on SGLang's runtime context: TP group by SGLang's name, ep from
    moe_ep_size, the rendezvous TP rank 0 broadcast (the dist-init host across nodes), and on
    NPU the group's HCCL handle."""
    pytest.importorskip("sglang")
    import types

    import torch.distributed as dist
    from sglang.srt import runtime_context

    from sglang_fx.sglang import compat

    published = types.SimpleNamespace(tp_size=2, tp_group=_FakeCoordinator(), moe_ep_size=2, dp_rank=1, nnodes=2,
                                      dist_init_addr="10.1.2.3:5000")  # fmt: skip
    monkeypatch.setattr(runtime_context, "get_parallel", lambda: published)
    monkeypatch.setattr(runtime_context, "get_server_args", lambda: types.SimpleNamespace(dp_size=2))
    seen = {}

    def broadcast(objects, src, group):  # rank 0's offer arrives
        seen.update(src=src, group=group)
        objects[0] = ("10.1.2.3", 4711)

    monkeypatch.setattr(dist, "broadcast_object_list", broadcast)
    monkeypatch.setattr(compat, "hccl_communicator", lambda group: 0xABC)
    p = compat.parallel_layout("npu:1")
    assert (p.tp.name, p.tp.ranks, p.tp_rank, p.ep_size, p.ep_rank, p.dp_size, p.dp_rank) == ("tp:0", (0, 1), 1, 2, 1, 2, 1)
    assert p.rendezvous == Rendezvous("10.1.2.3", 4711, 2, 1) and p.tp.native == 0xABC
    assert seen == {"src": 0, "group": _FakeCoordinator.cpu_group}
    assert compat.parallel_layout("cpu").tp.native is None


@pytest.mark.parametrize("tp,dp,cpus,expected", [
    (2, 1, [0, 1], "0|1"), (2, 2, [0, 1], "0|1|0|1"), (2, 1, [0, 1, 2, 3, 4, 5, 6, 7], "0-3|4-7"), (1, 1, [0, 1], None),
])  # fmt: skip
def test_cpu_thread_binding_for_sglang(monkeypatch, tp, dp, cpus, expected):
    import types

    from sglang_fx.sglang import compat

    monkeypatch.delenv(compat.CPU_THREADS_BIND_ENV, raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(cpus))
    args = types.SimpleNamespace(tp_size=tp, dp_size=dp, pp_size=1)
    assert compat.cpu_threads_binding(args) == expected
    monkeypatch.setenv(compat.CPU_THREADS_BIND_ENV, "0-1|0-1")  # the user's own setting wins
    assert compat.cpu_threads_binding(args) is None
