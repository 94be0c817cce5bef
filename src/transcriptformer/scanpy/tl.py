"""Tools: TranscriptFormer results written into the user's AnnData (``tfs.tl``)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd
from anndata import AnnData

from .. import __version__
from ..checkpoint import LoadedModel, load_model
from ..engine import Inference, Outputs, infer
from ..tokenize import TokenizeOptions

__all__ = ["contextual_gene_embeddings", "embed", "transcriptformer", "transfer_labels"]

ModelArg = str | os.PathLike | LoadedModel
SpeciesArg = str | os.PathLike | Sequence[str | os.PathLike] | None


def _check_adata(adata: Any) -> None:
    if not isinstance(adata, AnnData):
        raise TypeError(f"expected an AnnData, got {type(adata).__name__}.")
    if adata.n_obs == 0:
        raise ValueError("adata has no cells.")


def _run(
    adata: AnnData, model: ModelArg, outputs: Outputs, options: TokenizeOptions, *, cache_dir=None, **engine: Any
) -> tuple[Inference, LoadedModel, TokenizeOptions]:
    """Validate, load the model and run the shared pipeline (nothing is written to ``adata``)."""
    _check_adata(adata)
    loaded = load_model(model, cache_dir=cache_dir)
    return infer(adata, loaded, tokenize=options, outputs=outputs, cache_dir=cache_dir, **engine), loaded, options


def _params(run: Inference, loaded: LoadedModel, options: TokenizeOptions, **extra: Any) -> dict[str, Any]:
    """Everything needed to reproduce a run (h5ad-writable: no None values)."""
    src = run.source
    params: dict[str, Any] = {
        "model": loaded.name,
        "model_path": str(loaded.path),
        "weights_sha256": loaded.weights_sha256,
        "gene_key": options.gene_key if options.gene_key is not None else "var_names",
        "counts_source": src.source,
        "clip_counts": options.clip_counts if options.clip_counts is not None else "none",
        "normalize_to_scale": options.normalize_to_scale if options.normalize_to_scale else "none",
        "filter_to_vocab": options.filter_to_vocab,
        "duplicate_genes": options.duplicate_genes,
        "n_genes_matched": src.n_matched,
        "n_genes": src.n_genes,
        "seq_len": loaded.seq_len,
        "device": str(run.engine.device),
        "precision": run.engine.precision,
        "attention": run.engine.attention,
        "transcriptformer_version": __version__,
    }
    if run.species_tables:
        params["species_embedding"] = [str(p) for p in run.species_tables]
    params.update({k: v for k, v in extra.items() if v is not None})
    return params


def embed(
    adata: AnnData,
    model: ModelArg = "tf-sapiens",
    *,
    gene_key: str | None = "ensembl_id",
    layer: str | None = None,
    batch_size: int | None = None,
    max_tokens: int | None = None,
    device: str = "auto",
    precision: str = "auto",
    llh: bool = False,
    clip_counts: float | None = 30,
    normalize_to_scale: float | None = None,
    species_embedding: SpeciesArg = None,
    duplicate_genes: Literal["raise", "first"] = "raise",
    filter_to_vocab: bool = True,
    key_added: str = "X_transcriptformer",
    copy: bool = False,
    progress: bool | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> AnnData | None:
    """Embed cells with a TranscriptFormer model.

    Genes are matched to the model's vocabulary by Ensembl id, each cell becomes a sequence of its
    expressed genes (in the data's column order, at most ``seq_len``) with their counts, and the
    cell embedding is the model's pooled hidden state, exactly as the published implementation
    computes it.

    Parameters
    ----------
    adata
        Annotated data matrix of raw counts (cells x genes). In memory, a view, or backed
        (``sc.read_h5ad(..., backed="r")``; read one window of cells at a time).
    model
        A registry name (``"tf-sapiens"``, ``"tf-exemplar"``, ``"tf-metazoa"``; downloaded and verified
        on first use), a checkpoint folder in the published layout, or a loaded model.
    gene_key
        ``var`` column with Ensembl gene ids (version suffixes are ignored). ``None`` uses
        ``var_names``; if the default column is missing and ``var_names`` are Ensembl ids, they are used.
    layer
        Source of counts: ``None`` uses ``.raw`` if present, else ``X`` (the published rule); or
        ``"X"``, ``"raw"``, or the name of a layer.
    batch_size
        Most cells per batch. By default batches are limited by ``max_tokens`` only.
    max_tokens
        Token budget per batch: cells x (longest cell + 1). Default 16,384 on CPU, 131,072 on GPU.
        On a CUDA out-of-memory error the batch is halved and retried.
    device
        ``"auto"`` (CUDA if available, else CPU), ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``.
    precision
        ``"auto"`` (float32 on CPU, bfloat16 autocast on CUDA), ``"32"``, ``"bf16"``, ``"16"``.
    llh
        Also compute each cell's likelihood under the model: the mean zero-truncated-Poisson negative
        log-likelihood per gene (lower = more typical), as the published ``llh`` output.
    clip_counts
        Counts are clipped to this value (after ``normalize_to_scale``). ``None``: no clipping.
    normalize_to_scale
        Rescale the counts of each cell's retained genes to this total (off by default).
    species_embedding
        For species outside the model's training set: gene-table file(s) in the published HDF5 format,
        or species names such as ``"mus_musculus"`` (from the ``all-embeddings`` download).
    duplicate_genes
        ``"raise"``: duplicate gene ids are an error; ``"first"``: keep the first column of each.
    filter_to_vocab
        Drop genes outside the vocabulary (default). Otherwise they enter as the ``unknown`` token.
    key_added
        ``obsm`` key of the embedding. The run's parameters go to ``uns["transcriptformer"]`` and the
        likelihood to ``obs["transcriptformer_llh"]`` for the default key; otherwise to
        ``uns[key_added]`` and ``obs[f"{key_added}_llh"]``.
    copy
        Return a modified copy instead of writing into ``adata``.
    progress
        Show a progress bar (default: for 2,000 cells or more).
    cache_dir
        Where registry downloads are kept (default ``$TRANSCRIPTFORMER_CACHE`` or the user cache).

    Returns
    -------
    ``None``, or a copy of ``adata`` if ``copy=True``, with:

    ``adata.obsm[key_added]`` : :class:`numpy.ndarray` (float32, ``n_obs x embed_dim``)
        The cell embeddings, in the input's cell order.
    ``adata.uns["transcriptformer"]["params"]`` : :class:`dict`
        Model, checkpoint sha256, options and package version.
    ``adata.uns["transcriptformer"]["llh"]`` and ``adata.obs["transcriptformer_llh"]``
        With ``llh=True``: the per-cell negative log-likelihood (NaN for cells without any gene of
        the vocabulary).

    On any error ``adata`` is left unchanged.

    Examples
    --------
    >>> import scanpy as sc
    >>> import transcriptformer.scanpy as tfs
    >>> adata = tfs.datasets.tiny_human()
    >>> tfs.tl.embed(adata, model=tfs.datasets.tiny_model_path())
    >>> sc.pp.neighbors(adata, use_rep="X_transcriptformer")
    """
    run, loaded, options = _run(
        adata,
        model,
        Outputs(embeddings=True, llh=llh),
        TokenizeOptions(
            gene_key=gene_key,
            layer=layer,
            clip_counts=clip_counts,
            normalize_to_scale=normalize_to_scale,
            filter_to_vocab=filter_to_vocab,
            duplicate_genes=duplicate_genes,
        ),
        species_embedding=species_embedding,
        device=device,
        precision=precision,
        batch_size=batch_size,
        max_tokens=max_tokens,
        progress=progress,
        cache_dir=cache_dir,
    )
    # everything is computed: only now touch the AnnData
    if copy:
        adata = adata.to_memory() if adata.isbacked else adata.copy()
    uns_key, obs_key = (
        ("transcriptformer", "transcriptformer_llh")
        if key_added == "X_transcriptformer"
        else (key_added, f"{key_added}_llh")
    )
    params = _params(run, loaded, options, llh=llh, batch_size=batch_size, max_tokens=run.engine.max_tokens)
    entry: dict[str, Any] = {"params": params}
    if llh:
        entry["llh"] = run.result.llh
    adata.obsm[key_added] = run.result.embeddings
    adata.uns[uns_key] = entry
    if llh:
        adata.obs[obs_key] = run.result.llh
    return adata if copy else None


#: Alias of :func:`embed`, named after the model like ``sc.tl.umap`` is after its method.
transcriptformer = embed


def contextual_gene_embeddings(
    adata: AnnData,
    model: ModelArg = "tf-sapiens",
    *,
    genes: Sequence[str] | None = None,
    gene_key: str | None = "ensembl_id",
    layer: str | None = None,
    batch_size: int | None = None,
    max_tokens: int | None = None,
    device: str = "auto",
    precision: str = "auto",
    clip_counts: float | None = 30,
    normalize_to_scale: float | None = None,
    species_embedding: SpeciesArg = None,
    duplicate_genes: Literal["raise", "first"] = "raise",
    filter_to_vocab: bool = True,
    progress: bool | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> AnnData:
    """Contextual gene embeddings: one vector per gene per cell, read at the gene's prediction slot.

    The vector of gene ``g`` in a cell is the model's hidden state at the position where it
    predicts ``g`` from the genes before it (the published ``--emb-type cge``).

    Parameters
    ----------
    adata, model, gene_key, layer, batch_size, max_tokens, device, precision
        As in :func:`embed`.
    clip_counts, normalize_to_scale, species_embedding, duplicate_genes, filter_to_vocab, progress, cache_dir
        As in :func:`embed`.
    genes
        Keep only these gene ids (version suffixes ignored); the others are dropped as the batches
        are computed, so memory holds only what is kept. The output for a whole atlas is large: one
        row per expressed gene per cell.

    Returns
    -------
    anndata.AnnData
        A new AnnData with one observation per (cell, gene): ``X`` holds the embeddings (float32),
        ``obs`` has ``cell`` (the input's obs name), ``cell_index`` (its position), ``gene_id`` and
        ``position`` (slot in the cell's sequence); ``uns["transcriptformer_cge"]["params"]`` the run's
        parameters. ``adata`` is not modified.
    """
    run, loaded, options = _run(
        adata,
        model,
        Outputs(embeddings=False, cge=True),
        TokenizeOptions(
            gene_key=gene_key,
            layer=layer,
            clip_counts=clip_counts,
            normalize_to_scale=normalize_to_scale,
            filter_to_vocab=filter_to_vocab,
            duplicate_genes=duplicate_genes,
        ),
        cge_genes=genes,
        species_embedding=species_embedding,
        device=device,
        precision=precision,
        batch_size=batch_size,
        max_tokens=max_tokens,
        progress=progress,
        cache_dir=cache_dir,
    )
    res = run.result
    names = run.vocab.names()[res.cge_tokens]
    cells = res.cge_cell_indices
    obs = pd.DataFrame(
        {
            "cell": pd.Categorical(np.asarray(adata.obs_names)[cells]),
            "cell_index": cells,
            "gene_id": pd.Categorical(names),
            "position": res.cge_positions,
        }
    )
    obs.index = obs.index.astype(str)
    out = AnnData(X=res.cge_embeddings, obs=obs)
    out.var_names = [f"tf_{i}" for i in range(out.n_vars)]
    out.uns["transcriptformer_cge"] = {
        "params": _params(run, loaded, options, genes=None if genes is None else list(genes))
    }
    return out


def transfer_labels(
    adata: AnnData,
    reference: AnnData,
    *,
    key: str,
    rep: str = "X_transcriptformer",
    method: Literal["knn", "logreg"] = "knn",
    n_neighbors: int = 15,
    key_added: str | None = None,
    copy: bool = False,
) -> AnnData | None:
    """Transfer ``obs`` labels from an annotated reference to ``adata`` through their embeddings.

    Both datasets must be embedded with the same model (e.g. :func:`embed` on each). ``"knn"`` votes
    among the ``n_neighbors`` nearest reference cells by cosine similarity, weighted by similarity;
    ``"logreg"`` fits a multinomial logistic regression on the reference embeddings.

    Parameters
    ----------
    adata
        Query cells with ``obsm[rep]``.
    reference
        Reference cells with ``obsm[rep]`` and ``obs[key]``.
    key
        Label column of ``reference.obs`` (e.g. ``"cell_type"``).
    rep
        The embedding (same model, same width, in both).
    method
        ``"knn"`` or ``"logreg"``.
    n_neighbors
        Neighbours for ``"knn"``.
    key_added
        ``obs`` column for the labels (default ``f"{key}_transferred"``); the confidence (share of the
        vote, or the class probability) goes to ``f"{key_added}_confidence"``, parameters to
        ``uns[key_added]["params"]``.
    copy
        Return a copy instead of writing into ``adata``.

    Returns
    -------
    anndata.AnnData | None
        ``None``, or a copy of ``adata`` if ``copy=True``.
    """
    _check_adata(adata)
    _check_adata(reference)
    for name, a in (("adata", adata), ("reference", reference)):
        if rep not in a.obsm:
            raise KeyError(f"{name}.obsm has no {rep!r}; embed it first with tfs.tl.embed(...).")
    if key not in reference.obs:
        raise KeyError(f"reference.obs has no column {key!r}; its columns are {list(reference.obs.columns)}.")
    X_ref = np.asarray(reference.obsm[rep], dtype=np.float32)
    X_query = np.asarray(adata.obsm[rep], dtype=np.float32)
    if X_ref.shape[1] != X_query.shape[1]:
        raise ValueError(
            f"the embeddings differ in width ({X_ref.shape[1]} vs {X_query.shape[1]}): embed both with one model."
        )
    labels = reference.obs[key]
    known = labels.notna().to_numpy()
    if known.sum() == 0:
        raise ValueError(f"reference.obs[{key!r}] has no label.")
    y = labels[known].astype(str).to_numpy()
    X_ref = X_ref[known]
    if method == "knn":
        from sklearn.neighbors import KNeighborsClassifier

        k = min(n_neighbors, len(y))
        clf = KNeighborsClassifier(n_neighbors=k, metric="cosine", weights="distance")
    elif method == "logreg":
        from sklearn.linear_model import LogisticRegression

        clf = LogisticRegression(max_iter=1000)
    else:
        raise ValueError(f"method={method!r}; expected 'knn' or 'logreg'.")
    if len(np.unique(y)) == 1:
        predicted = np.full(adata.n_obs, y[0], dtype=object)
        confidence = np.ones(adata.n_obs, dtype=np.float32)
    else:
        clf.fit(X_ref, y)
        proba = clf.predict_proba(X_query)
        predicted = clf.classes_[proba.argmax(axis=1)]
        confidence = proba.max(axis=1).astype(np.float32)
    key_added = key_added or f"{key}_transferred"
    if copy:
        adata = adata.copy()
    categories = pd.unique(labels.dropna().astype(str))
    adata.obs[key_added] = pd.Categorical(predicted, categories=categories)
    adata.obs[f"{key_added}_confidence"] = confidence
    adata.uns[key_added] = {
        "params": {"key": key, "rep": rep, "method": method, "n_neighbors": n_neighbors, "n_reference": len(y)}
    }
    return adata if copy else None
