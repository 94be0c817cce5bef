from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import torch

import transcriptformer
import transcriptformer.scanpy as tfs

# snapshot and assert_unchanged are re-exported for tests written before helpers.py: import them from helpers
from helpers import DATA, REFERENCE, assert_unchanged, snapshot  # noqa: F401


def pytest_configure(config):
    # The tests run a model of width 32 on tens of cells: a second intra-op thread only adds a barrier to
    # every small op, and on a loaded 2-core machine each barrier waits for a time slice (3x slower suite).
    # OMP_NUM_THREADS, when set, decides instead. Subprocesses (torchrun, the memory test) are not affected.
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Keep the one intra-op thread of ``pytest_configure``: numba (scanpy's UMAP) sets the OpenMP thread count,
    which torch shares, back to the number of cores, and every later test ran up to 20x slower."""
    if "OMP_NUM_THREADS" not in os.environ and torch.get_num_threads() != 1:
        torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def _cache_outside_home(tmp_path_factory):
    """Loading a checkpoint records its hash in the cache: keep the tests out of the user's cache."""
    patch = pytest.MonkeyPatch()
    patch.setenv("TRANSCRIPTFORMER_CACHE", str(tmp_path_factory.mktemp("transcriptformer-cache")))
    yield
    patch.undo()


@pytest.fixture(scope="session")
def tiny_path() -> Path:
    return tfs.models.path("tf-tiny")


@pytest.fixture(scope="session")
def tiny_model(tiny_path):
    return transcriptformer.load_model(tiny_path)


@pytest.fixture
def tiny_adata() -> ad.AnnData:
    return tfs.datasets.tiny_human()


@pytest.fixture
def tiny_raw_adata() -> ad.AnnData:
    return ad.read_h5ad(DATA / "tiny_human_raw.h5ad")


@pytest.fixture(scope="session")
def stages() -> dict[str, np.ndarray]:
    with np.load(REFERENCE / "stages_human.npz") as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="session")
def reference():
    return {
        name: ad.read_h5ad(REFERENCE / f"human_{name}.h5ad") for name in ("cell", "llh", "gene_llh", "cge", "raw_cell")
    }


@pytest.fixture
def cli(capsys):
    """``cli(*args)`` runs ``transcriptformer ARGS`` in this process: a CompletedProcess (code, stdout, stderr).

    ``check=True`` raises on a non-zero exit status. argparse's exits (``--help``, ``--version``,
    usage errors) become the exit status, as in a process. The root logger starts without handlers, as in
    a new process, so ``main``'s ``logging.basicConfig`` sends log records to the captured stderr (a
    traceback logged there shows in ``stderr``); the logging configuration is restored afterwards.
    """
    from transcriptformer.cli import main

    def run(*args, check: bool = True) -> subprocess.CompletedProcess:
        argv = [str(a) for a in args]
        root, ours = logging.getLogger(), logging.getLogger("transcriptformer")
        saved = (list(root.handlers), root.level, ours.level)
        capsys.readouterr()
        root.handlers[:] = []
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        finally:
            root.handlers[:] = saved[0]
            root.setLevel(saved[1])
            ours.setLevel(saved[2])
        out, err = capsys.readouterr()
        proc = subprocess.CompletedProcess(["transcriptformer", *argv], code, out, err)
        if check and code != 0:
            raise AssertionError(f"exit {code}\nstdout:\n{out}\nstderr:\n{err}")
        return proc

    return run
