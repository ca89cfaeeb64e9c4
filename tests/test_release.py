"""Releases: layout, dtype, the gate (finite, measured, budgets), keep-N, re-publish, crash safety, status."""

from __future__ import annotations

import errno
import json
import math
import os
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import add_shard, tiny_llama, tiny_recipe

import olm_cli.release as release_module
from olm_cli.errors import CheckpointError
from olm_cli.recipe import Recipe, recipe_from_dict
from olm_cli.release import HISTORY_FILENAME, ReleaseStore, publish_release
from olm_cli.rundir.status import collect_status


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from olm_cli.modeling import train_tokenizer

    root = tmp_path_factory.mktemp("tok")
    shard = add_shard(root, "alpha", 0)
    return train_tokenizer([shard], "text", vocab_size=300, limit_chars=100_000)


@pytest.fixture
def model(tokenizer: Any) -> torch.nn.Module:
    return tiny_llama(vocab=len(tokenizer), eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


def make_recipe(tmp_path: Path, domains: tuple[str, ...] = ("alpha", "beta"), **sections: dict[str, Any]) -> Recipe:
    eval_section = {"sets": {d: str(tmp_path / f"{d}.jsonl") for d in domains}} | sections.pop("eval", {})
    return recipe_from_dict(tiny_recipe(tmp_path, eval=eval_section, **sections))


def results(**losses: float) -> dict[str, dict[str, float]]:
    return {name: {"loss": loss, "perplexity": math.exp(loss), "tokens": 100} for name, loss in losses.items()}


def publish(tmp_path: Path, recipe: Recipe, model: torch.nn.Module, tokenizer: Any, increment: int,
            eval_results: dict[str, dict[str, float]] | None) -> release_module.ReleaseResult:
    return publish_release(tmp_path / "run", recipe, model, tokenizer, increment=increment, step=10 * increment,
                           checkpoint=tmp_path / "run" / "checkpoints" / f"step-{10 * increment:08d}",
                           eval_results=eval_results, tokens_trained=1000 * increment)


def latest_name(tmp_path: Path) -> str:
    return os.readlink(tmp_path / "run" / "releases" / "latest")


def history(tmp_path: Path) -> list[dict[str, Any]]:
    text = (tmp_path / "run" / "releases" / HISTORY_FILENAME).read_text()
    return [json.loads(line) for line in text.splitlines()]


def test_release_layout_card_and_plain_from_pretrained(tmp_path: Path, model: torch.nn.Module, tokenizer: Any) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    recipe = make_recipe(tmp_path)
    old_umask = os.umask(0o022)
    try:
        result = publish(tmp_path, recipe, model, tokenizer, 7, results(alpha=2.0, beta=3.0))
    finally:
        os.umask(old_umask)

    release = tmp_path / "run" / "releases" / "release-0007"
    # A serving user must be able to read it (safetensors alone writes 0600).
    assert {oct(p.stat().st_mode & 0o777) for p in release.iterdir()} == {"0o644"}
    assert result.released and result.path == release and result.reasons == [] and result.latest == "release-0007"
    assert latest_name(tmp_path) == "release-0007"  # relative: the run directory can move
    files = {p.name for p in release.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "README.md",
            "release.json", "MANIFEST.json"} <= files
    assert not files & {"optimizer.safetensors", "optimizer.json", "trainer_state.json"}  # not training state
    manifest = json.loads((release / "MANIFEST.json").read_text())
    assert {f["path"] for f in manifest["files"]} == files - {"MANIFEST.json"}
    assert all(len(f["sha256"]) == 64 for f in manifest["files"])

    info = json.loads((release / "release.json").read_text())
    assert info["increment"] == 7 and info["step"] == 70 and info["released"] is True
    assert info["checkpoint"] == "checkpoints/step-00000070" and info["dtype"] == "float32"
    assert info["eval"]["beta"]["loss"] == 3.0 and info["created"] and info["previous"] is None
    assert info["gate"]["checks"]["budgets"]["note"].startswith("no budgets configured")

    card = (release / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["library_name"] == "transformers" and front["olm"]["increment"] == 7
    assert "| alpha | 2.0000 | 7.39 | 100 | n/a |" in card
    assert "| tokens trained (whole run) | 7,000 |" in card and "checkpoints/step-00000070" in card
    assert "| gate | passed |" in card

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "releases" / "latest")
    loaded_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "run" / "releases" / "latest")
    ids = torch.tensor([loaded_tokenizer.encode("the river runs past the mill")])
    assert ids.numel() > 1
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)

    assert history(tmp_path)[-1] | {"gate": None, "created": None} == {
        "release": "release-0007", "increment": 7, "step": 70, "released": True, "reasons": [], "gate": None,
        "created": None, "previous": None, "latest": "release-0007"}


def test_dtype_is_cast_on_a_copy(tmp_path: Path, tokenizer: Any) -> None:
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    # Tied embeddings stay tied through the cast (one tensor written, both names load it).
    model = tiny_llama(vocab=len(tokenizer), tie_word_embeddings=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    recipe = make_recipe(tmp_path, release={"dtype": "bfloat16"})
    result = publish(tmp_path, recipe, model, tokenizer, 1, results(alpha=2.0, beta=3.0))

    with safe_open(str(result.path / "model.safetensors"), "pt") as handle:
        assert {handle.get_tensor(k).dtype for k in handle.keys()} == {torch.bfloat16}
    assert json.loads((result.path / "config.json").read_text())["dtype"] == "bfloat16"
    assert json.loads((result.path / "release.json").read_text())["dtype"] == "bfloat16"
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the training model is untouched
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    loaded = AutoModelForCausalLM.from_pretrained(result.path)
    assert loaded.dtype == torch.bfloat16
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight.to(torch.bfloat16))


def test_gate_relative_budgets_with_star_default(tmp_path: Path, model: torch.nn.Module, tokenizer: Any) -> None:
    recipe = make_recipe(tmp_path, eval={"gate": {"max_regression": {"*": 0.05, "beta": 0.01}}})
    first = publish(tmp_path, recipe, model, tokenizer, 1, results(alpha=2.0, beta=3.0))
    assert first.released
    assert first.gate["checks"]["budgets"]["note"] == "first release: no previous release to compare with, budgets pass"

    # alpha +4% (under the "*" 5%), beta +0.67% (under its own 1%): released.
    second = publish(tmp_path, recipe, model, tokenizer, 2, results(alpha=2.08, beta=3.02))
    assert second.released and latest_name(tmp_path) == "release-0002"
    assert second.gate["checks"]["budgets"]["domains"]["alpha"]["budget"] == 0.05
    assert second.gate["checks"]["budgets"]["domains"]["beta"]["budget"] == 0.01

    # beta +2% against release-0002: over its own 1% budget although under "*".
    third = publish(tmp_path, recipe, model, tokenizer, 3, results(alpha=2.0, beta=3.0804))
    assert not third.released
    assert third.reasons == ["beta loss 3.0804 is +2.0% over release-0002 (3.0200), budget 1.0%"]
    assert third.message == ("increment 3 trained but not released: beta loss 3.0804 is +2.0% over release-0002 "
                             "(3.0200), budget 1.0%; releases/latest stays release-0002")
    assert latest_name(tmp_path) == "release-0002"
    rejected = json.loads((third.path / "release.json").read_text())
    assert rejected["released"] is False and rejected["reasons"] == third.reasons
    assert "**failed**: beta loss" in (third.path / "README.md").read_text()

    # The next increment is compared with what is served (release-0002), not with the rejected one:
    # beta 3.06 is better than release-0003's 3.0804 but +1.3% over release-0002's 3.02.
    fourth = publish(tmp_path, recipe, model, tokenizer, 4, results(alpha=2.0, beta=3.06))
    assert fourth.gate["previous"] == "release-0002" and not fourth.released
    assert [(row["increment"], row["released"], row["latest"]) for row in history(tmp_path)] == [
        (1, True, "release-0001"), (2, True, "release-0002"), (3, False, "release-0002"), (4, False, "release-0002")]


def test_gate_absolute_budgets(tmp_path: Path, model: torch.nn.Module, tokenizer: Any) -> None:
    recipe = make_recipe(tmp_path, domains=("alpha",), eval={"gate": {"max_regression": {"alpha": 0.1}, "relative": False}})
    assert publish(tmp_path, recipe, model, tokenizer, 1, results(alpha=2.0)).released
    assert publish(tmp_path, recipe, model, tokenizer, 2, results(alpha=2.09)).released
    failed = publish(tmp_path, recipe, model, tokenizer, 3, results(alpha=2.2))
    assert failed.reasons == ["alpha loss 2.2000 is +0.1100 over release-0002 (2.0900), budget 0.1"]
    assert failed.gate["checks"]["budgets"]["domains"]["alpha"]["allowed"] == 0.1


def test_non_finite_weights_are_refused(tmp_path: Path, model: torch.nn.Module, tokenizer: Any) -> None:
    recipe = make_recipe(tmp_path)
    assert publish(tmp_path, recipe, model, tokenizer, 1, results(alpha=2.0, beta=3.0)).released
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    failed = publish(tmp_path, recipe, model, tokenizer, 2, results(alpha=2.0, beta=3.0))
    assert not failed.released and latest_name(tmp_path) == "release-0001"
    assert failed.reasons == ["non-finite weights (NaN/Inf) in model.layers.0.mlp.up_proj.weight"]


def test_float16_overflow_is_caught_after_the_cast(tmp_path: Path, model: torch.nn.Module, tokenizer: Any) -> None:
    with torch.no_grad():
        model.lm_head.weight[0, 0] = 1e6  # finite in float32, inf in float16
    recipe = make_recipe(tmp_path, release={"dtype": "float16"})
    failed = publish(tmp_path, recipe, model, tokenizer, 1, results(alpha=2.0, beta=3.0))
    assert failed.reasons == ["non-finite weights (NaN/Inf) in lm_head.weight"]
    assert failed.latest is None and not (tmp_path / "run" / "releases" / "latest").exists()
    assert failed.message.endswith("releases/latest stays unset (no release yet)")


def test_every_eval_domain_must_be_measured(tmp_path: Path, model: torch.nn.Module, tokenizer: Any) -> None:
    recipe = make_recipe(tmp_path)
    failed = publish(tmp_path, recipe, model, tokenizer, 1, results(alpha=2.0))
    assert failed.reasons == ["eval domain(s) not measured: beta"]
    nan = publish(tmp_path, recipe, model, tokenizer, 2, results(alpha=2.0, beta=float("nan")))
    assert nan.reasons == ["eval domain(s) not measured: beta"]

    def refuse(constant: str) -> None:
        raise AssertionError(f"{constant} is not JSON")

    # Scripts read these files: the NaN is stored as null, never as the non-JSON `NaN`.
    info = json.loads((nan.path / "release.json").read_text(), parse_constant=refuse)
    assert info["eval"]["beta"]["loss"] is None
    json.loads((tmp_path / "run" / "releases" / HISTORY_FILENAME).read_text().splitlines()[-1], parse_constant=refuse)
    assert "| beta | nan | nan | 100 | n/a |" in (nan.path / "README.md").read_text()
    none = publish(tmp_path, recipe, model, tokenizer, 3, None)
    assert none.reasons == ["eval domain(s) not measured: alpha, beta"]

    # No eval sets: the check passes vacuously and the card says so.
    bare = recipe_from_dict(tiny_recipe(tmp_path))
    ok = publish(tmp_path, bare, model, tokenizer, 4, None)
    assert ok.released and ok.gate["checks"]["measured"]["note"] == "no eval sets"
    assert "No eval sets (`eval.sets` is empty)" in (ok.path / "README.md").read_text()


def test_keep_prunes_oldest_but_never_latest(tmp_path: Path, model: torch.nn.Module, tokenizer: Any) -> None:
    recipe = make_recipe(tmp_path, domains=("alpha",), release={"keep": 2},
                         eval={"gate": {"max_regression": {"*": 0.0}}})
    for increment, loss in [(1, 2.0), (2, 1.9), (3, 1.95), (4, 2.5)]:
        publish(tmp_path, recipe, model, tokenizer, increment, results(alpha=loss))
    names = sorted(p.name for p in ReleaseStore(tmp_path / "run").list())
    # 3 and 4 were rejected; 2 is what latest serves and survives although it is not among the newest 2.
    assert names == ["release-0002", "release-0003", "release-0004"]
    assert latest_name(tmp_path) == "release-0002"
    assert len(history(tmp_path)) == 4  # the history keeps every attempt


def test_republishing_an_increment_replaces_it(tmp_path: Path, model: torch.nn.Module, tokenizer: Any) -> None:
    recipe = make_recipe(tmp_path, domains=("alpha",), eval={"gate": {"max_regression": {"*": 0.05}}})
    publish(tmp_path, recipe, model, tokenizer, 1, results(alpha=2.0))
    publish(tmp_path, recipe, model, tokenizer, 2, results(alpha=2.05))
    # A crash after the checkpoint: increment 2 is published again and compared with 1, not itself.
    again = publish(tmp_path, recipe, model, tokenizer, 2, results(alpha=2.06))
    assert again.released and again.gate["previous"] == "release-0001"
    assert json.loads((again.path / "release.json").read_text())["eval"]["alpha"]["loss"] == 2.06
    releases = tmp_path / "run" / "releases"
    assert sorted(p.name for p in releases.iterdir()) == ["history.jsonl", "latest", "release-0001", "release-0002"]
    ReleaseStore(tmp_path / "run").verify(again.path)

    # Re-published and now over budget: latest falls back to the release it was compared with.
    worse = publish(tmp_path, recipe, model, tokenizer, 2, results(alpha=2.5))
    assert not worse.released and latest_name(tmp_path) == "release-0001"


def test_failed_write_leaves_latest_and_no_debris(tmp_path: Path, model: torch.nn.Module, tokenizer: Any,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    recipe = make_recipe(tmp_path)
    publish(tmp_path, recipe, model, tokenizer, 1, results(alpha=2.0, beta=3.0))
    releases = tmp_path / "run" / "releases"

    def disk_full(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(release_module, "write_bytes_atomic", disk_full)  # the model card
    with pytest.raises(CheckpointError, match="could not write release release-0002: .*No space left on device"):
        publish(tmp_path, recipe, model, tokenizer, 2, results(alpha=2.0, beta=3.0))
    assert sorted(p.name for p in releases.iterdir()) == ["history.jsonl", "latest", "release-0001"]
    assert latest_name(tmp_path) == "release-0001"


def test_failure_while_moving_latest_puts_everything_back(tmp_path: Path, model: torch.nn.Module, tokenizer: Any,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    recipe = make_recipe(tmp_path)
    publish(tmp_path, recipe, model, tokenizer, 1, results(alpha=2.0, beta=3.0))
    publish(tmp_path, recipe, model, tokenizer, 2, results(alpha=2.0, beta=3.0))

    real_replace = os.replace
    swaps: list[str] = []

    def interrupted(src: Any, dst: Any) -> None:
        if Path(dst).name == "latest":
            swaps.append(os.readlink(src))
            if swaps == ["release-0001", "release-0002"]:
                # Ctrl-C at the final swap: the old release-0002 is aside, latest on the fallback.
                raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(release_module.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        publish(tmp_path, recipe, model, tokenizer, 2, results(alpha=1.9, beta=3.0))  # re-publish
    monkeypatch.undo()
    assert swaps == ["release-0001", "release-0002", "release-0002"]  # fallback, interrupted, restored
    releases = tmp_path / "run" / "releases"
    assert sorted(p.name for p in releases.iterdir()) == ["history.jsonl", "latest", "release-0001", "release-0002"]
    assert latest_name(tmp_path) == "release-0002"
    assert json.loads((releases / "release-0002" / "release.json").read_text())["eval"]["alpha"]["loss"] == 2.0


def test_leftovers_of_a_killed_publish_are_cleaned(tmp_path: Path, model: torch.nn.Module, tokenizer: Any) -> None:
    recipe = make_recipe(tmp_path)
    first = publish(tmp_path, recipe, model, tokenizer, 1, results(alpha=2.0, beta=3.0))
    releases = tmp_path / "run" / "releases"
    # What kill -9 leaves at each stage: a half-written staging dir, a temporary link, and a
    # release moved aside for replacement whose replacement never arrived.
    (releases / ".tmp-release-0002").mkdir()
    (releases / ".tmp-release-0002" / "model.safetensors").write_bytes(b"half")
    os.symlink("release-0002", releases / ".latest.tmp-99999")
    os.rename(first.path, releases / ".trash-release-0001")
    assert ReleaseStore(tmp_path / "run").latest_target() is None  # serving would see no release...

    publish(tmp_path, recipe, model, tokenizer, 2, results(alpha=2.0, beta=3.0))
    assert sorted(p.name for p in releases.iterdir()) == ["history.jsonl", "latest", "release-0001", "release-0002"]
    assert latest_name(tmp_path) == "release-0002"
    ReleaseStore(tmp_path / "run").verify(releases / "release-0001")  # ...and the moved one is back


def test_status_shows_release_and_last_gate(tmp_path: Path, model: torch.nn.Module, tokenizer: Any) -> None:
    import io

    from rich.console import Console

    from olm_cli.rundir.status import render_status

    recipe = make_recipe(tmp_path, domains=("alpha",), eval={"gate": {"max_regression": {"*": 0.01}}})
    publish(tmp_path, recipe, model, tokenizer, 1, results(alpha=2.0))
    publish(tmp_path, recipe, model, tokenizer, 2, results(alpha=2.5))
    status = collect_status(tmp_path / "run")
    assert status["release"]["name"] == "release-0001" and status["release"]["increment"] == 1
    assert status["release"]["path"] == str((tmp_path / "run" / "releases" / "release-0001").resolve())
    assert status["last_gate"]["increment"] == 2 and status["last_gate"]["released"] is False
    assert status["last_gate"]["reasons"] == ["alpha loss 2.5000 is +25.0% over release-0001 (2.0000), budget 1.0%"]
    assert status["problems"] == []
    json.dumps(status)

    out = io.StringIO()
    render_status(status, Console(file=out, width=300))
    text = out.getvalue()
    assert "release-0001 (increment 1, step 10, float32)" in text
    assert "increment 2 not released: alpha loss 2.5000 is +25.0%" in text

    (tmp_path / "run" / "releases" / "release-0001" / "model.safetensors").write_bytes(b"truncated")
    status = collect_status(tmp_path / "run")
    assert status["release"] is None
    assert any(p.startswith("releases/latest is unusable:") and "model.safetensors" in p for p in status["problems"])


def test_lora_is_merged_into_a_plain_release(tmp_path: Path, model: torch.nn.Module, tokenizer: Any) -> None:
    from transformers import AutoModelForCausalLM

    from olm_cli.partial import LoraConfig, wrap_lora

    wrapped = wrap_lora(model, LoraConfig(r=2, target_modules=["q_proj"]))
    with torch.no_grad():  # a trained adapter: B is zero at init, which would hide a missing merge
        for name, param in wrapped.named_parameters():
            if "lora_B" in name:
                param.fill_(0.05)
    result = publish(tmp_path, make_recipe(tmp_path, domains=()), wrapped, tokenizer, 1, None)
    loaded = AutoModelForCausalLM.from_pretrained(result.path)
    assert not any("lora" in name for name, _ in loaded.named_parameters())
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, wrapped(input_ids=ids).logits, atol=1e-5)
    assert any("lora_A" in name for name, _ in wrapped.named_parameters())  # the training model keeps its adapters
