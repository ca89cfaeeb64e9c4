"""The ``olm`` command line. Thin: it parses arguments and calls one function per command.

Exit codes: 0 ok (or nothing to do), 1 failure, 2 recipe/usage error, 3 trained but not released,
75 run directory locked, 130 interrupted by SIGINT, 143 stopped by SIGTERM (a checkpoint was
written in both cases).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from olm_cli.console import make_console
from olm_cli.errors import OlmError, RecipeError

app = typer.Typer(
    name="olm",
    help="Keep a causal language model learning as new text shards arrive.",
    no_args_is_help=True,
    # --install-completion / --show-completion: typer's shell completion (bash, zsh, fish, PowerShell).
    add_completion=True,
    pretty_exceptions_enable=False,
)
PROG_NAME = "olm"  # also under `python -m olm_cli`: completion scripts complete the `olm` command
# Off a terminal (cron, log files) these never wrap a line: see olm_cli/console.py.
console = make_console()
err_console = make_console(stderr=True)

ConfigOption = Annotated[Path, typer.Option("--config", "-c", help="Recipe YAML file.")]
OverridesArg = Annotated[
    list[str] | None, typer.Argument(help="Dotted overrides applied after the file, e.g. optim.lr=3e-4 run.dir=/tmp/x.")
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of tables.")]


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def package_version() -> str:
    """The installed distribution's version; the source tree's when olm runs uninstalled."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("olm")
    except PackageNotFoundError:
        from olm_cli import __version__

        return __version__


def _show_version(value: bool) -> None:
    if value:
        sys.stdout.write(f"olm {package_version()}\n")
        raise typer.Exit(0)


@app.callback()
def _options(
    version: Annotated[bool, typer.Option("--version", is_eager=True, callback=_show_version,
                                          help="Print olm's version and exit.")] = False,
) -> None:
    """Keep a causal language model learning as new text shards arrive."""


@app.command()
def train(config: ConfigOption, overrides: OverridesArg = None, json_out: JsonOption = False) -> None:
    """Train one increment on the shards not yet seen (or finish an interrupted one).

    Example: olm train --config configs/quickstart.yaml run.max_steps=50
    """
    from olm_cli.increment import run_increment
    from olm_cli.recipe import load_recipe

    recipe = load_recipe(config, overrides or [])
    outcome = run_increment(recipe, console=err_console if json_out else console)
    if json_out:
        _print_json(outcome.__dict__)
    elif outcome.message:
        console.print(outcome.message)
    raise typer.Exit(outcome.exit_code)


@app.command()
def validate(config: ConfigOption, overrides: OverridesArg = None, json_out: JsonOption = False) -> None:
    """Check a recipe and print it fully resolved (defaults filled in, paths absolute).

    Example: olm validate --config configs/quickstart.yaml optim.lr=1e-3
    """
    from olm_cli.recipe import load_recipe

    recipe = load_recipe(config, overrides or [])
    if json_out:
        _print_json(recipe.model_dump(mode="json"))
    else:
        sys.stdout.write(recipe.to_yaml())


def _parse_pairs(pairs: list[str], option: str) -> dict[str, str]:
    parsed: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name or not value:
            raise RecipeError(f"{option} {pair!r}: expected NAME=VALUE")
        parsed[name] = value
    return parsed


@app.command("eval")
def eval_command(
    run: Annotated[Path | None, typer.Option("--run", help="Run directory: evaluates its latest checkpoint.")] = None,
    checkpoint: Annotated[Path | None, typer.Option("--checkpoint", help="An HF model directory to evaluate.")] = None,
    data: Annotated[list[str] | None, typer.Option("--data", help="NAME=PATH held-out file (repeatable). Default: the recipe's eval.sets.")] = None,
    block_size: Annotated[int | None, typer.Option(help="Tokens per block (default: the run's data.block_size, else 256).")] = None,
    max_tokens: Annotated[int | None, typer.Option(help="Tokens per domain at most.")] = None,
    matrix: Annotated[bool, typer.Option("--matrix", help="Show the run's continual-learning matrix and its summary instead.")] = False,
    union: Annotated[list[str] | None, typer.Option("--union", help="DOMAIN=LOSS of a union-trained reference, for intransigence (repeatable).")] = None,
    tasks: Annotated[str | None, typer.Option("--tasks", help="lm-evaluation-harness task(s), comma-separated (needs the lm-eval extra); --run evaluates releases/latest.")] = None,
    limit: Annotated[int | None, typer.Option("--limit", min=1, help="With --tasks: at most N examples per task.")] = None,
    num_fewshot: Annotated[int | None, typer.Option("--num-fewshot", min=0, help="With --tasks: few-shot examples (default: each task's own).")] = None,
    task_dir: Annotated[list[Path] | None, typer.Option("--task-dir", help="With --tasks: a folder of task YAML files of your own (repeatable).")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="With --tasks: requests per forward.")] = 8,
    json_out: JsonOption = False,
) -> None:
    """Per-domain held-out loss and perplexity, the continual-learning matrix, or downstream tasks.

    Examples: olm eval --run runs/quickstart --json;
    olm eval --checkpoint runs/quickstart/checkpoints/latest --data code=data/eval/code.jsonl;
    olm eval --run runs/quickstart --matrix;
    olm eval --run runs/quickstart --tasks arc_easy,hellaswag --limit 200
    """
    from olm_cli.commands import run_downstream, run_eval, show_matrix

    if tasks is not None:
        if matrix or data:
            raise RecipeError("--tasks runs lm-evaluation-harness; it does not combine with --matrix or --data")
        from olm_cli.evaluation.downstream import parse_tasks

        run_downstream(run=run, checkpoint=checkpoint, tasks=parse_tasks(tasks), limit=limit, num_fewshot=num_fewshot,
                       batch_size=batch_size, task_dirs=task_dir or [], as_json=json_out, console=console)
        return
    if matrix:
        if run is None:
            raise RecipeError("--matrix needs --run DIR")
        unions = {k: float(v) for k, v in _parse_pairs(union or [], "--union").items()} or None
        show_matrix(run, union=unions, as_json=json_out, console=console)
        return
    run_eval(run=run, checkpoint=checkpoint, data=_parse_pairs(data or [], "--data"), block_size=block_size,
             max_tokens=max_tokens, as_json=json_out, console=console)


@app.command()
def status(
    run: Annotated[Path, typer.Option("--run", help="Run directory.")],
    json_out: JsonOption = False,
) -> None:
    """Increments, shards per status, tokens, last checkpoint and eval, lock holder.

    With optim.schedule wsd or release.merge sma: the schedule's phase, the trunk step against
    the cooldown branch's, the last cooldown's release against the trunk, what an SMA averaged.

    Example: olm status --run runs/quickstart --json
    """
    from olm_cli.rundir import collect_status, render_status

    info = collect_status(run)
    if json_out:
        _print_json(info)
    else:
        render_status(info, console)


@app.command("replay-inspect")
def replay_inspect(
    run: Annotated[Path, typer.Option("--run", help="Run directory.")],
    show: Annotated[int, typer.Option("--show", help="Decode and print N samples.")] = 0,
    export: Annotated[Path | None, typer.Option("--export", help="Write every sample as one JSON line to this new file.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Let --export replace an existing file (a symlink there is replaced, never followed).")] = False,
    json_out: JsonOption = False,
) -> None:
    """What the replay buffer of the latest checkpoint holds.

    Example: olm replay-inspect --run runs/quickstart --show 3 --export replay.jsonl
    """
    from olm_cli.commands import inspect_run_replay

    inspect_run_replay(run, show=show, export=export, overwrite=force, as_json=json_out, console=console)


@app.command()
def report(
    run: Annotated[Path, typer.Option("--run", help="Run directory.")],
    out: Annotated[Path | None, typer.Option("--out", help="Directory for index.html and report.json (default: RUN/report, regenerated freely).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Let --out replace an index.html or report.json already there.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the gathered data (what the figures show) as JSON.")] = False,
) -> None:
    """One self-contained HTML page of a run: loss, lr and tokens/s per step by increment, eval loss
    per domain, the forgetting matrix, replay, the ledger and the release history.

    Example: olm report --run runs/quickstart   (then open runs/quickstart/report/index.html)
    """
    from olm_cli.report import write_report

    result = write_report(run, out, force=force)
    if json_out:
        _print_json({"page": str(result.page), "seconds": round(result.seconds, 3), **result.data})
    else:
        console.print(f"report → {result.page} ({result.seconds:.1f} s)", highlight=False, soft_wrap=True)


@app.command()
def merge(
    checkpoints: Annotated[list[Path], typer.Argument(help="Run directories (each stands for its releases/latest) or checkpoint directories (HF format).")],
    out: Annotated[Path, typer.Option("--out", help="Directory for the merged checkpoint.")],
    weights: Annotated[str | None, typer.Option("--weights", help="'tokens' (each run weighted by the tokens its ledger trained: FedAvg), or a number per input (e.g. sample counts: 3,1); normalised. Default: equal.")] = None,
    json_out: JsonOption = False,
) -> None:
    """Weighted parameter averaging of models into one loadable checkpoint (model soups, federated averaging).

    Examples: olm merge site-a/run site-b/run --weights tokens --out merged;
    olm merge runs/a/checkpoints/latest runs/b/checkpoints/latest --weights 3,1 --out merged
    """
    from olm_cli.merge import merge_runs

    by_tokens = (weights or "").strip().lower() == "tokens"
    parsed = None
    if weights and not by_tokens:
        try:
            parsed = [float(w) for w in weights.replace(",", " ").split()]
        except ValueError:
            raise RecipeError(f"--weights {weights!r}: expected 'tokens' or numbers such as 3,1") from None
    report = merge_runs(checkpoints, parsed, out, by_tokens=by_tokens)
    if json_out:
        _print_json(report)
        return
    from rich.table import Table

    table = Table(title="merge weights")
    for column, justify in (("input", "left"), ("model", "left"), ("tokens", "right"), ("weight", "right")):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for row, weight in zip(report["inputs"], report["weights"], strict=True):
        tokens = f"{row['tokens']:,}" if row["tokens"] is not None else ""
        table.add_row(row["given"], row["checkpoint"], tokens, f"{weight:.4f}")
    console.print(table)
    console.print(f"merged {len(checkpoints)} models → {report['out']}")


@app.command()
def generate(
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="Text to continue (or, with --chat, the user's message). Empty: start a new document.")],
    run: Annotated[Path | None, typer.Option("--run", help="Run directory: generates from releases/latest (its latest checkpoint when there is no release yet).")] = None,
    checkpoint: Annotated[Path | None, typer.Option("--checkpoint", help="A checkpoint, a release or any HF model directory.")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n", min=1, help="Tokens to generate at most (fewer if the model ends the text).")] = 100,
    temperature: Annotated[float, typer.Option("--temperature", "-t", min=0.0, help="0: greedy (the default); above 0: sample at this temperature.")] = 0.0,
    top_p: Annotated[float, typer.Option("--top-p", help="Sample from the smallest set of tokens whose probability reaches P (with --temperature > 0).")] = 1.0,
    seed: Annotated[int | None, typer.Option("--seed", help="Seed for sampling (default: a fresh one, reported with --json).")] = None,
    chat: Annotated[bool, typer.Option("--chat", help="Wrap the prompt in the tokenizer's chat template as a user turn (exit 2 if it has none).")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print prompt, text, tokens and seconds as JSON instead of streaming the text.")] = False,
) -> None:
    """Generate text from a run's release or a checkpoint, to see what the model has learnt.

    Examples: olm generate --run runs/quickstart --prompt "def main(" -n 40;
    olm generate --checkpoint runs/quickstart/checkpoints/latest -p "To be" --temperature 0.8 --top-p 0.95 --seed 1 --json
    """
    from olm_cli.generate import Sampling, run_generate

    run_generate(run=run, checkpoint=checkpoint, prompt=prompt, max_new_tokens=max_new_tokens,
                 sampling=Sampling(temperature, top_p, seed), chat=chat, as_json=json_out,
                 say=lambda line: err_console.print(line, highlight=False, markup=False))


def _template_names() -> list[str]:
    from olm_cli.init_recipe import list_templates

    return [item.name for item in list_templates()]


@app.command()
def init(
    template: Annotated[str, typer.Option("--template", "-t", autocompletion=_template_names,
                                          help="scratch, pretrained, gguf or hub-dataset (see --list).")] = "scratch",
    out: Annotated[str, typer.Option("--out", "-o", help="File to write; '-' prints the recipe instead.")] = "recipe.yaml",
    force: Annotated[bool, typer.Option("--force", help="Replace an existing file.")] = False,
    list_templates: Annotated[bool, typer.Option("--list", help="List the templates and exit.")] = False,
) -> None:
    """Write a commented starter recipe that validates, then edit its paths and train.

    Examples: olm init --template pretrained --out nightly.yaml; olm init --list; olm init -t gguf --out - | less
    """
    from rich.markup import escape

    from olm_cli import init_recipe

    if list_templates:
        for item in init_recipe.list_templates():
            console.print(f"[bold]{item.name:<12}[/] {escape(item.summary)}", highlight=False)
        return
    path = init_recipe.write_starter(template, out, force=force)
    if path is not None:
        err_console.print(f"wrote the {template} starter recipe to {path}", highlight=False, markup=False)
        err_console.print("edit its data and eval paths, then run:", highlight=False)
        console.print(init_recipe.run_command(out), highlight=False, markup=False)


@app.command()
def tune(
    config: ConfigOption,
    overrides: OverridesArg = None,
    space: Annotated[list[str] | None, typer.Option("--space", help="KEY=LOW:HIGH, KEY=LOW:HIGH:log or KEY=A,B,C (repeatable): a recipe key and its search range.")] = None,
    trials: Annotated[int, typer.Option("--trials", help="Finished trials the study should hold; a rerun continues the study up to this many.")] = 20,
    steps: Annotated[int, typer.Option("--steps", help="Optimizer steps of each trial's proxy increment (on the data the run has not trained yet).")] = 50,
    forgetting_weight: Annotated[float, typer.Option("--objective-forgetting-weight", help="W in: objective = mean held-out loss + W x forgetting.")] = 1.0,
    tune_dir: Annotated[Path | None, typer.Option("--dir", help="Tuning directory (study.db, scratch trials, best-recipe.yaml). Default: RUN.tune next to the run directory.")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Also write the best recipe to this new file.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Let --out replace an existing file.")] = False,
    json_out: JsonOption = False,
) -> None:
    """Search recipe settings with Optuna: each trial is a short proxy increment in a scratch copy of the run.

    Example: olm tune --config configs/quickstart.yaml --trials 20 --steps 50
    --space optim.lr=1e-5:1e-3:log --space replay.ratio=0:0.5
    """
    from olm_cli.tune import parse_space, render_report, run_tuning

    dimensions = [parse_space(text) for text in space or []]
    say = err_console.print if json_out else console.print
    report = run_tuning(config, overrides or [], dimensions, trials=trials, steps=steps,
                        forgetting_weight=forgetting_weight, tune_dir=tune_dir, out=out, force=force, say=say)
    if json_out:
        _print_json(report.to_json())
    else:
        render_report(report, dimensions, console)
    if report.best is None:
        raise typer.Exit(1)


@app.command("export")
def export_command(
    out: Annotated[Path, typer.Option("--out", help="File (GGUF) or directory (safetensors) to write; never replaced without --force.")],
    run: Annotated[Path | None, typer.Option("--run", help="Run directory: exports releases/latest (else its newest checkpoint).")] = None,
    checkpoint: Annotated[Path | None, typer.Option("--checkpoint", help="An HF model directory to export.")] = None,
    fmt: Annotated[str, typer.Option("--format", help="gguf (llama.cpp; Llama architecture) or safetensors (an HF directory).")] = "gguf",
    quantize: Annotated[str, typer.Option("--quantize", help="GGUF matrix type: f32, f16 or q8_0 (norms stay f32).")] = "f16",
    dtype: Annotated[str, typer.Option("--dtype", help="safetensors weight dtype: auto (as stored), float32, bfloat16, float16.")] = "auto",
    prune: Annotated[float, typer.Option("--prune", help="Zero this fraction of the smallest-magnitude weights of every linear layer (e.g. 0.3).")] = 0.0,
    prune_scope: Annotated[str, typer.Option("--prune-scope", help="unstructured (per matrix) or row (per output row).")] = "unstructured",
    eval_text: Annotated[Path | None, typer.Option("--eval-text", help="Held-out text (.txt, .jsonl, .parquet) for the loss --prune and --check report. Default: the run's eval.sets.")] = None,
    max_tokens: Annotated[int | None, typer.Option("--max-tokens", help="Held-out tokens per domain at most.")] = None,
    check: Annotated[bool, typer.Option("--check", help="Load the written model back with transformers and compare its logits (and loss) with the source.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing --out.")] = False,
    json_out: JsonOption = False,
) -> None:
    """Export a model for deployment: GGUF for llama.cpp, or a smaller safetensors directory.

    Examples: olm export --run runs/quickstart --format gguf --quantize q8_0 --out model-q8_0.gguf --check;
    olm export --run runs/quickstart --format safetensors --dtype bfloat16 --out release-bf16;
    olm export --run runs/quickstart --prune 0.3 --prune-scope row --out pruned.gguf
    """
    from olm_cli.export import export_model, render_export

    progress = err_console if json_out else console
    result = export_model(run=run, checkpoint=checkpoint, out=out, fmt=fmt, quantize=quantize, dtype=dtype,
                          prune=prune, prune_scope=prune_scope, eval_text=eval_text, max_tokens=max_tokens,
                          check=check, force=force, say=lambda line: progress.print(line, highlight=False))
    if json_out:
        _print_json(result)
    else:
        render_export(result, console)


def main() -> None:
    # Library download/loading bars would interleave with olm's own progress and logs.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        # Without standalone mode click returns (rather than raises) the code of typer.Exit.
        code = app(standalone_mode=False, prog_name=PROG_NAME)
        sys.exit(code if isinstance(code, int) else 0)
    except OlmError as exc:
        # Escaped: a message naming "pip install 'olm[lm-eval]'" or a path with brackets is not rich markup.
        err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        err_console.print("[bold red]aborted[/]")
        sys.exit(130)
    except Exception as exc:  # click usage errors arrive here in non-standalone mode
        # typer ships its own copy of click, so match click's exception interface, not its class.
        show, code = getattr(exc, "show", None), getattr(exc, "exit_code", None)
        if callable(show) and isinstance(code, int):
            show()
            sys.exit(code)
        raise

if __name__ == "__main__":
    main()
