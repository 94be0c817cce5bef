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
from helpers import (  # noqa: F401
    DATA,
    PROXY_VARIABLES,
    REFERENCE,
    RegistryServer,
    assert_unchanged,
    checkpoint_entries,
    snapshot,
    tar_bytes,
    tar_dir,
    tar_file,
)


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


@pytest.fixture(scope="session")
def ref_embedding(tiny_path) -> tuple[np.ndarray, np.ndarray]:
    """``(embeddings, llh)`` of the tiny data with the tiny model (the defaults of ``tl.embed``)."""
    a = tfs.datasets.tiny_human()
    tfs.tl.embed(a, model=tiny_path, llh=True)
    return a.obsm["X_transcriptformer"], a.obs["transcriptformer_llh"].to_numpy()


@pytest.fixture(scope="session")
def _embedded_once(tiny_path) -> ad.AnnData:
    adata = tfs.datasets.tiny_human()
    tfs.tl.embed(adata, model=tiny_path, llh=True)
    return adata


@pytest.fixture
def embedded(_embedded_once) -> ad.AnnData:
    """The tiny data embedded (with llh) once per session; each test gets its own copy."""
    return _embedded_once.copy()


@pytest.fixture
def h5ad(tmp_path, tiny_adata) -> Path:
    """The tiny data written to ``tmp_path / "cells.h5ad"``."""
    path = tmp_path / "cells.h5ad"
    tiny_adata.write_h5ad(path)
    return path


@pytest.fixture
def no_model_load(monkeypatch) -> list:
    """Records every attempt to load a model (and refuses it): the checks under test must come before.

    Every module that binds ``load_model`` at import is imported first (so that none keeps the refusing stand-in
    after the test) and patched.
    """
    from transcriptformer.scanpy.tl import _common
    from transcriptformer.training import fit, objective
    from transcriptformer.weights import checkpoint

    calls: list = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise AssertionError("a model was loaded")

    for module in (checkpoint, _common, tfs.pp, fit, objective):
        monkeypatch.setattr(module, "load_model", refuse)
    monkeypatch.setattr(checkpoint, "build_model", refuse)
    return calls


# -- registry downloads, offline: tarballs of the tiny checkpoint served on 127.0.0.1 ---------------------------


@pytest.fixture
def registry_offline(monkeypatch, tmp_path_factory):
    """Never the user's cache or a proxy; the registry's hosts unreachable; no model kept in memory across tests."""
    for var in PROXY_VARIABLES:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("TRANSCRIPTFORMER_CACHE", str(tmp_path_factory.mktemp("env-cache")))
    monkeypatch.setenv("TRANSCRIPTFORMER_BASE_URL", "http://127.0.0.1:9/unreachable/")
    monkeypatch.setenv("TRANSCRIPTFORMER_DATA_URL", "http://127.0.0.1:9/unreachable/")
    transcriptformer.clear_cache()
    yield
    transcriptformer.clear_cache()


@pytest.fixture(scope="session")
def registry_tarballs() -> dict[str, bytes]:
    """``<folder>.tar.gz`` -> bytes, for ``tf-sapiens`` and ``all-embeddings``."""
    tiny = tfs.models.path("tf-tiny")
    embeddings = [
        tar_file(f"all_embeddings/{sp}_gene.h5", (tiny / "vocabs" / f"{sp}_gene.h5").read_bytes())
        for sp in ("homo_sapiens", "mus_musculus")
    ]
    return {
        "tf_sapiens.tar.gz": tar_bytes(checkpoint_entries()),
        "all_embeddings.tar.gz": tar_bytes([tar_dir("all_embeddings"), *embeddings]),
    }


@pytest.fixture
def registry_server(registry_offline, registry_tarballs, monkeypatch):
    """A :class:`~helpers.RegistryServer` of ``registry_tarballs``; ``TRANSCRIPTFORMER_BASE_URL`` points at it."""
    with RegistryServer(registry_tarballs) as server:
        monkeypatch.setenv("TRANSCRIPTFORMER_BASE_URL", server.url)
        yield server
