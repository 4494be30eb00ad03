"""The `advmoe` command. Each sub-command is a module of cli/ (`add_arguments`, `run`), a thin
wrapper over a function of an application (training, evaluation, export, serving, clients,
benchmarks, studies) that tests call directly; this module only dispatches. It sits above the
applications, as BentoML's `bentoml_cli` sits beside `bentoml`: the model core imports none of this."""
from __future__ import annotations

import argparse
import sys

from . import bench, evaluate, export, loadtest, models, predict, serve, study, train

COMMANDS = {"models": models, "train": train, "eval": evaluate, "export": export, "serve": serve,
            "predict": predict, "loadtest": loadtest, "bench": bench, "study": study}


class Parser(argparse.ArgumentParser):
    """argparse, with a usage error in one line that says where the help is (not the whole usage)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="advmoe", description="Robust Mixture-of-Experts CNNs (AdvMoE).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)
    for name, command in COMMANDS.items():
        sub_parser = sub.add_parser(name, help=command.HELP, description=getattr(command, "DESCRIPTION", command.HELP))
        command.add_arguments(sub_parser)
        sub_parser.set_defaults(func=command.run)
    return parser


def exit_code(e: SystemExit) -> int:
    """The status `sys.exit(code)` would give the shell: None is 0, a message is printed and 1."""
    if e.code is None or isinstance(e.code, int):
        return e.code or 0
    print(e.code, file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # a usage error (2) or --help (0): callers get the code, as from a command
        return exit_code(e)
    try:
        return args.func(args)
    except SystemExit as e:  # a benchmark's or a study's own parser: its --help (0) or usage error (2)
        return exit_code(e)
    # A user's mistake is one line; anything else (TypeError included) is a bug and keeps its traceback.
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"advmoe {args.command}: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # e.g. an export whose parity check failed: nothing was written
        print(f"advmoe {args.command}: failed: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
