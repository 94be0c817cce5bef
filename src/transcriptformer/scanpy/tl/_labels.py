"""Label transfer and cell-type similarity through the embeddings (no model runs here)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
import pandas as pd
from anndata import AnnData

from ...data.tokenizer import table_column
from ...inference.options import check_bool, check_key, check_positive_int
from ...inference.record import provenance
from .._utils import Update, check_adata, check_writable, deprecated_argument, use_rep_or_deprecated

__all__ = ["celltype_similarity", "transfer_labels"]

#: Joins a dataset's label and a group's in :func:`celltype_similarity`'s table (so neither may contain it).
SEPARATOR = " | "


def embedding(adata: AnnData, use_rep: str, name: str = "adata") -> np.ndarray:
    """``adata.obsm[use_rep]`` as float32, refusing a missing or non-finite embedding with the fix."""
    if use_rep not in adata.obsm:
        raise KeyError(
            f"{name}.obsm has no {use_rep!r}; embed it first with tfs.tl.embed(...) (or pass use_rep=<obsm key>). "
            f"obsm has {list(adata.obsm.keys())}."
        )
    X = np.asarray(adata.obsm[use_rep], dtype=np.float32)
    bad = ~np.isfinite(X).all(axis=1)
    if bad.any():
        raise ValueError(
            f"{name}.obsm[{use_rep!r}] has NaN or infinite values in {int(bad.sum())} cell(s) (e.g. "
            f"{list(np.asarray(adata.obs_names)[bad][:3])}); embed those cells again or leave them out."
        )
    return X


def transfer_labels(
    adata: AnnData,
    reference: AnnData,
    *,
    labels_key: str | None = None,
    use_rep: str = "X_transcriptformer",
    method: Literal["knn", "logreg"] = "knn",
    n_neighbors: int = 15,
    key_added: str | None = None,
    copy: bool = False,
    key: str | None = None,
    rep: str | None = None,
) -> AnnData | None:
    """Transfer ``obs`` labels from an annotated reference to ``adata`` through their embeddings.

    Both datasets must be embedded with the same model (e.g. :func:`embed` on each). ``"knn"`` votes
    among the ``n_neighbors`` nearest reference cells by cosine similarity, weighted by similarity;
    ``"logreg"`` fits a multinomial logistic regression on the reference embeddings.

    Parameters
    ----------
    adata
        Query cells with ``obsm[use_rep]``.
    reference
        Reference cells with ``obsm[use_rep]`` and ``obs[labels_key]``.
    labels_key
        Label column of ``reference.obs`` (e.g. ``"cell_type"``).
    use_rep
        The embedding (same model, same width, in both).
    method
        ``"knn"`` or ``"logreg"``.
    n_neighbors
        Neighbours for ``"knn"``.
    key_added
        Base name of the keys written (default ``f"{labels_key}_transferred"``): the labels go to
        ``obs[key_added]``, the confidence (share of the vote, or the class probability) to
        ``obs[f"{key_added}_confidence"]``, parameters to ``uns[key_added]["params"]``. The labels are a
        categorical with the reference's categories (those with cells) in the reference's order when its column is
        categorical (and its colours, ``uns[f"{labels_key}_colors"]``, go to ``uns[f"{key_added}_colors"]``),
        sorted otherwise.
    copy
        Return a copy instead of writing into ``adata``.
    key, rep
        Deprecated spellings of ``labels_key`` and ``use_rep``.

    Returns
    -------
    anndata.AnnData | None
        ``None``, or a copy of ``adata`` if ``copy=True``.
    """
    if key is not None:
        deprecated_argument("transfer_labels(key=...)", "labels_key=...")
        labels_key = labels_key or key
    if labels_key is None:
        raise TypeError("transfer_labels() missing the keyword argument 'labels_key' (the reference's label column).")
    use_rep = use_rep_or_deprecated(rep, use_rep, "transfer_labels")
    check_adata(adata)
    check_adata(reference, "reference")
    labels_key = check_key(labels_key, "labels_key")
    use_rep = check_key(use_rep, "use_rep")
    if method not in ("knn", "logreg"):
        raise ValueError(f"method={method!r}; expected 'knn' or 'logreg'.")
    n_neighbors = check_positive_int(n_neighbors, "n_neighbors", allow_none=False)
    copy = check_bool(copy, "copy")
    check_writable(adata, copy)
    if labels_key not in reference.obs:
        raise KeyError(f"reference.obs has no column {labels_key!r}; its columns are {list(reference.obs.columns)}.")
    key_added = f"{labels_key}_transferred" if key_added is None else check_key(key_added)
    X_ref, X_query = embedding(reference, use_rep, "reference"), embedding(adata, use_rep)
    if X_ref.shape[1] != X_query.shape[1]:
        raise ValueError(
            f"the embeddings differ in width ({X_ref.shape[1]} vs {X_query.shape[1]}): embed both with one model."
        )
    labels = table_column(reference.obs, labels_key)
    known = labels.notna().to_numpy()
    if known.sum() == 0:
        raise ValueError(f"reference.obs[{labels_key!r}] has no label.")
    y = labels[known].astype(str).to_numpy()
    if len(np.unique(y)) == 1:
        predicted = np.full(adata.n_obs, y[0], dtype=object)
        confidence = np.ones(adata.n_obs, dtype=np.float32)
    else:
        if method == "knn":
            from sklearn.neighbors import KNeighborsClassifier  # lazily: start-up time

            clf = KNeighborsClassifier(n_neighbors=min(n_neighbors, len(y)), metric="cosine", weights="distance")
        else:
            from sklearn.linear_model import LogisticRegression

            clf = LogisticRegression(max_iter=1000)
        clf.fit(X_ref[known], y)
        proba = clf.predict_proba(X_query)
        predicted = clf.classes_[proba.argmax(axis=1)]
        confidence = proba.max(axis=1).astype(np.float32)
    categories, colors = _reference_categories(reference, labels_key, labels)
    params = provenance(
        "transfer_labels",
        None,
        labels_key=labels_key,
        use_rep=use_rep,
        method=method,
        n_neighbors=n_neighbors,
        n_reference=len(y),
    )
    update = Update("transfer_labels", record=key_added)
    update.set("obs", key_added, pd.Categorical(predicted, categories=categories))
    update.set("obs", f"{key_added}_confidence", confidence)
    if colors is not None:
        update.set("uns", f"{key_added}_colors", colors)
    update.set("uns", key_added, {"params": params})
    return update.apply(adata, copy=copy)


def _reference_categories(reference: AnnData, labels_key: str, labels: pd.Series) -> tuple[list[str], list | None]:
    """The categories of the transferred labels, and their colours (``None``: the reference has none).

    A categorical label column gives its categories that have cells, in its order, with their colours of
    ``reference.uns[f"{labels_key}_colors"]`` when that list matches the categories (as ``sc.tl.ingest`` keeps
    them); other columns give their labels sorted.
    """
    known = labels.dropna()
    if not isinstance(labels.dtype, pd.CategoricalDtype):
        return sorted(set(known.astype(str))), None
    used = set(known.astype(str))
    every = [str(c) for c in labels.cat.categories]
    keep = [i for i, c in enumerate(every) if c in used and c not in every[:i]]
    colors = reference.uns.get(f"{labels_key}_colors")
    if colors is not None and len(colors) == len(every):
        return [every[i] for i in keep], [colors[i] for i in keep]
    return [every[i] for i in keep], None


def celltype_similarity(
    adatas: AnnData | Mapping[str, AnnData] | Sequence[AnnData],
    *,
    groupby: str,
    batch_key: str | None = None,
    use_rep: str = "X_transcriptformer",
    method: Literal["centroid_cosine", "knn_transfer"] = "centroid_cosine",
    n_neighbors: int = 15,
    key_added: str = "transcriptformer_celltype_similarity",
    rep: str | None = None,
) -> pd.DataFrame:
    """How similar the cell types of different datasets (or species) are in the embedding.

    What the TranscriptFormer paper shows across species: cells of matching types should be close although
    their genes are those of different species.

    Parameters
    ----------
    adatas
        ``{dataset label: AnnData}``, a list of AnnData (labelled ``"0"``, ``"1"``, ...) or one AnnData whose
        datasets are told apart by ``batch_key``. Every dataset must have ``obsm[use_rep]`` from the same model.
    groupby
        The ``obs`` column with the cell types.
    batch_key
        With one AnnData: the ``obs`` column naming each cell's dataset or species. Cells whose label is
        missing belong to no dataset and are left out (as cells without a ``groupby`` label are).
    use_rep
        The embedding.
    method
        ``"centroid_cosine"``: the cosine similarity of the types' mean embeddings. ``"knn_transfer"``: for a
        type ``a`` of dataset ``A`` and a type ``b`` of dataset ``B``, the share of ``a``'s cells whose
        ``n_neighbors`` nearest cells of ``B`` (cosine) vote for ``b``; entries within one dataset are NaN, so it
        needs two datasets or more.
    n_neighbors
        Neighbours for ``"knn_transfer"``. Every dataset must have more cells (with a ``groupby`` label) than
        ``n_neighbors``: with as many or fewer, each cell's neighbours would be the whole dataset and every type
        would be given that dataset's majority type; such a request is refused, naming the dataset.
    key_added
        With one AnnData: the result is also stored in ``adata.uns[key_added]`` (``"similarity"`` and
        ``"params"``).
    rep
        Deprecated spelling of ``use_rep``.

    Returns
    -------
    pandas.DataFrame
        Rows and columns ``"dataset | cell type"`` for every (dataset, type) with at least one cell.
    """
    use_rep = use_rep_or_deprecated(rep, use_rep, "celltype_similarity")
    if method not in ("centroid_cosine", "knn_transfer"):
        raise ValueError(f"method={method!r}; expected 'centroid_cosine' or 'knn_transfer'.")
    n_neighbors = check_positive_int(n_neighbors, "n_neighbors", allow_none=False)
    key_added = check_key(key_added)
    parts = _datasets(adatas, batch_key)
    if method == "knn_transfer" and len(parts) < 2:
        raise ValueError(
            "method='knn_transfer' compares datasets with each other, but there is one: pass several (a dict or "
            "a list of AnnData, or one AnnData with batch_key=<obs column naming each cell's dataset>)."
        )
    data: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    groups: dict[str, tuple[str, str]] = {}  # label -> (dataset, group)
    for name, a in parts.items():
        if groupby not in a.obs:
            raise KeyError(f"dataset {name!r} has no obs column {groupby!r}.")
        column = table_column(a.obs, groupby)
        known = column.notna().to_numpy()
        X = embedding(a, use_rep, f"dataset {name!r}").astype(np.float64)[known]
        y = column.astype(str).to_numpy()[known]
        data[name] = (X, y)
        for g in sorted(pd.unique(y)):
            if SEPARATOR in name or SEPARATOR in g:
                raise ValueError(
                    f"dataset {name!r} / group {g!r}: labels are joined with {SEPARATOR!r} in the table, so neither "
                    "may contain it; rename them."
                )
            groups[f"{name}{SEPARATOR}{g}"] = (name, g)
    if len({X.shape[1] for X, _ in data.values()}) > 1:
        raise ValueError("the embeddings have different widths: embed every dataset with one model.")
    if method == "knn_transfer":
        small = {name: len(y) for name, (_, y) in data.items() if len(y) <= n_neighbors}
        if small:
            name, n = min(small.items(), key=lambda item: item[1])
            raise ValueError(
                f"method='knn_transfer' with n_neighbors={n_neighbors}, but dataset {name!r} has {n} cell(s) with a "
                f"{groupby!r} label: every cell's neighbours in it would be all of them, so every type would get its "
                f"majority type. Pass n_neighbors below {n} (the size of the smallest dataset)"
                + (f"; too small: {small}." if len(small) > 1 else ".")
            )
    labels = list(groups)
    out = pd.DataFrame(np.nan, index=labels, columns=labels)
    if method == "centroid_cosine":
        centroids = []
        for label in labels:
            name, g = groups[label]
            X, y = data[name]
            c = X[y == g].mean(axis=0)
            centroids.append(c / max(np.linalg.norm(c), 1e-12))
        C = np.stack(centroids)
        out[:] = C @ C.T
    else:
        from sklearn.neighbors import KNeighborsClassifier  # lazily: start-up time

        for a_name, (Xa, ya) in data.items():
            for b_name, (Xb, yb) in data.items():
                if a_name == b_name:
                    continue
                clf = KNeighborsClassifier(n_neighbors=n_neighbors, metric="cosine").fit(Xb, yb)
                pred = clf.predict(Xa)
                cols = [c for c in labels if groups[c][0] == b_name]
                for g in pd.unique(ya):
                    row = f"{a_name}{SEPARATOR}{g}"
                    out.loc[row, cols] = 0.0
                    for h, v in pd.Series(pred[ya == g]).value_counts(normalize=True).items():
                        out.loc[row, f"{b_name}{SEPARATOR}{h}"] = v
    if isinstance(adatas, AnnData):
        params = provenance(
            "celltype_similarity",
            None,
            groupby=groupby,
            batch_key=batch_key or "none",
            use_rep=use_rep,
            method=method,
            n_neighbors=n_neighbors,
        )
        update = Update("celltype_similarity", record=key_added)
        update.set("uns", key_added, {"similarity": out, "params": params})
        update.apply(adatas, copy=False)
    return out


def _datasets(adatas: object, batch_key: str | None) -> dict[str, AnnData]:
    """The datasets to compare, by label, from any of the accepted forms (each checked)."""
    if isinstance(adatas, AnnData):
        check_adata(adatas)
        check_writable(adatas, copy=None)  # the table goes to its uns
        if batch_key is None:
            return {"data": adatas}
        if batch_key not in adatas.obs:
            raise KeyError(f"adata.obs has no column {batch_key!r} (batch_key).")
        column = table_column(adatas.obs, batch_key)
        known = column.notna().to_numpy()  # cells without a dataset are left out, as those without a group
        if not known.any():
            raise ValueError(f"adata.obs[{batch_key!r}] (batch_key) has no label: no dataset to compare.")
        labels = column.astype(str).to_numpy()
        return {b: adatas[known & (labels == b)] for b in pd.unique(labels[known])}
    if isinstance(adatas, Mapping):
        parts = {str(k): v for k, v in adatas.items()}
    elif isinstance(adatas, Sequence) and not isinstance(adatas, str):
        parts = {str(i): a for i, a in enumerate(adatas)}
    else:
        kind = type(adatas).__name__
        raise TypeError(f"adatas must be an AnnData, a dict of AnnData or a list of AnnData, got {kind}.")
    if not parts:
        raise ValueError("adatas is empty: pass the datasets to compare.")
    for name, a in parts.items():
        check_adata(a, f"dataset {name!r}")
    return parts
