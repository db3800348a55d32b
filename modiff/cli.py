"""The ``modiff`` command: one subcommand per pipeline stage, generated from the stage table.

Each stage's declared inputs and outputs (:data:`modiff.pipeline.STAGES`) are its options, and
the other keyword arguments of its ``run`` function (:mod:`modiff.stages`) are options too.
Settings come from params.yaml (``--params``) with ``-S dotted.key=value`` overrides. This file
only translates a command line into a call; the work is in the package.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import logging
import sys
import types
import typing
from pathlib import Path
from typing import Any

from modiff.pipeline import COMMANDS, Stage, option_name

log = logging.getLogger("modiff")


def _add_settings_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--params", default="params.yaml", help="settings file (default: %(default)s)"
    )
    parser.add_argument("--preset", help="override params.yaml's preset")
    parser.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a setting (dotted key)")  # fmt: skip


def _option_kwargs(annotation: Any, default: Any) -> dict[str, Any]:
    """argparse keywords for a ``run`` argument of this type and default."""
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    members = typing.get_args(annotation) if union else ()
    base = next((a for a in members if a is not type(None)), annotation)
    kwargs: dict[str, Any] = {"required": default is inspect.Parameter.empty}
    if default is not inspect.Parameter.empty:
        kwargs["default"] = default
    if typing.get_origin(base) is list:
        kwargs.update(nargs="+", type=typing.get_args(base)[0])
    elif typing.get_origin(base) is typing.Literal:
        kwargs["choices"] = typing.get_args(base)
    elif base in (int, float, Path):
        kwargs["type"] = base
    return kwargs


def _stage_parser(sub: Any, stage: Stage) -> None:
    """``modiff <stage.command>``: an option per declared file and per other ``run`` argument."""
    module = importlib.import_module(stage.module)
    signature = inspect.signature(module.run)
    hints = typing.get_type_hints(module.run)
    doc = module.__doc__ or ""
    summary = " ".join(doc.split("\n\n")[0].split())
    parser = sub.add_parser(stage.command, help=summary, description=doc)
    if "params" in signature.parameters:
        _add_settings_options(parser)
    declared = {**stage.inputs, **stage.outputs}
    for name, parameter in signature.parameters.items():
        if name == "params":
            continue
        kwargs = _option_kwargs(hints[name], parameter.default)
        if name in declared:
            path = declared[name]
            path = (
                f"{path.pattern} (a pattern: one file per item)"
                if hasattr(path, "pattern")
                else path
            )
            kwargs["help"] = f"pipeline: {path}"
        parser.add_argument(option_name(name), dest=name, **kwargs)
    parser.set_defaults(run=module.run, takes_params="params" in signature.parameters)


def _generate(args: argparse.Namespace) -> None:
    """Write (--check: compare) the files generated from the code: dvc.yaml, its code
    fingerprints and params.schema.json."""
    from modiff.io import write_text
    from modiff.pipeline import generated_files

    for path, text in generated_files().items():
        dest = Path(args.root) / path
        if args.check and (not dest.is_file() or dest.read_text() != text):
            raise ValueError(
                f"{dest} is not generated from the current code: run `modiff generate`"
            )
        if not args.check:
            write_text(text, dest)
            log.info("wrote %s", dest)


def _train(args: argparse.Namespace) -> None:
    """Train the digits preset's diffusion model, or with --classifier its FID classifier."""
    from modiff.train import train_preset

    train_preset(_params(args), args.out, args.summary, classifier=args.classifier)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; of the stages only ``command``'s is built whole (importing a stage imports
    what it runs), unless none is named (``modiff --help``)."""
    parser = argparse.ArgumentParser(prog="modiff", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for stage in COMMANDS.values():
        if command in (None, stage.command):
            _stage_parser(sub, stage)
        else:
            sub.add_parser(stage.command, help=f"pipeline stage (modiff {stage.command} --help)")
    generate = sub.add_parser("generate", help=" ".join(_generate.__doc__.split()))
    generate.add_argument("--check", action="store_true", help="fail if a file is stale")
    generate.add_argument("--root", default=".", help="project root (default: %(default)s)")
    generate.set_defaults(handler=_generate)
    train = sub.add_parser("train", help=_train.__doc__.splitlines()[0])
    _add_settings_options(train)
    train.add_argument("--out", required=True, type=Path, help="checkpoint to write")
    train.add_argument("--summary", type=Path, help="JSON summary to write")
    train.add_argument("--classifier", action="store_true", help="train the digits classifier")
    train.set_defaults(handler=_train)
    return parser


def _params(args: argparse.Namespace) -> Any:
    from modiff.config import load_params

    overrides = [*args.set, *([f"preset={args.preset}"] if args.preset else [])]
    return load_params(args.params, overrides)


def main(argv: list[str] | None = None) -> int:
    from modiff.errors import UserError
    from modiff.runtime import setup_logging

    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if a in COMMANDS), None)
    args = build_parser(command).parse_args(argv)
    setup_logging(args.verbose)
    try:
        if hasattr(args, "handler"):
            args.handler(args)
        else:
            options = {
                k: v for k, v in vars(args).items() if k in inspect.signature(args.run).parameters
            }
            if args.takes_params:
                options["params"] = _params(args)
            args.run(**options)
    except (UserError, FileNotFoundError, ValueError) as exc:  # ConfigError, CheckpointError, ...
        if args.verbose:
            raise
        print(f"modiff {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
