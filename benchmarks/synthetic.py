"""Synthetic single-cell count data with realistic sequence lengths, in memory or written in chunks.

Cells x genes, CSR float32 integer counts, ``var["ensembl_id"]`` = the checkpoint's gene ids,
``obs["assay"]``. Per cell:

* the number of expressed genes is drawn from a mixture: 90% lognormal (median 1,500,
  sigma 0.27) and 10% small cells (lognormal median 500, sigma 0.5), clipped to
  ``[min_genes, n_genes]`` (default min 200). About 11% of cells express more than 2,047 genes;
  the median is about 1,450 (``describe`` prints the realised numbers);
* which genes: each gene has a popularity (lognormal), and a cell expresses gene ``g``
  independently with probability ``min(1, k * w_g / sum(w))`` (so about ``k`` genes, popular
  genes in most cells, as in real data);
* counts of expressed genes: ``1 + NegativeBinomial(r=0.6)`` with a per-gene mean
  (lognormal around 1.5), so the mean count is about 2.5 and some exceed 30.

``scale_genes`` shrinks the expressed-gene distribution (e.g. 0.2 for the data-pipeline benchmark).

:func:`write_h5ad_chunked` writes such data straight to the anndata on-disk format (h5py,
resizable CSR datasets) one chunk at a time, never holding the whole matrix.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

ASSAY_LABELS = np.array(["10x 3' v3", "10x 3' v2", "10x 5' v1", "Smart-seq2", "unknown", "MERFISH"], dtype=object)
ASSAY_P = np.array([0.55, 0.2, 0.1, 0.05, 0.05, 0.05])


@dataclass(frozen=True)
class Profile:
    """Distribution of cells."""

    median_genes: float = 1500.0
    sigma: float = 0.27
    small_fraction: float = 0.10
    small_median: float = 500.0
    small_sigma: float = 0.5
    min_genes: int = 200
    count_mean: float = 1.5  # mean of (count - 1)
    count_r: float = 0.6  # negative binomial shape
    scale_genes: float = 1.0


class GeneModel:
    """Per-gene popularity and count means for a fixed gene list (seeded)."""

    def __init__(self, n_genes: int, profile: Profile, seed: int):
        rng = np.random.default_rng([seed, 0])
        w = rng.lognormal(0.0, 1.5, n_genes)
        self.p_gene = w / w.sum()
        self.gene_mean = profile.count_mean * rng.lognormal(0.0, 0.6, n_genes) / np.exp(0.18)
        self.n_genes = n_genes
        self.profile = profile


def _n_expressed(rng: np.random.Generator, n: int, pr: Profile, n_genes: int) -> np.ndarray:
    k = rng.lognormal(np.log(pr.median_genes), pr.sigma, n)
    small = rng.random(n) < pr.small_fraction
    k[small] = rng.lognormal(np.log(pr.small_median), pr.small_sigma, int(small.sum()))
    k = np.clip(k * pr.scale_genes, pr.min_genes * min(1.0, pr.scale_genes), n_genes)
    return k


def _chunk(gm: GeneModel, rng: np.random.Generator, n: int) -> sp.csr_matrix:
    """``n`` cells as CSR float32 (sorted column indices)."""
    pr = gm.profile
    k = _n_expressed(rng, n, pr, gm.n_genes)
    prob = np.minimum(1.0, k[:, None] * gm.p_gene[None, :]).astype(np.float32)
    # genes with p >= 1 are capped: re-inflate the others so that E[n expressed] ~= k
    for _ in range(2):
        deficit = k - prob.sum(1)
        free = (prob < 1).astype(np.float32)
        room = (prob * free).sum(1)
        factor = np.where(room > 0, 1 + deficit / np.maximum(room, 1e-9), 1.0).astype(np.float32)
        prob = np.minimum(1.0, prob * np.where(free > 0, factor[:, None], 1.0))
    mask = rng.random((n, gm.n_genes), dtype=np.float32) < prob
    rows, cols = np.nonzero(mask)
    mean = gm.gene_mean[cols]
    r = pr.count_r
    vals = 1 + rng.negative_binomial(r, r / (r + mean))
    m = sp.csr_matrix((vals.astype(np.float32), (rows, cols)), shape=(n, gm.n_genes))
    m.sort_indices()
    return m


def synthetic_counts(
    n_cells: int, n_genes: int, *, seed: int = 0, profile: Profile = Profile(), chunk: int = 2048
) -> sp.csr_matrix:
    """``n_cells x n_genes`` CSR float32 counts (in memory)."""
    gm = GeneModel(n_genes, profile, seed)
    parts = [
        _chunk(gm, np.random.default_rng([seed, 1, i]), min(chunk, n_cells - s))
        for i, s in enumerate(range(0, n_cells, chunk))
    ]
    return sp.vstack(parts, format="csr") if parts else sp.csr_matrix((0, n_genes), dtype=np.float32)


def synthetic_obs(n_cells: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng([seed, 2])
    assay = ASSAY_LABELS[rng.choice(len(ASSAY_LABELS), n_cells, p=ASSAY_P)]
    return pd.DataFrame(
        {"assay": pd.Categorical(assay, categories=list(ASSAY_LABELS))}, index=[f"cell{i}" for i in range(n_cells)]
    )


def synthetic_var(gene_ids: list[str]) -> pd.DataFrame:
    return pd.DataFrame({"ensembl_id": list(gene_ids)}, index=[f"gene{i}" for i in range(len(gene_ids))])


class MiniAnnData:
    """Just enough of AnnData for ``prepare_cells`` (used where anndata is not installed)."""

    def __init__(self, X, obs: pd.DataFrame, var: pd.DataFrame):
        self.X, self.obs, self.var = X, obs, var
        self.raw = None
        self.layers: dict = {}

    @property
    def n_obs(self) -> int:
        return self.X.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        return self.X.shape


def synthetic_adata(n_cells: int, gene_ids: list[str], *, seed: int = 0, profile: Profile = Profile()):
    """An AnnData (or :class:`MiniAnnData` if anndata is missing) of synthetic cells."""
    X = synthetic_counts(n_cells, len(gene_ids), seed=seed, profile=profile)
    obs, var = synthetic_obs(n_cells, seed), synthetic_var(gene_ids)
    try:
        import anndata as ad
    except ImportError:
        return MiniAnnData(X, obs, var)
    return ad.AnnData(X=X, obs=obs, var=var)


def describe(X: sp.csr_matrix) -> dict:
    n = np.diff(X.indptr)
    return {
        "cells": int(X.shape[0]),
        "genes": int(X.shape[1]),
        "expressed_median": float(np.median(n)),
        "expressed_mean": float(n.mean()),
        "expressed_min": int(n.min()) if len(n) else 0,
        "expressed_p99": float(np.percentile(n, 99)) if len(n) else 0.0,
        "expressed_max": int(n.max()) if len(n) else 0,
        "frac_above_2047": float((n > 2047).mean()) if len(n) else 0.0,
        "count_mean": float(X.data.mean()) if X.nnz else 0.0,
        "frac_count_above_30": float((X.data > 30).mean()) if X.nnz else 0.0,
        "count_max": float(X.data.max()) if X.nnz else 0.0,
    }


# ------------------------------------------------------------------------------------------------
# chunked h5ad writer


def _write_df(f: h5py.File, key: str, df: pd.DataFrame) -> None:
    """A DataFrame in the anndata on-disk format (anndata's own writer when available)."""
    try:
        from anndata.io import write_elem
    except ImportError:
        try:
            from anndata.experimental import write_elem
        except ImportError:
            write_elem = None
    if write_elem is not None:
        write_elem(f, key, df)
        return
    # minimal encoding (string columns and categoricals), as anndata 0.10+ writes them
    g = f.create_group(key)
    g.attrs.update({"encoding-type": "dataframe", "encoding-version": "0.2.0", "_index": "_index"})
    g.attrs["column-order"] = np.array(list(df.columns), dtype=object) if len(df.columns) else np.array([], dtype="S")
    str_dt = h5py.string_dtype()
    idx = g.create_dataset("_index", data=np.array(df.index.astype(str), dtype=object), dtype=str_dt)
    idx.attrs.update({"encoding-type": "string-array", "encoding-version": "0.2.0"})
    for col in df.columns:
        s = df[col]
        if isinstance(s.dtype, pd.CategoricalDtype):
            c = g.create_group(col)
            c.attrs.update({"encoding-type": "categorical", "encoding-version": "0.2.0", "ordered": False})
            cats = c.create_dataset(
                "categories", data=np.array(s.cat.categories.astype(str), dtype=object), dtype=str_dt
            )
            cats.attrs.update({"encoding-type": "string-array", "encoding-version": "0.2.0"})
            codes = c.create_dataset("codes", data=s.cat.codes.to_numpy())
            codes.attrs.update({"encoding-type": "array", "encoding-version": "0.2.0"})
        else:
            d = g.create_dataset(col, data=np.array(s.astype(str), dtype=object), dtype=str_dt)
            d.attrs.update({"encoding-type": "string-array", "encoding-version": "0.2.0"})


def write_h5ad_chunked(
    path: str | Path,
    n_cells: int,
    gene_ids: list[str],
    *,
    seed: int = 0,
    profile: Profile = Profile(),
    chunk: int = 2048,
    verbose: bool = True,
    head: int | None = None,
) -> dict:
    """Write ``n_cells`` synthetic cells to ``path`` (h5ad, CSR ``X``), ``chunk`` cells at a time.

    Memory stays at about one chunk (``chunk x n_genes`` float32 for the sampling, plus its CSR).
    ``head``: write only the first ``head`` cells of those ``n_cells`` (the same cells as the start of the
    full file). Returns :func:`describe`-like statistics of the written data.
    """
    full = n_cells
    n_cells = min(n_cells, head) if head is not None else n_cells
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    gm = GeneModel(len(gene_ids), profile, seed)
    t0 = time.perf_counter()
    n_expr = np.zeros(n_cells, dtype=np.int64)
    nnz = 0
    count_sum = 0.0
    above30 = 0
    count_max = 0.0
    with h5py.File(path, "w") as f:
        f.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0"})
        X = f.create_group("X")
        X.attrs.update({"encoding-type": "csr_matrix", "encoding-version": "0.1.0"})
        X.attrs["shape"] = np.array([n_cells, len(gene_ids)], dtype=np.int64)
        data = X.create_dataset("data", shape=(0,), maxshape=(None,), dtype=np.float32, chunks=(1 << 18,))
        indices = X.create_dataset("indices", shape=(0,), maxshape=(None,), dtype=np.int32, chunks=(1 << 18,))
        indptr = X.create_dataset("indptr", shape=(n_cells + 1,), dtype=np.int64)
        indptr[0] = 0
        for i, s in enumerate(range(0, n_cells, chunk)):
            m = _chunk(gm, np.random.default_rng([seed, 1, i]), min(chunk, full - s))[: n_cells - s]
            e = s + m.shape[0]
            data.resize((nnz + m.nnz,))
            indices.resize((nnz + m.nnz,))
            data[nnz:] = m.data
            indices[nnz:] = m.indices.astype(np.int32)
            indptr[s + 1 : e + 1] = nnz + m.indptr[1:].astype(np.int64)
            nnz += m.nnz
            n_expr[s:e] = np.diff(m.indptr)
            count_sum += float(m.data.sum(dtype=np.float64))
            above30 += int((m.data > 30).sum())
            count_max = max(count_max, float(m.data.max(initial=0)))
            if verbose and (i % 10 == 0 or e == n_cells):
                print(f"  {path.name}: {e:,}/{n_cells:,} cells ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
        _write_df(f, "obs", synthetic_obs(full, seed).iloc[:n_cells])
        _write_df(f, "var", synthetic_var(gene_ids))
        for key in ("obsm", "varm", "obsp", "varp", "layers", "uns"):
            g = f.create_group(key)
            g.attrs.update({"encoding-type": "dict", "encoding-version": "0.1.0"})
    return {
        "cells": n_cells,
        "genes": len(gene_ids),
        "expressed_median": float(np.median(n_expr)),
        "expressed_mean": float(n_expr.mean()),
        "expressed_min": int(n_expr.min()),
        "expressed_max": int(n_expr.max()),
        "frac_above_2047": float((n_expr > 2047).mean()),
        "count_mean": count_sum / max(nnz, 1),
        "frac_count_above_30": above30 / max(nnz, 1),
        "count_max": count_max,
        "file_bytes": path.stat().st_size,
        "write_seconds": time.perf_counter() - t0,
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Write a synthetic h5ad (chunked).")
    p.add_argument("path")
    p.add_argument("--cells", type=int, default=10000)
    p.add_argument("--checkpoint", help="take gene ids from this checkpoint folder (else ENSG00000000001...)")
    p.add_argument("--n-genes", type=int, default=20000)
    p.add_argument("--scale-genes", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.checkpoint:
        with h5py.File(Path(a.checkpoint) / "vocabs" / "homo_sapiens_gene.h5", "r") as f:
            ids = [k.decode() for k in f["keys"][:]]
    else:
        from make_checkpoint import gene_ids

        ids = gene_ids(a.n_genes)
    stats = write_h5ad_chunked(a.path, a.cells, ids, seed=a.seed, profile=Profile(scale_genes=a.scale_genes))
    print(stats)


if __name__ == "__main__":
    main()
