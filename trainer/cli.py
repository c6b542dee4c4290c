"""The ``sodkern`` command: ``sodkern SUBCOMMAND ...``; each subcommand owns its own options.

What every command shares lives here too: :func:`configure_logging` (the one ``sodkern`` logger, set up once
per command, writing timestamped lines to stdout, so progress shows in a log file — ``sodkern demo > demo.log``
— as well as in a terminal)
and :func:`exit_on_user_error` (a mistake the user can fix, :class:`UserError`, is one line on stderr and exit
status 2; ``--debug`` or ``SODKERN_DEBUG=1`` shows the traceback instead).
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from collections.abc import Callable

# subcommand -> (module with a ``main(argv)`` function, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "sandbox": ("sodkern.trainer.sandbox.cli", "run a Python file in the code-interpreter sandbox"),
    "eval": ("sodkern.trainer.eval", "evaluate a model on parquet/JSONL data: average@k, pass@k, maj@k"),
    "train": ("sodkern.trainer.train", "train (sft | grpo | opd | sod | opsd_gt | opsd_hint) in one process"),
    "demo": ("sodkern.trainer.demo.demo", "the whole SOD story on CPU: teacher, student, GRPO vs OPD vs SOD, plots"),
    "plot": ("sodkern.trainer.plot", "plot training curves and SOD step-weight patterns from a run folder"),
}

DEBUG_ENV = "SODKERN_DEBUG"


class UserError(Exception):
    """A mistake the user can fix (a missing file, an unknown config key, a bad value): the message is one line
    naming what is wrong and the fix."""


def debug_enabled(flag: bool = False) -> bool:
    """``--debug`` was given or ``SODKERN_DEBUG`` is set to something other than ``0`` / empty."""
    return flag or os.environ.get(DEBUG_ENV, "") not in ("", "0", "false", "no")


def configure_logging(debug: bool = False) -> logging.Logger:
    """Set up the ``sodkern`` logger once: INFO (DEBUG with ``debug``) lines with a timestamp on stdout (errors
    a user can fix go to stderr: :func:`exit_on_user_error`).

    Library code logs to ``logging.getLogger("sodkern")`` or a child (``sodkern.train``, ...); a command calls
    this once at its start. Calling it again only updates the level.
    """
    logger = logging.getLogger("sodkern")
    logger.setLevel(logging.DEBUG if debug else logging.INFO)
    if not any(isinstance(h, _StdoutHandler) for h in logger.handlers):
        handler = _StdoutHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s sodkern %(levelname)s %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
    return logger


class _StdoutHandler(logging.StreamHandler):
    """A line per record to whatever ``sys.stdout`` is at the time (flushed: visible at once under nohup, tee,
    CI), so a replaced stdout (a test's capture, rich's live progress display, a notebook) is followed."""

    def __init__(self) -> None:
        super().__init__(sys.stdout)

    @property
    def stream(self):  # noqa: ANN201 (logging.StreamHandler's attribute)
        return sys.stdout

    @stream.setter
    def stream(self, value) -> None:  # noqa: ANN001
        pass


def exit_on_user_error(prog: str, run: Callable[[], int], *, debug: bool) -> int:
    """``run()``'s exit status; a :class:`UserError` becomes ``PROG: error: MESSAGE`` on stderr (on rank 0 only
    under torchrun) and exit status 2, or its traceback with ``debug``."""
    try:
        return run()
    except UserError as e:
        if debug:
            raise
        if os.environ.get("RANK", "0") == "0":
            message = " ".join(str(e).split("\n"))
            print(f"{prog}: error: {message} (--debug or {DEBUG_ENV}=1 for the traceback)", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    missing = missing_train_modules()
    if missing:  # `pip install sodkern` alone has the ops, not the commands
        extra = 'pip install "sodkern[train]"'
        print(f"sodkern: the commands need the [train] extra (missing {', '.join(missing)}): {extra}", file=sys.stderr)
        return 2
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SUBCOMMANDS:
        print("usage: sodkern {" + ",".join(SUBCOMMANDS) + "} ...\n")
        for name, (_, help_) in SUBCOMMANDS.items():
            print(f"  {name:<10} {help_}")
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nsodkern: error: unknown command {argv[0]!r}", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(SUBCOMMANDS[argv[0]][0])
    return int(module.main(argv[1:]) or 0)


# What the commands import beyond the core ops (the ``[train]`` extra), as top-level module names.
TRAIN_MODULES = ("transformers", "tokenizers", "safetensors", "pyarrow", "yaml", "math_verify", "tqdm", "rich")


def missing_train_modules() -> list[str]:
    """The ``[train]`` extra's modules that cannot be imported here."""
    import importlib.util

    missing = []
    for name in TRAIN_MODULES:
        try:
            found = importlib.util.find_spec(name) is not None
        except ValueError:  # sys.modules[name] is None: the import is blocked
            found = False
        if not found:
            missing.append(name)
    return missing


if __name__ == "__main__":
    raise SystemExit(main())
