"""SOMA experiments (TileDB-SOMA, e.g. the CELLxGENE Census) as AnnData whose counts stay where they are.

:func:`read_soma` opens an experiment (a URI, an open ``tiledbsoma.Experiment`` or an
``ExperimentAxisQuery``) as an :class:`~anndata.AnnData` whose ``X`` is a lazy dask array: each chunk of
cells is read from the SOMA X layer only when it is computed, as sparse CSR rows. ``obs`` holds the requested
columns of the selected cells, indexed by ``soma_joinid``; ``var`` is the measurement's ``var`` indexed by
its gene ids. Everything downstream (the tokeniser, every tool, the command line) reads it window by window
as it reads a backed h5ad file or a lazily read zarr store, so memory does not grow with the number of cells
(the cells' ``soma_joinid`` and requested ``obs`` columns aside).

tiledbsoma and dask are optional dependencies (``pip install "transcriptformer-scanpy[soma]"``), imported when a
function here is called.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

logger = logging.getLogger(__name__)

__all__ = ["INSTALL_HINT", "SomaRows", "read_soma"]

#: How to install what this module needs.
INSTALL_HINT = 'pip install "transcriptformer-scanpy[soma]"'
#: The CELLxGENE Census schema: Ensembl gene ids in ``var["feature_id"]``, raw counts in the ``"raw"`` layer.
DEFAULT_VAR_ID = "feature_id"
DEFAULT_LAYER = "raw"
DEFAULT_MEASUREMENT = "RNA"
#: ``obs`` columns read when none are requested (when the experiment has them): the model's assay token.
DEFAULT_OBS_COLUMNS = ("assay",)
_ENSEMBL = re.compile(r"^ENS[A-Z]*G\d{6,}(\.\d+)?$")


def _tiledbsoma() -> Any:
    try:
        import tiledbsoma
    except ImportError:
        raise ImportError(f"reading SOMA experiments needs tiledbsoma: {INSTALL_HINT}") from None
    return tiledbsoma


def _dask_array() -> Any:
    try:
        import dask.array as da
    except ImportError:
        raise ImportError(f"SOMA experiments are read lazily with dask: {INSTALL_HINT} (or pip install dask)") from None
    return da


class SomaRows:
    """Cells of a SOMA sparse X layer as an array-like for :func:`dask.array.from_array`.

    ``rows[i:j, k:l]`` reads the cells at positions ``i..j`` of ``obs_ids`` (and the genes at positions
    ``k..l`` of ``var_ids``) and returns a CSR matrix, in the order of ``obs_ids`` and ``var_ids``.

    Parameters
    ----------
    array
        The open ``tiledbsoma.SparseNDArray`` (cells x genes by ``soma_joinid``).
    obs_ids, var_ids
        ``soma_joinid`` of the cells and genes, ascending.
    dtype
        The values' type.
    owner
        An object to close when this one is garbage collected (the experiment :func:`read_soma` opened).
    """

    ndim = 2

    def __init__(self, array: Any, obs_ids: np.ndarray, var_ids: np.ndarray, dtype: Any, owner: Any = None):
        self.array = array
        self.obs_ids = np.asarray(obs_ids, dtype=np.int64)
        self.var_ids = np.asarray(var_ids, dtype=np.int64)
        self.shape = (len(self.obs_ids), len(self.var_ids))
        self.dtype = np.dtype(dtype)
        n = len(self.var_ids)
        self._all_var = n == 0 or bool(self.var_ids[0] == 0 and self.var_ids[-1] == n - 1)
        self._lock = threading.Lock()
        if owner is not None and hasattr(owner, "close"):
            weakref.finalize(self, owner.close)

    def __getitem__(self, key: Any) -> sp.csr_matrix:
        rows, cols = key if isinstance(key, tuple) else (key, slice(None))
        ids = self.obs_ids[rows]
        var = self.var_ids[cols]
        if len(ids) == 0 or len(var) == 0:
            return sp.csr_matrix((len(ids), len(var)), dtype=self.dtype)
        contiguous = bool(ids[-1] - ids[0] == len(ids) - 1)
        obs_coord: Any = slice(int(ids[0]), int(ids[-1])) if contiguous else ids  # SOMA slices include the end
        whole = self._all_var and len(var) == len(self.var_ids)
        var_coord: Any = slice(None) if whole else var
        with self._lock:
            table = self.array.read(coords=(obs_coord, var_coord)).tables().concat()
        dim0 = table["soma_dim_0"].to_numpy()
        dim1 = table["soma_dim_1"].to_numpy()
        data = table["soma_data"].to_numpy()
        r = dim0 - ids[0] if contiguous else np.searchsorted(ids, dim0)
        c = dim1 if whole else np.searchsorted(var, dim1)
        out = sp.coo_matrix((data.astype(self.dtype, copy=False), (r, c)), shape=(len(ids), len(var)))
        return out.tocsr()


def _open(experiment: Any, context: Any) -> tuple[Any, Any, bool]:
    """``(experiment, query or None, opened here)`` for a URI, an Experiment or an ExperimentAxisQuery."""
    soma = _tiledbsoma()
    if isinstance(experiment, soma.ExperimentAxisQuery):
        return experiment.experiment, experiment, False
    if isinstance(experiment, soma.Experiment):
        return experiment, None, False
    if not isinstance(experiment, str) and not hasattr(experiment, "__fspath__"):
        raise TypeError(
            "read_soma takes a SOMA experiment: its URI (a path or e.g. s3://...), an open tiledbsoma.Experiment "
            f"or an ExperimentAxisQuery, got {type(experiment).__name__}."
        )
    uri = str(experiment.__fspath__() if hasattr(experiment, "__fspath__") else experiment)
    try:
        return soma.Experiment.open(uri, context=context), None, True
    except (soma.SOMAError, OSError, ValueError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(
            f"cannot read the SOMA experiment {uri!r} ({reason}). Pass the URI of a SOMA Experiment (a folder made by "
            "tiledbsoma.io.from_h5ad, or e.g. the Census's experiment: cellxgene_census.open_soma()"
            '["census_data"]["homo_sapiens"]).'
        ) from None


def _measurement(exp: Any, name: str) -> Any:
    names = sorted(exp.ms.keys())
    if name not in names:
        raise KeyError(
            f"measurement {name!r} not found in the SOMA experiment {exp.uri}; it has {names or 'no measurements'}. "
            "Pass measurement=<one of those> (the Census: 'RNA')."
        )
    return exp.ms[name]


def _layer(ms: Any, name: str, measurement: str) -> Any:
    soma = _tiledbsoma()
    layers = sorted(ms.X.keys()) if "X" in ms else []
    if name not in layers:
        raise KeyError(
            f"X layer {name!r} not found in measurement {measurement!r}; it has {layers or 'no X layers'}. Pass "
            "layer=<the layer of raw counts> (the Census: 'raw'; tiledbsoma.io.from_h5ad writes X as 'data')."
        )
    array = ms.X[name]
    if not isinstance(array, soma.SparseNDArray):
        raise ValueError(
            f"X layer {name!r} of measurement {measurement!r} is a {type(array).__name__}; only sparse X layers "
            "(SparseNDArray, how the Census and tiledbsoma.io.from_h5ad store counts) are read."
        )
    return array


def _obs_columns(exp: Any, requested: Sequence[str] | None) -> list[str]:
    names = [f.name for f in exp.obs.schema]
    if requested is None:
        return [c for c in DEFAULT_OBS_COLUMNS if c in names]
    if isinstance(requested, str):
        requested = [requested]
    missing = [c for c in requested if c not in names]
    if missing:
        raise KeyError(
            f"obs column(s) {missing} not found in the SOMA experiment {exp.uri}; its obs columns are "
            f"{[n for n in names if n != 'soma_joinid']}."
        )
    return [c for c in dict.fromkeys(requested) if c != "soma_joinid"]


def _looks_like_ensembl(values: Sequence[Any]) -> bool:
    sample = [v for v in list(values[:2000]) if isinstance(v, str) and v]
    return bool(sample) and sum(bool(_ENSEMBL.match(v)) for v in sample) >= 0.5 * len(sample)


def _var_frame(var: pd.DataFrame, var_id: str, measurement: str) -> pd.DataFrame:
    """``var`` indexed by its gene ids (checked to be Ensembl ids), sorted by ``soma_joinid``."""
    var = var.sort_values("soma_joinid").reset_index(drop=True)
    candidates = [c for c in var.columns if var[c].dtype == object or isinstance(var[c].dtype, pd.StringDtype)]
    ensembl = [c for c in candidates if _looks_like_ensembl(var[c].astype(object).tolist())]
    hint = (
        f"the column(s) {ensembl} hold Ensembl ids: pass var_id={ensembl[0]!r}"
        if ensembl
        else "no column of it holds Ensembl ids; map the gene symbols to Ensembl ids when writing the experiment"
    )
    if var_id not in var.columns:
        raise KeyError(
            f"var column {var_id!r} not found in measurement {measurement!r}; its var columns are "
            f"{[c for c in var.columns if c != 'soma_joinid']}: {hint}."
        )
    ids = var[var_id].astype(object).tolist()
    if not _looks_like_ensembl(ids):
        raise ValueError(
            f"var[{var_id!r}] of measurement {measurement!r} does not hold Ensembl gene ids (e.g. {ids[:3]}), which "
            f"TranscriptFormer's vocabularies use; {hint}."
        )
    # a gene without an id gets a name of its own (no vocabulary gene has it), so var_names stay unique
    joinids = var["soma_joinid"].tolist()
    names = [v if isinstance(v, str) and v else f"missing-{var_id}-{j}" for v, j in zip(ids, joinids, strict=True)]
    var.index = pd.Index(names, dtype=object)
    return var


def read_soma(
    experiment: Any,
    *,
    obs_filter: str | None = None,
    measurement: str | None = None,
    layer: str = DEFAULT_LAYER,
    obs_columns: Sequence[str] | None = None,
    var_id: str = DEFAULT_VAR_ID,
    chunk_size: int = 4096,
    context: Any = None,
):
    """A SOMA experiment's cells as an AnnData whose counts are read from the experiment when needed.

    Parameters
    ----------
    experiment
        The URI of a SOMA ``Experiment`` (a local folder, ``s3://...``), an open ``tiledbsoma.Experiment``
        (e.g. ``cellxgene_census.open_soma()["census_data"]["homo_sapiens"]``), or an
        ``ExperimentAxisQuery`` (``experiment.axis_query("RNA", obs_query=...)``), whose cells and genes are used.
    obs_filter
        A SOMA value filter selecting cells, e.g. ``"tissue_general == 'lung' and is_primary_data == True"``;
        ``None`` selects every cell. Not with an ``ExperimentAxisQuery`` (it has its own).
    measurement
        The measurement with the counts (default ``"RNA"``, the Census's; a query's own otherwise).
    layer
        The X layer of raw counts (the Census: ``"raw"``; ``tiledbsoma.io.from_h5ad`` writes ``X`` as
        ``"data"``).
    obs_columns
        ``obs`` columns to read (the auxiliary token's ``"assay"`` should be among them). ``None``: ``"assay"``
        if the experiment has it.
    var_id
        The measurement's ``var`` column with Ensembl gene ids (the Census: ``"feature_id"``); it becomes
        ``var_names``.
    chunk_size
        Cells per chunk of the lazy ``X`` (one SOMA read each).
    context
        A ``tiledbsoma.SOMATileDBContext`` for opening a URI (credentials, region), else the default.

    Returns
    -------
    anndata.AnnData
        ``X``: a dask array of the selected cells (ascending ``soma_joinid``) x the measurement's genes with CSR
        chunks of ``chunk_size`` cells, read from ``layer`` when computed; ``obs``: ``obs_columns``, indexed by
        ``soma_joinid`` (as text; index name ``"soma_joinid"``); ``var``: the measurement's ``var``, indexed by
        ``var_id`` (a gene without an id is named ``missing-<var_id>-<soma_joinid>``); ``uns["soma"]``: where
        the cells come from (URI, measurement, layer, filter). An experiment opened here stays open as long as
        ``X`` is referenced.

    Raises
    ------
    ValueError
        The experiment cannot be read, the filter is invalid or selects no cell, ``var_id`` does not hold
        Ensembl ids, or the layer is not sparse.
    KeyError
        An unknown measurement, layer, ``obs`` or ``var`` column (the message lists the existing ones).
    """
    import anndata as ad

    soma = _tiledbsoma()
    da = _dask_array()
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}.")
    if obs_filter is not None and (not isinstance(obs_filter, str) or not obs_filter.strip()):
        raise ValueError(f"obs_filter must be a SOMA value filter (text) or None, got {obs_filter!r}.")
    exp, query, opened = _open(experiment, context)
    own_query = query is None
    try:
        if query is not None:
            if obs_filter is not None:
                raise ValueError("obs_filter cannot be combined with an ExperimentAxisQuery: put it in the query.")
            if measurement is not None and measurement != query.measurement_name:
                raise ValueError(
                    f"measurement={measurement!r} but the query is on {query.measurement_name!r}; leave it out."
                )
            measurement = query.measurement_name
        measurement = measurement or DEFAULT_MEASUREMENT
        ms = _measurement(exp, measurement)
        array = _layer(ms, layer, measurement)
        columns = _obs_columns(exp, obs_columns)
        if query is None:
            query = exp.axis_query(measurement, obs_query=soma.AxisQuery(value_filter=obs_filter))
        try:
            obs_ids = np.sort(query.obs_joinids().to_numpy())
        except soma.SOMAError as e:
            raise ValueError(
                f"obs_filter {obs_filter!r} cannot be applied ({str(e).strip().splitlines()[0]}). The obs columns "
                f"are {[f.name for f in exp.obs.schema]}; write it as a Python comparison, e.g. "
                "\"tissue_general == 'lung'\"."
            ) from None
        if len(obs_ids) == 0:
            raise ValueError(
                f"obs_filter {obs_filter!r} selects no cell of the SOMA experiment {exp.uri} ({exp.obs.count:,} "
                "cells); check the column values (e.g. with tiledbsoma: "
                "exp.obs.read(column_names=[...]).concat().to_pandas())."
            )
        obs = query.obs(column_names=["soma_joinid", *columns]).concat().to_pandas()
        obs = obs.sort_values("soma_joinid")
        obs.index = pd.Index(obs.pop("soma_joinid").astype(np.int64).astype(str), name="soma_joinid", dtype=object)
        var = _var_frame(query.var().concat().to_pandas(), var_id, measurement)
        var_ids = var["soma_joinid"].to_numpy(dtype=np.int64)
        dtype = array.schema.field("soma_data").type.to_pandas_dtype()
        rows = SomaRows(array, obs_ids, var_ids, dtype, owner=exp if opened else None)
        meta = sp.csr_matrix((0, 0), dtype=dtype)
        key = repr((str(exp.uri), measurement, layer, obs_filter, len(obs_ids), int(obs_ids[0]), id(rows)))
        name = "read-soma-" + hashlib.sha1(key.encode()).hexdigest()[:16]
        X = da.from_array(rows, chunks=(chunk_size, len(var_ids)), asarray=False, fancy=False, meta=meta, name=name)
    except BaseException:
        if opened:
            exp.close()
        raise
    finally:
        if own_query and query is not None:
            query.close()
    uns = {"uri": str(exp.uri), "measurement": measurement, "layer": layer, "var_id": var_id}
    if obs_filter is not None:
        uns["obs_filter"] = obs_filter
    logger.info(
        "SOMA experiment %s: %s cells x %s genes (measurement %r, layer %r), read %s cells at a time",
        exp.uri,
        f"{len(obs_ids):,}",
        f"{len(var_ids):,}",
        measurement,
        layer,
        f"{chunk_size:,}",
    )
    return ad.AnnData(X=X, obs=obs, var=var, uns={"soma": uns})
