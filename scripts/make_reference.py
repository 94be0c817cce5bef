"""Regenerate every reference number that this project takes from the published TranscriptFormer.

The published implementation (PyPI ``transcriptformer`` 0.6.1) is run, never copied: the inference
references come from its ``transcriptformer inference`` command, the intermediate tensors and the
training-mode numbers from forward hooks on, and direct calls into, its own model and loss modules.

How to run
----------
The published package must live in its own virtual environment (it pins torch 2.5.1 and other exact
versions; ``benchmarks/setup_published_venv.sh`` in the project builds one with torch 2.13.0 CPU)::

    bash benchmarks/setup_published_venv.sh /tmp/published-venv
    /tmp/published-venv/bin/python make_reference.py --out OUT [--parity DIR] [--check DIR]

``--parity`` is the folder holding ``tf_tiny/`` and ``data/tiny_human.h5ad`` / ``data/tiny_human_raw.h5ad``
(default ``/work/shared/parity``). Everything is computed on CPU in float32 with eager flex attention;
the run takes about 3 minutes on 2 CPU threads (17 CLI start-ups). ``--check DIR`` compares ``OUT/reference`` with an
existing reference folder (default: ``tests/data/reference`` of the project when it is found) and prints
the largest absolute difference of every array.

What is written
---------------
``OUT/reference/``        the files in the project's ``tests/data/reference``:
                          ``human_{cell,llh,gene_llh,cge,raw_cell}.h5ad`` (published CLI) and
                          ``stages_human.npz`` + ``stages_human.meta.json`` (hooks on the published model).
``OUT/reference_train/``  training-mode forward and loss numbers (``<name>.npz``), gradients of the batch
                          loss (``<name>_grads.npz``; torch refuses flex-attention backward on CPU, so this
                          one pass switches off that device check and uses the eager math path),
                          ``FIELDS.json`` describing every array, and the generated input files
                          ``unseen_*.h5ad`` (fixed seeds, see ``make_unseen_datasets``).
``OUT/reference_unseen/`` published CLI outputs (cell embeddings, llh, gene_llh, cge) for the generated
                          inputs: ``<name>_{cell,llh,gene_llh,cge}.h5ad``.
``OUT/MANIFEST.json``     which CLI arguments produced which file, versions, and the --check results.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

CLI_COMMON = ["--batch-size", "8", "--precision", "32", "--device", "cpu", "--disable-compile-block-mask"]

# Inputs generated here (never seen by the published project's own tests). ``cli`` holds the extra
# CLI arguments every run on that input uses (the same arguments configure the in-process model).
UNSEEN = {
    "unseen_mixed": {"cli": []},
    "unseen_norm": {"cli": ["--config-override", "model.data_config.normalize_to_scale=1000"]},
    "unseen_raw_clip100": {"cli": ["--clip-counts", "100"]},
}

# (suffix, extra CLI arguments) of the inference outputs made for each input.
OUTPUT_KINDS = {
    "cell": [],
    "llh": ["--config-override", "model.inference_config.output_keys.0=llh"],
    "gene_llh": ["--config-override", "model.inference_config.output_keys.0=gene_llh"],
    "cge": ["--emb-type", "cge"],
}


# --------------------------------------------------------------------------------------------
# generated inputs
# --------------------------------------------------------------------------------------------
def _vocab_gene_ids(ckpt: Path) -> list[str]:
    import h5py

    cfg = json.loads((ckpt / "config.json").read_text())["model"]["data_config"]
    seen: dict[str, None] = {}
    for name in cfg["esm2_mappings"]:
        with h5py.File(ckpt / "vocabs" / name, "r") as f:
            for k in f["keys"][:]:
                seen.setdefault(k.decode() if isinstance(k, bytes) else str(k), None)
    return list(seen)


def _counts(rng: np.random.Generator, n: int, high: int = 200) -> np.ndarray:
    """Positive integer counts: mostly small, a heavy tail reaching ``high``."""
    c = 1 + rng.negative_binomial(1, 0.15, size=n)
    tail = rng.random(n) < 0.08
    c[tail] = rng.integers(25, high + 1, size=int(tail.sum()))
    return np.minimum(c, high).astype(np.float32)


def make_unseen_datasets(ckpt: Path, out: Path) -> dict[str, Path]:
    """Write the generated inputs; fixed seeds, so the files are the same on every run."""
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    vocab = _vocab_gene_ids(ckpt)
    oov = [f"ENSG00000990{i:03d}" for i in range(20)] + [f"ENSMUSG00000990{i:03d}" for i in range(10)]
    assays = ["10x 3' v3", "10x 3' v2", "10x 5' v1", "Smart-seq2", "unknown", "MERFISH", "Visium", "sci-RNA-seq3"]
    cell_types = ["T cell", "B cell", "NK cell", "monocyte", "neuron"]
    paths: dict[str, Path] = {}

    def build(seed, n_cells, genes, k_in_list, n_oov_max, human_share):
        rng = np.random.default_rng(seed)
        genes = list(genes)
        cols = list(rng.permutation(len(genes)))
        var_ids = [genes[i] for i in cols]
        in_vocab = np.array([g in set(vocab) for g in var_ids])
        # version suffixes on about a third of the ids (cut at the first '.' by the published code)
        shown = [g + (f".{rng.integers(1, 15)}" if rng.random() < 0.33 else "") for g in var_ids]
        is_human = np.array([g.startswith("ENSG") for g in var_ids])
        X = np.zeros((n_cells, len(var_ids)), np.float32)
        for i in range(n_cells):
            k_in = k_in_list[i]
            w = np.where(is_human, human_share, 1.0 - human_share)[in_vocab]
            pick = rng.choice(np.flatnonzero(in_vocab), size=k_in, replace=False, p=w / w.sum())
            n_oov = int(rng.integers(0, n_oov_max + 1))
            pick_oov = rng.choice(np.flatnonzero(~in_vocab), size=n_oov, replace=False)
            X[i, pick] = _counts(rng, k_in)
            X[i, pick_oov] = _counts(rng, n_oov)
        obs = pd.DataFrame(
            {
                "cell_type": rng.choice(cell_types, n_cells),
                "assay": [assays[i % len(assays)] for i in rng.permutation(n_cells)],
                "donor_id": [f"D{i % 4}" for i in range(n_cells)],
            },
            index=[f"c{seed}_{i:03d}" for i in range(n_cells)],
        )
        obs["n_counts_input"] = X.sum(1).astype(np.float64)
        var = pd.DataFrame(
            {"ensembl_id": shown, "feature_name": [f"G{i}" for i in range(len(shown))]},
            index=[f"G{i}" for i in range(len(shown))],
        )
        return X, obs, var

    # 1) 40 cells, human + mouse ids + OOV ids, 1..150 expressed in-vocab genes (several above
    #    seq_len=63, one exactly 63), counts up to 200, assays from the vocab and unknown labels.
    k_list = [1, 2, 3, 5, 8, 13, 21, 34, 55, 61, 62, 63, 64, 65, 70, 90, 120, 150, 150, 100]
    k_list += list(np.random.default_rng(7).integers(1, 151, size=20))
    X, obs, var = build(11, 40, vocab + oov, k_list, 12, 0.65)
    a = ad.AnnData(X=sp.csr_matrix(X), obs=obs, var=var)
    paths["unseen_mixed"] = out / "unseen_mixed.h5ad"
    a.write_h5ad(paths["unseen_mixed"])

    # 2) 24 cells, mostly mouse ids, read with normalize_to_scale=1000 (non-integer counts, then clip 30).
    k_list = [1, 4, 9, 30, 62, 63, 64, 80, 117, 150] + list(np.random.default_rng(8).integers(1, 151, size=14))
    X, obs, var = build(12, 24, vocab + oov, k_list, 6, 0.3)
    a = ad.AnnData(X=sp.csr_matrix(X), obs=obs, var=var)
    paths["unseen_norm"] = out / "unseen_norm.h5ad"
    a.write_h5ad(paths["unseen_norm"])

    # 3) 20 cells, counts only in .raw (raw.var has the ids, X is log-normalised, var has no id
    #    column), read with --clip-counts 100.
    k_list = [2, 10, 40, 63, 64, 100, 140, 150] + list(np.random.default_rng(9).integers(1, 151, size=12))
    X, obs, var = build(13, 20, vocab + oov, k_list, 8, 0.5)
    raw = ad.AnnData(X=sp.csr_matrix(X), obs=obs, var=var)
    tot = X.sum(1, keepdims=True)
    logn = np.log1p(X / np.maximum(tot, 1) * 1e4).astype(np.float32)
    a = ad.AnnData(X=sp.csr_matrix(logn), obs=obs.copy(), var=var[["feature_name"]].copy())
    a.raw = raw
    paths["unseen_raw_clip100"] = out / "unseen_raw_clip100.h5ad"
    a.write_h5ad(paths["unseen_raw_clip100"])
    return paths


# --------------------------------------------------------------------------------------------
# the published CLI
# --------------------------------------------------------------------------------------------
def run_cli(ckpt: Path, data: Path, dest: Path, extra: list[str]) -> list[str]:
    """One ``transcriptformer inference`` run in a scratch directory; the output goes to ``dest``."""
    exe = Path(sys.executable).parent / "transcriptformer"
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            str(exe),
            "inference",
            "--checkpoint-path",
            str(ckpt),
            "--data-file",
            str(data),
            "--output-path",
            tmp,
            "--output-filename",
            "out.h5ad",
            *CLI_COMMON,
            *extra,
        ]
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        proc = subprocess.run(args, cwd=tmp, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"published CLI failed ({' '.join(args)}):\n{proc.stderr[-4000:]}")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(tmp) / "out.h5ad", dest)
    return args[1:]


# --------------------------------------------------------------------------------------------
# the published model, in-process, configured exactly as the CLI configures it
# --------------------------------------------------------------------------------------------
class _Captured(Exception):
    pass


def cli_config(ckpt: Path, data: Path, extra: list[str]):
    """The OmegaConf config the published CLI would pass to ``run_inference`` for these arguments.

    The CLI entry point is called with ``run_inference`` swapped for a function that records its
    arguments and stops, so the config-building steps are the published ones.
    """
    import transcriptformer.cli as tcli

    captured = {}

    def _capture(cfg, data_files):
        captured["cfg"], captured["files"] = cfg, data_files
        raise _Captured

    argv, real = sys.argv, tcli.run_inference
    sys.argv = [
        "transcriptformer",
        "inference",
        "--checkpoint-path",
        str(ckpt),
        "--data-file",
        str(data),
        *CLI_COMMON,
        *extra,
    ]
    tcli.run_inference = _capture
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            tcli.main()
    except _Captured:
        pass
    finally:
        sys.argv, tcli.run_inference = argv, real
    return captured["cfg"], captured["files"]


def load_published(cfg):
    """Model (eval mode, weights loaded) and the gene/aux vocabularies, built through the published API."""
    import torch
    from transcriptformer.model.model import Transcriptformer
    from transcriptformer.tokenizer.vocab import load_vocabs_and_embeddings

    (gene_vocab, aux_vocab), emb = load_vocabs_and_embeddings(cfg)
    m = cfg.model
    model = Transcriptformer(
        data_config=m.data_config,
        model_config=m.model_config,
        loss_config=m.loss_config,
        inference_config=m.inference_config,
        gene_vocab_dict=gene_vocab,
        aux_vocab_dict=aux_vocab,
        emb_matrix=emb,
    )
    model.eval()
    state = torch.load(m.inference_config.load_checkpoint, weights_only=True, map_location="cpu")
    model.load_state_dict(state)
    return model, gene_vocab, aux_vocab


def published_batches(cfg, files, gene_vocab, aux_vocab):
    """The CLI's data pipeline (AnnDataset + DataLoader, batch_size from the config), as BatchData."""
    from torch.utils.data import DataLoader
    from transcriptformer.data.dataloader import AnnDataset

    m = cfg.model
    d = m.data_config
    ds = AnnDataset(
        files,
        gene_vocab,
        aux_vocab=aux_vocab,
        max_len=m.model_config.seq_len,
        pad_zeros=d.pad_zeros,
        pad_token=d.gene_pad_token,
        sort_genes=d.sort_genes,
        filter_to_vocab=d.filter_to_vocabs,
        filter_outliers=d.filter_outliers,
        gene_col_name=d.gene_col_name,
        normalize_to_scale=d.normalize_to_scale,
        randomize_order=d.randomize_genes,
        min_expressed_genes=d.min_expressed_genes,
        clip_counts=d.clip_counts,
        obs_keys=m.inference_config.obs_keys,
        remove_duplicate_genes=d.remove_duplicate_genes,
        use_raw=d.use_raw,
    )
    return ds, DataLoader(
        ds, batch_size=m.inference_config.batch_size, num_workers=0, drop_last=False, collate_fn=ds.collate_fn
    )


class Hooks:
    """Records intermediate tensors of one published forward pass."""

    def __init__(self, model):
        import transcriptformer.model.model as mm

        self.model, self.mm, self.rec, self.handles = model, mm, {}, []
        self._orig_score = model._score_mod_factory
        self._orig_pad = mm.pad_mask_factory

    def __enter__(self):
        rec, model, mm = self.rec, self.model, self.mm

        def score_factory(log_counts, emb_mode=False):
            rec["log_counts"], rec["emb_mode"] = log_counts.detach().clone(), emb_mode
            return self._orig_score(log_counts, emb_mode=emb_mode)

        def pad_factory(mask):
            rec["key_valid"] = mask.detach().clone()
            return self._orig_pad(mask)

        model._score_mod_factory = score_factory
        mm.pad_mask_factory = pad_factory
        self.handles.append(
            model.transformer_encoder.register_forward_pre_hook(
                lambda mod, args, kw: rec.__setitem__("encoder_input", kw["x"].detach().clone()), with_kwargs=True
            )
        )
        for i, layer in enumerate(model.transformer_encoder.encoder_layers):
            self.handles.append(
                layer.register_forward_hook(lambda mod, a, out, i=i: rec.__setitem__(f"layer{i}", out.detach().clone()))
            )
        calls = []
        rec["_ge_calls"] = calls
        self.handles.append(
            model.gene_embeddings.register_forward_hook(lambda mod, a, out: calls.append(out.detach().clone()))
        )
        return rec

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        del self.model._score_mod_factory  # back to the class method
        self.mm.pad_mask_factory = self._orig_pad
        return False


def _names(tokens, inv):
    return np.vectorize(inv.get)(tokens).astype("<U18")


def make_stages(ckpt: Path, data: Path, out: Path) -> None:
    """stages_human.npz + meta: hooks on the published model running its inference step, batch by batch."""
    import torch

    cfg, files = cli_config(ckpt, data, [])
    cfg.model.inference_config.output_keys = ["embeddings"]
    model, gene_vocab, aux_vocab = load_published(cfg)
    _, loader = published_batches(cfg, files, gene_vocab, aux_vocab)
    inv = {v: k for k, v in gene_vocab.items()}
    A = None
    parts: dict[str, list] = {}
    for batch in loader:
        n = batch.gene_counts.shape[0]
        captured = {}
        real_forward = model.forward

        def forward(batch, embed=False, **kw):
            res = real_forward(batch, embed=embed, **kw)
            captured.update(res)
            return res

        model.forward = forward
        try:
            with Hooks(model) as rec, torch.no_grad():
                res = model.inference(batch)
        finally:
            del model.forward
        A = batch.aux_token_indices.shape[1]
        L = len(model.transformer_encoder.encoder_layers)
        trim = lambda t: t[:n].cpu()  # noqa: E731
        mask = trim(captured["mask"])
        mu, input_counts = trim(captured["mu"]), trim(captured["input_counts"])
        llh = model.criterion(mu=mu, input_counts=input_counts, mask=mask, eval_mode=True)
        model.gene_id_criterion.reduction = None
        ce = model.gene_id_criterion(
            logits=trim(captured["gene_logit"]), input_ids=trim(captured["input_gene_token_indices"]), mask=mask
        )
        model.gene_id_criterion.reduction = "mean"
        row = {
            "gene_token_indices": batch.gene_token_indices,
            "gene_counts": batch.gene_counts,
            "aux_token_indices": batch.aux_token_indices,
            "encoder_input": trim(rec["encoder_input"]),
            "log_counts": trim(rec["log_counts"]),
            "key_valid": trim(rec["key_valid"]),
            "layer_outputs": torch.stack([trim(rec[f"layer{i}"]) for i in range(L)]),
            "gene_output": trim(rec[f"layer{L - 1}"][:, A:]),
            "target_gene_emb": trim(rec["_ge_calls"][1]),
            "mu": mu,
            "loss_mask": mask,
            "input_counts": input_counts,
            "nll": llh,
            "gene_ce": ce,
            "cell_embeddings": res["embeddings"],
        }
        for k, v in row.items():
            parts.setdefault(k, []).append(v.numpy())
    arrays = {k: np.concatenate(v, axis=1 if k == "layer_outputs" else 0) for k, v in parts.items()}
    arrays["nll"] = arrays["nll"].astype(np.float32)
    arrays["gene_names"] = _names(arrays["gene_token_indices"], inv)
    np.savez(out / "stages_human.npz", **arrays)
    meta = {
        "pad_idx": model.gene_vocab.pad_idx,
        "start_idx": model.gene_vocab.start_idx,
        "end_idx": model.gene_vocab.end_idx,
        "vocab_pad": gene_vocab["[PAD]"],
        "vocab_start": gene_vocab["[START]"],
        "inference_batch_size": int(cfg.model.inference_config.batch_size),
        "emb_type": cfg.model.inference_config.emb_type,
        "output_keys": list(cfg.model.inference_config.output_keys),
        "torch": torch.__version__,
        "vocab_in_index_order": [inv[i] for i in range(len(inv))],
    }
    (out / "stages_human.meta.json").write_text(json.dumps(meta, indent=1))


# --------------------------------------------------------------------------------------------
# training-mode references
# --------------------------------------------------------------------------------------------
TRAIN_FIELDS = {
    "gene_token_indices": "(N,S) int64 tokens fed to the model (published AnnDataset, CLI config)",
    "gene_counts": "(N,S) float32 counts fed to the model (after ordering, truncation, padding, normalize_to_scale, clip)",
    "aux_token_indices": "(N,A) int64 aux (assay) tokens",
    "gene_names": "(N,S) str vocabulary name of each token",
    "n_genes": "(N,) int64 number of valid slots (token != pad); the loss positions",
    "train_mu": "(N,S) float32 mu of the training-mode forward (model(batch) i.e. embed=False; model.eval() so dropout is off)",
    "infer_mu": "(N,S) float32 mu of the embed=True forward on the same batch (for contrast: diagonal count bias included)",
    "train_gene_output": "(N,S,E) float32 transformer output at the gene slots, training-mode forward",
    "train_input_counts": "(N,S) float32 result['input_counts']: gene_counts with the last column set to 1",
    "train_target_tokens": "(N,S) int64 result['input_gene_token_indices']: tokens with the last column set to end_idx",
    "train_loss_mask": "(N,S) bool result['mask'], True = position excluded (token == pad)",
    "train_count_nll_pos": "(N,S) float32 per-position ZTP NLL from the published ZTP_NLL (column by column), 0 where masked",
    "train_gene_ce_pos": "(N,S) float32 per-position CE from the published CrossEntropyLoss (reduction None), 0 where masked",
    "train_count_nll_cell": "(N,) float32 published ZTP_NLL(eval_mode=True): mean over the cell's valid positions",
    "train_gene_ce_cell": "(N,) float32 DERIVED here: sum of train_gene_ce_pos over the cell / n_genes (no published function gives it)",
    "full_count_loss": "() float32 published ZTP_NLL in training reduction over ALL N cells as one batch: sum over valid / number valid",
    "full_gene_loss": "() float32 published CrossEntropyLoss(reduction='mean') over all N cells as one batch: sum over valid / (N*S)",
    "full_total_loss": "() float32 full_count_loss + full_gene_loss (weights 1, 1 as in the upstream training engine)",
    "batch8_count_loss": "(ceil(N/8),) float32 same as full_count_loss per batch of 8 consecutive cells (last batch shorter)",
    "batch8_gene_loss": "(ceil(N/8),) float32 same as full_gene_loss per batch of 8 consecutive cells",
    "batch8_total_loss": "(ceil(N/8),) float32 batch8_count_loss + batch8_gene_loss",
    "batch8_n_cells": "(ceil(N/8),) int64 cells in each batch",
    "cell_llh_inference_path": "(N,) float32 the llh as the published inference step computes it (embed=True forward) - equals the CLI output",
}
GRAD_DOC = (
    "<name>_grads.npz: gradient of full_total_loss (all N cells as one batch, model.eval() so no dropout, "
    "fp32) with respect to every trainable parameter of the published model, keyed by parameter name; "
    "the frozen gene_embeddings.embedding.weight has none. Computed on CPU through torch's eager "
    "flex_attention path with its CPU-backward device check switched off (the published code cannot "
    "differentiate on CPU as shipped); spot-checked against central finite differences."
)


def make_training(ckpt: Path, data: Path, extra: list[str], out: Path, name: str) -> dict:
    import torch
    from transcriptformer.data.dataclasses import BatchData

    cfg, files = cli_config(ckpt, data, extra)
    cfg.model.inference_config.output_keys = ["embeddings", "llh"]
    model, gene_vocab, aux_vocab = load_published(cfg)
    ds, loader = published_batches(cfg, files, gene_vocab, aux_vocab)
    inv = {v: k for k, v in gene_vocab.items()}
    full = ds.data
    N, S = full.gene_token_indices.shape
    batch = BatchData(
        gene_counts=full.gene_counts,
        gene_token_indices=full.gene_token_indices,
        aux_token_indices=full.aux_token_indices,
    )
    crit, ce_crit = model.criterion, model.gene_id_criterion
    assert not model.training
    with torch.no_grad():
        with Hooks(model) as rec:
            res = model(batch)  # the default: embed=False, the training-mode forward
        assert rec["emb_mode"] is False
        A = batch.aux_token_indices.shape[1]
        gene_output = rec[f"layer{len(model.transformer_encoder.encoder_layers) - 1}"][:, A:]
        infer = model(batch, embed=True)
        mu, ic, mask = res["mu"], res["input_counts"], res["mask"]
        pos_nll = torch.stack(
            [crit(mu=mu[:, j : j + 1], input_counts=ic[:, j : j + 1], eval_mode=True) for j in range(S)], dim=1
        ).masked_fill(mask, 0.0)
        cell_nll = crit(mu=mu, input_counts=ic, mask=mask, eval_mode=True)
        ce_crit.reduction = None
        pos_ce = ce_crit(logits=res["gene_logit"], input_ids=res["input_gene_token_indices"], mask=mask)
        ce_crit.reduction = "mean"
        n_genes = (~mask).sum(1)

        def losses(sl):
            r = model(
                BatchData(
                    gene_counts=batch.gene_counts[sl],
                    gene_token_indices=batch.gene_token_indices[sl],
                    aux_token_indices=batch.aux_token_indices[sl],
                )
            )
            c = crit(mu=r["mu"], input_counts=r["input_counts"], mask=r["mask"])
            g = ce_crit(logits=r["gene_logit"], input_ids=r["input_gene_token_indices"], mask=r["mask"])
            return float(c), float(g), r

        fc, fg, _ = losses(slice(0, N))
        b8 = []
        for s in range(0, N, 8):
            c, g, r = losses(slice(s, min(s + 8, N)))
            # rows never interact: the batch-of-8 forward equals the full-batch forward
            assert torch.allclose(r["mu"], mu[s : s + 8], atol=1e-5, rtol=1e-5)
            b8.append((c, g, c + g, min(s + 8, N) - s))
        # the llh the published inference step would give (embed=True, padded to batch_size)
        llh = torch.cat([model.inference(b)["llh"] for b in loader])

    arrays = {
        "gene_token_indices": batch.gene_token_indices.numpy(),
        "gene_counts": batch.gene_counts.numpy(),
        "aux_token_indices": batch.aux_token_indices.numpy(),
        "gene_names": _names(batch.gene_token_indices.numpy(), inv),
        "n_genes": n_genes.numpy().astype(np.int64),
        "train_mu": mu.numpy(),
        "infer_mu": infer["mu"].numpy(),
        "train_gene_output": gene_output.numpy(),
        "train_input_counts": ic.numpy(),
        "train_target_tokens": res["input_gene_token_indices"].numpy(),
        "train_loss_mask": mask.numpy(),
        "train_count_nll_pos": pos_nll.numpy().astype(np.float32),
        "train_gene_ce_pos": pos_ce.numpy(),
        "train_count_nll_cell": cell_nll.numpy().astype(np.float32),
        "train_gene_ce_cell": (pos_ce.sum(1) / n_genes).numpy().astype(np.float32),
        "full_count_loss": np.float32(fc),
        "full_gene_loss": np.float32(fg),
        "full_total_loss": np.float32(fc + fg),
        "batch8_count_loss": np.array([b[0] for b in b8], np.float32),
        "batch8_gene_loss": np.array([b[1] for b in b8], np.float32),
        "batch8_total_loss": np.array([b[2] for b in b8], np.float32),
        "batch8_n_cells": np.array([b[3] for b in b8], np.int64),
        "cell_llh_inference_path": llh.numpy().astype(np.float32),
    }
    assert set(arrays) == set(TRAIN_FIELDS), set(arrays) ^ set(TRAIN_FIELDS)
    np.savez(out / f"{name}.npz", **arrays)

    # Gradients of the full-batch total loss. torch refuses flex_attention backward on CPU with a
    # device check only (NotImplementedError "FlexAttention does not support backward on CPU");
    # with that check switched off for this pass, the eager (unfused, math) flex path differentiates
    # fine, and central finite differences agree (see verify_training.py).
    import torch.nn.attention.flex_attention as fa

    check = fa._validate_device
    fa._validate_device = lambda *a, **k: None
    try:
        model.zero_grad(set_to_none=True)
        r = model(batch)
        total = crit(mu=r["mu"], input_counts=r["input_counts"], mask=r["mask"]) + ce_crit(
            logits=r["gene_logit"], input_ids=r["input_gene_token_indices"], mask=r["mask"]
        )
        total.backward()
    finally:
        fa._validate_device = check
    grads = {k: p.grad.numpy().copy() for k, p in model.named_parameters() if p.grad is not None}
    np.savez(out / f"{name}_grads.npz", **grads)
    return {
        "cells": int(N),
        "full_total_loss": float(fc + fg),
        "grad_total_loss": float(total.detach()),
        "config": {
            "clip_counts": cfg.model.data_config.clip_counts,
            "normalize_to_scale": cfg.model.data_config.normalize_to_scale,
            "use_raw": cfg.model.data_config.use_raw,
            "seq_len": cfg.model.model_config.seq_len,
            "log_counts_eps": cfg.model.model_config.log_counts_eps,
            "softcap": cfg.model.model_config.softcap,
            "gene_id_loss_weight": cfg.model.loss_config.gene_id_loss_weight,
            "softplus_approx": cfg.model.loss_config.softplus_approx,
        },
    }


# --------------------------------------------------------------------------------------------
# comparison with an existing reference folder
# --------------------------------------------------------------------------------------------
def _h5ad_arrays(path: Path) -> dict[str, np.ndarray]:
    import anndata as ad

    a = ad.read_h5ad(path)
    out = {f"obs/{c}": a.obs[c].astype(str).to_numpy() for c in a.obs.columns}
    out["obs_names"] = a.obs_names.to_numpy().astype(str)
    for k, v in a.obsm.items():
        out[f"obsm/{k}"] = np.asarray(v)
    for k, v in a.uns.items():
        out[f"uns/{k}"] = v["llh"].to_numpy() if hasattr(v, "columns") else np.asarray(v)
    return out


def compare(new: Path, old: Path) -> dict:
    report = {}
    for f in sorted(old.iterdir()):
        g = new / f.name
        if not g.exists():
            report[f.name] = "MISSING"
            continue
        if f.suffix == ".json":
            report[f.name] = "identical" if json.loads(f.read_text()) == json.loads(g.read_text()) else "DIFFERENT"
            continue
        if f.suffix == ".npz":
            with np.load(f) as za, np.load(g) as zb:
                a, b = {k: za[k] for k in za.files}, {k: zb[k] for k in zb.files}
        else:
            a, b = _h5ad_arrays(f), _h5ad_arrays(g)
        res = {}
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                res[k] = "only in " + ("new" if k in b else "old")
            elif a[k].shape != b[k].shape:
                res[k] = f"shape {a[k].shape} vs {b[k].shape}"
            elif a[k].dtype.kind in "fc":
                d = np.abs(a[k].astype(np.float64) - b[k].astype(np.float64))
                res[k] = float(np.nanmax(d)) if d.size else 0.0
            else:
                res[k] = "equal" if np.array_equal(a[k], b[k]) else "DIFFERENT"
        report[f.name] = res
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--parity", type=Path, default=Path("/work/shared/parity"))
    ap.add_argument(
        "--check",
        type=Path,
        default=None,
        help="reference folder to compare OUT/reference with (default: the project's tests/data/reference)",
    )
    args = ap.parse_args()
    import torch

    torch.manual_seed(0)
    ckpt = args.parity / "tf_tiny"
    tiny, tiny_raw = args.parity / "data" / "tiny_human.h5ad", args.parity / "data" / "tiny_human_raw.h5ad"
    ref, train, unseen = args.out / "reference", args.out / "reference_train", args.out / "reference_unseen"
    for d in (ref, train, unseen):
        d.mkdir(parents=True, exist_ok=True)
    manifest = {
        "transcriptformer": importlib.metadata.version("transcriptformer"),
        "torch": torch.__version__,
        "checkpoint": str(ckpt),
        "cli_common": CLI_COMMON,
        "runs": {},
    }

    # 1) the project's tests/data/reference
    for kind, extra in OUTPUT_KINDS.items():
        manifest["runs"][f"reference/human_{kind}.h5ad"] = run_cli(ckpt, tiny, ref / f"human_{kind}.h5ad", extra)
    manifest["runs"]["reference/human_raw_cell.h5ad"] = run_cli(ckpt, tiny_raw, ref / "human_raw_cell.h5ad", [])
    make_stages(ckpt, tiny, ref)

    # 2) generated inputs and their published inference outputs
    paths = make_unseen_datasets(ckpt, train)
    for name, spec in UNSEEN.items():
        for kind, extra in OUTPUT_KINDS.items():
            dest = unseen / f"{name}_{kind}.h5ad"
            manifest["runs"][f"reference_unseen/{dest.name}"] = run_cli(ckpt, paths[name], dest, spec["cli"] + extra)

    # 3) training-mode references
    manifest["training"] = {"tiny_human": make_training(ckpt, tiny, [], train, "tiny_human")}
    for name, spec in UNSEEN.items():
        manifest["training"][name] = make_training(ckpt, paths[name], spec["cli"], train, name)
    (train / "FIELDS.json").write_text(
        json.dumps(
            {"arrays": TRAIN_FIELDS, "grads": GRAD_DOC, "inputs": {k: v["cli"] for k, v in UNSEEN.items()}}, indent=1
        )
    )

    # 4) check against the existing references
    check = args.check
    if check is None:
        here = Path(__file__).resolve()
        for cand in [p / "tests" / "data" / "reference" for p in (here.parent, *here.parents)] + [
            Path("/work/main/tests/data/reference")
        ]:
            if cand.is_dir():
                check = cand
                break
    if check is not None and check.is_dir():
        manifest["check"] = {"against": str(check), "max_abs_diff": compare(ref, check)}
        print(json.dumps(manifest["check"], indent=1))
        # the tool-made unseen llh must equal the in-process inference-path llh
        for name in ["tiny_human", *UNSEEN]:
            import anndata as ad

            with np.load(train / f"{name}.npz") as z:
                llh_inproc = z["cell_llh_inference_path"]
            cli = ad.read_h5ad((ref / "human_llh.h5ad") if name == "tiny_human" else (unseen / f"{name}_llh.h5ad"))
            manifest["check"][f"{name}: in-process llh vs CLI llh"] = float(
                np.nanmax(np.abs(llh_inproc - cli.obsm["llh"].ravel()))
            )
    (args.out / "MANIFEST.json").write_text(json.dumps(manifest, indent=1, default=str))
    print(f"done: {args.out}")


if __name__ == "__main__":
    main()
