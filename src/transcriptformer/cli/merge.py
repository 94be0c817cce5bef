"""``transcriptformer merge``: assemble a resumable run's shards into one output.

``transcriptformer inference --resumable`` merges automatically when its last shard is written; this command
does it by hand (e.g. after a run whose processes were stopped after the last shard but before the merge, or
into another file). It refuses while a shard is missing, naming the rows, and checks that every shard belongs
to the folder's run. The output is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from ._common import CLIError

logger = logging.getLogger("transcriptformer")

__all__ = ["add_parser", "run"]


def add_parser(sub: Any) -> None:
    """Add ``merge`` to the sub-commands."""
    p = sub.add_parser(
        "merge",
        help="merge the shards of a resumable run into one output",
        description="Assemble the shards of `transcriptformer inference --resumable` (a <output>.shards folder) "
        "into one .h5ad file or .zarr store whose rows are the input's cells in input order.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("shards", help="the shard folder (<output>.shards)")
    p.add_argument("--output", default=None, help="the merged file (.h5ad or .zarr); default: the run's output")
    p.add_argument("--keep-shards", action="store_true", help="keep the shard folder after the merge")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> Path:
    """Run the ``merge`` command; returns the output path."""
    from ..inference.shards import ShardStore  # lazily: numpy and pandas (start-up time)

    output = args.output
    if output is not None and Path(output).suffix not in (".h5ad", ".zarr"):
        raise CLIError(f"--output {output!r}: the merged output is an .h5ad file or a .zarr store.")
    store = ShardStore.open(args.shards)
    pending = store.pending()
    if pending:
        raise CLIError(store.missing_message(pending))
    path = store.merge(output, keep=args.keep_shards, progress=False if args.no_progress else None)
    logger.info("wrote %s (%s cells from %d shards)", path, f"{store.n_obs:,}", store.n_shards)
    print(path)
    return path
