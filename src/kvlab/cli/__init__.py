"""The ``kvlab`` command: one thin module per verb (``add_parser`` + ``run``), each calling library
functions.

Exit codes: 0 success, 2 usage error (bad flag, impossible configuration, an output path that holds
something else; one line on stderr), 1 failure (a file that cannot be read or written, a run that
breaks, a bug), 130 interrupted (Ctrl-C: where it stopped and how to resume), 141 stdout closed
(``kvlab ... | head``: quietly). No error prints a traceback unless ``kvlab --debug`` or
``KVLAB_DEBUG=1``.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Sequence

from kvlab.cli import convert, eval, export, finetune, generate, info, plan, serve, shrink, study, tasks, train
from kvlab.cli.common import UsageError
from kvlab.errors import ConfigError, Interrupted, KvlabError

VERBS = (info, plan, generate, serve, eval, convert, shrink, train, study, finetune, tasks, export)
RESUMABLE_VERBS = ("train", "finetune", "shrink")        # the verbs with --resume


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of argparse's usage dump
        raise UsageError(f"{self.prog}: {message} (see '{self.prog} --help')")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="kvlab", description="Transformer LMs with small, fast KV caches.")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error (or KVLAB_DEBUG=1)")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", parser_class=_Parser)
    sub.required = True
    for verb in VERBS:
        verb.add_parser(sub)
    return parser


def _debug(argv: Sequence[str]) -> bool:
    return os.environ.get("KVLAB_DEBUG", "") not in ("", "0") or "--debug" in argv[:1]


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _os_error(e: OSError) -> str:
    where = f"{e.filename}" + (f" -> {e.filename2}" if e.filename2 else "") if e.filename else ""
    reason = e.strerror or type(e).__name__
    hints = {13: "check its permissions or choose another path", 28: "free some space or choose another disk",
             30: "the file system is read-only: choose another path", 20: "a part of the path is a file, not a "
             "directory", 21: "it is a directory where a file is expected", 36: "shorten the path",
             2: "check the path"}
    hint = hints.get(e.errno or 0)
    return f"error: {where + ': ' if where else ''}{reason}" + (f" ({hint})" if hint else "")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    import signal

    if getattr(signal.getsignal(signal.SIGINT), "__name__", "") == "_stopped_while_starting":
        signal.signal(signal.SIGINT, signal.default_int_handler)    # from here on main reports a Ctrl-C
    debug = _debug(argv)
    # Input that is accepted but probably wrong (a prompt past the model's context...): one line.
    formatwarning = warnings.formatwarning
    warnings.formatwarning = lambda message, category, *a, **k: f"warning: {message}\n"
    try:
        return _run(argv, debug)
    finally:
        warnings.formatwarning = formatwarning


def _run(argv: list[str], debug: bool) -> int:
    parser = build_parser()
    args = None
    try:
        args = parser.parse_args(argv)
        code = args.func(args)
        sys.stdout.flush()          # a closed pipe shows here, inside the handlers below, not at exit
        return code
    except (UsageError, ConfigError) as e:
        if debug:
            raise
        _say(f"error: {e}" if not str(e).startswith("kvlab") else str(e))
        return 2
    except Interrupted as e:
        resumable = getattr(args, "verb", None) in RESUMABLE_VERBS
        how = ("; the same command with --resume continues from it" if e.resumable and resumable else
               "; run it again to start over")
        _say(f"stopped: {e}{how}")
        return 130
    except KvlabError as e:
        if debug:
            raise
        _say(f"error: {e}")
        return 1
    except KeyboardInterrupt:
        _say("stopped (Ctrl-C)")
        return 130
    except BrokenPipeError:
        # The reader went away (kvlab ... | head): say nothing; keep Python's exit-time flush quiet too.
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except OSError:
            pass
        return 141
    except OSError as e:
        if debug:
            raise
        _say(_os_error(e))
        return 1
    except MemoryError:
        if debug:
            raise
        _say("error: out of memory (try a smaller --batch-size, --seq-len or model, or a machine with more memory)")
        return 1
    except Exception as e:  # a bug: one line, the traceback on request
        if debug:
            raise
        _say(f"error: internal error ({type(e).__name__}: {str(e)[:300]}); this is a bug in kvlab — rerun with "
             f"--debug (or KVLAB_DEBUG=1) for the traceback and report it")
        return 1


if __name__ == "__main__":
    sys.exit(main())
