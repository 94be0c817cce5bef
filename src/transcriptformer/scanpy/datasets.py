"""Example and published data (``tfs.datasets``), as scanpy's ``sc.datasets``: cells, not models.

Real cells ship with the package (:func:`mouse_val`, :func:`pbmc68k_counts` from scanpy's bundled PBMCs) or are
downloaded once and verified (:func:`published_test_data`, :func:`bgee_testis_evolution`,
:func:`tabula_sapiens`); CELLxGENE Discover datasets by species are ``transcriptformer download-data``
(:func:`transcriptformer.data.discover.download_data`). Models are in :mod:`transcriptformer.scanpy.models`.
"""

from __future__ import annotations

import logging
import os
from importlib.resources import files
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..data.discover import tabula_sapiens
from ..weights import registry
from . import models
from ._utils import deprecated_argument
from .pp import symbols_to_ensembl

__all__ = [
    "bgee_testis_evolution",
    "mouse_val",
    "pbmc68k_counts",
    "published_test_data",
    "tabula_sapiens",
    "tiny_human",
]

#: Deprecated names, still importable (each warns): not in ``__all__`` and not listed by ``dir()``.
_DEPRECATED = ("available_models", "demo_model_path", "download", "species_testis", "tiny_model_path")

logger = logging.getLogger(__name__)

#: largest distance from an integer accepted when recovering counts from a log-normalised matrix
COUNT_TOLERANCE = 0.25


def mouse_val() -> ad.AnnData:
    """1,000 real mouse brain cells measured by MERFISH (1,122 genes), bundled with the package.

    The published TranscriptFormer repository's test file ``test/data/mouse_val.h5ad`` (a subset of a
    CELLxGENE dataset): raw counts in ``X``, ``var["ensembl_id"]`` (Ensembl mouse ids) and
    ``var["feature_name"]`` (symbols), ``obs["cell_type"]`` (21 Cell Ontology labels: glutamatergic and
    GABAergic neurons, oligodendrocytes, astrocytes, endothelial cells, microglia, ...) and
    ``obs["assay"] == "MERFISH"``. The file is checked against the sha256 the registry pins for it.
    """
    return ad.read_h5ad(registry.fetch_dataset("mouse-val"))


def published_test_data(
    species: str = "human", *, cache_dir: str | os.PathLike | None = None, progress: bool = True
) -> ad.AnnData:
    """The published TranscriptFormer repository's validation cells of one species (downloaded once).

    ``"human"``, ``"mouse"`` (bundled: no download; the same as :func:`mouse_val`) or ``"chicken"``: the files
    ``test/data/<species>_val.h5ad`` of github.com/czi-ai/transcriptformer at the commit that added them. Each
    download is checked against the file's git blob id (a content pin published by the repository) and its
    sha256 recorded (see :func:`transcriptformer.weights.registry.fetch_dataset`).
    """
    if species not in ("human", "mouse", "chicken"):
        raise ValueError(f"species={species!r}; expected 'human', 'mouse' or 'chicken'.")
    return ad.read_h5ad(registry.fetch_dataset(f"{species}-val", cache_dir=cache_dir, progress=progress))


def bgee_testis_evolution(
    organism: str = "macaque",
    *,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    backed: bool = False,
) -> ad.AnnData:
    """Testis cells of one of nine species (Murat et al. 2023), as the published cross-species notebook uses.

    The published tool's name for these data. ``organism``: ``"human"``, ``"chimpanzee"``, ``"gorilla"``,
    ``"macaque"``, ``"marmoset"``, ``"mouse"``, ``"opossum"``, ``"platypus"`` or ``"chicken"``. Downloaded once
    from the public benchmark bucket (no checksum is published: the sha256 of the first download is recorded
    and later downloads must match it). ``backed=True`` opens the file backed (read in windows by the tools).
    """
    name = f"testis-{organism}"
    if name not in registry.REGISTRY:
        known = sorted(n.removeprefix("testis-") for n in registry.DATASET_NAMES if n.startswith("testis-"))
        raise ValueError(f"organism={organism!r}; expected one of {', '.join(known)}.")
    path = registry.fetch_dataset(name, cache_dir=cache_dir, progress=progress)
    return ad.read_h5ad(path, backed="r" if backed else None)


def species_testis(organism: str = "macaque", **kwargs: Any) -> ad.AnnData:
    """Deprecated name of :func:`bgee_testis_evolution`."""
    deprecated_argument("datasets.species_testis(...)", "datasets.bgee_testis_evolution(...)")
    return bgee_testis_evolution(organism, **kwargs)


def demo_model_path() -> Path:
    """Deprecated: ``tfs.models.path("tf-demo")`` (model paths are in :mod:`~transcriptformer.scanpy.models`)."""
    deprecated_argument("datasets.demo_model_path()", "tfs.models.path('tf-demo') (or model='tf-demo')")
    return models.path("tf-demo")


def tiny_model_path() -> Path:
    """Deprecated: ``tfs.models.path("tf-tiny")`` (model paths are in :mod:`~transcriptformer.scanpy.models`)."""
    deprecated_argument("datasets.tiny_model_path()", "tfs.models.path('tf-tiny') (or model='tf-tiny')")
    return models.path("tf-tiny")


def available_models(cache_dir: str | os.PathLike | None = None) -> pd.DataFrame:
    """Deprecated: ``tfs.models.available()``."""
    deprecated_argument("datasets.available_models()", "tfs.models.available()")
    return models.available(cache_dir)


def download(name: str, **kwargs: Any) -> Path:
    """Deprecated: ``tfs.models.download(name)``."""
    deprecated_argument("datasets.download(name)", "tfs.models.download(name)")
    return models.download(name, **kwargs)


def tiny_human() -> ad.AnnData:
    """21 cells x 205 genes of synthetic human counts matching :func:`tiny_model_path`.

    ``var["ensembl_id"]`` holds Ensembl ids (some with version suffixes, some mouse, some in no
    vocabulary), ``obs["assay"]`` assay labels, ``obs["cell_type"]`` a label.
    """
    return ad.read_h5ad(Path(str(files("transcriptformer") / "_data" / "tiny_human.h5ad")))


def pbmc68k_counts() -> ad.AnnData:
    """700 PBMCs x 765 genes with integer counts, Ensembl ids and cell-type labels, offline.

    Built from scanpy's bundled :func:`scanpy.datasets.pbmc68k_reduced` (a subsample of the 68k PBMCs of
    Zheng et al. 2017, 10x Genomics "Fresh 68k PBMCs (Donor A)"). Its ``raw.X`` is
    ``log1p(counts / n_counts * 1e4)`` rounded to three decimals, so the counts are recovered as
    ``rint(expm1(raw.X) * n_counts / 1e4)``; before rounding every value is checked to lie within
    :data:`COUNT_TOLERANCE` (0.25) of an integer, and the largest deviation is stored (0.082 with
    scanpy 1.11: the three-decimal rounding of the log values, which grows with the count).

    Returns
    -------
    anndata.AnnData
        A new object (scanpy's is not modified) with

        ``X``
            CSR float32 integer counts (raw-count semantics) of the 765 genes kept in ``pbmc68k_reduced``
            only, so per-cell totals are 11-28% (mean 20%) of the original library sizes.
        ``var_names``
            Gene symbols (an hg19-era annotation).
        ``var["ensembl_id"]``
            From :func:`transcriptformer.scanpy.pp.symbols_to_ensembl` (``species="homo_sapiens"``); ``None``
            for the 67 genes whose symbol is retired (65, e.g. ``IGJ``) or ambiguous (``HLA-DPA1``,
            ``HLA-DPB1``). They are kept: TranscriptFormer leaves unknown ids out as out of vocabulary.
        ``obs``
            ``bulk_labels`` (cell types from the sorted populations), ``louvain``, ``n_genes`` and
            ``n_counts_all_genes`` (detected genes and counts over all genes of the original matrix), and
            ``assay = "10x 3' v1"`` (the CELLxGENE label of EFO:0009901): the 10x dataset was made with
            Chromium Single Cell 3' v1 reagents and Cell Ranger 1.1.
        ``obsm["X_umap"]``, ``uns["bulk_labels_colors"]``, ``uns["louvain_colors"]``
            From ``pbmc68k_reduced``, for plots.
        ``uns["pbmc68k_counts"]``
            ``max_deviation`` (distance to the nearest integer before rounding) and ``source``.
        ``uns["ensembl_id"]``
            The mapping report of :func:`~transcriptformer.scanpy.pp.symbols_to_ensembl`.
    """
    import scanpy as sc

    src = sc.datasets.pbmc68k_reduced()
    lognorm = sp.csr_matrix(src.raw.X, dtype=np.float64)
    size = src.obs["n_counts"].to_numpy(dtype=np.float64)
    counts = lognorm.copy()
    counts.data = np.expm1(counts.data) * np.repeat(size / 1e4, np.diff(counts.indptr))
    deviation = float(np.abs(counts.data - np.rint(counts.data)).max()) if counts.nnz else 0.0
    if deviation > COUNT_TOLERANCE:
        raise ValueError(
            f"pbmc68k_reduced's raw.X does not give integer counts (a value lies {deviation:.3f} from an integer): "
            "the installed scanpy ships a different file."
        )
    counts.data = np.rint(counts.data)
    if counts.nnz and counts.data.min() < 1:
        raise ValueError(
            "pbmc68k_reduced's raw.X gives a stored count below 1; the installed scanpy ships a different file."
        )
    counts.eliminate_zeros()
    logger.info("pbmc68k_counts: counts recovered, largest distance to an integer %.4f", deviation)

    obs = pd.DataFrame(
        {
            "bulk_labels": src.obs["bulk_labels"],
            "louvain": src.obs["louvain"],
            "n_genes": src.obs["n_genes"],
            "n_counts_all_genes": src.obs["n_counts"],
        },
        index=src.obs_names.copy(),
    )
    obs["assay"] = pd.Categorical(["10x 3' v1"] * len(obs))
    adata = ad.AnnData(
        X=counts.astype(np.float32),
        obs=obs,
        var=pd.DataFrame(index=src.raw.var_names.copy()),
        obsm={"X_umap": np.array(src.obsm["X_umap"], dtype=np.float32)},
        uns={k: list(src.uns[k]) for k in ("bulk_labels_colors", "louvain_colors") if k in src.uns},
    )
    adata.uns["pbmc68k_counts"] = {
        "max_deviation": deviation,
        "source": "scanpy.datasets.pbmc68k_reduced(): rint(expm1(raw.X) * obs['n_counts'] / 1e4)",
    }
    symbols_to_ensembl(adata, species="homo_sapiens", raw=False)
    return adata


def __dir__() -> list[str]:
    return __all__
