"""Model and tokenizer sources: a hub id or local HF directory, a GGUF file, or from scratch.

From scratch, the tokenizer is a byte-level BPE trained locally on the first shards (so nothing
is downloaded) and saved as an ordinary HF fast tokenizer; the model is a small Llama.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from olm_cli.errors import DataError, RecipeError
from olm_cli.recipe import ModelConfig
from olm_cli.rundir.atomic import (
    apply_umask,
    fsync_dir,
    fsync_file,
    publishing_directory,
    write_json_atomic,
)

if TYPE_CHECKING:  # imported where used: a command that loads no model does not pay for transformers
    from transformers import PreTrainedModel

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


def check_attn_implementation(name: str | None) -> None:
    """Refuse, before any model is loaded, an attention kernel this machine cannot run.

    transformers would fail later with a long ImportError (or silently on a CPU-only host);
    ``flash_attention_2`` needs the ``flash_attn`` package and a CUDA device.
    """
    if name != "flash_attention_2":
        return
    import importlib.util

    if importlib.util.find_spec("flash_attn") is None:
        raise RecipeError("model.attn_implementation 'flash_attention_2' needs the flash-attn package "
                          "(pip install flash-attn); use 'sdpa' otherwise")
    if not torch.cuda.is_available():
        raise RecipeError("model.attn_implementation 'flash_attention_2' needs a CUDA GPU and none is visible; "
                          "use 'sdpa' otherwise")


def _attn_kwargs(attn_implementation: str | None) -> dict[str, Any]:
    """``attn_implementation`` for ``from_pretrained``/``from_config``; unset leaves transformers' default."""
    return {"attn_implementation": attn_implementation} if attn_implementation else {}


CAUSAL_SDPA = "olm_causal_sdpa"  # transformers' SDPA kernel, registered without a mask function


def use_causal_attention_only(model: torch.nn.Module) -> bool:
    """Attend causally without a padding mask: exact for olm's batches, and free of host syncs.

    olm pads on the right only and never computes a loss on padded positions, so under causal
    attention no real token ever sees a pad: the padding mask changes nothing. Yet transformers
    reads it on the host in every forward (to decide whether SDPA may skip it, or to look for
    packed sequences when there is none), a device sync per micro-batch. Registering its SDPA
    kernel under a name with no mask function makes it build no mask at all and call SDPA with
    ``is_causal=True``. Only for plain causal SDPA models: a sliding window or chunked
    attention needs the mask transformers builds. Returns whether the model was switched.
    """
    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    layer_types = set(getattr(config, "layer_types", None) or ["full_attention"])
    if (getattr(config, "sliding_window", None) or getattr(config, "attention_chunk_size", None)
            or getattr(config, "use_sliding_window", False) or layer_types != {"full_attention"}):
        return False
    try:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    except ImportError:  # transformers before the attention registry (4.48)
        return False
    if CAUSAL_SDPA not in ALL_ATTENTION_FUNCTIONS:
        ALL_ATTENTION_FUNCTIONS.register(CAUSAL_SDPA, ALL_ATTENTION_FUNCTIONS["sdpa"])
    config._attn_implementation = CAUSAL_SDPA  # not saved: config.json keeps no attention kernel
    return True


def build_scratch_model(cfg: ModelConfig, tokenizer: Any, seed: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    sizes = cfg.arch.resolved()
    config = LlamaConfig(
        **_attn_kwargs(cfg.attn_implementation),
        vocab_size=len(tokenizer),
        max_position_embeddings=cfg.arch.max_position_embeddings,
        num_key_value_heads=sizes["num_attention_heads"],
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
        hidden_size=sizes["hidden_size"],
        num_hidden_layers=sizes["num_hidden_layers"],
        num_attention_heads=sizes["num_attention_heads"],
        intermediate_size=sizes["intermediate_size"],
    )
    torch.manual_seed(seed)
    # Held as a plain Module: transformers decorates ``to`` with functools.wraps, which type
    # checkers read as the unbound ``Module.to`` (the dtype would be taken for ``self``).
    model: torch.nn.Module = LlamaForCausalLM(config)
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
    attn_implementation: str | None = None,
) -> torch.nn.Module:
    """Load a causal LM from a hub id, a local directory or a GGUF file inside it.

    A plain Module is all that training and evaluation use, and it keeps transformers' typing of
    ``PreTrainedModel.to`` (an unbound functools.wraps) away from every ``model.to(device)``; the
    GGUF cache, which needs ``save_pretrained``, calls :func:`_load_hf_model` itself.
    """
    return _load_hf_model(source, dtype, gguf_file, revision, trust_remote_code, attn_implementation)


def _load_hf_model(
    source: str, dtype: str, gguf_file: str | None, revision: str | None, trust_remote_code: bool,
    attn_implementation: str | None = None,
) -> PreTrainedModel:
    from transformers import AutoModelForCausalLM

    kwargs = {**_source_kwargs(gguf_file, revision, trust_remote_code), **_attn_kwargs(attn_implementation)}
    model: PreTrainedModel
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=DTYPES[dtype], **kwargs)
    except (OSError, ValueError) as exc:
        raise RecipeError(f"model.name_or_path={source!r}: cannot load the model ({_first_line(exc)})") from None
    if gguf_file:
        model = _rebuild_plain(model, DTYPES[dtype], attn_implementation)
    return model


def _rebuild_plain(model: PreTrainedModel, dtype: torch.dtype, attn_implementation: str | None = None) -> PreTrainedModel:
    """A GGUF-loaded model carries a GGUF quantizer that refuses ``save_pretrained`` (and marks it
    untrainable) even when every weight is de-quantised; rebuild a plain model with the same weights."""
    from transformers import AutoModelForCausalLM

    state = model.state_dict()
    plain = AutoModelForCausalLM.from_config(plain_config(model.config), dtype=dtype, **_attn_kwargs(attn_implementation))
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


TOKENIZER_CONFIG = "tokenizer_config.json"
# ``from_pretrained`` options that ``save_pretrained`` copies into tokenizer_config.json. They
# describe how one load happened; replayed at the next load they change it (``local_files_only``
# forces offline mode, ``backend`` and ``is_local`` are transformers-5 bookkeeping).
_LOAD_OPTIONS = (
    "local_files_only", "trust_remote_code", "revision", "cache_dir", "force_download", "token",
    "use_auth_token", "proxies", "subfolder", "_commit_hash", "_from_auto", "gguf_file",
    "is_local", "name_or_path", "backend",
)
# transformers spells "no limit" as int(1e30) (or 1e20); a reader would take it literally.
_NO_LENGTH_LIMIT = int(1e20)


def portable_tokenizer_config(config: dict[str, Any], *, fast: bool, max_length: int | None) -> dict[str, Any]:
    """A tokenizer_config.json that every transformers version olm supports (4.46 up) can load.

    transformers 5 names its own ``TokenizersBackend`` class, unknown to 4.x, so ``AutoTokenizer``
    fails there; any fast tokenizer (one with a tokenizer.json, which holds the whole pipeline)
    loads as ``PreTrainedTokenizerFast`` in both. Its list of ``extra_special_tokens`` is a dict
    of named tokens in 4.x and goes back under the name both read, ``additional_special_tokens``.
    """
    portable = {key: value for key, value in config.items() if key not in _LOAD_OPTIONS}
    if fast:
        portable["tokenizer_class"] = "PreTrainedTokenizerFast"
    extra = portable.get("extra_special_tokens")
    if isinstance(extra, list):
        del portable["extra_special_tokens"]
        if extra:
            portable.setdefault("additional_special_tokens", extra)
    current = portable.get("model_max_length")
    if max_length is not None:
        portable["model_max_length"] = max_length
    elif isinstance(current, int | float) and current >= _NO_LENGTH_LIMIT:
        del portable["model_max_length"]
    return portable


def _max_positions(directory: Path) -> int | None:
    """``max_position_embeddings`` of the model config saved in ``directory``, if there is one."""
    try:
        value = json.loads((directory / "config.json").read_text(encoding="utf-8")).get("max_position_embeddings")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, int) and value > 0 else None


def save_tokenizer(tokenizer: Any, directory: Path, *, max_length: int | None = None) -> None:
    """Save ``tokenizer`` into ``directory`` so that it loads with every supported transformers.

    ``save_pretrained`` alone writes what only the running version understands (see
    :func:`portable_tokenizer_config`). ``max_length`` defaults to the ``max_position_embeddings``
    of a model already saved in ``directory``; without either, no length is written. A chat
    template that transformers 5 keeps in chat_template.jinja is also copied into the config,
    where 4.x looks for it. Files land in ``directory`` by rename, each complete or absent, with
    the umask's permissions.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tokenizer.tmp-", dir=directory))
    try:
        tokenizer.save_pretrained(str(staging))
        config_path = staging / TOKENIZER_CONFIG
        config = json.loads(config_path.read_text(encoding="utf-8"))
        template = staging / "chat_template.jinja"
        if template.is_file() and "chat_template" not in config:
            config["chat_template"] = template.read_text(encoding="utf-8")
        limit = max_length if max_length is not None else _max_positions(directory)
        fast = (staging / "tokenizer.json").is_file()
        write_json_atomic(config_path, portable_tokenizer_config(config, fast=fast, max_length=limit))
        apply_umask(staging)
        for item in sorted(staging.iterdir()):
            fsync_file(item)
            os.replace(item, directory / item.name)
        fsync_dir(directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def plain_config(config: Any) -> Any:
    """A fresh config of the same class without GGUF loading leftovers, so ``save_pretrained`` works."""
    data = config.to_dict()
    for key in ("gguf_file", "_name_or_path", "quantization_config"):
        data.pop(key, None)
    return type(config).from_dict(data)


def load_source(
    cfg: ModelConfig,
    *,
    shards: Sequence[Path],
    text_field: str,
    seed: int,
    cache_dir: Path | None = None,
    say: Callable[[str], object] = lambda _message: None,
) -> tuple[torch.nn.Module, Any]:
    """The starting model and tokenizer for a brand-new run.

    Slow phases announce themselves through ``say`` (tokenizer training, GGUF de-quantisation).
    A GGUF model is de-quantised once per run directory: the plain weights are kept in
    ``cache_dir`` and reused by later fresh starts (an increment that crashed before its first
    checkpoint would otherwise pay the conversion again every night).
    """
    if cfg.init == "scratch":
        if cfg.tokenizer:
            tokenizer = load_tokenizer(cfg.tokenizer, trust_remote_code=cfg.trust_remote_code)
        else:
            say(f"training a {cfg.arch.vocab_size:,}-token byte-level BPE tokenizer on the first "
                f"{cfg.arch.tokenizer_train_chars:,} characters of the shards")
            tokenizer = train_tokenizer(shards, text_field, cfg.arch.vocab_size, cfg.arch.tokenizer_train_chars)
        model = build_scratch_model(cfg, tokenizer, seed)
        say(f"built a from-scratch Llama ({sum(p.numel() for p in model.parameters()):,} parameters)")
        return model, tokenizer
    assert cfg.name_or_path is not None
    if cfg.gguf_file and cache_dir is not None:
        cached = _cached_gguf(cfg, cache_dir)
        if cached is not None:
            say(f"loading the de-quantised GGUF model from {cache_dir}")
            return cached
        say(f"de-quantising {cfg.gguf_file} (once per run directory; this can take minutes)")
    else:
        say(f"loading the model from {cfg.name_or_path}")
    model = _load_hf_model(cfg.name_or_path, cfg.dtype, cfg.gguf_file, cfg.revision, cfg.trust_remote_code,
                           cfg.attn_implementation)
    tokenizer = load_tokenizer(
        cfg.tokenizer or cfg.name_or_path,
        gguf_file=None if cfg.tokenizer else cfg.gguf_file,
        revision=cfg.revision,
        trust_remote_code=cfg.trust_remote_code,
    )
    if cfg.gguf_file and cache_dir is not None:
        _store_gguf_cache(cfg, cache_dir, model, tokenizer)
    return model, tokenizer


_GGUF_SOURCE = "gguf-source.json"


def _gguf_identity(cfg: ModelConfig) -> dict[str, Any]:
    """What the cache was made from: the GGUF file's path, size and mtime, and the tokenizer source."""
    assert cfg.name_or_path is not None and cfg.gguf_file is not None
    path = Path(cfg.name_or_path) / cfg.gguf_file
    try:
        st = path.stat()
        stamp: list[int] | None = [st.st_size, st.st_mtime_ns]
    except OSError:
        stamp = None  # a hub GGUF: identified by name and revision only
    return {"gguf": str(path), "stat": stamp, "revision": cfg.revision, "tokenizer": cfg.tokenizer, "dtype": cfg.dtype}


def _cached_gguf(cfg: ModelConfig, cache_dir: Path) -> tuple[torch.nn.Module, Any] | None:
    try:
        if json.loads((cache_dir / _GGUF_SOURCE).read_text(encoding="utf-8")) != _gguf_identity(cfg):
            return None
        return (load_pretrained(str(cache_dir), dtype=cfg.dtype, attn_implementation=cfg.attn_implementation),
                load_tokenizer(str(cache_dir)))
    except (OSError, ValueError, RecipeError) as exc:
        logger.warning("ignoring the de-quantised GGUF cache in %s (%s)", cache_dir, exc)
        return None


def _store_gguf_cache(cfg: ModelConfig, cache_dir: Path, model: PreTrainedModel, tokenizer: Any) -> None:
    """Write the cache to a temporary directory and rename it, so a crash never leaves half of one."""
    try:
        with publishing_directory(cache_dir) as staged:
            model.save_pretrained(staged, safe_serialization=True)
            save_tokenizer(tokenizer, staged)
            (staged / _GGUF_SOURCE).write_text(json.dumps(_gguf_identity(cfg)), encoding="utf-8")
    except OSError as exc:  # a cache is an optimisation: a full disk here must not stop training
        logger.warning("could not keep the de-quantised GGUF in %s (%s); it will be converted again next time",
                       cache_dir, exc)
