"""Write a tiny Llama GGUF file that ``transformers`` loads, for tests of GGUF model sources.

Real GGUF checkpoints are hundreds of megabytes; this one is ~440 KB and takes milliseconds,
yet goes through the same path as a llama.cpp conversion:

* weights under llama.cpp's tensor names (``token_embd.weight``, ``blk.N.attn_q.weight`` ...),
  obtained from ``gguf``'s own name map, i.e. the map transformers inverts when loading;
* ``attn_q`` / ``attn_k`` rows permuted the way ``convert_hf_to_gguf.py`` does for rotary
  embeddings, which transformers' ``LlamaTensorProcessor`` undoes -- so a file written without the
  permutation loads without error but gives different logits (``permute_qk=False`` exists to
  prove that a test would notice);
* a byte-level BPE tokenizer (``tokenizer.ggml.model = "gpt2"``): all 256 byte symbols, a few
  merges and ``<|endoftext|>`` as a control token (bos = eos = pad).

Usage::

    info = write_tiny_llama_gguf(tmp_path / "tiny.gguf")
    model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path, gguf_file="tiny.gguf")
    reference = LlamaForCausalLM(info["config"]); reference.load_state_dict(info["state_dict"])
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

EOS_TOKEN = "<|endoftext|>"
# (left, right) in GPT-2's byte alphabet, where "\u0120" (Ġ) is a leading space. Each merge's
# parts are bytes or earlier merges, as BPE requires.
MERGES: tuple[tuple[str, str], ...] = (
    ("\u0120", "t"),
    ("h", "e"),
    ("\u0120t", "he"),
    ("i", "n"),
    ("e", "r"),
    ("\u0120", "a"),
    ("o", "n"),
    ("r", "e"),
    ("\u0120", "w"),
    ("o", "r"),
)
ROPE_THETA = 10000.0
GGUF_TOKEN_TYPE_NORMAL = 1
GGUF_TOKEN_TYPE_CONTROL = 3


def byte_symbols() -> list[str]:
    """GPT-2's printable stand-in for each byte, in byte order (``bytes_to_unicode``)."""
    printable = list(range(ord("!"), ord("~") + 1))
    printable += list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    symbols = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in symbols:
            symbols[b] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


def tiny_vocab() -> list[str]:
    """Bytes, then merge results, then the one special token: 267 tokens."""
    return byte_symbols() + [left + right for left, right in MERGES] + [EOS_TOKEN]


def tiny_llama_config(vocab_size: int, tie_word_embeddings: bool = False) -> LlamaConfig:
    # Grouped-query attention (4 query heads, 2 key/value heads) so that the key permutation,
    # which uses the key/value head count, is exercised too.
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA},
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=vocab_size - 1,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )


def _permute_for_rope(weight: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """llama.cpp's ``LlamaModel.permute``: interleave the two rotary halves of every head."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def _init_weights(model: LlamaForCausalLM, seed: int) -> None:
    """O(1) activations: with the default 0.02 init the logits barely depend on the weights, so a
    wrongly loaded tensor could hide under a tolerance."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 1:  # RMSNorm gains
                param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=generator))
            elif "embed_tokens" in name:
                param.copy_(torch.randn(param.shape, generator=generator))
            else:
                param.copy_(torch.randn(param.shape, generator=generator) / param.shape[1] ** 0.5)


def write_tiny_llama_gguf(
    path: Path,
    *,
    seed: int = 0,
    tie_word_embeddings: bool = False,
    permute_qk: bool = True,
) -> dict[str, Any]:
    """Write a float32 two-layer Llama with a 267-token byte-level BPE vocabulary to ``path``.

    Returns ``config`` (LlamaConfig), ``state_dict`` (the reference weights, HF names and layout),
    ``gguf_file`` (the file name, for ``from_pretrained(path.parent, gguf_file=...)``), ``tokens``,
    ``merges`` and ``eos_token_id``. Same seed, same bytes.
    """
    import gguf  # optional dependency: only tests that use this fixture need it

    tokens = tiny_vocab()
    config = tiny_llama_config(len(tokens), tie_word_embeddings)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    _init_weights(model, seed)
    state_dict = {k: v.detach().clone() for k, v in model.state_dict().items()}

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arch = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA]
    writer = gguf.GGUFWriter(str(path), arch)

    # Metadata: the keys transformers' GGUF_CONFIG_MAPPING["llama"] turns back into the config.
    writer.add_name("olm-tiny-llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(ROPE_THETA)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)

    # Tokenizer: byte-level BPE as llama.cpp writes it for GPT-2-style vocabularies.
    eos_id = len(tokens) - 1
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([GGUF_TOKEN_TYPE_NORMAL] * eos_id + [GGUF_TOKEN_TYPE_CONTROL])
    writer.add_token_merges([f"{left} {right}" for left, right in MERGES])
    writer.add_bos_token_id(eos_id)
    writer.add_eos_token_id(eos_id)
    writer.add_pad_token_id(eos_id)
    writer.add_add_bos_token(False)

    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    for hf_name, tensor in state_dict.items():
        if tie_word_embeddings and hf_name == "lm_head.weight":
            continue  # a missing output.weight is how GGUF says "tied"
        stem, suffix = hf_name.rsplit(".", 1)
        gguf_name = name_map.get_name(stem)
        if gguf_name is None:
            raise KeyError(f"no GGUF name for {hf_name}")
        data = tensor.numpy().astype(np.float32)
        if permute_qk and gguf_name.endswith(".attn_q"):
            data = _permute_for_rope(data, config.num_attention_heads)
        elif permute_qk and gguf_name.endswith(".attn_k"):
            data = _permute_for_rope(data, config.num_attention_heads, config.num_key_value_heads)
        writer.add_tensor(f"{gguf_name}.{suffix}", np.ascontiguousarray(data))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    return {
        "config": config,
        "state_dict": state_dict,
        "gguf_file": path.name,
        "tokens": tokens,
        "merges": list(MERGES),
        "eos_token_id": eos_id,
    }
