from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pytest

import transcriptformer
import transcriptformer.scanpy as tfs

# snapshot and assert_unchanged are re-exported for tests written before helpers.py: import them from helpers
from helpers import DATA, REFERENCE, assert_unchanged, snapshot  # noqa: F401


@pytest.fixture(scope="session")
def tiny_path() -> Path:
    return tfs.datasets.tiny_model_path()


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
