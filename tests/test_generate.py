"""`olm generate`: greedy and sampled text from a release, a checkpoint or any HF directory."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import make_documents, tiny_llama, write_jsonl
from e2e_helpers import cli, make_recipe

from olm_cli.generate import (
    ModelSource,
    Sampling,
    complete,
    encode_prompt,
    load_for_generation,
    open_checkpoint,
)
from olm_cli.modeling import save_tokenizer, train_tokenizer
from olm_cli.rundir.checkpoint import MANIFEST_FILENAME, describe_files

CHAT_TEMPLATE = ("{% for m in messages %}<user>{{ m['content'] }}</user>{% endfor %}"
                 "{% if add_generation_prompt %}<bot>{% endif %}")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama with a locally trained tokenizer, saved as a plain Hugging Face directory."""
    root = tmp_path_factory.mktemp("generate")
    corpus = write_jsonl(root / "corpus.jsonl", make_documents("alpha", 30, 0))
    tokenizer = train_tokenizer([corpus], "text", 300, 100_000)
    model = tiny_llama(seed=1, vocab=len(tokenizer), max_position_embeddings=48,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    directory = root / "model"
    model.save_pretrained(directory)
    save_tokenizer(tokenizer, directory)
    return directory


@pytest.fixture(scope="module")
def loaded(model_dir: Path) -> tuple[Any, Any]:
    return load_for_generation(ModelSource(model_dir, "directory"))


def _argmax_continuation(model: Any, prompt_ids: list[int], steps: int, stop: int) -> list[int]:
    ids = list(prompt_ids)
    with torch.no_grad():
        for _ in range(steps):
            token = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            ids.append(token)
            if token == stop:
                break
    return ids[len(prompt_ids):]


def test_greedy_is_the_argmax_continuation_and_streams_the_same_text(loaded: tuple[Any, Any]) -> None:
    model, tokenizer = loaded
    prompt_ids = encode_prompt(tokenizer, "the river runs", chat=False, where=Path("."))
    pieces: list[str] = []
    new_ids, seconds = complete(model, tokenizer, prompt_ids, max_new_tokens=12, sampling=Sampling(), write=pieces.append)
    assert new_ids == _argmax_continuation(model, prompt_ids, 12, tokenizer.eos_token_id)
    assert seconds > 0
    assert "".join(pieces) == tokenizer.decode(new_ids, skip_special_tokens=True)
    again, _ = complete(model, tokenizer, prompt_ids, max_new_tokens=12, sampling=Sampling())
    assert again == new_ids


def test_sampling_follows_the_seed_and_top_p(loaded: tuple[Any, Any]) -> None:
    model, tokenizer = loaded
    prompt_ids = encode_prompt(tokenizer, "the mill", chat=False, where=Path("."))

    def sample(**options: Any) -> list[int]:
        return complete(model, tokenizer, prompt_ids, max_new_tokens=16, sampling=Sampling(**options))[0]

    first = sample(temperature=1.0, seed=7)
    assert sample(temperature=1.0, seed=7) == first
    assert sample(temperature=1.0, seed=8) != first  # a random model spreads its probability thinly
    # A nucleus this small holds only the most likely token: sampling becomes greedy.
    assert sample(temperature=1.0, top_p=1e-6, seed=9) == sample()


def test_sampling_without_a_seed_draws_one_and_reports_it() -> None:
    drawn = Sampling(temperature=0.7).checked()
    assert drawn.seed is not None
    assert Sampling().checked().seed is None  # greedy needs none
    for bad in (Sampling(temperature=-1.0), Sampling(temperature=float("nan")), Sampling(1.0, 0.0), Sampling(1.0, 1.5)):
        with pytest.raises(Exception, match="--t"):
            bad.checked()


def test_cli_json_reports_prompt_text_tokens_and_seconds(model_dir: Path) -> None:
    result = cli("generate", "--checkpoint", model_dir, "--prompt", "the river", "-n", "8", "--json")
    assert result.code == 0, result.err
    report = json.loads(result.out)
    assert report["prompt"] == "the river" and report["source"] == "directory"
    assert report["model"] == str(model_dir.resolve())
    assert 1 <= report["tokens"] <= 8 and report["prompt_tokens"] >= 2
    assert report["seconds"] > 0 and report["seed"] is None and report["temperature"] == 0.0
    assert report["stop"] in ("eos", "max_new_tokens")
    assert (report["stop"] == "max_new_tokens") == (report["tokens"] == 8)

    streamed = cli("generate", "--checkpoint", model_dir, "--prompt", "the river", "-n", "8")
    assert streamed.code == 0, streamed.err
    assert streamed.out == "the river" + report["text"] + "\n"
    assert "greedy" in streamed.err and f"{report['tokens']} tokens" in streamed.err


def test_sampled_json_can_be_replayed_from_its_seed(model_dir: Path) -> None:
    args = ("generate", "--checkpoint", model_dir, "-p", "the", "-n", "10", "--temperature", "0.9", "--top-p", "0.95")
    first = json.loads(cli(*args, "--json").out)
    assert isinstance(first["seed"], int)
    again = json.loads(cli(*args, "--seed", str(first["seed"]), "--json").out)
    assert again["text"] == first["text"] and again["seed"] == first["seed"]


def test_chat_uses_the_template_and_refuses_a_tokenizer_without_one(model_dir: Path, tmp_path: Path) -> None:
    refused = cli("generate", "--checkpoint", model_dir, "--prompt", "hello", "--chat")
    assert refused.code == 2
    assert "no chat template" in refused.err and len(refused.err.strip().splitlines()) == 2  # "loading", error

    chat_dir = tmp_path / "chat"
    shutil.copytree(model_dir, chat_dir)
    config_path = chat_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = CHAT_TEMPLATE
    config_path.write_text(json.dumps(config))
    result = cli("generate", "--checkpoint", chat_dir, "--prompt", "hello", "--chat", "-n", "4", "--json")
    assert result.code == 0, result.err
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(chat_dir)
    expected = tokenizer("<user>hello</user><bot>", add_special_tokens=False)["input_ids"]
    assert json.loads(result.out)["prompt_tokens"] == len(expected)
    assert json.loads(result.out)["chat"] is True
    assert "add --chat" not in result.err
    plain = cli("generate", "--checkpoint", chat_dir, "--prompt", "hello", "-n", "4", "--json")
    assert plain.code == 0 and json.loads(plain.out)["prompt_tokens"] < len(expected)
    assert "has a chat template; add --chat" in plain.err


def test_context_limit_caps_new_tokens_and_refuses_a_prompt_that_fills_it(model_dir: Path) -> None:
    long_prompt = " ".join(["the river runs past the old mill"] * 4)
    capped = cli("generate", "--checkpoint", model_dir, "-p", long_prompt, "-n", "100", "--json")
    assert capped.code == 0, capped.err
    report = json.loads(capped.out)
    assert report["prompt_tokens"] + report["tokens"] <= 48
    assert "reads at most 48" in capped.err

    too_long = cli("generate", "--checkpoint", model_dir, "-p", long_prompt * 3)
    assert too_long.code == 2 and "reads at most 48" in too_long.err


def test_an_empty_prompt_starts_a_new_document(model_dir: Path) -> None:
    result = cli("generate", "--checkpoint", model_dir, "-p", "", "-n", "4", "--json")
    assert result.code == 0, result.err
    assert json.loads(result.out)["prompt_tokens"] == 1  # EOS: this tokenizer has no BOS


def test_usage_and_missing_directories(model_dir: Path, tmp_path: Path) -> None:
    for args in ((), ("--run", tmp_path, "--checkpoint", model_dir), ("--checkpoint", model_dir, "--top-p", "0"),
                 ("--checkpoint", model_dir, "--temperature", "-1"), ("--checkpoint", model_dir, "-n", "0")):
        result = cli("generate", "-p", "x", *args)
        assert result.code == 2, (args, result.err)
        assert "Traceback" not in result.err
    missing = cli("generate", "-p", "x", "--checkpoint", tmp_path / "nope")
    assert missing.code == 1 and "no such checkpoint directory" in missing.err
    not_a_run = cli("generate", "-p", "x", "--run", tmp_path)
    assert not_a_run.code == 1 and "not an olm run directory" in not_a_run.err


def test_a_directory_that_fails_its_manifest_is_not_loaded(model_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "step-00000001"
    shutil.copytree(model_dir, copy)
    manifest = {"format": 1, "step": 1, "created": "", "metadata": {}, "files": describe_files(copy)}
    (copy / MANIFEST_FILENAME).write_text(json.dumps(manifest))
    assert cli("generate", "--checkpoint", copy, "-p", "x", "-n", "2").code == 0
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # same size, different bytes: only the deep check sees it
    weights.write_bytes(bytes(data))
    result = cli("generate", "--checkpoint", copy, "-p", "x", "-n", "2")
    assert result.code == 1
    assert "model.safetensors does not match its sha256" in result.err


def test_remote_code_is_trusted_only_when_the_runs_recipe_says_so(
        model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import olm_cli.modeling as modeling

    seen: list[bool] = []
    real_tokenizer = modeling.load_tokenizer
    monkeypatch.setattr(modeling, "load_tokenizer",
                        lambda source, **kw: seen.append(kw["trust_remote_code"]) or real_tokenizer(source))
    release = tmp_path / "run" / "releases" / "release-0001"
    shutil.copytree(model_dir, release)
    for trusted in (False, True):
        (tmp_path / "run" / "recipe.yaml").write_text(yaml.safe_dump({"model": {"trust_remote_code": trusted}}))
        source, _, _ = open_checkpoint(release, say=print)
        assert source.kind == "release" and source.trust_remote_code is trusted
    open_checkpoint(model_dir, say=print)  # outside any run: never trusted
    assert seen == [False, True, False]


# --------------------------------------------------------------------------- a trained run


@pytest.mark.slow
def test_run_generates_from_the_release_then_falls_back_to_a_checkpoint(tmp_path: Path) -> None:
    recipe = make_recipe(tmp_path, run={"max_steps": 4})
    assert cli("train", "--config", recipe).code == 0
    run = tmp_path / "run"

    released = cli("generate", "--run", run, "-p", "the river", "-n", "6", "--json")
    assert released.code == 0, released.err
    report = json.loads(released.out)
    assert report["source"] == "release"
    assert report["model"] == str((run / "releases" / "release-0001").resolve())
    streamed = cli("generate", "--run", run, "-p", "the river", "-n", "6")
    assert streamed.out == "the river" + report["text"] + "\n"
    assert "release-0001" in streamed.err

    # What serving reads is broken: say so rather than show another model.
    weights = run / "releases" / "release-0001" / "model.safetensors"
    original = weights.read_bytes()
    weights.write_bytes(original[:-1] + bytes([original[-1] ^ 0xFF]))
    broken = cli("generate", "--run", run, "-p", "the river")
    assert broken.code == 1
    assert "releases/latest (release-0001) is unusable" in broken.err and "--checkpoint" in broken.err

    # No release at all (releases off, or none yet): the newest checkpoint, with a note.
    shutil.rmtree(run / "releases")
    fallback = cli("generate", "--run", run, "-p", "the river", "-n", "6", "--json")
    assert fallback.code == 0, fallback.err
    assert json.loads(fallback.out)["source"] == "checkpoint"
    assert "has no release yet" in fallback.err and "step-00000004" in fallback.err
    mixed_up = cli("generate", "--checkpoint", run, "-p", "the river")
    assert mixed_up.code == 2 and "is a run directory; use --run" in mixed_up.err
    assert json.loads(fallback.out)["text"] == report["text"]  # the release holds the same weights
