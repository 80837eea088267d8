"""The ``kvlab`` command: one thin module per verb (``add_parser`` + ``run``), each calling library
functions.

Exit codes: 0 success, 2 usage error (bad flag or impossible configuration; one line on
stderr), 1 failure (a file that cannot be read, a run that breaks).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from kvlab.cli import convert, eval, export, finetune, generate, info, plan, shrink, study, tasks, train
from kvlab.cli.common import UsageError
from kvlab.errors import ConfigError, KvlabError

VERBS = (info, plan, generate, eval, convert, shrink, train, study, finetune, tasks, export)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of argparse's usage dump
        raise UsageError(f"{self.prog}: {message} (see '{self.prog} --help')")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="kvlab", description="Transformer LMs with small, fast KV caches.")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", parser_class=_Parser)
    sub.required = True
    for verb in VERBS:
        verb.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        return args.func(args)
    except (UsageError, ConfigError) as e:
        print(f"error: {e}" if not str(e).startswith("kvlab") else str(e), file=sys.stderr)
        return 2
    except KvlabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
