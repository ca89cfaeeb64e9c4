"""Write a Llama-architecture HF checkpoint as a GGUF file that llama.cpp (and transformers) load.

The layout follows llama.cpp's ``convert_hf_to_gguf.py`` for ``LlamaForCausalLM``, through the
``gguf`` package's own writer and tensor-name map (the map transformers inverts when loading):

* hyper-parameters under the ``llama.*`` keys (context, embedding and feed-forward lengths,
  heads, key/value heads, rotary base and dimension, RMS-norm epsilon);
* weights under llama.cpp's names (``token_embd``, ``blk.N.attn_q`` ...), the rows of every
  ``attn_q``/``attn_k`` permuted so the two rotary halves of each head interleave
  (``LlamaModel.permute``; transformers' GGUF loader undoes it); a tied output head is written
  once, as ``token_embd`` with no ``output`` tensor;
* 1-D tensors (norm gains) always in float32, matrices in the chosen type: ``f32``, ``f16`` or
  ``q8_0`` (blocks of 32 values sharing one scale); a matrix whose rows are not a multiple of 32
  falls back to f16, as llama.cpp does, and the result lists it;
* the tokenizer as GGUF metadata: a byte-level BPE vocabulary (GPT-2 style, ``tokenizer.ggml.model
  = "gpt2"``), its merges, token types (control for special tokens), special token ids and
  whether a BOS token is prepended. GGUF has no room for an arbitrary ``tokenizer.json``, so
  only pre-tokenizers llama.cpp knows by name are exported (``gpt-2``, ``llama-bpe``); any other
  tokenizer is refused rather than written in a form that would tokenize differently.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from olm_cli.errors import CheckpointError, RecipeError

GGUF_TYPES = ("f32", "f16", "q8_0")
_MISSING_EXTRA = "GGUF export needs the gguf package: pip install 'olm[gguf]'"

# The split regex of Llama 3's tokenizer.json, which llama.cpp calls "llama-bpe".
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def import_gguf() -> Any:
    """The ``gguf`` package, or a usage error (exit 2) naming the extra that installs it."""
    try:
        import gguf
    except ImportError:
        raise RecipeError(_MISSING_EXTRA) from None
    return gguf


# --------------------------------------------------------------------------- hyper-parameters


@dataclass
class LlamaShape:
    """The hyper-parameters GGUF stores for a Llama model, read from its HF config."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    context_length: int
    rms_norm_eps: float
    rope_theta: float
    tied: bool


def llama_shape(config: Any, source: Path | str) -> LlamaShape:
    """Check that ``config`` is a Llama that GGUF can describe exactly, and read its sizes.

    Refused with a usage error (exit 2) naming the setting: other architectures, rotary
    scaling (a GGUF reader would have to reproduce it from keys transformers does not read
    back), and biased projections.
    """
    model_type = getattr(config, "model_type", None)
    if model_type != "llama":
        raise RecipeError(f"{source}: model_type {model_type!r} cannot be exported to GGUF; "
                          "olm writes Llama-architecture models only (model_type 'llama')")
    rope = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in (None, "default"):
        raise RecipeError(f"{source}: rotary scaling {rope_type!r} (config rope_scaling) is not exported to GGUF; "
                          "only plain rotary embeddings are")
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(config, flag, False):
            raise RecipeError(f"{source}: {flag}=true is not exported to GGUF (Llama GGUF files have no biases)")
    heads = int(config.num_attention_heads)
    theta = rope.get("rope_theta", getattr(config, "rope_theta", None))
    return LlamaShape(
        vocab_size=int(config.vocab_size),
        hidden_size=int(config.hidden_size),
        intermediate_size=int(config.intermediate_size),
        num_layers=int(config.num_hidden_layers),
        num_heads=heads,
        num_kv_heads=int(getattr(config, "num_key_value_heads", None) or heads),
        head_dim=int(getattr(config, "head_dim", None) or config.hidden_size // heads),
        context_length=int(config.max_position_embeddings),
        rms_norm_eps=float(config.rms_norm_eps),
        rope_theta=float(theta if theta is not None else 10000.0),
        tied=bool(getattr(config, "tie_word_embeddings", False)),
    )


def permute_for_rope(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's ``LlamaModel.permute``: interleave the two rotary halves of every head's rows."""
    return (weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
            .swapaxes(1, 2)
            .reshape(weight.shape))


# --------------------------------------------------------------------------- tokenizer


@dataclass
class GGUFVocab:
    """A tokenizer as GGUF metadata (``tokenizer.ggml.*``)."""

    tokens: list[str]
    types: list[int]
    merges: list[str]
    pre: str
    bos: int | None
    eos: int | None
    pad: int | None
    unk: int | None
    add_bos: bool
    add_eos: bool
    padded: int = 0  # ids the model has but the tokenizer does not (written as unused "[PADn]")


def _pre_tokenizer_name(pre: Any, normalizer: Any, source: Path | str) -> str:
    """llama.cpp's name for a byte-level pre-tokenizer, or a usage error naming what it found."""
    if normalizer is not None:
        raise RecipeError(f"{source}: the tokenizer has a {normalizer.get('type')!r} normalizer; GGUF export "
                          "supports byte-level BPE tokenizers without one (GPT-2 or Llama 3 style)")
    kind = (pre or {}).get("type")
    if kind == "ByteLevel" and not pre.get("add_prefix_space", False) and pre.get("use_regex", True):
        return "gpt-2"  # llama.cpp's name (llama-vocab.cpp); "gpt2" would be an unknown pre-tokenizer there
    if kind == "Sequence":
        parts = pre.get("pretokenizers") or []
        if (len(parts) == 2 and parts[0].get("type") == "Split"
                and (parts[0].get("pattern") or {}).get("Regex") == LLAMA3_SPLIT
                and parts[1].get("type") == "ByteLevel" and not parts[1].get("use_regex", True)
                and not parts[1].get("add_prefix_space", False)):
            return "llama-bpe"
    raise RecipeError(f"{source}: the tokenizer's pre-tokenizer ({kind or 'none'}) has no llama.cpp equivalent "
                      "olm knows; GGUF export supports GPT-2 ('gpt-2') and Llama 3 ('llama-bpe') byte-level BPE")


def gguf_vocab(tokenizer: Any, vocab_size: int, source: Path | str) -> GGUFVocab:
    """Read a fast byte-level BPE tokenizer into GGUF's vocabulary form, for a model of ``vocab_size`` rows."""
    gguf = import_gguf()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise RecipeError(f"{source}: GGUF export needs a fast tokenizer (tokenizer.json); this one is "
                          f"{type(tokenizer).__name__}")
    state = json.loads(backend.to_str())
    model = state.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        kind = "BPE with byte fallback (SentencePiece style)" if model.get("byte_fallback") else model.get("type")
        raise RecipeError(f"{source}: tokenizer model {kind!r} is not exported to GGUF; "
                          "olm writes byte-level BPE (GPT-2 style) vocabularies only")
    pre = _pre_tokenizer_name(state.get("pre_tokenizer"), state.get("normalizer"), source)

    by_id: dict[int, str] = {int(i): t for t, i in model["vocab"].items()}
    types = {i: int(gguf.TokenType.NORMAL) for i in by_id}
    for added in state.get("added_tokens") or []:
        by_id[int(added["id"])] = added["content"]
        types[int(added["id"])] = int(gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED)
    too_big = [i for i in by_id if i >= vocab_size]
    if too_big:
        raise RecipeError(f"{source}: the tokenizer has token id {max(too_big)} but the model's embedding has "
                          f"only {vocab_size} rows")
    tokens, token_types, padded = [], [], 0
    for i in range(vocab_size):
        if i in by_id:
            tokens.append(by_id[i])
            token_types.append(types[i])
        else:  # an embedding row no token uses (vocabularies padded to a multiple of 64, say)
            tokens.append(f"[PAD{i}]")
            token_types.append(int(gguf.TokenType.UNUSED))
            padded += 1
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]

    def prepends(token_id: int | None, position: int) -> bool:
        if token_id is None:
            return False
        with_special = tokenizer("a", add_special_tokens=True).input_ids
        plain = tokenizer("a", add_special_tokens=False).input_ids
        return len(with_special) > len(plain) and with_special[position] == token_id

    return GGUFVocab(
        tokens=tokens, types=token_types, merges=merges, pre=pre,
        bos=tokenizer.bos_token_id, eos=tokenizer.eos_token_id, pad=tokenizer.pad_token_id,
        unk=tokenizer.unk_token_id, add_bos=prepends(tokenizer.bos_token_id, 0),
        add_eos=prepends(tokenizer.eos_token_id, -1), padded=padded,
    )


# --------------------------------------------------------------------------- writing


@dataclass
class GGUFReport:
    """What :func:`write_llama_gguf` wrote."""

    tensors: int = 0
    types: dict[str, int] = field(default_factory=dict)  # GGML type name -> tensor count
    f16_fallback: list[str] = field(default_factory=list)  # matrices q8_0 could not hold


def write_llama_gguf(
    path: Path,
    shape: LlamaShape,
    vocab: GGUFVocab,
    tensors: Iterable[tuple[str, Callable[[], torch.Tensor]]],
    *,
    quantize: str,
    name: str,
) -> GGUFReport:
    """Write ``tensors`` (HF names, loaded one at a time) with ``shape`` and ``vocab`` to ``path``."""
    gguf = import_gguf()
    if quantize not in GGUF_TYPES:
        raise RecipeError(f"--quantize {quantize!r}: expected one of {', '.join(GGUF_TYPES)}")
    arch = gguf.MODEL_ARCH.LLAMA
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[quantize]
    matrix_type = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
                   "q8_0": gguf.GGMLQuantizationType.Q8_0}[quantize]
    try:
        writer.add_name(name)
        writer.add_context_length(shape.context_length)
        writer.add_embedding_length(shape.hidden_size)
        writer.add_block_count(shape.num_layers)
        writer.add_feed_forward_length(shape.intermediate_size)
        writer.add_rope_dimension_count(shape.head_dim)
        writer.add_rope_freq_base(shape.rope_theta)
        writer.add_head_count(shape.num_heads)
        writer.add_head_count_kv(shape.num_kv_heads)
        if shape.head_dim * shape.num_heads != shape.hidden_size:
            writer.add_key_length(shape.head_dim)
            writer.add_value_length(shape.head_dim)
        writer.add_layer_norm_rms_eps(shape.rms_norm_eps)
        writer.add_vocab_size(shape.vocab_size)
        writer.add_file_type(file_type)
        if quantize == "q8_0":
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _add_vocab(writer, vocab)
        report = _add_tensors(gguf, writer, shape, tensors, matrix_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return report


def _add_vocab(writer: Any, vocab: GGUFVocab) -> None:
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    writer.add_token_merges(vocab.merges)
    for token_id, add in ((vocab.bos, writer.add_bos_token_id), (vocab.eos, writer.add_eos_token_id),
                          (vocab.pad, writer.add_pad_token_id), (vocab.unk, writer.add_unk_token_id)):
        if token_id is not None:
            add(int(token_id))
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)


def _add_tensors(gguf: Any, writer: Any, shape: LlamaShape,
                 tensors: Iterable[tuple[str, Callable[[], torch.Tensor]]], matrix_type: Any) -> GGUFReport:
    report = GGUFReport()
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, shape.num_layers)
    seen: set[str] = set()
    for hf_name, load in tensors:
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue  # recomputed from the rotary base by every reader
        if shape.tied and hf_name == "lm_head.weight":
            continue  # a missing output.weight is how GGUF says "tied"
        stem, _, suffix = hf_name.rpartition(".")
        gguf_stem = name_map.get_name(stem)
        if gguf_stem is None:
            raise RecipeError(f"tensor {hf_name!r} has no GGUF name in llama.cpp's Llama layout")
        data = load().detach().to(torch.float32).cpu().numpy()
        if gguf_stem.endswith(".attn_q"):
            data = permute_for_rope(data, shape.num_heads)
        elif gguf_stem.endswith(".attn_k"):
            data = permute_for_rope(data, shape.num_kv_heads)
        qtype = gguf.GGMLQuantizationType.F32 if data.ndim <= 1 else matrix_type
        try:
            packed = gguf.quants.quantize(np.ascontiguousarray(data), qtype)
        except gguf.quants.QuantError:  # rows not a multiple of the block size
            qtype = gguf.GGMLQuantizationType.F16
            packed = gguf.quants.quantize(np.ascontiguousarray(data), qtype)
            report.f16_fallback.append(hf_name)
        gguf_name = f"{gguf_stem}.{suffix}"
        # float arrays carry their type; packed blocks are bytes and need it said
        writer.add_tensor(gguf_name, packed, raw_dtype=None if packed.dtype != np.uint8 else qtype)
        seen.add(gguf_stem)
        report.tensors += 1
        report.types[qtype.name] = report.types.get(qtype.name, 0) + 1
    if "token_embd" not in seen or (not shape.tied and "output" not in seen):
        missing = "model.embed_tokens.weight" if "token_embd" not in seen else "lm_head.weight"
        raise CheckpointError(f"the checkpoint has no {missing}; it cannot be written as a Llama GGUF")
    return report
