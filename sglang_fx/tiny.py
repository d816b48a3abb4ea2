"""Tiny random-weight Hugging Face checkpoints, made locally (no hub access).

`make_tiny_model(arch, out)` writes config.json, safetensors weights (sharded on request) and a
byte-level BPE tokenizer trained here with `tokenizers`, with a ChatML chat template. The result
loads in `transformers.AutoModelForCausalLM`, in SGLang and in every sglang-fx backend, through
the same code path a real checkpoint takes.
"""

from __future__ import annotations

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
