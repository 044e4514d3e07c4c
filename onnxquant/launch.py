"""The `onnxquant` console script: Ctrl-C at any moment ends in one line, "interrupted", and exit 130.

Importing the commands (onnx, ONNX Runtime, numpy) takes a second or more, and an interrupt then would print a
raw KeyboardInterrupt traceback; so this module sets its handlers before it imports them. Until a command
starts, and again once it has returned (its outputs are committed, and the interpreter is shutting down),
SIGINT and SIGTERM end the process at once: there is nothing to undo. While the command runs, SIGINT raises
KeyboardInterrupt as usual and the CLI unwinds (staged outputs removed).

Run as `python -m onnxquant.launch`, or through the `onnxquant` entry point that setup.cfg names.
"""

from __future__ import annotations

import os
import signal
import sys


def exit_at_once(signum, _frame) -> None:
    """Nothing is staged: say so in one line and end with the shell's code for the signal."""
    sys.stderr.write("\ninterrupted\n" if sys.stderr.isatty() else "interrupted\n")
    sys.stderr.flush()
    os._exit(128 + signum)


def between_commands() -> None:
    signal.signal(signal.SIGINT, exit_at_once)
    signal.signal(signal.SIGTERM, exit_at_once)


between_commands()

from onnxquant import cli  # after the handlers: an interrupt while importing is one line


def main() -> None:
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        cli.main()
    finally:
        sys.stdout.flush()
        between_commands()


if __name__ == "__main__":
    main()
