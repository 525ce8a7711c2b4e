"""The ``zodb-s3blobs`` command line: the operator tools, built on the storage.

This subpackage depends on the rest of ``zodb_s3blobs``; nothing outside it
imports from here. Each command lives in the module of its name, listed in
``COMMAND_MODULES`` (``gc`` here runs the collector of :mod:`zodb_s3blobs.gc`);
the module's ``register(subparsers)`` adds its parser and sets ``run`` (a
function taking the parsed arguments and returning an exit code) as that
parser's default. Beside them: ``target`` reads CONFIG, ``output`` prints
tables, JSON and progress, ``sources`` lists the blobs ``migrate`` uploads,
``localserver`` is the in-process S3 server of ``demo`` and the tests, and
``reference`` renders docs/cli.md.

``main`` turns failures into one line on stderr and an exit code: 0 success,
1 a problem found or a failed run, 2 bad usage or configuration (130 when
interrupted with Ctrl-C). With ``--json``, a failure is also printed as one
JSON document on stdout, so a script always gets one.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
import traceback
from collections.abc import Sequence
from typing import NoReturn

PROG = "zodb-s3blobs"
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

#: The logger --debug opens up: the whole package, storage and tools alike.
PACKAGE_LOGGER = __name__.rpartition(".")[0]

#: Modules of this subpackage that each define ``register(subparsers)``.
COMMAND_MODULES = (
    "demo",
    "init",
    "check",
    "migrate",
    "verify",
    "gc",
    "undelete",
    "cache",
)


class _BadUsage(Exception):
    """Raised instead of argparse's exit on a usage error, so that ``main``
    can also print it as JSON under ``--json``."""

    def __init__(self, parser: argparse.ArgumentParser, message: str) -> None:
        super().__init__(message)
        self.parser = parser
        self.message = message


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors reach ``main`` as exceptions
    (its subparsers are of the same class)."""

    def error(self, message: str) -> NoReturn:
        raise _BadUsage(self, message)


class CommandError(Exception):
    """A run failed for a reason the message fully explains (exit code 1)."""

    exit_code = EXIT_FAILED


class UsageError(CommandError):
    """The command line or the configuration is wrong (exit code 2)."""

    exit_code = EXIT_USAGE


def add_common_options(
    parser: argparse.ArgumentParser, default: object = argparse.SUPPRESS
) -> None:
    """Add the options accepted before and after the command name. Subparsers
    use ``argparse.SUPPRESS`` so they do not overwrite a value given before it."""
    parser.add_argument(
        "-v",
        "--debug",
        action="store_true",
        default=default,
        help="log debug messages and show the traceback of an error",
    )


def add_operator_options(parser: argparse.ArgumentParser) -> None:
    """Add what every command working on a deployment takes: CONFIG, --db and
    --json."""
    parser.add_argument(
        "config",
        metavar="CONFIG",
        help="a ZConfig file holding one <s3blobstorage> section (with "
        "%%import zodb_s3blobs), or a zope.conf",
    )
    parser.add_argument(
        "--db",
        metavar="NAME",
        help="the <zodb_db NAME> section of a zope.conf to use; may be left "
        "out when it has only one",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="print one JSON document on stdout instead of a table",
    )


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one subparser per command module."""
    parser = _Parser(
        prog=PROG,
        description="Tools for ZODB databases whose blobs are stored in S3.",
    )
    add_common_options(parser, default=False)
    subparsers = parser.add_subparsers(
        title="commands", dest="command", metavar="COMMAND", required=True
    )
    for name in COMMAND_MODULES:
        module = importlib.import_module(f"{__package__}.{name}")
        command = module.register(subparsers)
        add_common_options(command)
    return parser


def _configure_logging(debug: bool) -> None:
    """Show the package's debug messages with --debug, else warnings only."""
    logging.basicConfig(
        level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    if debug:
        logging.getLogger(PACKAGE_LOGGER).setLevel(logging.DEBUG)


def _report(exc: BaseException, args: argparse.Namespace) -> int:
    """Print *exc* as one line on stderr (after its traceback with --debug),
    and as a JSON document on stdout with --json; return the exit code."""
    from ..errors import S3BlobStorageError
    from ..redact import redact

    if args.debug:
        lines = traceback.format_exception(type(exc), exc, exc.__traceback__)
        print(redact("".join(lines)), end="", file=sys.stderr)
    if isinstance(exc, (CommandError, S3BlobStorageError)):
        message = str(exc)  # these messages name what failed and why
    else:
        message = f"{type(exc).__name__}: {exc}"
    message = redact(message)  # credentials the storage registered, signatures
    code = getattr(exc, "exit_code", EXIT_FAILED)
    print(f"{PROG}: error: {message}", file=sys.stderr)
    if getattr(args, "json", False):
        document = {"command": args.command, "ok": False, "error": message}
        print(json.dumps(document, indent=2))
    return code


def _command_named(argv: Sequence[str]) -> str | None:
    """The command *argv* names (``cache prune`` for a cache action), if any,
    for the JSON document of a usage error."""
    words = [word for word in argv if not word.startswith("-")]
    if not words or words[0] not in COMMAND_MODULES:
        return None
    if words[0] == "cache" and len(words) > 1 and words[1] in ("stats", "prune"):
        return f"cache {words[1]}"
    return words[0]


def _usage_error(exc: _BadUsage, argv: Sequence[str]) -> int:
    """Print a usage error as argparse does (usage, then the message) and,
    when ``--json`` was given, as a JSON document on stdout; return 2."""
    exc.parser.print_usage(sys.stderr)
    print(f"{exc.parser.prog}: error: {exc.message}", file=sys.stderr)
    if "--json" in argv:
        document = {"command": _command_named(argv), "ok": False, "error": exc.message}
        print(json.dumps(document, indent=2))
    return EXIT_USAGE


def main(argv: Sequence[str] | None = None) -> int:
    """Parse *argv* (default: ``sys.argv[1:]``), run the command, return its
    exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except _BadUsage as exc:
        return _usage_error(exc, argv)
    except SystemExit as exc:  # --help or --version printed
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    _configure_logging(args.debug)
    try:
        return args.run(args)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:
        return _report(exc, args)
