"""The `weightsmith` command line.

    weightsmith convert RECIPE      build and validate every target (a Prefect flow run; no server needed)
    weightsmith validate RECIPE     check a recipe without running it
    weightsmith inspect SOURCE      resolve a source (bundled:NAME, folder or hub id) and describe the checkpoint

Exit status: 0 when every target is ok or honestly not run, 1 when a target failed, 2 for a bad recipe or source.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from pipeline.lock import OutputBusy
from pipeline.recipe import RecipeError, load_recipe
from pipeline.types import SourceError, SourceSpec

PREFECT_DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",  # no telemetry heartbeat from the ephemeral server
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",  # 20 s runs out on a busy small machine
    "PREFECT_LOGGING_EXTRA_LOGGERS": "weightsmith",  # the library's progress shows in the flow run's logs
}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.func(args)
    except (RecipeError, SourceError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OutputBusy as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="weightsmith", description="Convert Hugging Face checkpoints into validated GGUF (and more) artifacts."
    )
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
    return parser


def _convert(args) -> int:
    from pipeline.convert import run_recipe, summary_table

    recipe = load_recipe(args.recipe).with_overrides(args.only, args.source)
    logging.getLogger("weightsmith").setLevel(logging.INFO)
    if args.no_prefect:
        logging.basicConfig(format="%(asctime)s %(levelname)-7s %(message)s", datefmt="%H:%M:%S")
        summary = run_recipe(recipe, force=args.force)
    else:
        summary = _run_flow(args.recipe, args)
    print(summary_table(summary))
    print(f"\nsummary: {recipe.output_dir() / 'summary.json'}")
    print(f"report: {summary['report']}")
    return 0 if summary["ok"] else 1


def _run_flow(path: str, args) -> dict:
    """This run's summary (never one an earlier run left on disk); what stopped the flow before it had one is
    raised."""
    for key, value in PREFECT_DEFAULTS.items():
        os.environ.setdefault(key, value)
    from flows.convert import TargetsFailed, convert

    state = convert(path, only=args.only, force=args.force, source=args.source, return_state=True)
    try:
        return state.result()
    except TargetsFailed as failed:
        return failed.summary


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
