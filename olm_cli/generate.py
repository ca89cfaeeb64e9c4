"""``olm generate``: text from what a run serves, to eyeball a release or a checkpoint.

By default the model is ``RUN/releases/latest``, the directory serving reads; a run with no
release yet falls back to its newest checkpoint that verifies, and says so. Every directory with
a manifest (a release or a checkpoint) is re-hashed against it before it is loaded, as for
``olm eval``. Remote modelling code runs only when the run's recipe sets
``model.trust_remote_code``.

Decoding is greedy unless ``temperature`` is above zero; then it samples with nucleus (top-p)
filtering (arXiv:1904.09751) from a seed that is reported, so any sample can be drawn again.
The continuation is streamed as it is decoded.
"""

from __future__ import annotations

import json
import random
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from olm_cli.errors import OlmError, RecipeError
from olm_cli.release import LATEST_LINK, RELEASES_DIR, ReleaseStore
from olm_cli.rundir.checkpoint import CheckpointVerifyError, loading_checkpoint, verify_checkpoint

DEFAULT_MAX_NEW_TOKENS = 100
_SEED_RANGE = 2**31 - 1


@dataclass(frozen=True)
class Sampling:
    """How tokens are picked: greedy at temperature 0, else sampled from the top-p nucleus."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def checked(self) -> Sampling:
        """Itself with a seed drawn when sampling without one; RecipeError for values out of range."""
        if not self.temperature >= 0.0:  # also refuses NaN
            raise RecipeError(f"--temperature {self.temperature}: must be 0 (greedy) or more")
        if not 0.0 < self.top_p <= 1.0:
            raise RecipeError(f"--top-p {self.top_p}: must be above 0 and at most 1")
        if self.greedy or self.seed is not None:
            return self
        return Sampling(self.temperature, self.top_p, random.SystemRandom().randint(0, _SEED_RANGE))

    def describe(self) -> str:
        if self.greedy:
            return "greedy"
        return f"sampled at temperature {self.temperature:g}, top-p {self.top_p:g}, seed {self.seed}"


@dataclass(frozen=True)
class ModelSource:
    """The directory generated from, what it is, and whether its code may run."""

    path: Path
    kind: str  # "release", "checkpoint" or "directory" (a plain Hugging Face directory)
    trust_remote_code: bool = False


@dataclass
class Generation:
    """What ``--json`` prints: the prompt, the continuation and what producing it took."""

    prompt: str
    text: str
    tokens: int
    prompt_tokens: int
    seconds: float
    tokens_per_s: float
    stop: str  # "eos" (the model ended the text) or "max_new_tokens"
    model: str
    source: str
    chat: bool
    temperature: float
    top_p: float
    seed: int | None


class TextStream:
    """A ``generate`` streamer that hands ``write`` each piece of the continuation once it decodes.

    The whole continuation is decoded again at every token, so a piece appears only when the
    characters before it are final: a token that ends inside a multi-byte character (decoded as
    U+FFFD) waits for the next one. The pieces add up to the one-shot decode of the continuation.
    """

    def __init__(self, tokenizer: Any, write: Callable[[str], object]) -> None:
        self.tokenizer = tokenizer
        self.write = write
        self.ids: list[int] = []
        self.shown = ""
        self._prompt_seen = False

    def put(self, value: Any) -> None:
        if not self._prompt_seen:  # generate passes the prompt first
            self._prompt_seen = True
            return
        self.ids.extend(int(token) for token in value.reshape(-1).tolist())
        self._show(final=False)

    def end(self) -> None:
        self._show(final=True)

    def _show(self, *, final: bool) -> None:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if not final and text.endswith("\ufffd"):
            return
        if text.startswith(self.shown) and len(text) > len(self.shown):
            self.write(text[len(self.shown):])
            self.shown = text


def _run_trusts_remote_code(run: Path) -> bool:
    """``model.trust_remote_code`` of the run's recipe (false when there is no readable recipe)."""
    import yaml

    try:
        data = yaml.safe_load((run / "recipe.yaml").read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):
        return False
    model = data.get("model") if isinstance(data, dict) else None
    return isinstance(model, dict) and model.get("trust_remote_code") is True


def _enclosing_run(directory: Path) -> Path | None:
    """The run directory around a checkpoint or release directory, if it is one."""
    resolved = directory.resolve()
    if resolved.parent.name in ("checkpoints", RELEASES_DIR) and (resolved.parent.parent / "recipe.yaml").is_file():
        return resolved.parent.parent
    return None


def load_for_generation(source: ModelSource, check: Callable[[Any, Path], object] = lambda _tokenizer, _path: None) -> tuple[Any, Any]:
    """Model (in eval mode, on the GPU when there is one) and tokenizer; CheckpointLoadError on failure.

    ``check`` sees the tokenizer before the model is loaded, so a prompt it cannot encode (no
    chat template) fails in a second, not after loading billions of weights. On a GPU the
    weights keep the dtype they were saved in; on a CPU they are float32, which every CPU
    kernel supports and which holds float16 and bfloat16 weights exactly.
    """
    import torch

    from olm_cli.modeling import DTYPES, load_pretrained, load_tokenizer

    with loading_checkpoint(source.path, "the tokenizer"):
        tokenizer = load_tokenizer(str(source.path), trust_remote_code=source.trust_remote_code)
    check(tokenizer, source.path)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = _saved_dtype(source.path) if device == "cuda" else "float32"
    with loading_checkpoint(source.path, "the model"):
        model = load_pretrained(str(source.path), dtype=dtype if dtype in DTYPES else "float32",
                                trust_remote_code=source.trust_remote_code)
    return model.to(device).eval(), tokenizer


def _saved_dtype(directory: Path) -> str:
    try:
        config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "float32"
    value = (config.get("dtype") or config.get("torch_dtype")) if isinstance(config, dict) else None
    return value if isinstance(value, str) else "float32"


def open_run(run: Path, say: Callable[[str], object],
             check: Callable[[Any, Path], object] = lambda _tokenizer, _path: None) -> tuple[ModelSource, Any, Any]:
    """The release serving reads (``releases/latest``), or the newest usable checkpoint without one.

    A ``latest`` that is broken is an error, not a reason to show another model: the point is to
    see what serving sees.
    """
    from olm_cli.commands import _latest_usable, _run_recipe

    recipe = _run_recipe(run)
    trust = recipe.model.trust_remote_code
    store = ReleaseStore(run)
    link = store.root / LATEST_LINK
    target = store.latest_target()
    if target is not None:
        try:
            verify_checkpoint(target, deep=True)
        except CheckpointVerifyError as exc:
            raise OlmError(f"{link} ({target.name}) is unusable: {exc.reason}; "
                           "pass --checkpoint DIR to generate from a checkpoint instead") from None
        source = ModelSource(target, "release", trust)
        say(f"loading {target.name} ({link})")
        model, tokenizer = load_for_generation(source, check)
        return source, model, tokenizer
    if link.is_symlink():
        raise OlmError(f"{link} points to a missing release; pass --checkpoint DIR to generate from a checkpoint")
    checkpoint, (model, tokenizer) = _latest_usable(
        run, lambda path: load_for_generation(ModelSource(path, "checkpoint", trust), check))
    say(f"note: {run} has no release yet (releases/latest is unset); using its latest checkpoint, {checkpoint.name}")
    return ModelSource(checkpoint, "checkpoint", trust), model, tokenizer


def open_checkpoint(directory: Path, say: Callable[[str], object],
                    check: Callable[[Any, Path], object] = lambda _tokenizer, _path: None) -> tuple[ModelSource, Any, Any]:
    """A checkpoint, a release or a plain Hugging Face directory, re-hashed first when it has a manifest."""
    from olm_cli.commands import _verified

    if not directory.is_dir():
        raise OlmError(f"{directory}: no such checkpoint directory")
    if (directory / "recipe.yaml").is_file() and (directory / "checkpoints").is_dir():
        raise RecipeError(f"--checkpoint {directory} is a run directory; use --run {directory}")
    _verified(directory)
    run = _enclosing_run(directory)
    kind = "directory"
    if run is not None:
        kind = "release" if directory.resolve().parent.name == RELEASES_DIR else "checkpoint"
    source = ModelSource(directory, kind, _run_trusts_remote_code(run) if run is not None else False)
    say(f"loading {directory}")
    model, tokenizer = load_for_generation(source, check)
    return source, model, tokenizer


def encode_prompt(tokenizer: Any, prompt: str, *, chat: bool, where: Path) -> list[int]:
    """Token ids of ``prompt``, through the tokenizer's chat template with ``chat``.

    An empty prompt starts a new document: BOS, or EOS for tokenizers without one (olm packs
    documents with EOS between them, so that is where a document starts in training).
    """
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise RecipeError(f"--chat: the tokenizer in {where} has no chat template; leave out --chat "
                              "to continue the prompt as plain text")
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    else:
        ids = list(tokenizer(prompt)["input_ids"])
    if not ids:
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        ids = [int(start)]
    return ids


def _stop_ids(model: Any, tokenizer: Any) -> list[int]:
    """Tokens that end the text: the model's generation config's EOS ids and the tokenizer's."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    listed = configured if isinstance(configured, list) else [configured]
    ids = [int(i) for i in listed if i is not None]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(int(tokenizer.eos_token_id))
    return ids


def complete(model: Any, tokenizer: Any, prompt_ids: list[int], *, max_new_tokens: int, sampling: Sampling,
             write: Callable[[str], object] | None = None) -> tuple[list[int], float]:
    """Generate after ``prompt_ids``; return the new token ids and the seconds it took.

    ``write`` receives the continuation piece by piece as it is decoded.
    """
    import torch
    from transformers import GenerationConfig

    stop = _stop_ids(model, tokenizer)
    options: dict[str, Any] = {"max_new_tokens": max_new_tokens, "eos_token_id": stop,
                               "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop[0]}
    if sampling.greedy:
        options["do_sample"] = False
    else:
        # top_k 0: nucleus filtering alone, not the library's default top-k of 50 on top of it.
        options.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=0)
        torch.manual_seed(sampling.seed if sampling.seed is not None else 0)
    device = next(model.parameters()).device
    input_ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    streamer = TextStream(tokenizer, write) if write is not None else None
    started = time.perf_counter()
    with torch.inference_mode():
        output = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                generation_config=GenerationConfig(**options), streamer=streamer)
    seconds = time.perf_counter() - started
    return [int(t) for t in output[0, len(prompt_ids):].tolist()], seconds


def _context_limit(model: Any) -> int | None:
    value = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return value if isinstance(value, int) and value > 0 else None


def run_generate(
    *,
    run: Path | None,
    checkpoint: Path | None,
    prompt: str,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    sampling: Sampling = Sampling(),
    chat: bool = False,
    as_json: bool = False,
    say: Callable[[str], object] = lambda _line: None,
) -> Generation:
    """``olm generate``: load, encode, generate (streamed to stdout unless ``as_json``), report."""
    if (run is None) == (checkpoint is None):
        raise RecipeError("give exactly one of --run DIR or --checkpoint DIR")
    if max_new_tokens < 1:
        raise RecipeError(f"--max-new-tokens {max_new_tokens}: must be at least 1")
    sampling = sampling.checked()
    if sampling.greedy and (sampling.seed is not None or sampling.top_p != 1.0):
        say("note: --seed and --top-p apply to sampling only; decoding is greedy at --temperature 0")
    encoded: list[list[int]] = []

    def check(tokenizer: Any, path: Path) -> None:  # before the weights are loaded: see load_for_generation
        encoded.append(encode_prompt(tokenizer, prompt, chat=chat, where=path))
        if not chat and getattr(tokenizer, "chat_template", None):
            say("note: this tokenizer has a chat template; add --chat to send the prompt as a user turn")

    if run is not None:
        source, model, tokenizer = open_run(Path(run), say, check)
    else:
        source, model, tokenizer = open_checkpoint(Path(checkpoint), say, check)  # type: ignore[arg-type]
    prompt_ids = encoded[-1]
    limit = _context_limit(model)
    if limit is not None:
        if len(prompt_ids) >= limit:
            raise RecipeError(f"the prompt is {len(prompt_ids)} tokens; the model reads at most {limit}, "
                              "leaving no room to generate")
        if len(prompt_ids) + max_new_tokens > limit:
            max_new_tokens = limit - len(prompt_ids)
            say(f"note: generating at most {max_new_tokens} tokens: the model reads at most {limit} "
                f"and the prompt takes {len(prompt_ids)}")
    write = None
    if not as_json:
        if not chat and prompt:
            sys.stdout.write(prompt)
        write = _write_stdout
    new_ids, seconds = complete(model, tokenizer, prompt_ids, max_new_tokens=max_new_tokens, sampling=sampling,
                                write=write)
    stop_ids = _stop_ids(model, tokenizer)
    result = Generation(
        prompt=prompt,
        text=tokenizer.decode(new_ids, skip_special_tokens=True),
        tokens=len(new_ids),
        prompt_tokens=len(prompt_ids),
        seconds=round(seconds, 4),
        tokens_per_s=round(len(new_ids) / seconds, 2) if seconds > 0 else 0.0,
        stop="eos" if new_ids and new_ids[-1] in stop_ids else "max_new_tokens",
        model=str(source.path.resolve()),
        source=source.kind,
        chat=chat,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        seed=sampling.seed,
    )
    if as_json:
        sys.stdout.write(json.dumps(asdict(result), indent=2, ensure_ascii=False) + "\n")
    else:
        sys.stdout.write("\n")
        sys.stdout.flush()
        ended = "the model ended the text" if result.stop == "eos" else f"--max-new-tokens {max_new_tokens} reached"
        say(f"{result.tokens} tokens in {result.seconds:.2f} s ({result.tokens_per_s:,.1f} tokens/s), "
            f"{sampling.describe()}, {ended}; from {source.kind} {source.path.resolve()}")
    return result


def _write_stdout(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()
