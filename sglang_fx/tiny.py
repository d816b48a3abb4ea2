"""Tiny random-weight Hugging Face checkpoints, made locally (no hub access).

`make_tiny_model(arch, out)` writes config.json, safetensors weights (sharded on request) and a
byte-level BPE tokenizer trained here with `tokenizers`, with a ChatML chat template. The result
loads in `transformers.AutoModelForCausalLM`, in SGLang and in every sglang-fx backend, through
the same code path a real checkpoint takes.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

VOCAB_SIZE = 512
#: Prompts of varied lengths for comparing outputs on tiny models (examples and tests share them).
SAMPLE_PROMPTS = [
    "hello world",
    "a b c",
    "the quick brown fox jumps over the lazy dog",
    "one",
    "in the beginning there was a very long sentence that keeps going and going",
    "x y",
    "numbers 1 2 3 4 5 6 7 8 9 10",
    "what is the answer",
]
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# A few hundred words of plain text to train the tokenizer on: enough for merges of common
# English pieces, numbers and code-ish punctuation.
CORPUS = """
The quick brown fox jumps over the lazy dog. A language model reads a prompt, one token at a
time, and predicts the next token. The server batches many requests together; each request
keeps its keys and values in a paged cache, so that a long shared prefix is computed once.
Once upon a time there was a small model that wanted to be large. It learned to count: one,
two, three, four, five, six, seven, eight, nine, ten. 0 1 2 3 4 5 6 7 8 9 10 11 12 100 1000.
def forward(self, input_ids, positions): return self.model(input_ids, positions)
Hello, world! How are you today? I am fine, thank you. What is the capital of France? Paris.
The weather is sunny and warm; the river flows to the sea; the mountains are high and cold.
Attention is all you need. Keys, values and queries; heads, layers and experts; tensors move
between frameworks without copies, by DLPack, and the logits come back for sampling.
"""

#: Model settings per architecture: HF config class name and its tiny sizes.
PRESETS: dict[str, dict[str, Any]] = {
    "qwen3": dict(
        config_class="Qwen3Config",
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6, rope_theta=1000000.0,
        tie_word_embeddings=True,
    ),
    "qwen2": dict(
        config_class="Qwen2Config",
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=False,
    ),
    "llama": dict(
        config_class="LlamaConfig",
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
    ),
    "qwen3_moe": dict(
        config_class="Qwen3MoeConfig",
        hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2,
        norm_topk_prob=True, rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=False,
    ),
    "deepseek_v3": dict(
        config_class="DeepseekV3Config",
        hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=32, q_lora_rank=48,
        qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, n_routed_experts=8,
        num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, n_group=2, topk_group=1,
        routed_scaling_factor=2.5, rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False,
    ),
}


def train_tokenizer(vocab_size: int = VOCAB_SIZE):
    """A byte-level BPE tokenizer trained on CORPUS, wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([CORPUS] * 4, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_tiny_model(
    arch: str,
    out: str | Path,
    *,
    seed: int = 0,
    shards: int = 1,
    dtype: str = "float32",
    **overrides: Any,
) -> Path:
    """Write a random-weight checkpoint of `arch` (a PRESETS key) to `out` and return it.
    The same seed gives the same weights. overrides replace preset sizes (e.g. hidden_size); a
    vocab_size above the tokenizer's VOCAB_SIZE gives ids no text encodes to (for tools that
    send random ids).
    shards > 1 writes model-0000N-of-0000M.safetensors plus model.safetensors.index.json."""
    import torch
    import transformers

    if arch not in PRESETS:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose one of: {', '.join(PRESETS)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer()
    settings = {"vocab_size": VOCAB_SIZE, "max_position_embeddings": 4096, **PRESETS[arch], **overrides}
    config_class = getattr(transformers, settings.pop("config_class"))
    config = config_class(
        initializer_range=0.1,  # larger than usual: distinct logits make greedy decoding robust
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **settings,
    )
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    with torch.no_grad():  # HF starts norm weights at one and routing biases at zero; random ones exercise them
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(0.5 + torch.rand(param.shape))
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(torch.rand(buf.shape) * 0.1)
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    max_shard = f"{max(1, nbytes // shards // 1000 + 1)}KB" if shards > 1 else "50GB"
    transformers.utils.logging.disable_progress_bar()
    model.save_pretrained(out, max_shard_size=max_shard)
    tokenizer.save_pretrained(out)
    return out


def make_tiny_eagle3(target: str | Path, out: str | Path, *, seed: int = 0, draft_vocab_size: int = 256,
                     aux_layer_ids: tuple[int, ...] | None = None, own_embedding: bool = False,
                     hot_ids: Sequence[int] | None = None) -> Path:  # fmt: skip
    """Write a random-weight EAGLE3 draft (`LlamaForCausalLMEagle3`, the layout of EAGLE3's own
    checkpoints: fc, midlayer.*, norm, lm_head, d2t, t2d) for the Llama-family checkpoint at
    `target` to `out`, and return it. Its sizes are the target's; aux_layer_ids: the target layers
    whose outputs it reads (default: the first three, as many as the target has); its draft
    vocabulary is `draft_vocab_size` target ids chosen at random (sorted), or the target ids
    `hot_ids` (then draft_vocab_size is their number), mapped by d2t. With
    own_embedding it carries an embed_tokens.weight of its own (which the target's replaces, as
    in SGLang: `sglang_fx.eagle3.draft_weights`)."""
    import json
    import shutil

    import torch
    from safetensors.torch import save_file

    target, out = Path(target), Path(out)
    cfg = json.loads((target / "config.json").read_text())
    layers = cfg["num_hidden_layers"]
    ids = list(aux_layer_ids if aux_layer_ids is not None else range(min(3, layers - 1)))
    H, V = cfg["hidden_size"], cfg["vocab_size"]
    heads, kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    D = cfg.get("head_dim") or H // heads
    if hot_ids is not None:
        draft_vocab_size = len(set(hot_ids))
    if not 0 < draft_vocab_size <= V:
        raise ValueError(f"draft_vocab_size must be in [1, {V}] (the target's vocabulary), got {draft_vocab_size}")
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(shape, generator=g) * 0.1

    def norm(n):
        return 0.5 + torch.rand((n,), generator=g)

    I, p = cfg["intermediate_size"], "midlayer."
    hot = torch.randperm(V, generator=g)[:draft_vocab_size].sort().values  # the draft vocabulary, as target ids
    if hot_ids is not None:
        if not all(0 <= i < V for i in hot_ids):
            raise ValueError(f"hot_ids must be target ids in [0, {V}), got {sorted(hot_ids)}")
        hot = torch.tensor(sorted(set(hot_ids)), dtype=torch.int64)
    weights = {
        "fc.weight": rand(H, H * len(ids)),
        p + "input_layernorm.weight": norm(H), p + "hidden_norm.weight": norm(H),
        p + "self_attn.q_proj.weight": rand(heads * D, 2 * H), p + "self_attn.k_proj.weight": rand(kv * D, 2 * H),
        p + "self_attn.v_proj.weight": rand(kv * D, 2 * H), p + "self_attn.o_proj.weight": rand(H, heads * D),
        p + "post_attention_layernorm.weight": norm(H),
        p + "mlp.gate_proj.weight": rand(I, H), p + "mlp.up_proj.weight": rand(I, H), p + "mlp.down_proj.weight": rand(H, I),
        "norm.weight": norm(H),
        "lm_head.weight": rand(draft_vocab_size, H),
        "d2t": hot - torch.arange(draft_vocab_size),
        "t2d": torch.zeros(V, dtype=torch.bool).index_fill_(0, hot, True),
    }  # fmt: skip
    if own_embedding:
        weights["embed_tokens.weight"] = rand(V, H)
    out.mkdir(parents=True, exist_ok=True)
    save_file({n: t.contiguous() for n, t in weights.items()}, str(out / "model.safetensors"))
    config = {
        "architectures": ["LlamaForCausalLMEagle3"], "model_type": "llama", "hidden_size": H, "intermediate_size": I,
        "num_hidden_layers": 1, "num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": D,
        "rms_norm_eps": cfg.get("rms_norm_eps", 1e-6), "rope_theta": cfg.get("rope_theta", 10000.0),
        "max_position_embeddings": cfg.get("max_position_embeddings", 4096), "vocab_size": V,
        "draft_vocab_size": draft_vocab_size, "target_hidden_size": H, "tie_word_embeddings": False,
        "hidden_act": "silu", "torch_dtype": "float32", "eagle_config": {"eagle_aux_hidden_state_layer_ids": ids},
    }  # fmt: skip
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for f in target.iterdir():  # the tokenizer: the draft reads the target's text
        if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
            shutil.copy(f, out / f.name)
    return out
