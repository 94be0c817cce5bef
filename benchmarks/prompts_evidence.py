"""Evidence for the prompting tools on real cells: do the model's answers reflect the data?

Two measurements on the bundled PBMCs (``tfs.datasets.pbmc68k_counts()``, 700 cells, ``obs["bulk_labels"]``), each
against an untrained network of the same shape (:func:`transcriptformer.new_model` with the model's own gene tables
and config, random weights):

1. **Interactions against co-expression.** The model's gene-gene interaction scores
   (:func:`transcriptformer.inference.prompts.interactions`, neutral background with the data's assay token, the added
   gene with count 1) for the most often detected genes, against the data's own pointwise mutual information of
   co-detection over the held-out cells, ``PMI(a, b) = log[(n_ab + 1)(n + 1) / ((n_a + 1)(n_b + 1))]`` (``n`` cells,
   ``n_a`` detecting ``a``, ``n_ab`` both; the +1 keeps pairs never seen together finite). Spearman correlation over
   the unordered pairs, for the symmetrised score ``(S[a, b] + S[b, a]) / 2`` and for the score in reading order
   (``a`` before ``b`` in the data's columns: the order the model reads, and the only one it saw in training).
2. **Regulators against markers.** The genes of the vocabulary in the data are split at random into two halves.
   For each half, every held-out cell is a prompt made of its genes of the *other* half, and
   :func:`~transcriptformer.inference.prompts.group_regulators` ranks the half's genes per cell type. The top ``k``
   genes of each type are compared with the type's top ``k`` markers among the same genes from
   ``sc.tl.rank_genes_groups`` (Wilcoxon, log-normalised held-out counts). The statistic is the overlap summed over
   types and halves; the null draws ``k`` genes at random from the half for every type (10,000 draws), and
   ``p = (1 + #null >= observed) / (1 + draws)``.

The held-out cells are the 210 PBMCs ``tf-demo`` was not trained on (``split.json`` in its folder). With another
model (``--model tf-sapiens``, when its weights are in the cache) the same cells and calls are used.

Usage::

    python benchmarks/prompts_evidence.py --seeds 0 1 2 3 4 --json benchmarks/results/cpu/prompts_evidence.json
    python benchmarks/prompts_evidence.py --timing --json benchmarks/results/cpu/prompts_timing.json
    python benchmarks/prompts_evidence.py --model tf-sapiens --no-untrained --device cuda
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def held_out(adata, loaded) -> np.ndarray:
    """Boolean mask of the cells the model was not trained on (all cells for a model without ``split.json``)."""
    split = None if loaded.path is None else loaded.path / "split.json"
    if split is None or not split.exists():
        return np.ones(adata.n_obs, dtype=bool)
    names = set(json.loads(split.read_text())["pbmc_test"])
    return np.asarray([n in names for n in adata.obs_names])


def untrained_like(loaded, seed: int = 0):
    """A randomly initialised network with the model's gene tables, assay vocabulary and config."""
    import transcriptformer

    c = loaded.config.model
    tables = [loaded.vocab_files[name] for name in loaded.config.data.esm2_mappings]
    assay = dict(loaded.aux_vocabs[0].labels) if loaded.aux_vocabs else None
    return transcriptformer.new_model(
        tables,
        assay_vocab=assay,
        embed_dim=c.embed_dim,
        num_layers=c.num_layers,
        num_heads=c.num_heads,
        model_dim=c.model_dim,
        seq_len=c.seq_len,
        gene_head_hidden_dim=c.gene_head_hidden_dim,
        softcap=c.softcap,
        activation=c.activation,
        mu_link_fn=c.mu_link_fn,
        seed=seed,
        name=f"untrained-seed{seed}",
    )


def detection(adata, loaded):
    """Binary detection matrix of the genes of ``adata`` in the vocabulary, their tokens and column positions."""
    import scipy.sparse as sp

    from transcriptformer.data.tokenizer import strip_version

    ids = strip_version(adata.var["ensembl_id"].tolist())
    tokens = loaded.vocab.lookup_genes(list(ids))
    cols = np.flatnonzero(tokens >= 0)
    X = sp.csr_matrix(adata.X)[:, cols]
    return (X > 0).astype(np.float64), tokens[cols], cols


def pmi(D, genes: np.ndarray) -> np.ndarray:
    """Smoothed PMI of co-detection (see the module documentation) among the columns ``genes`` of ``D``."""
    sub = D[:, genes]
    n = sub.shape[0]
    n_ab = np.asarray((sub.T @ sub).todense())
    n_a = np.diag(n_ab)
    return np.log((n_ab + 1) * (n + 1)) - np.log(np.outer(n_a + 1, n_a + 1))


def interaction_evidence(
    loaded, adata, test, n_genes: int, device: str, assay: str, background: str, n_background: int
) -> dict:
    import scipy.stats

    from transcriptformer.inference import prompts as P

    D, tokens, _ = detection(adata[test], loaded)
    rate = np.asarray(D.mean(axis=0)).ravel()
    pick = np.sort(np.argsort(-rate, kind="stable")[:n_genes])  # most detected, kept in column order
    bg = None
    if background == "cells":
        cells = np.flatnonzero(test)
        cells = cells[np.random.default_rng(0).permutation(len(cells))[:n_background]]
        bg = P.cell_prompts(loaded, adata[np.sort(cells)])
    t0 = time.perf_counter()
    res = P.interactions(loaded, tokens[pick], background=bg, assay=assay, device=device)
    seconds = time.perf_counter() - t0
    data = pmi(D, pick)
    iu = np.triu_indices(len(pick), k=1)  # a before b in column order
    S = res.score.astype(np.float64)
    sym = (S + S.T) / 2
    out = {
        "model": loaded.name,
        "background": "neutral" if bg is None else f"{res.n_background} held-out cells",
        "n_genes": len(pick),
        "n_pairs": len(iu[0]),
        "detection_rate_range": [float(rate[pick].min()), float(rate[pick].max())],
        "spearman_symmetric": float(scipy.stats.spearmanr(sym[iu], data[iu]).statistic),
        "spearman_reading_order": float(scipy.stats.spearmanr(S[iu], data[iu]).statistic),
        "spearman_reverse_order": float(scipy.stats.spearmanr(S.T[iu], data[iu]).statistic),
        "spearman_reading_order_vs_distance": float(scipy.stats.spearmanr(S[iu], iu[1] - iu[0]).statistic),
        "mean_score_reading_order": float(S[iu].mean()),
        "mean_score_reverse_order": float(S.T[iu].mean()),
        "seconds": seconds,
        "stats": res.stats,
    }
    return out


def markers(adata, groupby: str):
    """``sc.tl.rank_genes_groups`` (Wilcoxon) on log-normalised counts: the full ranking of each group."""
    import scanpy as sc

    ad = adata.copy()
    sc.pp.normalize_total(ad, target_sum=1e4)
    sc.pp.log1p(ad)
    sc.tl.rank_genes_groups(ad, groupby, method="wilcoxon", use_raw=False)
    names = ad.uns["rank_genes_groups"]["names"]
    lfc = ad.uns["rank_genes_groups"]["logfoldchanges"]
    groups = list(names.dtype.names)
    return {g: [n for n, f in zip(names[g], lfc[g], strict=True) if f > 0] for g in groups}


def regulator_evidence(loaded, adata, test, k: int, device: str, seed: int, draws: int, groupby: str, at: str) -> dict:
    from transcriptformer.inference import prompts as P

    cells = adata[test]
    counts = cells.obs[groupby].value_counts()
    groups = [g for g in counts.index if counts[g] > 0]
    codes = np.asarray([groups.index(g) for g in cells.obs[groupby]])
    _, tokens, cols = detection(cells, loaded)
    ranked = markers(cells, groupby)
    rng = np.random.default_rng(seed)
    halves = np.array_split(rng.permutation(len(tokens)), 2)
    all_prompts = P.cell_prompts(loaded, cells)
    observed = 0
    per_group: dict[str, list[int]] = {g: [] for g in groups}
    sizes = []
    seconds = 0.0
    label_null = np.zeros(draws)
    gene_null = np.zeros(draws)
    for half in halves:
        cand = tokens[half]
        names_h = cells.var_names[cols[half]]
        in_half = set(names_h)
        t0 = time.perf_counter()
        res = P.group_regulators(loaded, all_prompts, codes, groups, cand, at=at, device=device)
        seconds += time.perf_counter() - t0
        sizes.append(len(cand))
        # the type's markers among the half's genes, as a membership mask over the half
        member = np.stack([np.isin(names_h, [n for n in ranked[g] if n in in_half][:k]) for g in groups])
        for j, g in enumerate(groups):
            hit = int(member[j][res.order(j)[:k]].sum())
            per_group[g].append(hit)
            observed += hit
        # null 1 (genes): k random genes of the half for every type
        for j in range(len(groups)):
            picks = np.argsort(rng.random((draws, len(half))), axis=1)[:, :k]
            gene_null += member[j][picks].sum(axis=1)
        # null 2 (labels): the same per-cell probabilities with the cells' types shuffled, then ranked as above
        prob = np.exp(res.cell_log_prob.astype(np.float64))
        n_groups = len(groups)
        for s0 in range(0, draws, 500):
            perms = np.stack([rng.permutation(codes) for _ in range(min(500, draws - s0))])  # (d, cells)
            onehot = (perms[:, None, :] == np.arange(n_groups)[None, :, None]).astype(np.float64)
            mean = onehot @ prob / onehot.sum(axis=2, keepdims=True)  # (d, groups, k)
            ratio = np.log2(mean) - np.log2(mean.mean(axis=1, keepdims=True))
            top = np.argsort(-ratio, axis=2, kind="stable")[:, :, :k]  # (d, groups, k)
            label_null[s0 : s0 + len(perms)] += member[np.arange(n_groups)[None, :, None], top].sum(axis=(1, 2))

    def summary(null: np.ndarray) -> dict:
        return {
            "mean": float(null.mean()),
            "sd": float(null.std()),
            "q95": float(np.quantile(null, 0.95)),
            "p_value": float((1 + (null >= observed).sum()) / (1 + len(null))),
        }

    return {
        "model": loaded.name,
        "at": at,
        "k": k,
        "groups": {
            g: {"n_cells": int((codes == i).sum()), "overlap_per_half": per_group[g]} for i, g in enumerate(groups)
        },
        "candidates_per_half": sizes,
        "observed_overlap": int(observed),
        "max_possible": int(k * len(groups) * len(halves)),
        "null_random_genes": summary(gene_null),
        "null_shuffled_labels": summary(label_null),
        "draws": draws,
        "seconds": seconds,
    }


def timing(model: str = "tf-demo", n_background: int = 20, n_genes: int = 100, rounds: int = 2) -> dict:
    """Wall-clock seconds of the prompting calls on the held-out PBMCs: interactions with and without the cache
    (interleaved rounds), the neutral background, and ``next_gene`` with and without the count head."""
    import torch

    import transcriptformer
    import transcriptformer.scanpy as tfs
    from transcriptformer.inference import prompts as P

    m = transcriptformer.load_model(model)
    adata = tfs.datasets.pbmc68k_counts()
    src = P.cell_prompts(m, adata[held_out(adata, m)])
    inside = np.arange(src.tokens.shape[1])[None, :] < src.lengths[:, None]
    read = np.bincount(src.tokens[inside], minlength=len(m.vocab))
    read[: m.vocab.n_special] = 0
    genes = np.argsort(-read)[:n_genes]
    bg = src.take(np.arange(n_background))
    out: dict = {"loadavg_before": os.getloadavg(), "threads": torch.get_num_threads()}
    for rnd in range(rounds):
        for cached in (True, False):
            t = time.perf_counter()
            r = P.interactions(m, genes, background=bg, use_cache=cached)
            out.setdefault(f"cached={cached}", []).append(round(time.perf_counter() - t, 2))
            if rnd == 0:
                out[f"stats cached={cached}"] = r.stats
    t = time.perf_counter()
    P.interactions(m, genes, assay="10x 3' v1")
    out["neutral_100_genes_s"] = round(time.perf_counter() - t, 3)
    t = time.perf_counter()
    P.next_gene(m, src)
    out["next_gene_210_cells_s"] = round(time.perf_counter() - t, 2)
    t = time.perf_counter()
    P.next_gene(m, src, counts=False)
    out["next_gene_210_cells_no_counts_s"] = round(time.perf_counter() - t, 2)
    out["loadavg_after"] = os.getloadavg()
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tf-demo")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--n-genes", type=int, nargs="+", default=[100, 300], help="genes of the interaction map")
    parser.add_argument("--k", type=int, nargs="+", default=[10, 25], help="top genes compared per cell type")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of the untrained networks")
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--draws", type=int, default=10_000)
    parser.add_argument("--no-untrained", action="store_true")
    parser.add_argument("--n-background", type=int, default=100, help="held-out cells as the background")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--timing", action="store_true", help="only the timings (cache against full passes)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.timing:
        result = timing(args.model)
        print(json.dumps(result, indent=1))
        if args.json:
            args.json.write_text(json.dumps(result, indent=1))
        return

    import torch
    from bench import cpu_model

    import transcriptformer
    import transcriptformer.scanpy as tfs

    adata = tfs.datasets.pbmc68k_counts()
    loaded = transcriptformer.load_model(args.model)
    test = held_out(adata, loaded)
    assay = str(adata.obs["assay"].iloc[0])
    models = [loaded]
    if not args.no_untrained:
        models += [untrained_like(loaded, s) for s in args.seeds]
    report: dict = {
        "machine": {
            "cpu": cpu_model(),
            "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "loadavg_before": os.getloadavg(),
        },
        "data": {"cells": adata.n_obs, "held_out": int(test.sum()), "assay": assay},
        "interactions": [],
        "regulators": [],
    }
    for m in models:
        for background in ("neutral", "cells"):
            for n in args.n_genes:
                r = interaction_evidence(m, adata, test, n, args.device, assay, background, args.n_background)
                report["interactions"].append(r)
                print(
                    f"interactions {m.name:>16} {r['background']:>16} n={n}: spearman symmetric "
                    f"{r['spearman_symmetric']:+.3f}, reading order {r['spearman_reading_order']:+.3f}, reverse "
                    f"{r['spearman_reverse_order']:+.3f} ({r['seconds']:.2f} s)",
                    flush=True,
                )
        for at in ("place", "end"):
            for k in args.k:
                r = regulator_evidence(m, adata, test, k, args.device, args.split_seed, args.draws, "bulk_labels", at)
                report["regulators"].append(r)
                g_, l_ = r["null_random_genes"], r["null_shuffled_labels"]
                print(
                    f"regulators   {m.name:>16} at={at:<5} k={k}: overlap {r['observed_overlap']} of "
                    f"{r['max_possible']}; random genes {g_['mean']:.1f} +- {g_['sd']:.1f}, p = {g_['p_value']:.2g}; "
                    f"shuffled labels {l_['mean']:.1f} +- {l_['sd']:.1f}, p = {l_['p_value']:.2g} "
                    f"({r['seconds']:.2f} s)",
                    flush=True,
                )
    report["machine"]["loadavg_after"] = os.getloadavg()
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
