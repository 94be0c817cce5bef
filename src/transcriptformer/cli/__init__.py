"""The ``transcriptformer`` command line, compatible with the published tool.

Sub-commands, one module each: ``download`` (:mod:`.download`), ``inference`` (:mod:`.inference`), ``merge``
(:mod:`.merge`, the shards of a resumable run), ``finetune`` and ``train`` (:mod:`.training`); what they share is
:mod:`._common`. They accept the published tool's flags and write its output layout. The library's advice in errors
and warnings is given in the command's flags (:func:`in_flags`). An error, Ctrl-C or SIGTERM removes any temporary
output (the finished shards of a resumable run are kept). The modules import only the standard library until a
command runs (the heavy imports inside the ``run`` functions are for start-up time), so ``--help`` and ``--version``
are instant.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import re
import signal
import sys
import threading
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

from .._meta import __version__
from ..data import discover
from ..errors import TranscriptFormerWarning
from . import download, inference, merge, training

logger = logging.getLogger("transcriptformer")

__all__ = ["main"]


#: How the library's error messages name the options of reading the data, and the flags that set them in every
#: command that reads data (``inference``, ``finetune``, ``train``).
_DATA_FLAG_NAMES = {
    "gene_key=None to use var_names": "--gene-col-name var_names to use var_names",
    "layer='raw' but adata.raw is None; pass layer='X' or the name of a layer of counts.": (
        "--use-raw True but the file has no .raw; pass --use-raw False (counts in X) or auto."
    ),
    "gene_key=<": "--gene-col-name <",
    "duplicate_genes='first'": "--remove-duplicate-genes",
    "layer=<layer of raw counts> (or 'raw')": "an input with raw counts in X or .raw (--use-raw)",
    "layer=<layer of raw counts>": "an input with raw counts in X or .raw (--use-raw)",
}

#: The same for the options of ``finetune`` and ``train``.
_TRAINING_FLAG_NAMES = {
    "pass resume=True to continue it": "pass --resume to continue it",
    "resume=True but": "--resume but",
    "start without resume": "start without --resume",
    "pass another output_dir": "pass another --output-dir",
    "pass a writable output_dir": "pass a writable --output-dir",
    "lower learning_rate": "lower --learning-rate",
    "clip the gradients (grad_clip)": "clip the gradients (--grad-clip)",
    "lower lora_r": "lower --lora-r",
}

#: Each command's rewriting: only its own flags are named (a command without a flag keeps the library's words).
_FLAG_NAMES = {
    "inference": _DATA_FLAG_NAMES,
    "finetune": {**_DATA_FLAG_NAMES, **_TRAINING_FLAG_NAMES},
    "train": {**_DATA_FLAG_NAMES, **_TRAINING_FLAG_NAMES},
}


def build_parser() -> argparse.ArgumentParser:
    """The ``transcriptformer`` parser with every sub-command."""
    parser = argparse.ArgumentParser(
        prog="transcriptformer",
        description="TranscriptFormer single-cell foundation models: download weights and run inference.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log details and show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="{download,download-data,inference,merge,finetune,train}")
    download.add_parser(sub)
    data = sub.add_parser(
        "download-data",
        help="download CELLxGENE Discover datasets by species",
        description="Download the public CELLxGENE Discover datasets (h5ad) of one or more species, in parallel.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    discover.add_arguments(data)
    inference.add_parser(sub)
    merge.add_parser(sub)
    training.add_parsers(sub)
    for command in sub.choices.values():  # -v also after the sub-command (default: what the main parser says)
        command.add_argument(
            "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="as transcriptformer -v"
        )
    return parser


#: Advice with arguments, in the command line's words (the commands that have ``--adapter``).
_FLAG_PATTERNS = [
    (
        re.compile(r"model=\(base, '([^']*)'\) \(or load_model\(base, adapter=\.\.\.\)\)"),
        r"--checkpoint-path BASE --adapter \1",
    ),
]
_COMMAND_PATTERNS = {"inference": _FLAG_PATTERNS, "finetune": _FLAG_PATTERNS, "train": _FLAG_PATTERNS}


class _Terminated(BaseException):
    """SIGTERM arrived (SLURM, containers and ``kill`` send it): unwinds like Ctrl-C, removing temporary files."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise _Terminated


def in_flags(message: str, command: str) -> str:
    """The library's advice in ``message``, in the words of ``command``'s flags (only flags it has)."""
    for api, flag in _FLAG_NAMES.get(command, {}).items():
        message = message.replace(api, flag)
    for pattern, flag in _COMMAND_PATTERNS.get(command, []):
        message = pattern.sub(flag, message)
    return message


@contextlib.contextmanager
def _warnings_in_flags(command: str) -> Iterator[None]:
    """While ``command`` runs, the package's warnings give their advice in its flags' words (as its errors do)."""
    previous = warnings.showwarning

    def show(message: Warning | str, category: type[Warning], filename: str, lineno: int, file=None, line=None):
        if issubclass(category, TranscriptFormerWarning):
            text = in_flags(str(message), command)
            if text != str(message):
                message = category(text)
        previous(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    try:
        yield
    finally:
        if warnings.showwarning is show:  # not replaced meanwhile by someone else
            warnings.showwarning = previous


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``transcriptformer`` command.

    Returns 0 on success, 1 on an error (one line on stderr, or a traceback with ``--verbose``), 2 for a usage
    error, 130 on Ctrl-C and 143 on SIGTERM; the last two remove any temporary output first.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    # quiet by default (warnings and errors); -v: progress messages, timestamps and tracebacks
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(message)s" if args.verbose else "%(message)s",
    )
    logging.getLogger("transcriptformer").setLevel(logging.INFO if args.verbose else logging.WARNING)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        runners = {
            "download": download.run,
            "download-data": discover.run,
            "inference": inference.run,
            "merge": merge.run,
            "finetune": training.run_finetune,
            "train": training.run_train,
        }
        with _warnings_in_flags(args.command):
            status = runners[args.command](args)
    except KeyboardInterrupt:
        print("transcriptformer: interrupted", file=sys.stderr)
        return 130
    except _Terminated:
        print("transcriptformer: terminated (SIGTERM); temporary files removed", file=sys.stderr)
        return 143
    except Exception as e:
        if args.verbose:
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if isinstance(e, KeyError):
            msg = msg.strip("\"'")
        msg = in_flags(msg, args.command)  # the library's advice, in the words of this command's flags
        print(f"transcriptformer: error: {msg}", file=sys.stderr)
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return status if isinstance(status, int) else 0  # a command that returns an exit status (download-data)


if __name__ == "__main__":  # pragma: no cover - `python -m transcriptformer.cli`
    sys.exit(main())
