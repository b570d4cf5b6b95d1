"""What every command-line tool shares (asym-export, asym-parity, asym-bench on the export side;
asym-serve, asym-triton-repo on the runtime side): exit codes, one-line usage errors, the
unexpected-error and Ctrl-C convention, and help text built from the registries the code itself
uses (graphs, variants, backends), so help can never list what the code does not accept. It lives
in the runtime so the runtime's tools need nothing of the export side (and no torch)."""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from .specs import GRAPHS

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a usage error in one line (no usage dump) and exits with 2."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def parse(parser: argparse.ArgumentParser, argv):
    """``parser.parse_args(argv)``, or the exit code argparse would exit with (2 after its one-line
    error, 0 after --help), so every ``main()`` returns its code instead of raising."""
    try:
        return parser.parse_args(argv), None
    except SystemExit as e:
        return None, (e.code if isinstance(e.code, int) else EXIT_USAGE)


def graph_lines(indent: str = "  ") -> str:
    """One line per graph of the contract: file name and what it computes."""
    width = max(len(g.file_name()) for g in GRAPHS.values())
    return "\n".join(f"{indent}{g.file_name().ljust(width)}  {', '.join(g.input_names)} -> {', '.join(g.output_names)}"
                     for g in GRAPHS.values())


def exit_codes(ok: str, failed: str, usage: str) -> str:
    return f"exit codes: {EXIT_OK} {ok}; {EXIT_FAILED} {failed}; {EXIT_USAGE} {usage}."


def add_debug(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true", help="show the traceback of an unexpected error")


def guarded(prog: str, debug: bool, body: Callable[[], int], interrupted: str = "interrupted") -> int:
    """Run a tool's body under the shared convention: an error the body did not expect is one
    line on stderr and exit 1 (its traceback with ``--debug``); Ctrl-C is exit 130 after
    ``prog: interrupted`` (the tool may say more)."""
    try:
        return body()
    except KeyboardInterrupt:
        print(f"{prog}: {interrupted}", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the convention: one line, never a traceback unasked
        if debug:
            raise
        print(f"{prog}: unexpected error: {type(e).__name__}: {e} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return EXIT_FAILED
