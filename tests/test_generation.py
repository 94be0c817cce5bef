"""In-silico cells: ``transcriptformer.inference.generation.sample_cells`` and its face ``tfs.tl.generate``."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import scipy.stats
import torch

import transcriptformer.scanpy as tfs
from helpers import assert_unchanged, snapshot
from transcriptformer.data.tokenizer import TokenizeOptions, prepare_cells
from transcriptformer.inference.generation import sample_cells, sample_zero_truncated_poisson

ASSAY = "10x 3' v3"


@pytest.fixture(scope="module")
def cells(tiny_model):
    return sample_cells(tiny_model, 6, assay=ASSAY, seed=3)


# --- sample_cells ---------------------------------------------------------------------------------------------------


def test_same_seed_same_cells_other_seed_other_cells(tiny_model, cells):
    again = sample_cells(tiny_model, 6, assay=ASSAY, seed=3)
    np.testing.assert_array_equal(again.tokens, cells.tokens)
    np.testing.assert_array_equal(again.counts, cells.counts)
    other = sample_cells(tiny_model, 6, assay=ASSAY, seed=4)
    assert not np.array_equal(other.tokens, cells.tokens)


def test_genes_are_valid_and_unique_counts_positive_integers(tiny_model, cells):
    vocab = tiny_model.vocab
    for i, n in enumerate(cells.lengths):
        genes = cells.tokens[i, :n]
        assert ((genes >= vocab.n_special) & (genes < len(vocab))).all()  # no special token is ever a gene
        assert len(np.unique(genes)) == n  # never the same gene twice
        counts = cells.counts[i, :n]
        assert (counts >= 1).all() and np.array_equal(counts, np.round(counts))
        assert (cells.tokens[i, n:] == vocab.pad).all() and (cells.counts[i, n:] == 0).all()
    assert (cells.lengths[~cells.ended] == tiny_model.seq_len).all()  # without [END] a cell runs to max_genes


def test_cached_log_probabilities_equal_a_teacher_forced_training_forward(tiny_model, cells):
    """The KV-cached sampler's view of each generated cell is the training-mode forward over the finished cell."""
    model = tiny_model.model
    tok = torch.from_numpy(cells.tokens)
    cnt = torch.from_numpy(np.minimum(cells.counts, 30.0))  # the model reads clipped counts
    with torch.inference_mode():
        enc = model.encode(tok, cnt, torch.from_numpy(cells.aux), mode="train", with_targets=True)
        logp = torch.log_softmax(model.gene_logits(enc.hidden), dim=-1)
        logp = logp.gather(-1, tok[..., None])[..., 0].numpy()
        logit = model.count_logits(enc.hidden, enc.targets, tok).numpy()
    real = np.arange(tok.shape[1])[None, :] < cells.lengths[:, None]
    assert real.sum() > 100
    np.testing.assert_allclose(cells.gene_logprob[real], logp[real], atol=1e-5, rtol=0)
    np.testing.assert_allclose(cells.count_logit[real], logit[real], atol=1e-5, rtol=0)
    # the inference (embed) mode differs: the cache really runs the training-mode semantics
    with torch.inference_mode():
        embed_mode = model.encode(tok, cnt, torch.from_numpy(cells.aux), mode="embed").hidden
    assert (embed_mode - enc.hidden).abs()[torch.from_numpy(real)].max() > 1e-3


def test_cache_gives_the_cells_of_the_uncached_reference(tiny_model):
    cached = sample_cells(tiny_model, 3, assay=ASSAY, seed=7, max_genes=30)
    plain = sample_cells(tiny_model, 3, assay=ASSAY, seed=7, max_genes=30, use_cache=False)
    np.testing.assert_array_equal(cached.tokens, plain.tokens)
    np.testing.assert_array_equal(cached.counts, plain.counts)
    np.testing.assert_allclose(cached.gene_logprob, plain.gene_logprob, atol=1e-5)


def _first_gene_probabilities(tiny_model, assay_token: int) -> np.ndarray:
    model, vocab = tiny_model.model, tiny_model.vocab
    with torch.inference_mode():
        h = model.encode(torch.tensor([[vocab.pad]]), torch.zeros(1, 1), torch.tensor([[assay_token]]), mode="train")
        logits = model.gene_logits(h.hidden[:, 0])[0].clone()
        end = logits[vocab.end].clone()
        logits[: vocab.n_special] = -np.inf
        logits[vocab.end] = end  # [END] may be sampled
        return torch.softmax(logits, dim=-1).numpy()


def test_first_gene_follows_the_head_distribution(tiny_model):
    """Chi-square test of 20,000 first genes against the gene-identity head's probabilities."""
    n = 20_000
    sampled = sample_cells(tiny_model, n, assay=ASSAY, seed=11, max_genes=1, batch_size=n)
    first = np.where(sampled.ended, tiny_model.vocab.end, sampled.tokens[:, 0])
    p = _first_gene_probabilities(tiny_model, tiny_model.aux_vocabs[0].labels[ASSAY])
    observed = np.bincount(first, minlength=len(p))
    support = p > 0
    assert observed[~support].sum() == 0
    expected = p[support].astype(np.float64) * n
    # pool the rare categories so that every expected count is at least 5
    order = np.argsort(expected)
    obs_s, exp_s = observed[support][order], expected[order]
    rare = np.cumsum(exp_s) < 50
    obs_b = np.r_[obs_s[rare].sum(), obs_s[~rare]]
    exp_b = np.r_[exp_s[rare].sum(), exp_s[~rare]]
    stat, pvalue = scipy.stats.chisquare(obs_b, exp_b * obs_b.sum() / exp_b.sum())
    assert pvalue > 1e-3, (stat, pvalue)
    # and a wrong distribution (uniform) is rejected by the same test
    uniform = np.full(len(exp_b), obs_b.sum() / len(exp_b))
    assert scipy.stats.chisquare(obs_b, uniform).pvalue < 1e-6


def test_zero_truncated_poisson_sampler():
    g = torch.Generator().manual_seed(0)
    for rate in (0.05, 1.0, 7.5, 60.0):
        x = sample_zero_truncated_poisson(torch.full((40_000,), rate), g).numpy()
        assert x.min() >= 1 and np.array_equal(x, np.round(x))
        mean = rate / -np.expm1(-rate)  # E[X | X >= 1]
        var = mean * (1 + rate - mean)
        assert abs(x.mean() - mean) < 5 * np.sqrt(var / len(x))
        if rate == 1.0:  # the whole distribution: P(k) = rate^k e^-rate / (k! (1 - e^-rate))
            k = np.arange(1, 6)
            pk = scipy.stats.poisson.pmf(k, rate) / -np.expm1(-rate)
            np.testing.assert_allclose(np.bincount(x.astype(int), minlength=6)[1:6] / len(x), pk, atol=0.01)


def test_top_k_restricts_each_choice(tiny_model):
    k = 3
    cells = sample_cells(tiny_model, 4, assay=ASSAY, seed=5, max_genes=10, top_k=k)
    model, vocab = tiny_model.model, tiny_model.vocab
    tok = torch.from_numpy(cells.tokens)
    with torch.no_grad():
        enc = model.encode(
            tok, torch.from_numpy(np.minimum(cells.counts, 30)), torch.from_numpy(cells.aux), mode="train"
        )
        logits = model.gene_logits(enc.hidden)
    for i in range(4):
        for t in range(cells.lengths[i]):
            lg = logits[i, t].clone()
            lg[: vocab.n_special] = -np.inf
            lg[vocab.end] = logits[i, t, vocab.end]
            lg[cells.tokens[i, :t]] = -np.inf  # genes already in the cell
            assert (lg > lg[cells.tokens[i, t]]).sum() < k


def test_total_counts_scales_the_counts(tiny_model):
    small = sample_cells(tiny_model, 8, assay=ASSAY, seed=9, max_genes=40, total_counts=40)
    large = sample_cells(tiny_model, 8, assay=ASSAY, seed=9, max_genes=40, total_counts=4000)
    assert large.counts.sum() > 5 * small.counts.sum()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"temperature": 0}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_k": 0}, "top_k"),
        ({"max_genes": 64}, "seq_len"),
        ({"n_prompt_genes": 3}, "needs a prompt"),
        ({"total_counts": -1}, "total_counts"),
        ({"seed": 1.5}, "seed"),
        ({"seed": 2**64}, "seed must be an integer from 0"),
        ({"seed": -1}, "seed must be an integer from 0"),
        ({"total_counts": [10, 20, 30]}, r"one per generated cell \(2\), got shape \(3,\)"),
        ({"total_counts": [[10, 20]]}, "one per generated cell"),
        ({"total_counts": "many"}, "total_counts must be a number"),
    ],
)
def test_bad_options(tiny_model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        sample_cells(tiny_model, 2, **kwargs)


def test_numpy_numbers_are_options_too(tiny_model):
    cells = sample_cells(tiny_model, 3, max_genes=4, temperature=np.float32(0.5), total_counts=np.array([10, 20, 30]))
    assert len(cells.lengths) == 3


def test_a_vanishing_temperature_samples_greedily(tiny_model):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow or NaN warning either
        cold = sample_cells(tiny_model, 3, assay=ASSAY, seed=1, max_genes=12, temperature=1e-45)
    greedy = sample_cells(tiny_model, 3, assay=ASSAY, seed=1, max_genes=12, top_k=1)
    # the most likely gene at every slot (the counts, and so what follows them, still come from the seed)
    np.testing.assert_array_equal(cold.tokens, greedy.tokens)
    np.testing.assert_array_equal(cold.counts, greedy.counts)
    p = _first_gene_probabilities(tiny_model, tiny_model.aux_vocabs[0].labels[ASSAY])
    assert (cold.tokens[:, 0] == int(np.argmax(p))).all()
    assert np.isfinite(cold.counts).all() and (cold.lengths > 0).all()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"total_counts": 1e38}, r"total_counts must be finite, > 0 and at most 1e\+09"),
        ({"total_counts": [10.0, float("inf")]}, "total_counts must be finite"),
        ({"assay": 3}, r"assay must be a label \(a string\), one label per cell, or None"),
        ({"assay": ["10x 3' v3", 3]}, "assay must be a label"),
    ],
    ids=["total-1e38", "total-inf", "assay-int", "assay-list-with-int"],
)
def test_unreasonable_totals_and_assays_are_clear_errors(tiny_model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        sample_cells(tiny_model, 2, max_genes=4, **kwargs)


def test_an_unknown_assay_label_is_a_transcriptformer_warning(tiny_path, tiny_model):
    """As in the other tools (docs/errors.md): a warning that -W error and warnings filters see, not only a log line."""
    from transcriptformer.errors import TranscriptFormerWarning

    match = r"assay label\(s\) \['10x 3 v3'\] are not in tf_tiny's assay vocabulary, so they mean 'unknown'"
    with pytest.warns(TranscriptFormerWarning, match=match):
        cells = sample_cells(tiny_model, 2, assay="10x 3 v3", max_genes=4)
    assert (cells.aux[:, 0] == tiny_model.aux_vocabs[0].unknown).all()
    with pytest.warns(TranscriptFormerWarning, match=match):
        out = tfs.tl.generate(tiny_path, 2, assay=["10x 3 v3", ASSAY], max_genes=4)
    assert out.obs["assay"].astype(str).tolist() == ["unknown", ASSAY]
    with warnings.catch_warnings():
        warnings.simplefilter("error", TranscriptFormerWarning)
        sample_cells(tiny_model, 2, assay=ASSAY, max_genes=4)  # known labels: no warning


# --- tl.generate ----------------------------------------------------------------------------------------------------


def test_prompts_are_continued_never_altered(tiny_path, tiny_model, tiny_adata):
    before = snapshot(tiny_adata)
    out = tfs.tl.generate(tiny_path, prompt=tiny_adata[:5], n_prompt_genes=4, seed=2, max_genes=12)
    assert_unchanged(tiny_adata, before)
    src = prepare_cells(
        tiny_adata, tiny_model.vocab, tiny_model.aux_vocabs, seq_len=63, options=TokenizeOptions(clip_counts=None)
    )
    window = src.read(0, 5)
    names = tiny_model.vocab.names()
    position = out.layers["position"].toarray()
    X = out.X.toarray()
    for i in range(5):
        p = min(4, window.lengths[i])
        assert out.obs["n_prompt_genes"].iloc[i] == p
        cols = [out.var_names.get_loc(names[t]) for t in window.tokens[i, :p]]
        np.testing.assert_array_equal(position[i, cols], np.arange(p))  # first, in the prompt's order
        np.testing.assert_array_equal(X[i, cols], window.counts[i, :p])  # with their real (unclipped) counts
    assert list(out.obs["prompt_cell"].astype(str)) == list(tiny_adata.obs_names[:5])
    assert list(out.obs["assay"].astype(str)) == [
        a if a in tiny_model.aux_vocabs[0].labels else "unknown" for a in tiny_adata.obs["assay"][:5]
    ]


def test_generate_anndata(tiny_path, tiny_model):
    out = tfs.tl.generate(tiny_path, 4, assay=ASSAY, max_genes=15, temperature=0.7, top_k=20, seed=1)
    assert out.n_obs == 4 and sp.issparse(out.X) and out.X.dtype == np.float32
    assert (out.obs["n_genes"] == np.diff(out.X.indptr)).all()
    assert list(out.var_names) == list(out.var["ensembl_id"])
    assert set(out.var_names) <= set(tiny_model.vocab.genes)
    assert (np.asarray(out.X.sum(axis=0)).ravel() > 0).all()  # only genes that occur
    params = out.uns["transcriptformer_generate"]["params"]
    assert params["top_k"] == 20 and params["temperature"] == 0.7 and params["max_genes"] == 15
    assert np.isfinite(out.obs["gene_logprob"]).all() and (out.obs["gene_logprob"] < 0).all()


def test_the_same_seed_gives_the_same_cells_whatever_the_batch_size(tiny_path):
    kwargs = {"assay": ASSAY, "max_genes": 8, "seed": 4}
    default = tfs.tl.generate(tiny_path, 3, **kwargs)
    pairs = tfs.tl.generate(tiny_path, 3, batch_size=2, **kwargs)
    assert list(pairs.var_names) == list(default.var_names)
    np.testing.assert_array_equal(pairs.X.toarray(), default.X.toarray())
    np.testing.assert_array_equal(pairs.layers["position"].toarray(), default.layers["position"].toarray())
    pd.testing.assert_frame_equal(pairs.obs, default.obs, check_exact=False, atol=1e-5)
    assert pairs.uns["transcriptformer_generate"]["params"]["batch_size"] == 2
    assert default.uns["transcriptformer_generate"]["params"]["batch_size"] == 64
    other = tfs.tl.generate(tiny_path, 3, batch_size=2, **{**kwargs, "seed": 5})
    assert other.X.shape != pairs.X.shape or (other.X != pairs.X).nnz > 0  # the seed does matter


def test_generated_genes_carry_their_symbols():
    from transcriptformer.data import gene_ids

    out = tfs.tl.generate("tf-demo", 2, assay="10x 3' v3", max_genes=30, seed=0)
    assert list(out.var.columns) == ["ensembl_id", "symbol"]
    known = {}
    for species in gene_ids.SPECIES:
        table = gene_ids.gene_table(species).dropna(subset=["symbol"])
        known.update(zip(table["ensembl_id"], table["symbol"], strict=True))
    expected = [known.get(i, "") for i in out.var["ensembl_id"]]
    assert out.var["symbol"].tolist() == expected
    assert sum(bool(s) for s in expected) > 0.8 * out.n_vars  # real genes: nearly all have a symbol
    tiny = tfs.tl.generate("tf-tiny", 1, assay=ASSAY, max_genes=5, seed=0)
    assert tiny.var["symbol"].tolist() == [""] * tiny.n_vars  # the tiny model's made-up ids have none


def test_sampling_runs_in_inference_mode(tiny_model, monkeypatch):
    """No autograd bookkeeping across the autoregressive loop (a network with gradients on would build a graph)."""
    from transcriptformer.inference.generation import sample_cells
    from transcriptformer.model import TranscriptFormer

    seen = []
    original = TranscriptFormer.gene_logits

    def recording(self, *args, **kwargs):
        seen.append(torch.is_inference_mode_enabled())
        return original(self, *args, **kwargs)

    monkeypatch.setattr(TranscriptFormer, "gene_logits", recording)
    sample_cells(tiny_model, 2, max_genes=4)
    assert seen and all(seen)
