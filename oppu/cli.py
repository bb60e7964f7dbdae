"""The ``oppu`` command: a map of subcommand name -> module (or ``module:object``) in ``oppu.commands``.

Each command defines ``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int``; it is
imported only when its command runs, so ``oppu score`` never pays for torch or ray. ``-q/--quiet``
and ``-v/--verbose`` (before or after the command) set the log level (``oppu.logs``).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from oppu import logs
from oppu.errors import ConfigError, DataError, OppuError

COMMANDS = {
    "quickstart": "oppu.commands.quickstart",
    "synth": "oppu.commands.synth",
    "prepare": "oppu.commands.prepare",
    "score": "oppu.commands.score",
    "token": "oppu.commands.token",
    "users": "oppu.commands.users",
    "adapters": "oppu.commands.adapters",
    "analyze": "oppu.commands.analyze",
    "profiles": "oppu.commands.profiles",
    "publish": "oppu.commands.publish",
    "train-base": "oppu.commands.stages:TRAIN_BASE",
    "train-users": "oppu.commands.stages:TRAIN_USERS",
    "evaluate": "oppu.commands.stages:EVALUATE",
    "pipeline": "oppu.commands.stages:PIPELINE",
}

EXIT_BAD_INPUT = 2


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    """The ``oppu`` parser; for a known command, with only that command's subparser (no heavy
    imports). ``build_parser(argv).parse_args(argv)`` checks a command line without running it."""
    parser = argparse.ArgumentParser(prog="oppu", description="One PEFT Per User on Ray.")
    logs.add_arguments(parser)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    names = [argv[0]] if argv and argv[0] in COMMANDS else list(COMMANDS)
    for name in names:
        module_name, _, attribute = COMMANDS[name].partition(":")
        module = importlib.import_module(module_name)
        module = getattr(module, attribute) if attribute else module
        sub = subparsers.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(sub)
        logs.add_arguments(sub, suppress_defaults=True)
        sub.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not getattr(args, "_module", None):
        parser.print_help()
        return EXIT_BAD_INPUT
    if args.quiet or args.verbose or logs.configured_level() is None:  # a nested main keeps the level
        logs.configure_from_args(args)
    try:
        return int(args._module.run(args) or 0)
    except (DataError, ConfigError) as exc:
        print(f"oppu {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OppuError as exc:
        print(f"oppu {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
