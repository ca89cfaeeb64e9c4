"""Model and tokenizer sources: a hub id or local HF directory, a GGUF file, or from scratch.

From scratch, the tokenizer is a byte-level BPE trained locally on the first shards (so nothing
is downloaded) and saved as an ordinary HF fast tokenizer; the model is a small Llama.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from olm_cli.errors import DataError, RecipeError
from olm_cli.recipe import ModelConfig

logger = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _iter_texts(shards: Sequence[Path], text_field: str, limit_chars: int) -> Iterator[str]:
    from olm_cli.data import _load_streaming, shard_format

    seen = 0
    for path in shards:
        try:
            for record in _load_streaming(path, shard_format(path)):
                text = record.get(text_field)
                if isinstance(text, str) and text:
                    yield text
                    seen += len(text)
                    if seen >= limit_chars:
                        return
        except Exception as exc:
            logger.warning("skipping %s while training the tokenizer: %s", path, exc)


def train_tokenizer(shards: Sequence[Path], text_field: str, vocab_size: int, limit_chars: int) -> Any:
    """A byte-level BPE tokenizer trained on the first ``limit_chars`` characters of ``shards``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if not shards:
        raise DataError("model.init is 'scratch' but there are no shards to train a tokenizer on")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_iter_texts(shards, text_field, limit_chars), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN, bos_token=None)


def build_scratch_model(cfg: ModelConfig, tokenizer: Any, seed: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    sizes = cfg.arch.resolved()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=cfg.arch.max_position_embeddings,
        num_key_value_heads=sizes["num_attention_heads"],
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
        **sizes,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    return model.to(DTYPES[cfg.dtype])


def _source_kwargs(gguf_file: str | None, revision: str | None, trust_remote_code: bool) -> dict[str, Any]:
    """``from_pretrained`` options shared by models and tokenizers (unset ones left out)."""
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if revision:
        kwargs["revision"] = revision
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    return kwargs


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def load_pretrained(
    source: str,
    *,
    dtype: str = "float32",
    gguf_file: str | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
) -> torch.nn.Module:
    """Load a causal LM from a hub id, a local directory or a GGUF file inside it."""
    from transformers import AutoModelForCausalLM

    kwargs = _source_kwargs(gguf_file, revision, trust_remote_code)
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=DTYPES[dtype], **kwargs)
    except (OSError, ValueError) as exc:
        raise RecipeError(f"model.name_or_path={source!r}: cannot load the model ({_first_line(exc)})") from None
    if gguf_file:
        model = _rebuild_plain(model, DTYPES[dtype])
    return model


def _rebuild_plain(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A GGUF-loaded model carries a GGUF quantizer that refuses ``save_pretrained`` (and marks it
    untrainable) even when every weight is de-quantised; rebuild a plain model with the same weights."""
    from transformers import AutoModelForCausalLM

    state = model.state_dict()
    plain = AutoModelForCausalLM.from_config(plain_config(model.config), dtype=dtype)
    plain.load_state_dict(state)
    plain.tie_weights()
    return plain


def load_tokenizer(source: str, *, gguf_file: str | None = None, revision: str | None = None, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **_source_kwargs(gguf_file, revision, trust_remote_code))
    except (OSError, ValueError) as exc:
        raise RecipeError(f"tokenizer {source!r}: cannot load ({_first_line(exc)})") from None
    if tokenizer.eos_token_id is None:
        raise RecipeError(f"tokenizer {source!r} has no EOS token; olm needs one to separate packed documents")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def plain_config(config: Any) -> Any:
    """A fresh config of the same class without GGUF loading leftovers, so ``save_pretrained`` works."""
    data = config.to_dict()
    for key in ("gguf_file", "_name_or_path", "quantization_config"):
        data.pop(key, None)
    return type(config).from_dict(data)


def load_source(cfg: ModelConfig, *, shards: Sequence[Path], text_field: str, seed: int) -> tuple[torch.nn.Module, Any]:
    """The starting model and tokenizer for a brand-new run."""
    if cfg.init == "scratch":
        tokenizer = (
            load_tokenizer(cfg.tokenizer, trust_remote_code=cfg.trust_remote_code)
            if cfg.tokenizer
            else train_tokenizer(shards, text_field, cfg.arch.vocab_size, cfg.arch.tokenizer_train_chars)
        )
        return build_scratch_model(cfg, tokenizer, seed), tokenizer
    assert cfg.name_or_path is not None
    model = load_pretrained(
        cfg.name_or_path,
        dtype=cfg.dtype,
        gguf_file=cfg.gguf_file,
        revision=cfg.revision,
        trust_remote_code=cfg.trust_remote_code,
    )
    tokenizer = load_tokenizer(
        cfg.tokenizer or cfg.name_or_path,
        gguf_file=None if cfg.tokenizer else cfg.gguf_file,
        revision=cfg.revision,
        trust_remote_code=cfg.trust_remote_code,
    )
    return model, tokenizer
