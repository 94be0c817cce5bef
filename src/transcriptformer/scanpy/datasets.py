"""Models and example data (``tfs.datasets``).

The published weights are downloaded on demand through :mod:`transcriptformer.weights.registry`. A
tiny checkpoint in the published layout (random weights, 2 layers, 364 genes) and a tiny
dataset ship with the package, so examples and tests run offline.
"""

from __future__ import annotations

import logging
import os
from importlib.resources import files
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..weights import registry

__all__ = [
    "available_models",
    "demo_model_path",
    "download",
    "mouse_val",
    "pbmc68k_counts",
    "published_test_data",
    "species_testis",
    "tiny_human",
    "tiny_model_path",
]

logger = logging.getLogger(__name__)

#: largest distance from an integer accepted when recovering counts from a log-normalised matrix
COUNT_TOLERANCE = 0.25


def available_models(cache_dir: str | os.PathLike | None = None) -> pd.DataFrame:
    """What can be downloaded and what is already cached (see :func:`transcriptformer.weights.registry.available`)."""
    return registry.available(cache_dir)


def download(
    name: str, *, cache_dir: str | os.PathLike | None = None, progress: bool = True, force: bool = False
) -> Path:
    """Download, verify and unpack a model or the gene tables; return the folder.

    Parameters
    ----------
    name
        ``"tf-sapiens"``, ``"tf-exemplar"``, ``"tf-metazoa"`` or ``"all-embeddings"``.
    cache_dir
        Cache folder (default ``$TRANSCRIPTFORMER_CACHE`` or the user cache).
    progress
        Show progress bars.
    force
        Download again even if cached.
    """
    return registry.fetch(name, cache_dir=cache_dir, progress=progress, force=force)


#: sha256 of the bundled copy of the published repository's ``test/data/mouse_val.h5ad``.
MOUSE_VAL_SHA256 = "f109995258daf776ceae48def5f5fc81cf478e3b4369aee22c394423aa549281"


def demo_model_path() -> Path:
    """Folder of the bundled demo model ``tf-demo`` (also reachable as ``model="tf-demo"``).

    A small TranscriptFormer (4 layers, width 64, 511 gene slots) trained with this package's training code
    on 1,190 real cells of two species: human PBMCs (:func:`pbmc68k_counts`) and mouse brain cells
    (:func:`mouse_val`). Its gene vectors are random, with one-to-one human-mouse orthologs sharing a vector
    (ESM2 embeddings cannot be computed offline), so it knows only the genes of those two datasets and their
    orthologs. It is a demonstration of the package on real data, not the published weights: use
    ``"tf-sapiens"``, ``"tf-exemplar"`` or ``"tf-metazoa"`` for analyses. ``demo_report.json`` in the folder
    records how it was trained and evaluated; ``scripts/train_demo_model.py`` in the repository reproduces it.
    """
    return registry.bundled_path(registry.REGISTRY["tf-demo"])


def mouse_val() -> ad.AnnData:
    """1,000 real mouse brain cells measured by MERFISH (1,122 genes), bundled with the package.

    The published TranscriptFormer repository's test file ``test/data/mouse_val.h5ad`` (a subset of a
    CELLxGENE dataset): raw counts in ``X``, ``var["ensembl_id"]`` (Ensembl mouse ids) and
    ``var["feature_name"]`` (symbols), ``obs["cell_type"]`` (21 Cell Ontology labels: glutamatergic and
    GABAergic neurons, oligodendrocytes, astrocytes, endothelial cells, microglia, ...) and
    ``obs["assay"] == "MERFISH"``. The file's sha256 is checked on reading.
    """
    from .._files import sha256_file

    path = Path(str(files("transcriptformer") / "_data" / "mouse_val.h5ad"))
    digest = sha256_file(path)
    if digest != MOUSE_VAL_SHA256:
        raise ValueError(f"{path} is corrupted (sha256 {digest[:16]}..., expected {MOUSE_VAL_SHA256[:16]}...).")
    return ad.read_h5ad(path)


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


def species_testis(
    organism: str = "macaque",
    *,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    backed: bool = False,
) -> ad.AnnData:
    """Testis cells of one of nine species (Murat et al. 2023), as the published cross-species notebook uses.

    ``organism``: ``"human"``, ``"chimpanzee"``, ``"gorilla"``, ``"macaque"``, ``"marmoset"``, ``"mouse"``,
    ``"opossum"``, ``"platypus"`` or ``"chicken"``. Downloaded once from the public benchmark bucket (no
    checksum is published: the sha256 of the first download is recorded and later downloads must match it).
    ``backed=True`` opens the file backed (read in windows by the tools).
    """
    name = f"testis-{organism}"
    if name not in registry.REGISTRY:
        known = sorted(n.removeprefix("testis-") for n in registry.DATASET_NAMES if n.startswith("testis-"))
        raise ValueError(f"organism={organism!r}; expected one of {', '.join(known)}.")
    path = registry.fetch_dataset(name, cache_dir=cache_dir, progress=progress)
    return ad.read_h5ad(path, backed="r" if backed else None)


def tiny_model_path() -> Path:
    """Folder of the bundled tiny checkpoint (random weights; for examples and tests, not for biology)."""
    return Path(str(files("transcriptformer") / "_data" / "tf_tiny"))


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
        ``uns["symbols_to_ensembl"]``
            The mapping report.
    """
    import scanpy as sc

    from .pp import symbols_to_ensembl

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
