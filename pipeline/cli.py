"""The `weightsmith` command line.

    weightsmith convert RECIPE      build and validate every target (a Prefect flow run; no server needed)
    weightsmith validate RECIPE     check a recipe without running it
    weightsmith inspect SOURCE      resolve a source (bundled:NAME, folder or hub id) and describe the checkpoint
    weightsmith check-consumer FOLDER [--consumer vllm|xinference]
                                    serve a published artifact in that stack's own virtualenv (`make vllm-venv`)

Exit status (`pipeline.types.ExitCode`, the same for a flow run's final message): 0 every target ok, not_run or
refused; 1 a target failed; 2 bad input (recipe, source, a text it names); 3 another run is writing into the output
folder; 4 the machine cannot do it (output not writable, disk full); 5 a bug (rerun with --debug). Errors are one
line on stderr; `--debug` adds the traceback and the libraries' debug logs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback

from pipeline import console
from pipeline.recipe import load_recipe
from pipeline.types import ExitCode, SourceSpec, Status, exit_code, one_line

PREFECT_DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",  # no telemetry heartbeat from the ephemeral server
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",  # 20 s runs out on a busy small machine
}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    console.quiet_libraries(args.debug)
    logging.getLogger("weightsmith").setLevel(logging.DEBUG if args.debug else logging.INFO)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted: published artifacts are as they were; the next run clears what this one left",
              file=sys.stderr)  # fmt: skip
        return 130
    except Exception as exc:
        if args.debug:
            traceback.print_exc()
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return exit_code(exc)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="weightsmith", description="Convert Hugging Face checkpoints into validated GGUF (and more) artifacts."
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks and the libraries' debug logs")
    sub = parser.add_subparsers(dest="command", required=True)
    convert = sub.add_parser("convert", help="build and validate every target of a recipe")
    convert.add_argument("recipe", help="path to a recipe YAML file")
    convert.add_argument("--no-prefect", action="store_true", help="run the steps directly, without Prefect")
    convert.add_argument("--only", action="append", metavar="TARGET",
                         help="build only this target (its recipe name, e.g. gguf/q8_0); repeatable")  # fmt: skip
    convert.add_argument("--force", action="store_true", help="rebuild targets that are already up to date")
    convert.add_argument("--source", help="convert this checkpoint instead of the recipe's source")
    convert.set_defaults(func=_convert)
    validate = sub.add_parser("validate", help="check a recipe without running it")
    validate.add_argument("recipe")
    validate.set_defaults(func=_validate)
    inspect = sub.add_parser("inspect", help="resolve a source and describe the checkpoint")
    inspect.add_argument("source", help="bundled:NAME, a local folder, or a hub id")
    inspect.add_argument("--revision")
    inspect.set_defaults(func=_inspect)
    consumer = sub.add_parser("check-consumer", help="serve a published artifact in a real consumer (vLLM, Xinference)")
    consumer.add_argument("folder", help="a published artifact folder (GPTQ or compressed-tensors)")
    consumer.add_argument("--consumer", choices=["vllm", "xinference"], default="vllm")
    consumer.set_defaults(func=_check_consumer)
    return parser


def _check_consumer(args) -> int:
    """A real consumer (vLLM through the artifact's `vllm-serve.sh`, Xinference through its `xinference.json`) serves
    the artifact; the outcome goes into its manifest. Exit 1 on failure."""
    from pathlib import Path

    from pipeline import consumers
    from pipeline.xinference_check import xinference_check

    folder = Path(args.folder)
    log_file = console.log_folder() / f"consumer-{args.consumer}-{folder.name}.log"
    check = {"vllm": consumers.vllm_check, "xinference": xinference_check}[args.consumer]
    outcome = check(folder, log_file)
    consumers.record(folder, args.consumer, outcome)
    print(consumers.summary(outcome))
    print(f"log: {log_file}")
    return ExitCode.FAILED if outcome["status"] == Status.FAILED else ExitCode.OK


def _convert(args) -> int:
    from pipeline.convert import run_recipe, summary_table

    recipe = load_recipe(args.recipe).with_overrides(args.only, args.source)
    log_file = console.start_log(recipe.name, args.debug)
    if args.no_prefect:
        summary = run_recipe(recipe, force=args.force)
    else:
        summary = _run_flow(args)
        if isinstance(summary, str):  # the run stopped before it had a summary: its one line says why
            code, _, message = summary.partition(": ")
            print(f"error: {message}", file=sys.stderr)
            return int(code.removeprefix("exit ")) if code.startswith("exit ") else ExitCode.INTERNAL
    print(summary_table(summary))
    print(f"\nsummary: {recipe.output_dir() / 'summary.json'}")
    print(f"report: {summary['report']}")
    print(f"log: {log_file}")
    failed = [row["target"] for row in summary["targets"] if row["status"] == Status.FAILED]
    if failed:
        print(f"failed: {', '.join(failed)} (exit {ExitCode.FAILED.value}; the reasons are in the table above and "
              f"in summary.json)", file=sys.stderr)  # fmt: skip
    return ExitCode.FAILED if failed else ExitCode.OK


def _run_flow(args) -> dict | str:
    """This run's summary (never one an earlier run left on disk), or the message of a run that ended without one."""
    for key, value in {**PREFECT_DEFAULTS, "PREFECT_LOGGING_LEVEL": "DEBUG" if args.debug else "WARNING"}.items():
        os.environ.setdefault(key, value)
    from flows.convert import convert

    state = convert(args.recipe, only=args.only, force=args.force, source=args.source, return_state=True)
    result = state.result(raise_on_failure=False)
    if isinstance(result, dict):
        return result
    if isinstance(result, BaseException):
        raise result
    return state.message or f"exit {ExitCode.INTERNAL.value}: the flow run ended {state.name}"


def _validate(args) -> int:
    recipe = load_recipe(args.recipe)
    print(
        f"{args.recipe}: ok: {recipe.name} from {recipe.source.id}, {len(recipe.targets)} target(s): "
        f"{', '.join(t.key for t in recipe.targets)}; output {recipe.output_dir()}"
    )
    return 0


def _inspect(args) -> int:
    from pipeline.source import resolve_source

    info = resolve_source(SourceSpec(id=args.source, revision=args.revision))
    print(json.dumps(info.describe(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
