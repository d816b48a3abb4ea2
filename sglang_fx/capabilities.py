"""What a backend can run, declared as data, and checked before anything is loaded."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Capabilities:
    """A backend's declared abilities.

    dtypes          device kind ("cpu", "cuda", "npu") -> dtype names the backend runs there
                    ("float32", "float16", "bfloat16"). The keys are the supported devices.
    architectures   HF `architectures` names, e.g. "Qwen3ForCausalLM".
    page_sizes      supported KV page sizes in tokens; None means any positive size.
    features        free-form feature flags, e.g. "prefix_cache", "jit", "all_token_logits".
    parallelism     the parallel layouts it runs (`sglang_fx.parallel`): "tp" (tensor parallel:
                    sharded weights, collectives over the TP group), "ep" (routed experts split
                    over the TP group). Empty: one process only. Data parallelism needs nothing
                    of a backend (each replica is a world of its own) and is always allowed.
    verify          the speculative verify steps (ForwardMode.VERIFY in sglang_fx/metadata.py) it
                    runs: "chain" (each draft token sees all earlier ones: one draft per
                    sequence), "tree" (any tree mask; implies chain). Empty: none (SPI < 1.2).
    quantization    the quantized-checkpoint schemes it runs (`sglang_fx.quant`: "w8a8_int8", with
                    int8 weights kept int8 and an int8 x int8 -> int32 product). Empty: float
                    checkpoints only (SPI 1.3; a backend written for 1.1 or 1.2 declares none).
    eagle3          EAGLE3 speculative decoding's model side (SPI 1.4): its runners capture the
                    hidden states of chosen layers of a target model and run the
                    LlamaForCausalLMEagle3 draft on them, both through ModelRunner.forward_hidden
                    (sglang_fx/spi.py); it lists "LlamaForCausalLMEagle3" in architectures too.
                    False: neither (a backend written for SPI 1.3 or older).
    options         the keys of RunnerOptions.extra the runner takes -> what each means (shown
                    by `sglang-fx backends`); an unknown key is refused before loading. The
                    runner checks the values.
    """

    dtypes: Mapping[str, frozenset[str]]
    architectures: frozenset[str]
    page_sizes: frozenset[int] | None = None
    features: frozenset[str] = field(default_factory=frozenset)
    parallelism: frozenset[str] = field(default_factory=frozenset)
    quantization: frozenset[str] = field(default_factory=frozenset)
    options: Mapping[str, str] = field(default_factory=dict)
    verify: frozenset[str] = field(default_factory=frozenset)
    eagle3: bool = False

    @property
    def devices(self) -> frozenset[str]:
        return frozenset(self.dtypes)

    def validate(
        self,
        *,
        architecture: str | None = None,
        dtype: str | None = None,
        device: str | None = None,
        page_size: int | None = None,
        tp_size: int = 1,
        ep_size: int = 1,
        options: Mapping[str, str] | None = None,
        verify: str | None = None,
        quantization: str | None = None,
        eagle3: bool = False,
    ) -> list[str]:
        """Every problem with running this configuration, as sentences naming the fix.
        An empty list means supported. Arguments left as None are not checked."""
        problems = []
        if architecture is not None and architecture not in self.architectures:
            problems.append(
                f"architecture {architecture!r} is not supported; supported: {', '.join(sorted(self.architectures))}"
            )
        kind = device.split(":")[0] if device is not None else None
        if kind is not None and kind not in self.dtypes:
            problems.append(f"device {device!r} is not supported; supported devices: {', '.join(sorted(self.dtypes))}")
        elif dtype is not None:
            kinds = [kind] if kind is not None else sorted(self.dtypes)
            for k in kinds:
                if dtype not in self.dtypes[k]:
                    problems.append(
                        f"dtype {dtype!r} is not supported on {k}; use one of: {', '.join(sorted(self.dtypes[k]))}"
                    )
        if page_size is not None:
            if page_size < 1:
                problems.append(f"page size must be a positive number of tokens, got {page_size}")
            elif self.page_sizes is not None and page_size not in self.page_sizes:
                problems.append(
                    f"page size {page_size} is not supported; supported: {', '.join(map(str, sorted(self.page_sizes)))}"
                )
        if tp_size > 1 and "tp" not in self.parallelism:
            problems.append(f"tensor parallelism (tp_size {tp_size}) is not supported: this backend runs one process "
                            "per model; use tp_size 1, or a backend that declares 'tp' in its parallelism")  # fmt: skip
        if ep_size > 1 and "ep" not in self.parallelism:
            problems.append(f"expert parallelism (ep_size {ep_size}) is not supported; use ep_size 1")
        if verify is not None and not self.can_verify(verify):
            problems.append(f"speculative decoding needs {verify} verification (ForwardMode.VERIFY), and this backend "
                            f"verifies {' and '.join(sorted(self.verify)) + ' masks only' if self.verify else 'nothing'}; "
                            "serve without speculative decoding" + (", or with a chain-shaped draft (topk 1)"
                                                                   if self.verify else ""))  # fmt: skip
        if quantization is not None and quantization not in self.quantization:
            runs = ", ".join(sorted(self.quantization)) or "none (float checkpoints only)"
            problems.append(f"quantized checkpoints of scheme {quantization!r} are not supported; the schemes it runs: {runs}; "
                            "use a float checkpoint or a backend that declares the scheme")  # fmt: skip
        if eagle3 and not self.eagle3:
            problems.append("EAGLE3 speculative decoding needs hidden-state capture and the LlamaForCausalLMEagle3 draft "
                            "(Capabilities.eagle3, ModelRunner.forward_hidden, SPI 1.4), which this backend does not declare; "
                            "serve without EAGLE3 (e.g. NGRAM or STANDALONE), or with a backend that declares eagle3")  # fmt: skip
        unknown = sorted(set(options or {}) - set(self.options))
        if unknown:
            takes = ", ".join(sorted(self.options)) or "none"
            problems.append(f"unknown backend option(s) {', '.join(unknown)}; the options it takes: {takes}")
        return problems

    def can_verify(self, kind: str) -> bool:
        """Whether it runs a VERIFY step whose tree mask is a "chain" or a "tree"."""
        if kind not in ("chain", "tree"):
            raise ValueError(f"verify kind must be 'chain' or 'tree', got {kind!r}")
        return kind in self.verify or (kind == "chain" and "tree" in self.verify)

    def describe(self) -> str:
        devices = "; ".join(f"{d}: {', '.join(sorted(ts))}" for d, ts in sorted(self.dtypes.items()))
        pages = "any" if self.page_sizes is None else ", ".join(map(str, sorted(self.page_sizes)))
        return (
            f"devices/dtypes [{devices}]; architectures [{', '.join(sorted(self.architectures))}]; "
            f"page sizes [{pages}]; features [{', '.join(sorted(self.features))}]; "
            f"parallelism [{', '.join(sorted(self.parallelism)) or 'none'}]; "
            f"verify [{', '.join(sorted(self.verify)) or 'none'}]; "
            f"quantization [{', '.join(sorted(self.quantization)) or 'none'}]; "
            f"eagle3 [{'capture and draft' if self.eagle3 else 'none'}]; "
            f"options [{', '.join(f'{k}: {v}' for k, v in sorted(self.options.items())) or 'none'}]"
        )
