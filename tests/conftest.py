"""Shared fixtures. Expensive things (models, engines, Ray) are built once per session."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"
KO_SAMPLE = DATA / "ko_reviews_sample.txt"

# Keep vLLM's CPU KV cache small: tests share a 24 GiB machine between several engines.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Publishing (quickstart's last stage, publish tests) goes to a throwaway local Hub, never ~/.cache.
os.environ.setdefault("HUBKIT_HUB_ROOT", tempfile.mkdtemp(prefix="hubkit-test-hub-"))


def build_tiny_neox(out: Path, *, seed: int = 0, **overrides: object) -> Path:
    """A tiny GPT-NeoX (RoPE on half of each 64-dim head) with a BPE tokenizer trained on Korean reviews.

    Random weights with a wide init so that next-token distributions are peaked: greedy parity
    between backends is then not decided by float noise between near-equal logits. ``overrides`` replace
    GPTNeoXConfig fields (e.g. ``use_parallel_residual=False``).
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, PreTrainedTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1000,
        special_tokens=["<|endoftext|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train([str(KO_SAMPLE)], trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>", pad_token="<|pad|>"
    )
    fast.save_pretrained(out)
    fields = {
        "vocab_size": fast.vocab_size if len(fast) <= fast.vocab_size else len(fast),
        "hidden_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 512,
        "rotary_pct": 0.5,
        "max_position_embeddings": 512,
        "initializer_range": 0.2,
        "tie_word_embeddings": False,
        "bos_token_id": fast.bos_token_id,
        "eos_token_id": fast.eos_token_id,
        "pad_token_id": fast.pad_token_id,
    }
    config = GPTNeoXConfig(**(fields | overrides))
    torch.manual_seed(seed)
    model = GPTNeoXForCausalLM(config).to(torch.float32).eval()
    model.save_pretrained(out, safe_serialization=True)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_neox(tmp_path_factory.mktemp("tiny-neox"))
