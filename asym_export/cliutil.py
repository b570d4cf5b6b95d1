"""What the three command-line tools (asym-export, asym-parity, asym-bench) share: exit codes,
one-line usage errors, and help text built from the registries the code itself uses (graphs,
variants, backends), so help can never list what the code does not accept."""

from __future__ import annotations

import argparse

from asym_runtime.specs import GRAPHS

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
