"""Tools: TranscriptFormer results written into the user's AnnData (``tfs.tl``).

Every tool that runs a model takes the same tokenisation and engine options (documented once, in
:class:`~transcriptformer.inference.options.RunOptions`), validates them and the input before any compute, and
writes nothing until everything has been computed: on error the AnnData is left as it was.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from .._meta import __version__
from ..inference.options import RunOptions, check_bool, check_genes, check_key
from ..weights.checkpoint import LoadedModel, load_model
from ._utils import Keys, Update, check_adata, check_writable, fingerprint, with_run_options

if TYPE_CHECKING:
    from ..inference.pipeline import Inference

logger = logging.getLogger("transcriptformer")

__all__ = [
    "celltype_similarity",
    "contextual_gene_embeddings",
    "embed",
    "gene_embeddings",
    "generate",
    "likelihood",
    "transcriptformer",
    "transfer_labels",
    "umap",
]

ModelArg = str | os.PathLike | LoadedModel


def _run(
    adata: AnnData, model: ModelArg, options: RunOptions, heads: Sequence[str], **extra: Any
) -> tuple[Inference, LoadedModel]:
    """Validate, load the model and run the shared pipeline (nothing is written to ``adata``)."""
    from ..inference.devices import resolve_device
    from ..inference.pipeline import infer

    check_adata(adata)
    resolve_device(options.device)  # an unavailable device is an error before the model is loaded
    loaded = load_model(model, cache_dir=options.cache_dir)
    run = infer(adata, loaded, heads=heads, tokenize=options.tokenize(), **options.engine(), **extra)
    return run, loaded


def _params(run: Inference, loaded: LoadedModel, options: RunOptions, tool: str, **extra: Any) -> dict[str, Any]:
    """Everything needed to reproduce a run (h5ad-writable: no None values)."""
    return run.params(loaded, options, tool, **extra)


def _likelihood_update(update: Update, keys: Keys, run: Inference, adata: AnnData, params: dict, level: str) -> None:
    """Queue the likelihood family's outputs of ``run`` (see :func:`likelihood`)."""
    res = run.result
    update.remove(keys.likelihood_family())
    update.set("obs", keys.obs("llh"), res.llh)
    update.set("obs", keys.obs("n_genes"), res.n_genes.astype(np.int64))
    if level == "gene":
        update.set("obs", keys.obs("end_nll"), res.cells["end_nll"])
        genes = res.genes
        gene_nll = genes["gene_nll"]
        sums = np.bincount(genes["cell"], weights=gene_nll, minlength=adata.n_obs)
        with np.errstate(invalid="ignore", divide="ignore"):
            update.set("obs", keys.obs("gene_nll"), (sums / res.n_genes).astype(np.float32))
        positions = run.source.token_positions(adata.var_names)
        cols = positions[genes["token"]]
        placed = cols >= 0
        if not placed.all():
            logger.warning(
                "%s read genes (of %s) are in %s but not in adata.var, so the layers cannot hold them; obs %r "
                "still covers them.",
                f"{int((~placed).sum()):,}",
                f"{len(cols):,}",
                run.source.source,
                keys.obs("llh"),
            )
        # with filter_to_vocab=False, genes outside the vocabulary are read as the 'unknown' token: they count in
        # obs (as in the published llh) but have no gene identity, so the layers leave them out
        n_unknown = int(res.n_genes.sum()) - len(cols)
        if n_unknown:
            logger.warning(
                "%s read genes (of %s) are outside the vocabulary and were read as the 'unknown' token "
                "(filter_to_vocab=False); the layers hold only vocabulary genes, obs %r covers all.",
                f"{n_unknown:,}",
                f"{int(res.n_genes.sum()):,}",
                keys.obs("llh"),
            )
        params["n_genes_read_as_unknown"] = n_unknown
        for what in ("count_nll", "gene_nll"):
            values = genes[what][placed].astype(np.float32)
            layer = sp.csr_matrix(
                (values, (genes["cell"][placed], cols[placed])), shape=(adata.n_obs, adata.n_vars), dtype=np.float32
            )
            layer.sort_indices()
            update.set("layers", keys.layer(what), layer)
        params["n_genes_not_in_var"] = int((~placed).sum())
    update.set("uns", keys.llh_uns, {"params": params})


@with_run_options
def embed(
    adata: AnnData,
    model: ModelArg = "tf-sapiens",
    *,
    llh: bool = False,
    key_added: str = "X_transcriptformer",
    copy: bool = False,
    options: RunOptions,
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
        on first use), a checkpoint folder in the published layout, or a loaded model. An existing folder
        always wins over a registry name of the same spelling.
    llh
        Also compute each cell's likelihood under the model, exactly what ``likelihood(level="cell")``
        writes: the mean zero-truncated-Poisson negative log-likelihood per gene (lower = more typical),
        as the published ``llh`` output.
    key_added
        ``obsm`` key of the embedding. Its base name (``key_added`` without a leading ``X_``) keys the
        rest: the run's parameters go to ``uns[base]["params"]`` and, with ``llh``, the likelihood to
        ``obs[f"{base}_llh"]`` (see :func:`likelihood`).
    copy
        Return a modified copy instead of writing into ``adata``.
    {run_options}

    Returns
    -------
    ``None``, or a copy of ``adata`` if ``copy=True``, with:

    ``adata.obsm[key_added]`` : :class:`numpy.ndarray` (float32, ``n_obs x embed_dim``)
        The cell embeddings, in the input's cell order.
    ``adata.uns[base]["params"]`` : :class:`dict`
        Model, checkpoint sha256, options, how it ran, and the package version.
    ``adata.obs[f"{base}_llh"]``, ``adata.obs[f"{base}_n_genes"]``, ``adata.uns[f"{base}_llh"]``
        With ``llh=True``: the per-cell negative log-likelihood (NaN for cells without any gene of
        the vocabulary) and the number of genes the model read.

    A run replaces everything an earlier run wrote under the same keys: ``embed(llh=False)`` after
    ``embed(llh=True)`` removes the earlier likelihood columns too, so that results of two runs are never
    mixed. Likelihoods written by :func:`likelihood` are left alone. On any error ``adata`` is left
    unchanged.

    Examples
    --------
    >>> import scanpy as sc
    >>> import transcriptformer.scanpy as tfs
    >>> adata = tfs.datasets.tiny_human()
    >>> tfs.tl.embed(adata, model=tfs.datasets.tiny_model_path())
    >>> sc.pp.neighbors(adata, use_rep="X_transcriptformer")
    """
    llh = check_bool(llh, "llh")
    keys = Keys.from_embedding_key(check_key(key_added))
    copy = check_bool(copy, "copy")
    check_adata(adata)
    check_writable(adata, copy)
    run, loaded = _run(adata, model, options, ("embeddings", "llh") if llh else ("embeddings",))
    update = Update()
    update.remove(keys.embedding_family())
    previous = adata.uns.get(keys.llh_uns, {})
    if not llh and isinstance(previous, dict) and previous.get("params", {}).get("tool") == "embed":
        update.remove(keys.likelihood_family())  # the likelihood of an earlier embed run under this key
    params = _params(run, loaded, options, "embed", llh=llh)
    update.set("obsm", keys.obsm, run.result.embeddings)
    update.set("uns", keys.uns, {"params": params})
    if llh:
        _likelihood_update(update, keys, run, adata, {**params, "level": "cell"}, "cell")
    return update.apply(adata, copy=copy)


#: Alias of :func:`embed`, named after the model like ``sc.tl.umap`` is after its method.
transcriptformer = embed


@with_run_options
def likelihood(
    adata: AnnData,
    model: ModelArg = "tf-sapiens",
    *,
    level: Literal["cell", "gene"] = "cell",
    key_added: str = "transcriptformer",
    copy: bool = False,
    options: RunOptions,
) -> AnnData | None:
    """How likely the model finds each cell, and each of its genes.

    TranscriptFormer is generative: at each gene of a cell it predicts the gene's identity from the genes
    before it (the gene-identity head) and the gene's count (the count head, a zero-truncated Poisson whose
    rate is a softmax over the cell's genes times its total count). These are the negative
    log-likelihoods (NLL, lower = more typical) of what the cell actually contains, exactly as the
    published ``llh`` and ``gene_llh`` outputs compute them (inference mode: each gene's own count enters
    the attention bias).

    Parameters
    ----------
    adata
        Annotated data matrix of raw counts, as in :func:`embed`.
    model
        As in :func:`embed`.
    level
        ``"cell"``: the per-cell count NLL. ``"gene"``: also every read gene's count NLL and gene-identity
        NLL as sparse layers aligned with ``adata.var`` (needs the gene-identity head).
    key_added
        Base name of the outputs (below).
    copy
        Return a modified copy instead of writing into ``adata``.
    {run_options}

    Returns
    -------
    ``None``, or a copy of ``adata`` if ``copy=True``, with:

    ``adata.obs[f"{key_added}_llh"]`` : float32
        Mean count NLL over the genes the model read (the published ``llh``; NaN for a cell without any gene
        of the vocabulary). Identical to ``embed(llh=True)``.
    ``adata.obs[f"{key_added}_n_genes"]`` : int
        Genes the model read (expressed, in the vocabulary, at most ``seq_len``).
    ``adata.layers[f"{key_added}_count_nll"]`` : :class:`scipy.sparse.csr_matrix` (float32), ``level="gene"``
        The count NLL of each read gene at that gene's column. Entries exist exactly for the genes the model
        read; genes it did not read (not expressed, outside the vocabulary, beyond ``seq_len``) are absent,
        never 0. The row mean over the stored entries is ``obs[f"{key_added}_llh"]``. published: for a cell
        with ``seq_len`` or more genes, the last read gene's count is taken as 1.
    ``adata.layers[f"{key_added}_gene_nll"]`` : :class:`scipy.sparse.csr_matrix` (float32), ``level="gene"``
        The gene-identity cross-entropy of each read gene (the published ``gene_llh`` at the gene's slot).
        At the last slot of a full-length cell the published target is ``[END]``; there this layer holds the
        cross-entropy of the gene itself, and the ``[END]`` value goes to ``obs[f"{key_added}_end_nll"]``.
    ``adata.obs[f"{key_added}_gene_nll"]``, ``adata.obs[f"{key_added}_end_nll"]`` : float32, ``level="gene"``
        The mean of the gene-identity layer over the cell's read genes; the ``[END]`` cross-entropy of
        full-length cells (NaN for the others).
    ``adata.uns[f"{key_added}_llh"]["params"]`` : :class:`dict`
        How it was computed.

    When the counts come from ``.raw`` and ``raw.var`` has genes that ``adata.var`` lacks (e.g. ``adata`` was
    subset to highly variable genes), those genes' entries cannot be placed in ``adata.layers`` and are left
    out (a warning says how many; ``params["n_genes_not_in_var"]`` records it); the per-cell values in
    ``obs`` still cover them. Likewise, with ``filter_to_vocab=False`` genes outside the vocabulary are read as
    the ``unknown`` token: they count in ``obs`` (as in the published ``llh``) but have no gene identity and no
    entry in the layers (``params["n_genes_read_as_unknown"]``, with a warning). A run replaces everything an
    earlier likelihood run wrote under ``key_added``.

    Examples
    --------
    >>> import transcriptformer.scanpy as tfs
    >>> adata = tfs.datasets.tiny_human()
    >>> tfs.tl.likelihood(adata, model=tfs.datasets.tiny_model_path(), level="gene")
    >>> int(adata.layers["transcriptformer_count_nll"].nnz) == int(adata.obs["transcriptformer_n_genes"].sum())
    True
    """
    if level not in ("cell", "gene"):
        raise ValueError(f"level={level!r}; expected 'cell' or 'gene'.")
    keys = Keys.from_base(check_key(key_added))
    copy = check_bool(copy, "copy")
    check_adata(adata)
    check_writable(adata, copy)
    heads = ("llh", "end_nll", "count_nll", "gene_nll") if level == "gene" else ("llh",)
    run, loaded = _run(adata, model, options, heads)
    update = Update()
    _likelihood_update(update, keys, run, adata, _params(run, loaded, options, "likelihood", level=level), level)
    return update.apply(adata, copy=copy)


@with_run_options
def contextual_gene_embeddings(
    adata: AnnData,
    model: ModelArg = "tf-sapiens",
    *,
    genes: Sequence[str] | None = None,
    options: RunOptions,
) -> AnnData:
    """Contextual gene embeddings: one vector per gene per cell, read at the gene's prediction slot.

    The vector of gene ``g`` in a cell is the model's hidden state at the position where it
    predicts ``g`` from the genes before it (the published ``--emb-type cge``). For one vector per gene
    (averaged over cells, or over the cells of each group) use :func:`gene_embeddings`, which streams.

    Parameters
    ----------
    adata, model
        As in :func:`embed`.
    genes
        Keep only these gene ids (version suffixes ignored); the others are dropped as the batches
        are computed, so memory holds only what is kept. The output for a whole atlas is large: one
        row per expressed gene per cell.
    {run_options}

    Returns
    -------
    anndata.AnnData
        A new AnnData with one observation per (cell, gene): ``X`` holds the embeddings (float32),
        ``obs`` has ``cell`` (the input's obs name), ``cell_index`` (its position), ``gene_id``, ``position``
        (slot in the cell's sequence) and ``count`` (the count the model saw for that gene, after
        ``normalize_to_scale`` and clipping); ``uns["transcriptformer_cge"]["params"]`` the run's
        parameters. ``adata`` is not modified.
    """
    genes = check_genes(genes)
    run, loaded = _run(adata, model, options, ("cge", "count"), genes=genes)
    res = run.result.genes
    names = run.vocab.names()[res["token"]]
    cells = res["cell"]
    obs = pd.DataFrame(
        {
            "cell": pd.Categorical(np.asarray(adata.obs_names)[cells]),
            "cell_index": cells,
            "gene_id": pd.Categorical(names),
            "position": res["position"],
            "count": res["count"].astype(np.float32),
        }
    )
    obs.index = obs.index.astype(str)
    out = AnnData(X=res["cge"], obs=obs)
    out.var_names = [f"tf_{i}" for i in range(out.n_vars)]
    genes_param = None if genes is None else [str(g) for g in ([genes] if isinstance(genes, str) else genes)]
    out.uns["transcriptformer_cge"] = {
        "params": _params(run, loaded, options, "contextual_gene_embeddings", genes=genes_param)
    }
    return out


@with_run_options
def gene_embeddings(
    adata: AnnData,
    model: ModelArg = "tf-sapiens",
    *,
    groupby: str | None = None,
    genes: Sequence[str] | None = None,
    key_added: str = "X_transcriptformer_genes",
    copy: bool = False,
    options: RunOptions,
) -> AnnData | None:
    """One embedding per gene: the mean of its contextual embeddings over the cells where the model read it.

    The contextual embedding of a gene in a cell (:func:`contextual_gene_embeddings`) is the model's
    hidden state where it predicts that gene from the genes before it. Averaging over cells gives a
    vector per gene that reflects the cellular contexts it occurs in; averaging within groups (cell types,
    species, conditions) lets the same gene be compared across them. The sums are accumulated as the
    batches are computed: memory holds ``n_genes x embed_dim`` (times the number of groups) float64 values,
    never one row per (cell, gene), so backed files of any size run in bounded memory.

    Parameters
    ----------
    adata, model
        As in :func:`embed`.
    groupby
        A categorical ``obs`` column: one mean per (group, gene). Cells whose group is missing are skipped.
    genes
        Only these gene ids (default: every gene of ``adata`` in the vocabulary).
    key_added
        Without ``groupby``: the ``varm`` key of the means and the prefix of ``var[f"{key_added}_n_cells"]``;
        parameters go to ``uns[key_added]["params"]``.
    copy
        Without ``groupby``: return a modified copy instead of writing into ``adata``.
    {run_options}

    Returns
    -------
    Without ``groupby``: ``None`` (or a copy with ``copy=True``) with ``adata.varm[key_added]`` (float32,
    ``n_vars x embed_dim``; NaN rows for genes never read), ``adata.var[f"{key_added}_n_cells"]`` (cells
    that contributed) and ``adata.uns[key_added]["params"]``.

    With ``groupby``: a new :class:`~anndata.AnnData` with one row per (group, gene) that occurs: ``X`` the
    mean (float32), ``obs`` columns ``group``, ``gene_id`` (the vocabulary id), ``gene`` (the gene's
    ``adata.var`` name) and ``n_cells``; ``uns["params"]``. ``adata`` is not modified.

    Genes read from ``.raw`` that ``adata.var`` lacks are left out (their means have no row of ``adata.var``).
    """
    key_added = check_key(key_added)
    copy = check_bool(copy, "copy")
    genes = check_genes(genes)
    check_adata(adata)
    if groupby is None:
        check_writable(adata, copy)
        codes, labels = None, ["all"]
    else:
        if not isinstance(groupby, str) or groupby not in adata.obs:
            raise KeyError(f"groupby={groupby!r} is not a column of adata.obs; columns: {list(adata.obs.columns)}.")
        cat = adata.obs[groupby].astype("category")
        codes, labels = cat.cat.codes.to_numpy().astype(np.int64), [str(c) for c in cat.cat.categories]
        if not labels:
            raise ValueError(f"adata.obs[{groupby!r}] has no group.")
    run, loaded = _run(
        adata, model, options, ("gene_sum",), genes=genes, groups=codes, n_groups=len(labels), data_genes_only=True
    )
    sums = run.result.gene_sums
    positions = run.source.token_positions(adata.var_names)[sums["tokens"]]
    placed = positions >= 0
    genes_param = None if genes is None else [str(g) for g in ([genes] if isinstance(genes, str) else genes)]
    params = _params(run, loaded, options, "gene_embeddings", groupby=groupby, genes=genes_param)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = (sums["sum"] / sums["n"][..., None]).astype(np.float32)
    E = loaded.embed_dim
    if groupby is None:
        varm = np.full((adata.n_vars, E), np.nan, dtype=np.float32)
        n_cells = np.zeros(adata.n_vars, dtype=np.int64)
        varm[positions[placed]] = means[0][placed]
        n_cells[positions[placed]] = sums["n"][0][placed]
        update = Update()
        update.remove([("varm", key_added), ("var", f"{key_added}_n_cells"), ("uns", key_added)])
        update.set("varm", key_added, varm)
        update.set("var", f"{key_added}_n_cells", n_cells)
        update.set("uns", key_added, {"params": params})
        return update.apply(adata, copy=copy)
    g, r = np.nonzero((sums["n"] > 0) & placed[None, :])
    obs = pd.DataFrame(
        {
            "group": pd.Categorical([labels[i] for i in g], categories=labels),
            "gene_id": pd.Categorical(run.vocab.names()[sums["tokens"][r]].astype(str)),
            "gene": pd.Categorical(np.asarray(adata.var_names)[positions[r]]),
            "n_cells": sums["n"][g, r].astype(np.int64),
        }
    )
    obs.index = [f"{labels[i]}:{n}" for i, n in zip(g, obs["gene"], strict=True)]
    out = AnnData(X=means[g, r], obs=obs)
    out.var_names = [f"tf_{i}" for i in range(E)]
    out.uns["params"] = params
    return out


def generate(
    model: ModelArg = "tf-sapiens",
    n_cells: int | None = None,
    *,
    assay: str | Sequence[str] | None = None,
    prompt: AnnData | None = None,
    n_prompt_genes: int | None = None,
    max_genes: int | None = None,
    temperature: float = 1.0,
    top_k: int | None = None,
    total_counts: float | Sequence[float] | None = None,
    seed: int = 0,
    device: str = "auto",
    precision: str = "auto",
    batch_size: int | None = None,
    gene_key: str | None = "ensembl_id",
    layer: str | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> AnnData:
    """In-silico cells sampled from the model, gene by gene, with counts.

    At each slot the gene-identity head gives the next gene (special tokens other than ``[END]`` and genes
    already in the cell are never sampled), then the count head gives its count (a zero-truncated
    Poisson). ``[END]`` or ``max_genes`` ends a cell. Attention uses the *training-mode* semantics (a
    position's own count does not bias its attention to itself), because a gene's count is not known when
    the gene is predicted; embeddings and likelihoods use the inference mode, where it does. Keys and
    values are cached across steps, so a cell of ``n`` genes costs ``n`` single-position passes.

    The released models' count head shares the cell's total count among its genes with a softmax over
    all of them, which a sampler cannot know in advance. The total is taken from ``total_counts`` and the
    softmax's normaliser is estimated from the genes so far, assuming the cell will have ``max_genes``
    genes (exact at the last one). The released models were trained with ``[END]`` as a target only at the
    last slot of full-length cells, so cells usually run to ``max_genes``: set it to the length you want.
    See :mod:`transcriptformer.inference.generation` for the details.

    Parameters
    ----------
    model
        As in :func:`embed` (it needs the gene-identity head).
    n_cells
        Cells to generate (default: one per prompt cell). With a prompt, cell ``i`` continues prompt cell
        ``i % prompt.n_obs``.
    assay
        Assay label of the generated cells (one, or one per cell), from the model's assay vocabulary
        (e.g. ``"10x 3' v3"``); ignored with a prompt (its ``obs["assay"]`` is used). ``None``: unknown.
    prompt
        Real cells (raw counts) to continue: each generated cell starts with the prompt cell's first
        ``n_prompt_genes`` genes in the order the model reads them (its expressed genes in column order) and
        their real counts, unchanged.
    n_prompt_genes
        Genes taken from each prompt cell (default: all of them, up to ``max_genes``).
    max_genes
        Most genes per cell, prompt included (default: the model's ``seq_len``).
    temperature
        The gene logits are divided by it before sampling (1: the model's distribution; lower: more
        typical genes).
    top_k
        Sample each gene among the ``top_k`` most likely only.
    total_counts
        Total count of each cell that the count rates share (one number, or one per cell). Default: the
        prompt cell's total as the model sees it (its clipped counts), else 2.5 counts per gene slot
        (``2.5 * max_genes``), about what droplet data has per detected gene.
    seed
        Random seed: the same seed gives the same cells on the same device and precision.
    device, precision
        As in :func:`embed`.
    batch_size
        Cells generated together (default 64).
    gene_key, layer
        How to read the prompt's gene ids and counts (as in :func:`embed`).
    cache_dir
        Where registry downloads are kept.

    Returns
    -------
    anndata.AnnData
        One row per generated cell. ``X``: sampled counts (CSR float32), one column per vocabulary gene that
        occurs in at least one cell (``var_names`` and ``var["ensembl_id"]`` the vocabulary ids, in vocabulary
        order). ``layers["position"]``: each gene's slot in its cell's sequence (the generation order).
        ``obs``: ``assay``, ``n_genes``, ``n_prompt_genes``, ``ended`` (``[END]`` was sampled), ``total_counts``,
        ``gene_logprob`` (summed log-probability of the sampled genes under the model) and, with a prompt,
        ``prompt_cell`` (the prompt's obs name). ``uns["transcriptformer_generate"]["params"]``.

    Examples
    --------
    >>> import transcriptformer.scanpy as tfs
    >>> cells = tfs.tl.generate(tfs.datasets.tiny_model_path(), 3, assay="10x 3' v3", max_genes=20, seed=1)
    >>> cells.obs["n_genes"].tolist()
    [20, 20, 20]
    """
    from ..inference.generation import sample_cells

    loaded = load_model(model, cache_dir=cache_dir)
    if prompt is not None:
        check_adata(prompt, "prompt")
    g = sample_cells(
        loaded,
        n_cells,
        assay=assay,
        prompt=prompt,
        n_prompt_genes=n_prompt_genes,
        max_genes=max_genes,
        temperature=temperature,
        top_k=top_k,
        total_counts=total_counts,
        seed=seed,
        device=device,
        precision=precision,
        batch_size=batch_size,
        gene_key=gene_key,
        layer=layer,
    )
    n = len(g.lengths)
    slots = np.arange(g.tokens.shape[1])[None, :]
    present = slots < g.lengths[:, None]
    rows, pos = np.nonzero(present)
    tokens = g.tokens[rows, pos]
    genes = np.unique(tokens)
    cols = np.searchsorted(genes, tokens)
    X = sp.csr_matrix((g.counts[rows, pos], (rows, cols)), shape=(n, len(genes)), dtype=np.float32)
    order = sp.csr_matrix((pos.astype(np.float32), (rows, cols)), shape=(n, len(genes)), dtype=np.float32)
    X.sort_indices()
    order.sort_indices()
    names = loaded.vocab.names()[genes].astype(str)
    obs = pd.DataFrame(index=[f"generated_{i}" for i in range(n)])
    if loaded.aux_vocabs:
        inverse = {v: k for k, v in loaded.aux_vocabs[0].labels.items()}
        obs["assay"] = pd.Categorical([inverse.get(int(a), "unknown") for a in g.aux[:, 0]])
    obs["n_genes"] = g.lengths
    obs["n_prompt_genes"] = g.n_prompt
    obs["ended"] = g.ended
    obs["total_counts"] = g.total_counts
    obs["gene_logprob"] = np.nansum(g.gene_logprob, axis=1).astype(np.float32)
    if prompt is not None:
        obs["prompt_cell"] = pd.Categorical(np.asarray(prompt.obs_names)[g.prompt_index])
    out = AnnData(X=X, obs=obs, var=pd.DataFrame({"ensembl_id": names}, index=names))
    out.layers["position"] = order
    out.uns["transcriptformer_generate"] = {
        "params": {
            "tool": "generate",
            "model": loaded.name,
            "model_path": str(loaded.path),
            "weights_sha256": loaded.weights_sha256,
            "n_cells": n,
            "assay": "none" if assay is None else (assay if isinstance(assay, str) else list(map(str, assay))),
            "prompt": prompt is not None,
            "n_prompt_genes": "all" if n_prompt_genes is None else int(n_prompt_genes),
            "max_genes": int(g.tokens.shape[1]),
            "temperature": float(temperature),
            "top_k": "none" if top_k is None else int(top_k),
            "seed": int(seed),
            "device": g.stats["device"],
            "precision": g.stats["precision"],
            "transcriptformer_version": __version__,
        }
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
    check_adata(adata)
    check_adata(reference, "reference")
    key = check_key(key, "key")
    rep = check_key(rep, "rep")
    if method not in ("knn", "logreg"):
        raise ValueError(f"method={method!r}; expected 'knn' or 'logreg'.")
    from ..inference.options import check_positive_int

    n_neighbors = check_positive_int(n_neighbors, "n_neighbors", allow_none=False)
    copy = check_bool(copy, "copy")
    check_writable(adata, copy)
    for name, a in (("adata", adata), ("reference", reference)):
        if rep not in a.obsm:
            raise KeyError(f"{name}.obsm has no {rep!r}; embed it first with tfs.tl.embed(...).")
    if key not in reference.obs:
        raise KeyError(f"reference.obs has no column {key!r}; its columns are {list(reference.obs.columns)}.")
    key_added = f"{key}_transferred" if key_added is None else check_key(key_added)
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

        clf = KNeighborsClassifier(n_neighbors=min(n_neighbors, len(y)), metric="cosine", weights="distance")
    else:
        from sklearn.linear_model import LogisticRegression

        clf = LogisticRegression(max_iter=1000)
    if len(np.unique(y)) == 1:
        predicted = np.full(adata.n_obs, y[0], dtype=object)
        confidence = np.ones(adata.n_obs, dtype=np.float32)
    else:
        clf.fit(X_ref, y)
        proba = clf.predict_proba(X_query)
        predicted = clf.classes_[proba.argmax(axis=1)]
        confidence = proba.max(axis=1).astype(np.float32)
    categories = pd.unique(labels.dropna().astype(str))
    update = Update()
    update.set("obs", key_added, pd.Categorical(predicted, categories=categories))
    update.set("obs", f"{key_added}_confidence", confidence)
    update.set(
        "uns",
        key_added,
        {"params": {"key": key, "rep": rep, "method": method, "n_neighbors": n_neighbors, "n_reference": len(y)}},
    )
    return update.apply(adata, copy=copy)


#: Fewest cells :func:`umap` accepts (scanpy's neighbour graph and spectral layout fail below it)
MIN_UMAP_CELLS = 4


def umap(adata: AnnData, *, rep: str = "X_transcriptformer", n_neighbors: int = 15, random_state: int = 0) -> str:
    """Neighbours and a UMAP of an embedding, under the package's own keys (the user's ``X_umap`` is left alone).

    For ``rep="X_transcriptformer"`` the graph goes to ``uns["transcriptformer_neighbors"]`` (and the
    matching ``obsp`` entries) and the coordinates to ``obsm["X_umap_transcriptformer"]``. Nothing is
    recomputed when both exist and were made from the same embedding (a fingerprint of it is kept) with the
    same settings.

    Parameters
    ----------
    adata
        AnnData with ``obsm[rep]``.
    rep
        The embedding.
    n_neighbors, random_state
        Passed to :func:`scanpy.pp.neighbors` and :func:`scanpy.tl.umap`.

    Returns
    -------
    str
        The basis name for :func:`scanpy.pl.embedding` (``"X_umap_transcriptformer"``).
    """
    import scanpy as sc

    check_adata(adata)
    check_writable(adata, copy=None)
    if rep not in adata.obsm:
        raise KeyError(f"adata.obsm has no {rep!r}; run tfs.tl.embed(adata, ...) first (or pass rep=<obsm key>).")
    if adata.n_obs < MIN_UMAP_CELLS:
        raise ValueError(f"a UMAP needs at least {MIN_UMAP_CELLS} cells; adata has {adata.n_obs}.")
    base = rep.removeprefix("X_")
    basis, key = f"X_umap_{base}", f"{base}_neighbors"
    wanted = {"use_rep": rep, "n_neighbors": n_neighbors, "random_state": random_state}
    wanted["fingerprint"] = fingerprint(adata.obsm[rep])
    params = adata.uns.get(key, {}).get("params", {})
    if basis not in adata.obsm or any(params.get(k) != v for k, v in wanted.items()):
        logger.info("computing neighbours and a UMAP of obsm[%r] (stored as obsm[%r], uns[%r])", rep, basis, key)
        k = min(n_neighbors, adata.n_obs - 1)
        sc.pp.neighbors(adata, use_rep=rep, n_neighbors=k, key_added=key, random_state=random_state)
        coords = sc.tl.umap(adata, neighbors_key=key, random_state=random_state, copy=True).obsm["X_umap"]
        adata.obsm[basis] = coords
        adata.uns[key]["params"]["fingerprint"] = wanted["fingerprint"]
        adata.uns[key]["params"]["n_neighbors"] = n_neighbors
    return basis


def celltype_similarity(
    adatas: AnnData | dict[str, AnnData] | Sequence[AnnData],
    *,
    groupby: str,
    batch_key: str | None = None,
    rep: str = "X_transcriptformer",
    method: Literal["centroid_cosine", "knn_transfer"] = "centroid_cosine",
    n_neighbors: int = 15,
    key_added: str = "transcriptformer_celltype_similarity",
) -> pd.DataFrame:
    """How similar the cell types of different datasets (or species) are in the embedding.

    What the TranscriptFormer paper shows across species: cells of matching types should be close although
    their genes are those of different species.

    Parameters
    ----------
    adatas
        ``{dataset label: AnnData}``, a list of AnnData (labelled ``"0"``, ``"1"``, ...) or one AnnData whose
        datasets are told apart by ``batch_key``. Every dataset must have ``obsm[rep]`` from the same model.
    groupby
        The ``obs`` column with the cell types.
    batch_key
        With one AnnData: the ``obs`` column naming each cell's dataset or species.
    rep
        The embedding.
    method
        ``"centroid_cosine"``: the cosine similarity of the types' mean embeddings. ``"knn_transfer"``: for a
        type ``a`` of dataset ``A`` and a type ``b`` of dataset ``B``, the share of ``a``'s cells whose
        ``n_neighbors`` nearest cells of ``B`` (cosine) vote for ``b``; entries within one dataset are NaN.
    n_neighbors
        Neighbours for ``"knn_transfer"``.
    key_added
        With one AnnData: the result is also stored in ``adata.uns[key_added]`` (``"similarity"`` and
        ``"params"``).

    Returns
    -------
    pandas.DataFrame
        Rows and columns ``"dataset | cell type"`` for every (dataset, type) with at least one cell.
    """
    if isinstance(adatas, AnnData):
        check_adata(adatas)
        check_writable(adatas, copy=None)  # the table goes to its uns
        if batch_key is None:
            parts = {"data": adatas}
        else:
            if batch_key not in adatas.obs:
                raise KeyError(f"adata.obs has no column {batch_key!r}.")
            labels = adatas.obs[batch_key].astype(str)
            parts = {b: adatas[(labels == b).to_numpy()] for b in pd.unique(labels)}
    elif isinstance(adatas, dict):
        parts = dict(adatas)
    else:
        parts = {str(i): a for i, a in enumerate(adatas)}
    if method not in ("centroid_cosine", "knn_transfer"):
        raise ValueError(f"method={method!r}; expected 'centroid_cosine' or 'knn_transfer'.")
    widths = set()
    for name, a in parts.items():
        if rep not in a.obsm:
            raise KeyError(f"dataset {name!r} has no obsm[{rep!r}]; embed it first with tfs.tl.embed.")
        if groupby not in a.obs:
            raise KeyError(f"dataset {name!r} has no obs column {groupby!r}.")
        widths.add(a.obsm[rep].shape[1])
    if len(widths) > 1:
        raise ValueError(f"the embeddings have different widths {sorted(widths)}: embed every dataset with one model.")
    groups: dict[str, tuple[str, str]] = {}  # label -> (dataset, group)
    data = {}
    for name, a in parts.items():
        X = np.asarray(a.obsm[rep], dtype=np.float64)
        y = a.obs[groupby].astype(str).to_numpy()
        known = a.obs[groupby].notna().to_numpy()
        data[name] = (X[known], y[known])
        for g in sorted(pd.unique(y[known])):
            groups[f"{name} | {g}"] = (name, g)
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
        from sklearn.neighbors import KNeighborsClassifier

        for a_name, (Xa, ya) in data.items():
            for b_name, (Xb, yb) in data.items():
                if a_name == b_name:
                    continue
                clf = KNeighborsClassifier(n_neighbors=min(n_neighbors, len(yb)), metric="cosine").fit(Xb, yb)
                pred = clf.predict(Xa)
                for g in pd.unique(ya):
                    share = pd.Series(pred[ya == g]).value_counts(normalize=True)
                    for h, v in share.items():
                        out.loc[f"{a_name} | {g}", f"{b_name} | {h}"] = v
                    cols = [c for c in labels if groups[c][0] == b_name]
                    out.loc[f"{a_name} | {g}", cols] = out.loc[f"{a_name} | {g}", cols].fillna(0.0)
    if isinstance(adatas, AnnData):
        adatas.uns[key_added] = {
            "similarity": out,
            "params": {"groupby": groupby, "batch_key": batch_key or "none", "rep": rep, "method": method},
        }
    return out
