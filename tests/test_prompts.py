"""Asking the model questions: `transcriptformer.inference.prompts` (next gene, interactions, regulators)."""

from __future__ import annotations

import copy
import dataclasses

import anndata
import numpy as np
import pandas as pd
import pytest
import torch

from transcriptformer.data.tokenizer import TokenizeOptions
from transcriptformer.inference import prompts as P

ASSAY = "10x 3' v3"


@pytest.fixture(scope="module")
def cells(tiny_model):
    import transcriptformer.scanpy as tfs

    adata = tfs.datasets.tiny_human()
    adata.obs["assay"] = ASSAY
    return adata


@pytest.fixture(scope="module")
def read(tiny_model, cells):
    """The cells as the model reads them (whole), for the teacher-forced references."""
    src = tiny_model.cells(cells, TokenizeOptions())
    return src.read(0, src.n_obs)


def _teacher_forced(model, window):
    """Training-mode encoder over whole cells: hidden states and count-head targets."""
    with torch.inference_mode():
        tok = torch.from_numpy(window.tokens.astype(np.int64))
        cnt = torch.from_numpy(window.counts)
        enc = model.encode(tok, cnt, torch.from_numpy(window.aux), mode="train", with_targets=True)
    return tok, cnt, enc


def test_next_gene_equals_the_teacher_forced_gene_head(tiny_model, cells, read):
    """The distribution after the first k genes of a cell is the training-mode head at slot k of the whole cell."""
    model, vocab = tiny_model.model, tiny_model.vocab
    k = np.minimum(read.lengths, np.arange(len(read.lengths)) % 9 + 1)  # 1 .. 9 genes, at most the cell's
    keep = read.lengths > 0
    prompts = P.cell_prompts(tiny_model, cells).take(np.flatnonzero(keep)).first(k[keep])
    assert prompts.lengths.tolist() == k[keep].tolist()
    out = P.next_gene(tiny_model, prompts, batch_size=5)
    _, _, enc = _teacher_forced(model, read)
    rows = np.flatnonzero(keep)
    with torch.inference_mode():
        ref = torch.log_softmax(model.gene_logits(enc.hidden[rows, k[keep]]), dim=-1).numpy()
    np.testing.assert_allclose(out.log_prob, ref[:, vocab.n_special :], atol=1e-5, rtol=0)
    np.testing.assert_allclose(out.end_log_prob, ref[:, vocab.end], atol=1e-5, rtol=0)
    # the next gene of the real cell is among the genes the head scored, at its own log-probability
    nxt = read.tokens[rows, k[keep]]
    real = nxt != vocab.pad
    picked = out.log_prob[np.flatnonzero(real), nxt[real] - vocab.n_special]
    np.testing.assert_allclose(picked, ref[np.flatnonzero(real), nxt[real]], atol=1e-5, rtol=0)


def test_count_rate_is_the_count_head_of_prompt_then_gene(tiny_model, cells, read):
    """rate_g = the count head's softmax-link rate of g in the cell 'prompt, then g' with total T."""
    model, vocab = tiny_model.model, tiny_model.vocab
    i, n = 2, 6
    prompts = P.cell_prompts(tiny_model, cells[[i]], n_genes=n)
    out = P.next_gene(tiny_model, prompts, total_counts=40.0)
    tok = np.r_[read.tokens[i, :n].astype(np.int64), 0]
    for g in (vocab.n_special, vocab.n_special + 50, int(read.tokens[i, n])):
        tok[n] = g
        cnt = np.r_[read.counts[i, :n], 3.0].astype(np.float32)
        with torch.inference_mode():
            t, c = torch.from_numpy(tok[None]), torch.from_numpy(cnt[None])
            enc = model.encode(t, c, torch.from_numpy(read.aux[[i]]), mode="train", with_targets=True)
            rate = model.count_rate(enc.hidden, enc.targets, t, c)[0, n].item() * 40.0 / cnt.sum()
            logit = model.count_logits(enc.hidden, enc.targets, t)[0, n].item()
        col = g - vocab.n_special
        assert out.count_logit[0, col] == pytest.approx(logit, abs=1e-5)
        assert out.count_rate[0, col] == pytest.approx(rate, rel=1e-5)
        assert out.expected_count[0, col] == pytest.approx(rate / -np.expm1(-rate), rel=1e-5)
    # default T: the prompt's total as the model reads it
    default = P.next_gene(tiny_model, prompts, counts=False)
    assert default.total_counts[0] == pytest.approx(read.counts[i, :n].sum())
    assert default.count_rate is None and default.expected_count is None
    np.testing.assert_array_equal(default.log_prob, out.log_prob)


def test_gene_prompts_equal_cell_prompts(tiny_model, cells, read):
    i, n = 3, 5
    ids = tiny_model.vocab.names()[read.tokens[i, :n]]
    written = P.gene_prompts(tiny_model, dict(zip(ids, read.counts[i, :n].tolist(), strict=True)), assay=ASSAY)
    from_cell = P.cell_prompts(tiny_model, cells[[i]], n_genes=n)
    np.testing.assert_array_equal(written.tokens, from_cell.tokens)
    a = P.next_gene(tiny_model, written)
    b = P.next_gene(tiny_model, from_cell)
    np.testing.assert_allclose(a.log_prob, b.log_prob, atol=1e-6)
    # several prompts, a plain list means count 1, version suffixes are ignored
    several = P.gene_prompts(tiny_model, [[f"{ids[0]}.7", ids[1]], {ids[2]: 4}], assay=ASSAY)
    assert several.lengths.tolist() == [2, 1] and several.counts[0].tolist() == [1.0, 1.0]
    assert several.counts[1, 0] == 4.0 and list(several.labels) == ["prompt_0", "prompt_1"]


def test_interactions_cached_equal_uncached(tiny_model, cells, read):
    genes = read.tokens[3, :7].astype(np.int64)
    cached = P.interactions(tiny_model, genes, assay=ASSAY)
    plain = P.interactions(tiny_model, genes, assay=ASSAY, use_cache=False)
    np.testing.assert_allclose(cached.score, plain.score, atol=1e-5, equal_nan=True)
    assert np.isnan(np.diag(cached.score)).all() and np.isfinite(cached.score[~np.eye(7, dtype=bool)]).all()
    assert cached.stats["prompt_passes"] == 1 and cached.stats["rows"] == 7  # one prompt pass, m extensions
    assert not plain.stats["cached"] and plain.stats["rows"] == 7  # (background, gene) prompts run in full
    # real cells as the background, in small chunks of extensions (the cache copied row by row)
    bg = P.cell_prompts(tiny_model, cells[5:12])
    a = P.interactions(tiny_model, genes, background=bg, batch_size=3, max_cache_bytes=1)
    b = P.interactions(tiny_model, genes, background=bg, use_cache=False)
    np.testing.assert_allclose(a.score, b.score, atol=1e-5, equal_nan=True)
    assert a.n_background == 7 and a.stats["prompt_passes"] == 3


def test_interaction_score_definition(tiny_model, read):
    """score[i, j] = log p(g_j | g_i) - log p(g_j | nothing), each from the head directly."""
    model, vocab = tiny_model.model, tiny_model.vocab
    genes = read.tokens[4, :4].astype(np.int64)
    out = P.interactions(tiny_model, genes, assay=ASSAY, count=2.0)
    aux = torch.tensor([[tiny_model.aux_vocabs[0].labels[ASSAY]]])
    with torch.inference_mode():
        h0 = model.encode(torch.tensor([[vocab.pad]]), torch.zeros(1, 1), aux, mode="train").hidden[:, 0]
        base = torch.log_softmax(model.gene_logits(h0), -1)[0, genes].numpy()
    np.testing.assert_allclose(out.base_log_prob, base, atol=1e-5)
    ids = vocab.names()[genes]
    after = P.next_gene(tiny_model, P.gene_prompts(tiny_model, [{g: 2.0} for g in ids], assay=ASSAY), counts=False)
    expected = after.log_prob[:, genes - vocab.n_special] - base[None, :]
    np.fill_diagonal(expected, np.nan)
    np.testing.assert_allclose(out.score, expected, atol=1e-5, equal_nan=True)


def test_group_regulators(tiny_model, cells):
    prompts = P.cell_prompts(tiny_model, cells)
    keep = prompts.lengths > 3
    prompts = prompts.take(np.flatnonzero(keep))
    codes = np.arange(len(prompts)) % 3
    cand = prompts.tokens[1, :4].astype(np.int64)
    out = P.group_regulators(tiny_model, prompts, codes, ["a", "b", "c"], cand)
    # the definition, from the per-cell log-probabilities of the cells without the candidates
    drop = np.zeros(len(tiny_model.vocab), dtype=bool)
    drop[cand] = True
    lp = P.candidate_log_probs(tiny_model, prompts.without(drop), cand, at="place")
    np.testing.assert_allclose(out.cell_log_prob, lp, atol=1e-6)
    p = np.exp(lp.astype(np.float64))
    group = np.stack([p[codes == j].mean(0) for j in range(3)])
    np.testing.assert_allclose(out.log2_ratio, np.log2(group / group.mean(0)), atol=1e-5)
    assert out.n_cells.tolist() == np.bincount(codes).tolist()
    assert ((out.pvals > 0) & (out.pvals <= 1)).all() and (out.pvals_adj >= out.pvals - 1e-12).all()
    best = out.order(0)
    assert out.log2_ratio[0, best[0]] == out.log2_ratio[0].max()


def test_scores_at_their_place_are_the_teacher_forced_head(tiny_model, cells, read):
    """at="place": the probability of g after the cell's genes before it = the head at g's slot with g put there."""
    model, vocab = tiny_model.model, tiny_model.vocab
    prompts = P.cell_prompts(tiny_model, cells)
    i = 6
    cand = np.r_[read.tokens[i, [2, 9, 20]], read.tokens[1, 40]].astype(np.int64)
    drop = np.zeros(len(vocab), dtype=bool)
    drop[cand] = True
    ctx = prompts.take(np.array([i])).without(drop)
    got = P.candidate_log_probs(tiny_model, ctx, cand, at="place")[0]
    slots = P.candidate_slots(ctx, cand)[0]
    place = prompts.place
    for g, slot, value in zip(cand, slots, got, strict=True):
        genes = ctx.tokens[0, : ctx.lengths[0]]
        assert (place[genes[:slot]] < place[g]).all() and (place[genes[slot:]] > place[g]).all()
        tok = np.r_[genes[:slot], g, genes[slot:]]
        cnt = np.r_[ctx.counts[0, :slot], 1.0, ctx.counts[0, slot : ctx.lengths[0]]].astype(np.float32)
        with torch.inference_mode():
            h = model.encode(
                torch.from_numpy(tok[None]), torch.from_numpy(cnt[None]), torch.from_numpy(ctx.aux), mode="train"
            )
            ref = torch.log_softmax(model.gene_logits(h.hidden[0, slot]), -1)[g].item()
        assert value == pytest.approx(ref, abs=1e-5)
    end = P.candidate_log_probs(tiny_model, ctx, cand, at="end")[0]
    assert not np.allclose(end, got, atol=1e-3)  # the two places differ


def test_benjamini_hochberg():
    p = np.array([0.01, 0.04, 0.03, np.nan, 0.5])
    adj = P.benjamini_hochberg(p)
    assert np.isnan(adj[3])
    np.testing.assert_allclose(adj[[0, 2, 1, 4]], [0.04, 0.0533333333, 0.0533333333, 0.5], rtol=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# bad input: clear errors


@pytest.fixture
def symbols(monkeypatch, tiny_model):
    """A symbol table for the tiny model's (made-up) ids: SYM<i> is its i-th gene (the real tables are slow)."""
    import pandas as pd

    from transcriptformer.data import gene_ids

    table = {f"SYM{i}": g for i, g in enumerate(tiny_model.vocab.genes[:10])}

    def fake(symbols, species="homo_sapiens", **kwargs):
        ids = [table.get(s) if species == "homo_sapiens" else None for s in symbols]
        return pd.DataFrame({"symbol": list(symbols), "ensembl_id": pd.Series(ids, dtype=object)})

    monkeypatch.setattr(gene_ids, "map_symbols", fake)
    return table


def test_genes_by_symbol(tiny_model, symbols):
    vocab = tiny_model.vocab
    tokens = P.resolve_genes(tiny_model, ["SYM3", vocab.genes[5], f"{vocab.genes[7]}.2"])
    assert tokens.tolist() == vocab.lookup([vocab.genes[3], vocab.genes[5], vocab.genes[7]]).tolist()


def test_unknown_and_duplicate_genes(tiny_model, symbols):
    known = tiny_model.vocab.genes[0]
    with pytest.raises(ValueError, match=r"1 of the 2 prompt genes are not genes of .*NOT_A_GENE"):
        P.gene_prompts(tiny_model, [known, "NOT_A_GENE"])
    with pytest.raises(ValueError, match="more than once"):
        P.gene_prompts(tiny_model, [known, f"{known}.2"])
    with pytest.raises(ValueError, match="more than once"):
        P.gene_prompts(tiny_model, [known, "SYM0"])
    with pytest.raises(ValueError, match="count of"):
        P.gene_prompts(tiny_model, {known: -1})
    with pytest.raises(ValueError, match="non-empty strings"):
        P.resolve_genes(tiny_model, [known, 5])


def test_empty_prompts_are_refused(tiny_model, cells):
    with pytest.raises(ValueError, match="empty"):
        P.gene_prompts(tiny_model, [])
    with pytest.raises(ValueError, match="empty"):
        P.gene_prompts(tiny_model, [[tiny_model.vocab.genes[0]], []])
    prompts = P.cell_prompts(tiny_model, cells)
    assert prompts.lengths.min() >= 0
    empty = dataclasses.replace(prompts, lengths=np.where(np.arange(len(prompts)) == 2, 0, prompts.lengths))
    with pytest.raises(ValueError, match="have no gene of the vocabulary"):
        P.next_gene(tiny_model, empty)


def test_groups_without_cells_are_refused(tiny_model, cells):
    prompts = P.cell_prompts(tiny_model, cells)
    cand = prompts.tokens[1, :2].astype(np.int64)
    codes = np.zeros(len(prompts), dtype=np.int64)
    with pytest.raises(ValueError, match=r"group\(s\) \['b'\] have no cells"):
        P.group_regulators(tiny_model, prompts, codes, ["a", "b"], cand)
    with pytest.raises(ValueError, match="at least 2"):
        P.group_regulators(tiny_model, prompts, codes, ["a"], cand)


def test_a_model_without_gene_head_is_refused(tiny_model, cells):
    headless = dataclasses.replace(tiny_model, model=copy.deepcopy(tiny_model.model))
    headless.model.gene_id_head = None
    prompts = P.cell_prompts(headless, cells[:3])
    with pytest.raises(ValueError, match="no gene-identity head"):
        P.next_gene(headless, prompts)
    with pytest.raises(ValueError, match="no gene-identity head"):
        P.interactions(headless, prompts.tokens[1, :3])
    with pytest.raises(ValueError, match="no gene-identity head"):
        P.group_regulators(headless, prompts, np.array([0, 1, 1]), ["a", "b"], prompts.tokens[1, :2])


def test_interactions_need_two_distinct_genes(tiny_model):
    g = tiny_model.vocab.n_special
    with pytest.raises(ValueError, match="at least 2"):
        P.interactions(tiny_model, np.array([g]))
    with pytest.raises(ValueError, match="distinct"):
        P.interactions(tiny_model, np.array([g, g]))


# ----------------------------------------------------------------------------------------------------------------
# the scanpy faces: tfs.tl.next_gene, tfs.tl.gene_interactions, tfs.tl.rank_regulators, tfs.pl.rank_regulators


@pytest.fixture(autouse=True)
def _no_symbol_tables(request, monkeypatch):
    """The tiny model's ids are made up: skip reading the symbol tables (a second); the slow tests read them."""
    if request.node.get_closest_marker("slow") is None:
        monkeypatch.setattr(P, "gene_symbols", lambda ids: np.full(len(ids), "", dtype=object))


@pytest.fixture
def headless(tiny_model):
    """The tiny model without its gene-identity head."""
    model = dataclasses.replace(tiny_model, model=copy.deepcopy(tiny_model.model))
    model.model.gene_id_head = None
    return model


def test_tl_next_gene(tiny_model, tiny_adata, tmp_path):
    import transcriptformer.scanpy as tfs
    from helpers import assert_unchanged, snapshot

    before = snapshot(tiny_adata)
    cells = tiny_adata[3:9]
    out = tfs.tl.next_gene(cells, tiny_model, n_prompt_genes=5)
    assert_unchanged(tiny_adata, before)
    vocab = tiny_model.vocab
    assert out.shape == (6, len(vocab.genes)) and list(out.var_names) == list(vocab.genes)
    ref = P.next_gene(tiny_model, P.cell_prompts(tiny_model, cells, n_genes=5))
    np.testing.assert_allclose(out.layers["log_probability"], ref.log_prob)
    np.testing.assert_allclose(out.X, np.exp(ref.log_prob), rtol=1e-6)
    np.testing.assert_allclose(out.layers["expected_count"], ref.expected_count)
    assert list(out.obs_names) == list(cells.obs_names) and (out.obs["n_prompt_genes"] <= 5).all()
    np.testing.assert_allclose(out.var["mean_probability"], out.X.mean(axis=0), rtol=1e-5)
    out.write_h5ad(tmp_path / "next.h5ad")
    np.testing.assert_array_equal(anndata.read_h5ad(tmp_path / "next.h5ad").X, out.X)
    params = out.uns["transcriptformer_next_gene"]["params"]
    assert params["tool"] == "next_gene" and params["attention_mode"] == "train"
    # a written prompt: ids with counts
    ids = list(vocab.genes[:3])
    one = tfs.tl.next_gene(dict.fromkeys(ids, 2), tiny_model, assay=ASSAY, counts=False)
    assert one.shape == (1, len(vocab.genes)) and "expected_count" not in one.layers
    assert one.var.loc[ids, "in_prompt"].tolist() == [1.0, 1.0, 1.0]


def test_tl_next_gene_refuses_bad_input(tiny_model, tiny_adata, headless, symbols):
    import transcriptformer.scanpy as tfs

    with pytest.raises(ValueError, match="not genes of"):
        tfs.tl.next_gene([tiny_model.vocab.genes[0], "NOT_A_GENE"], tiny_model, assay=ASSAY)
    with pytest.raises(ValueError, match="empty"):
        tfs.tl.next_gene([], tiny_model)
    with pytest.raises(ValueError, match="assay= is for written prompts"):
        tfs.tl.next_gene(tiny_adata, tiny_model, assay=ASSAY)
    empty = tiny_adata[:2].copy()
    empty.X = empty.X * 0
    with pytest.raises(ValueError, match="no gene of the vocabulary"):
        tfs.tl.next_gene(empty, tiny_model)
    with pytest.raises(ValueError, match="no gene-identity head"):
        tfs.tl.next_gene(tiny_adata, headless)
    with pytest.raises(ValueError, match="does not take species_embedding"):
        tfs.tl.next_gene(tiny_adata, tiny_model, species_embedding="mus_musculus")


def test_tl_gene_interactions(tiny_model, tiny_adata, symbols, tmp_path):
    import transcriptformer.scanpy as tfs
    from helpers import assert_unchanged, snapshot

    before = snapshot(tiny_adata)
    out = tfs.tl.gene_interactions(tiny_adata, tiny_model, max_genes=8, n_top=3)
    assert_unchanged(tiny_adata, before)
    assert out.shape == (8, 8) and list(out.obs_names) == list(out.var_names)
    assert np.isnan(np.diag(out.X)).all()
    np.testing.assert_allclose(out.layers["symmetric"], (out.X + out.X.T) / 2)
    # the genes: the 8 read by most cells, in the data's column order
    src = P.cell_prompts(tiny_model, tiny_adata)
    place = src.place[tiny_model.vocab.lookup(list(out.obs_names))]
    assert (np.diff(place) > 0).all()
    tokens = tiny_model.vocab.lookup(list(out.obs_names))
    ref = P.interactions(tiny_model, tokens, assay="10x 3' v3")  # the data's most frequent assay
    np.testing.assert_allclose(out.X, ref.score, equal_nan=True)
    out.write_h5ad(tmp_path / "pairs.h5ad")
    back = anndata.read_h5ad(tmp_path / "pairs.h5ad")
    pd.testing.assert_frame_equal(
        back.uns["transcriptformer_interactions"]["top_partners"],
        out.uns["transcriptformer_interactions"]["top_partners"],
    )
    top = out.uns["transcriptformer_interactions"]["top_partners"]
    assert len(top) == 8 * 3 and top.groupby("gene")["score"].apply(lambda s: s.is_monotonic_decreasing).all()
    # real cells as the background
    bg = tfs.tl.gene_interactions(None, tiny_model, genes=list(out.obs_names[:4]), background=tiny_adata[5:15])
    assert bg.shape == (4, 4) and bg.uns["transcriptformer_interactions"]["params"]["background"] == "cells"
    with pytest.raises(ValueError, match="background has no cells"):
        tfs.tl.gene_interactions(tiny_adata, tiny_model, max_genes=4, background=tiny_adata[:0])
    with pytest.raises(ValueError, match="not genes of"):
        tfs.tl.gene_interactions(None, tiny_model, genes=[tiny_model.vocab.genes[0], "NOT_A_GENE"])


def _known_var_names(model, adata):
    """The var_names of the genes the model knows."""
    ids = [str(i).split(".", 1)[0] for i in adata.var["ensembl_id"]]
    return adata.var_names[model.vocab.lookup_genes(ids) >= 0]


def test_tl_rank_regulators(tiny_model, tiny_adata, tmp_path):
    import scanpy as sc

    import transcriptformer.scanpy as tfs

    cand = _known_var_names(tiny_model, tiny_adata)[[2, 5, 9, 14, 30]].tolist()
    out = tfs.tl.rank_regulators(tiny_adata, tiny_model, groupby="cell_type", candidates=cand, copy=True)
    assert "transcriptformer_regulators" not in tiny_adata.uns
    res = out.uns["transcriptformer_regulators"]
    groups = sorted(tiny_adata.obs["cell_type"].unique())
    assert set(res["names"].dtype.names) == set(groups)
    df = sc.get.rank_genes_groups_df(out, group="monocyte", key="transcriptformer_regulators")
    assert df["scores"].is_monotonic_decreasing and set(df["names"]) <= set(cand)
    assert res["params"]["groupby"] == "cell_type" and res["params"]["tool"] == "rank_regulators"
    mean = res["mean_probability"]
    np.testing.assert_allclose(
        df.set_index("names")["scores"], np.log2(mean.loc["monocyte"] / mean.mean(axis=0))[df["names"]], rtol=1e-5
    )
    out.write_h5ad(tmp_path / "regulators.h5ad")  # everything written can be saved, and read back by scanpy
    back = anndata.read_h5ad(tmp_path / "regulators.h5ad")
    again = sc.get.rank_genes_groups_df(back, group="monocyte", key="transcriptformer_regulators")
    pd.testing.assert_frame_equal(again, df)
    ax = tfs.pl.rank_regulators(out, n_genes=2, show=False)
    assert len(ax.get_yticklabels()) == len(groups)
    tfs.pl.rank_regulators(out, n_genes=2, kind="heatmap", show=False)
    import matplotlib.pyplot as plt

    plt.close("all")


def test_tl_rank_regulators_writes_nothing_on_error(tiny_model, tiny_adata, headless, symbols):
    import transcriptformer.scanpy as tfs
    from helpers import assert_unchanged, snapshot

    cand = _known_var_names(tiny_model, tiny_adata)[[2, 5]].tolist()
    before = snapshot(tiny_adata)
    with pytest.raises(ValueError, match=r"group\(s\) \['nope'\] of 'cell_type' have no cells"):
        tfs.tl.rank_regulators(tiny_adata, tiny_model, groupby="cell_type", candidates=cand, groups=["B cell", "nope"])
    with pytest.raises(ValueError, match="not genes of"):
        tfs.tl.rank_regulators(tiny_adata, tiny_model, groupby="cell_type", candidates=[*cand, "NOT_A_GENE"])
    with pytest.raises(ValueError, match="no gene-identity head"):
        tfs.tl.rank_regulators(tiny_adata, headless, groupby="cell_type", candidates=cand)
    with pytest.raises(ValueError, match="candidates= is required"):
        tfs.tl.rank_regulators(tiny_adata, tiny_model, groupby="cell_type", candidates=None)
    with pytest.raises(KeyError, match="groupby"):
        tfs.tl.rank_regulators(tiny_adata, tiny_model, groupby="nope", candidates=cand)
    assert_unchanged(tiny_adata, before)
    with pytest.raises(KeyError, match=r"tfs\.tl\.rank_regulators"):
        tfs.pl.rank_regulators(tiny_adata, show=False)


def test_tl_options_are_checked_before_the_model_is_loaded(tiny_adata, monkeypatch):
    """A typo must not cost a download and load of the model (the default is tf-sapiens)."""
    import transcriptformer.scanpy as tfs
    from transcriptformer.scanpy.tl import _common

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(_common, "load_model", no_loading)
    gene = "ENSG00000000001"
    for call, match in [
        (lambda: tfs.tl.generate("tf-sapiens", 0), "n_cells must be a positive integer"),
        (lambda: tfs.tl.generate("tf-sapiens", 2, temperature=0), "temperature must be a finite number > 0"),
        (lambda: tfs.tl.generate("tf-sapiens", 2, top_k=0), "top_k must be a positive integer"),
        (lambda: tfs.tl.generate("tf-sapiens", 2, seed=-1), "seed must be an integer"),
        (lambda: tfs.tl.generate("tf-sapiens", 2, total_counts=-5), "total_counts must be finite"),
        (lambda: tfs.tl.generate("tf-sapiens", 2, n_prompt_genes=3), "n_prompt_genes needs a prompt"),
        (lambda: tfs.tl.next_gene([gene], "tf-sapiens", total_counts=-1), "total_counts must be finite numbers > 0"),
        (lambda: tfs.tl.next_gene([gene], "tf-sapiens", total_counts="x"), "total_counts must be a number"),
        (lambda: tfs.tl.gene_interactions(tiny_adata, "tf-sapiens", count=-1), "count must be a finite number > 0"),
        (lambda: tfs.tl.gene_interactions(tiny_adata, "tf-sapiens", random_state="a"), "random_state must be"),
        (
            lambda: tfs.tl.rank_regulators(
                tiny_adata, "tf-sapiens", groupby="cell_type", candidates=[gene], random_state=1.5
            ),
            "random_state must be an integer >= 0 or None",
        ),
    ]:
        with pytest.raises(ValueError, match=match):
            call()


def test_the_layer_and_gene_ids_are_checked_before_the_model_is_loaded(tiny_adata, monkeypatch):
    """A typo in layer= or gene_key= is reported without loading (or downloading) the model, by every tool."""
    import transcriptformer.scanpy as tfs
    from transcriptformer.scanpy import pp
    from transcriptformer.scanpy.tl import _common

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the layer and gene ids were checked")

    monkeypatch.setattr(_common, "load_model", no_loading)
    monkeypatch.setattr(pp, "load_model", no_loading)
    calls = {
        "embed": lambda **kw: tfs.tl.embed(tiny_adata, "tf-sapiens", **kw),
        "likelihood": lambda **kw: tfs.tl.likelihood(tiny_adata, "tf-sapiens", **kw),
        "gene_embeddings": lambda **kw: tfs.tl.gene_embeddings(tiny_adata, "tf-sapiens", **kw),
        "gene_embeddings_by_group": lambda **kw: tfs.tl.gene_embeddings_by_group(
            tiny_adata, "tf-sapiens", groupby="cell_type", **kw
        ),
        "next_gene": lambda **kw: tfs.tl.next_gene(tiny_adata, "tf-sapiens", **kw),
        "gene_interactions": lambda **kw: tfs.tl.gene_interactions(tiny_adata, "tf-sapiens", **kw),
        "rank_regulators": lambda **kw: tfs.tl.rank_regulators(
            tiny_adata, "tf-sapiens", groupby="cell_type", candidates=["ENSG00000000001"], **kw
        ),
        "generate": lambda **kw: tfs.tl.generate("tf-sapiens", prompt=tiny_adata, **kw),
        "check_input": lambda **kw: tfs.pp.check_input(tiny_adata, "tf-sapiens", **kw),
    }
    for call in calls.values():
        with pytest.raises(KeyError, match=r"layer 'counts_typo' not found"):
            call(layer="counts_typo")
        with pytest.raises(KeyError, match=r"gene id column 'gene_ids_typo' not found"):
            call(gene_key="gene_ids_typo")
        with pytest.raises(ValueError, match=r"layer='raw' but adata\.raw is None"):
            call(layer="raw")


def test_tl_rank_regulators_random_state_none(tiny_model, tiny_adata):
    import transcriptformer.scanpy as tfs

    cand = _known_var_names(tiny_model, tiny_adata)[[2, 5]].tolist()
    for max_cells in (None, 2):  # with and without subsampling
        out = tfs.tl.rank_regulators(
            tiny_adata, tiny_model, groupby="cell_type", candidates=cand, random_state=None, max_cells=max_cells,
            copy=True,
        )  # fmt: skip
        n_cells = out.uns["transcriptformer_regulators"]["n_cells"]
        assert max_cells is None or max(n_cells.values()) <= max_cells


def test_tl_gene_interactions_default_assay_leaves_missing_labels_out(tiny_model, tiny_adata):
    """The default assay is the most frequent label, not "nan" when most cells have none."""
    import warnings

    import transcriptformer.scanpy as tfs
    from transcriptformer.errors import TranscriptFormerWarning
    from transcriptformer.scanpy.tl._prompts import _assay_of

    adata = tiny_adata.copy()
    assert adata.n_obs == 21
    adata.obs["assay"] = pd.Series([np.nan] * 12 + [None] * 2 + [ASSAY] * 7, index=adata.obs_names, dtype=object)
    genes = list(tiny_model.vocab.genes[:3])
    with warnings.catch_warnings():
        warnings.simplefilter("error", TranscriptFormerWarning)  # no "unknown assay 'nan'" warning
        out = tfs.tl.gene_interactions(adata, tiny_model, genes=genes)
    assert out.uns["transcriptformer_interactions"]["params"]["assay"] == ASSAY
    ref = tfs.tl.gene_interactions(adata, tiny_model, genes=genes, assay=ASSAY)
    np.testing.assert_array_equal(out.X, ref.X)
    adata.obs["assay"] = pd.Categorical([np.nan] * 20 + [ASSAY])
    assert _assay_of(adata) == ASSAY
    adata.obs["assay"] = pd.Series([None] * 21, index=adata.obs_names, dtype=object)
    assert _assay_of(adata) is None  # no label at all: unknown


def _refuse_loading(monkeypatch):
    from transcriptformer.scanpy.tl import _common

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(_common, "load_model", no_loading)


def test_tl_rank_regulators_refuses_an_empty_group_label_before_the_model_runs(tiny_adata, monkeypatch):
    """numpy renames an empty field name, so '' cannot name a group: refused upfront, not after the computation."""
    import transcriptformer.scanpy as tfs
    from helpers import assert_unchanged, snapshot

    _refuse_loading(monkeypatch)
    adata = tiny_adata.copy()
    adata.obs["label"] = adata.obs["cell_type"].astype(str)
    adata.obs.loc[adata.obs_names[:2], "label"] = ""
    before = snapshot(adata)
    for kwargs in ({}, {"groups": ["", "B cell"]}):
        with pytest.raises(ValueError, match=r"cells of 'label' are labelled '' \(the empty string\)"):
            tfs.tl.rank_regulators(adata, "tf-sapiens", groupby="label", candidates=["ENSG00000000001"], **kwargs)
    assert_unchanged(adata, before)


def test_tl_rank_regulators_empty_group_label_left_out_with_groups(tiny_model, tiny_adata):
    import transcriptformer.scanpy as tfs

    adata = tiny_adata.copy()
    adata.obs["label"] = adata.obs["cell_type"].astype(str)
    adata.obs.loc[adata.obs_names[:2], "label"] = ""
    cand = _known_var_names(tiny_model, adata)[[2, 5]].tolist()
    groups = ["B cell", "monocyte"]
    tfs.tl.rank_regulators(adata, tiny_model, groupby="label", candidates=cand, groups=groups)
    assert adata.uns["transcriptformer_regulators"]["names"].dtype.names == tuple(groups)


def test_tl_rank_regulators_groups_given_twice_or_not_labels(tiny_adata, monkeypatch):
    import transcriptformer.scanpy as tfs

    _refuse_loading(monkeypatch)
    gene = ["ENSG00000000001"]
    for groups, match in [
        (["B cell", "B cell", "monocyte"], r"group\(s\) \['B cell'\] of 'cell_type' are given more than once"),
        ([None, "B cell"], r"groups must be labels of obs\['cell_type'\]"),
        ([["B cell"], "monocyte"], r"groups must be labels of obs\['cell_type'\]"),
        ({"B cell": 1}, r"groups must be labels of obs\['cell_type'\]"),
    ]:
        with pytest.raises(ValueError, match=match):
            tfs.tl.rank_regulators(tiny_adata, "tf-sapiens", groupby="cell_type", candidates=gene, groups=groups)
    adata = tiny_adata.copy()
    adata.obs["cluster"] = adata.obs["cell_type"].cat.codes.astype(int)
    with pytest.raises(ValueError, match=r"given more than once in groups= \(labels are compared as strings\)"):
        tfs.tl.rank_regulators(adata, "tf-sapiens", groupby="cluster", candidates=gene, groups=[0, "0", 1])


def test_tl_rank_regulators_takes_the_column_own_labels(tiny_model, tiny_adata):
    """Cluster ids: groups=[0, 1] are the groups '0' and '1' (labels are compared as strings, as the grouping does)."""
    import transcriptformer.scanpy as tfs

    adata = tiny_adata.copy()
    adata.obs["cluster"] = adata.obs["cell_type"].cat.codes.astype(int)
    cand = _known_var_names(tiny_model, adata)[[2, 5]].tolist()
    by_int = tfs.tl.rank_regulators(
        adata, tiny_model, groupby="cluster", candidates=cand, groups=[np.int64(0), 1], copy=True
    ).uns["transcriptformer_regulators"]
    by_str = tfs.tl.rank_regulators(
        adata, tiny_model, groupby="cluster", candidates=cand, groups=["0", "1"], copy=True
    ).uns["transcriptformer_regulators"]
    assert by_int["names"].dtype.names == ("0", "1")
    assert by_int["n_cells"] == by_str["n_cells"] == {g: int((adata.obs["cluster"] == int(g)).sum()) for g in "01"}
    pd.testing.assert_frame_equal(by_int["mean_probability"], by_str["mean_probability"])


def test_tl_next_gene_total_counts_of_the_wrong_length(tiny_model, tiny_adata, monkeypatch):
    """One number or one per prompt: named before the model is loaded where the prompts are counted upfront."""
    import transcriptformer.scanpy as tfs

    gene = tiny_model.vocab.genes[0]
    other = tiny_model.vocab.genes[1]
    written = P.gene_prompts(tiny_model, [[gene], [other]], assay=ASSAY)
    with pytest.raises(ValueError, match=r"total_counts must be one number or one per prompt \(2\), got shape \(3,\)"):
        P.next_gene(tiny_model, written, total_counts=[1.0, 2.0, 3.0])
    # a generator of prompts is only counted once read: still before the computation
    gen = (p for p in [[gene], [other]])
    with pytest.raises(ValueError, match=r"one per prompt \(2\), got shape \(3,\)"):
        tfs.tl.next_gene(gen, tiny_model, total_counts=[1, 2, 3])
    _refuse_loading(monkeypatch)
    for prompt, totals, match in [
        (tiny_adata[:3], [100, 200], r"one number or one per prompt \(3\), got shape \(2,\)"),
        (tiny_adata[:2], [[100, 200]], r"one number or one per prompt \(2\), got shape \(1, 2\)"),
        ([[gene], [other]], [1, 2, 3], r"one per prompt \(2\), got shape \(3,\)"),
        ({gene: 2, other: 1}, [1, 2], r"one per prompt \(1\), got shape \(2,\)"),
        ([gene, other], [1, 2], r"one per prompt \(1\), got shape \(2,\)"),
    ]:
        with pytest.raises(ValueError, match=match):
            tfs.tl.next_gene(prompt, "tf-sapiens", total_counts=totals)


@pytest.mark.slow
def test_demo_model_prompted_by_symbols():
    """On tf-demo (real Ensembl ids): symbols in, symbols out."""
    import transcriptformer.scanpy as tfs

    out = tfs.tl.next_gene({"LYZ": 5, "S100A9": 3}, "tf-demo", assay="10x 3' v1")
    assert out.var.loc["ENSG00000090382", "symbol"] == "LYZ"
    assert out.var.loc["ENSG00000090382", "in_prompt"] == 1.0
    assert out.obs["n_prompt_genes"].tolist() == [2]


def test_tl_rank_regulators_candidates_are_genes_of_raw(tiny_model, tiny_adata):
    """With the counts in .raw, candidates named by var_names are raw.var's (ids in raw.var), and shown so."""
    import transcriptformer.scanpy as tfs

    cand = _known_var_names(tiny_model, tiny_adata)[[2, 5, 9]].tolist()
    expected = tfs.tl.rank_regulators(tiny_adata, tiny_model, groupby="cell_type", candidates=cand, copy=True)
    hvg = tiny_adata.copy()
    hvg.raw = tiny_adata.copy()
    hvg = hvg[:, ~hvg.var_names.isin(cand[:1])].copy()  # one candidate only in .raw
    del hvg.var["ensembl_id"]  # the ids are in raw.var only
    got = tfs.tl.rank_regulators(hvg, tiny_model, groupby="cell_type", candidates=cand, copy=True)
    a, b = got.uns["transcriptformer_regulators"], expected.uns["transcriptformer_regulators"]
    pd.testing.assert_frame_equal(a["mean_probability"], b["mean_probability"])
    assert set(a["mean_probability"].columns) == set(cand)


def test_group_order_is_the_same_in_every_tool(tiny_model, tiny_adata):
    """rank_regulators and gene_embeddings_by_group group a column the same way: categories in their order,
    other columns sorted as pandas sorts their values (numbers as numbers), labels equal as strings together."""
    import transcriptformer.scanpy as tfs
    from transcriptformer.scanpy.tl._common import group_codes

    a = tiny_adata.copy()
    a.obs["cluster"] = np.asarray([10, 2, 1] * 7, dtype=object)[: a.n_obs]  # not categorical, numbers
    cand = _known_var_names(tiny_model, a)[[2, 5]].tolist()
    ranked = tfs.tl.rank_regulators(a, tiny_model, groupby="cluster", candidates=cand, copy=True)
    by_group = tfs.tl.gene_embeddings_by_group(a, tiny_model, groupby="cluster")
    expected = ["1", "2", "10"]
    assert list(ranked.uns["transcriptformer_regulators"]["names"].dtype.names) == expected
    assert list(pd.unique(by_group.obs["group"].astype(str))) == expected
    codes, labels = group_codes(pd.Series(pd.Categorical(["x", "y", None, "x"], categories=["y", "x", "z"])))
    assert labels == ["y", "x"] and codes.tolist() == [1, 0, -1, 1]
