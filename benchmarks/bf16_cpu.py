"""Issue 12, section 3: is ``precision="bf16"`` worth it on a CPU with AVX512-BF16, and does it change results?

One process; precisions alternate round by round (fp32, bf16, fp32, bf16, ...) so that both meet the same
load from other processes. Parts (``--parts``, default all):

* ``cpu``      -- /proc/cpuinfo model and flags (avx512_bf16, amx_bf16, ...), torch's CPU capability, oneDNN;
* ``matmul``   -- ``torch.mm`` rate in float32 and bfloat16 at the model's GEMM shapes;
* ``speed_medium`` -- the ``medium`` random checkpoint (E=256, L=4) on ``--medium-cells`` synthetic cells of
  realistic lengths (``synthetic.py``): cells/s in fp32 and bf16, and their agreement;
* ``speed_sapiens`` -- the TF-Sapiens shape (``--sapiens DIR``, from ``make_checkpoint.py --preset sapiens``)
  on ``--sapiens-cells`` synthetic cells: the same;
* ``real_mouse``   -- REAL cells: ``--mouse`` (default /work/shared/data/mouse_val.h5ad, 1,000 mouse MERFISH
  cells) embedded with a ``medium``-shaped random checkpoint whose vocabulary is that file's genes
  (``make_checkpoint.py --genes-from``), fp32 vs bf16;
* ``real_pbmc``    -- REAL cells: ``tfs.datasets.pbmc68k_counts()`` (700 PBMCs, 765 genes) likewise.

Agreement with the fp32 embeddings: per-cell cosine (min / median), max abs difference, relative error;
the overlap of the k-nearest-neighbour graphs (k=15, exact, Euclidean as ``sc.pp.neighbors`` and cosine:
the mean fraction of a cell's neighbours that are the same); the error relative to each cell's distance to its
k-th neighbour; the change of a leave-one-out kNN label vote (label transfer) and the agreement of k-means
clusterings (adjusted Rand index). The same metrics for a second fp32 run that differs only in float32
round-off (one cell per batch) give the floor, and k-means with another seed gives the clustering's own noise.

The checkpoints have random weights: the numbers say how much bf16 arithmetic moves these embeddings, not how
a trained model's embeddings move (trained weights can have larger activations).

Usage::

    python benchmarks/bf16_cpu.py --sapiens benchmarks/out/ckpt_sapiens --json benchmarks/out/bf16_cpu.json
    python benchmarks/bf16_cpu.py --smoke --json benchmarks/out/bf16_smoke.json     # < 1 min
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OUT_DIR = HERE / "out"
sys.path.insert(0, str(HERE))

import make_checkpoint as mc  # noqa: E402
import synthetic  # noqa: E402
from bench import _flops, _jsonable, contention, cpu_snapshot, machine_info, matmul_rate, wait_quiet  # noqa: E402

#: set by --wait-quiet: (seconds to wait at most, other-process CPU fraction to wait for) before each timed run
QUIET: tuple[float, float] | None = None

PARTS = ("cpu", "matmul", "speed_medium", "speed_sapiens", "real_mouse", "real_pbmc")
FLAGS = ("avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile", "amx_int8", "avx512_vnni", "avx_vnni")


def cpu_facts() -> dict:
    import torch

    flags: set[str] = set()
    model = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags") and not flags:
            flags = set(line.split(":", 1)[1].split())
        if line.startswith("model name") and model == "unknown":
            model = line.split(":", 1)[1].strip()
    out = {"model": model, "flags": {f: f in flags for f in FLAGS}, "cores": os.cpu_count()}
    with contextlib.suppress(AttributeError):
        out["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    out["mkldnn"] = bool(torch.backends.mkldnn.is_available())
    out["torch_threads"] = torch.get_num_threads()
    out["torch"] = torch.__version__
    return out


# ------------------------------------------------------------------------------------------------
# agreement


def knn(x: np.ndarray, k: int, metric: str) -> np.ndarray:
    """Exact k nearest neighbours of every row (itself excluded)."""
    x = np.asarray(x, np.float64)
    if metric == "cosine":
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-30)
        d = -(x @ x.T)
    else:
        sq = (x * x).sum(1)
        d = sq[:, None] + sq[None, :] - 2 * (x @ x.T)
    np.fill_diagonal(d, np.inf)
    idx = np.argpartition(d, k, axis=1)[:, :k]
    return idx


def knn_overlap(a: np.ndarray, b: np.ndarray, k: int, metric: str) -> dict:
    na, nb = knn(a, k, metric), knn(b, k, metric)
    frac = np.array([len(set(na[i]) & set(nb[i])) / k for i in range(len(a))])
    return {
        "mean": float(frac.mean()),
        "min": float(frac.min()),
        "p05": float(np.quantile(frac, 0.05)),
        "cells_identical_fraction": float((frac == 1).mean()),
    }


def vote(neigh: np.ndarray, labels: np.ndarray) -> np.ndarray:
    out = np.empty(len(neigh), dtype=object)
    for i, row in enumerate(neigh):
        vals, counts = np.unique(labels[row], return_counts=True)
        out[i] = vals[np.argmax(counts)]
    return out


def agreement(ref: np.ndarray, x: np.ndarray, k: int = 15, labels: np.ndarray | None = None) -> dict:
    """How far ``x`` is from the reference embeddings ``ref`` (same cells, same order)."""
    a, b = np.asarray(ref, np.float64), np.asarray(x, np.float64)
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    cos = (a * b).sum(1) / np.maximum(na * nb, 1e-30)
    diff = np.linalg.norm(a - b, axis=1)
    out = {
        "n": len(a),
        "cos_min": float(cos.min()),
        "cos_median": float(np.median(cos)),
        "max_abs": float(np.abs(a - b).max()),
        "max_abs_ref": float(np.abs(a).max()),
        "rel_err_median": float(np.median(diff / np.maximum(na, 1e-30))),
        "rel_err_max": float((diff / np.maximum(na, 1e-30)).max()),
    }
    if len(a) > k + 1:
        out["knn_overlap_euclidean"] = knn_overlap(a, b, k, "euclidean")
        out["knn_overlap_cosine"] = knn_overlap(a, b, k, "cosine")
        # the error against the scale of the neighbourhood: distance to the k-th neighbour in ref
        sq = (a * a).sum(1)
        d = np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2 * (a @ a.T), 0))
        np.fill_diagonal(d, np.inf)
        kth = np.partition(d, k - 1, axis=1)[:, k - 1]
        r = diff / np.maximum(kth, 1e-30)
        out["err_over_kth_neighbour_distance"] = {"median": float(np.median(r)), "max": float(r.max())}
        if labels is not None:
            la = vote(knn(a, k, "euclidean"), labels)
            lb = vote(knn(b, k, "euclidean"), labels)
            out["knn_vote"] = {
                "changed_fraction": float((la != lb).mean()),
                "accuracy_ref": float((la == labels).mean()),
                "accuracy": float((lb == labels).mean()),
            }
            out["kmeans_ari"] = kmeans_ari(a, b, len(np.unique(labels)))
    return out


def kmeans_ari(a: np.ndarray, b: np.ndarray, n_clusters: int) -> dict:
    """ARI of k-means on ``a`` vs on ``b`` (same seed), and of ``a`` with two seeds (the method's own noise)."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score as ari

    def km(x, seed):
        return KMeans(n_clusters=n_clusters, n_init=10, random_state=seed).fit_predict(x)

    a0, b0, a1 = km(a, 0), km(b, 0), km(a, 1)
    return {
        "n_clusters": n_clusters,
        "bf16_vs_fp32_same_seed": float(ari(a0, b0)),
        "fp32_seed0_vs_seed1": float(ari(a0, a1)),
    }


# ------------------------------------------------------------------------------------------------
# runs


def timed_runs(loaded, source, rounds: int, heads=("embeddings",), extra: dict | None = None) -> dict:
    """fp32 and bf16 runs, alternating; seconds, load, and the embeddings of the last run of each."""
    from transcriptformer.inference.engine import Engine

    engines = {p: Engine(loaded, device="cpu", precision=p, progress=False) for p in ("32", "bf16")}
    # warm-up of each precision (first-call costs, oneDNN's bf16 kernels), not timed
    for e in engines.values():
        e.run(_head(source, 4), heads)
    runs: dict[str, list[dict]] = {"32": [], "bf16": []}
    embs = {}
    for r in range(rounds):
        for p, e in engines.items():
            gate = wait_quiet(*QUIET) if QUIET else None
            la = os.getloadavg()
            snap = cpu_snapshot()
            res = e.run(source, heads)
            c = contention(snap, cpu_snapshot())
            runs[p].append(
                {
                    "round": r,
                    "seconds": res.seconds,
                    "loadavg_before": la,
                    "loadavg_after": os.getloadavg(),
                    "other_cpu_fraction_of_machine": c["other_cpu_fraction_of_machine"],
                    "quiet_gate": gate,
                }
            )
            embs[p] = res.embeddings
            n_genes = res.n_genes
            print(f"  precision {p} round {r}: {res.seconds:.2f} s (load {la[0]:.2f})", file=sys.stderr, flush=True)
    tokens, flops = _flops(n_genes, loaded, llh=False)
    out: dict = {"cells": int(source.n_obs), "tokens": tokens, "model_flops": flops, "runs": runs}
    for p in runs:
        sec = float(np.median([x["seconds"] for x in runs[p]]))
        out[p] = {"median_seconds": sec, "cells_per_s": source.n_obs / sec, "tokens_per_s": tokens / sec}
        out[p]["gflops_per_s"] = flops / sec / 1e9
    per_round = [b["seconds"] / a["seconds"] for a, b in zip(runs["32"], runs["bf16"], strict=True)]
    out["bf16_speedup_per_round"] = [1 / x for x in per_round]
    out["bf16_speedup_median"] = float(np.median([1 / x for x in per_round]))
    out["_embeddings"] = embs
    out["peak_rss_mb_process_so_far"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out.update(extra or {})
    return out


def _head(source, n):
    """The first ``n`` cells of a source, as a source (for warm-ups)."""
    from transcriptformer.data.tokenizer import prepare_cells

    sub = source.adata[: min(n, source.n_obs)]
    return prepare_cells(sub, source.vocab, source.aux_vocabs, seq_len=source.seq_len)


def source_of(adata, loaded):
    from transcriptformer.data.tokenizer import prepare_cells

    src = prepare_cells(adata, loaded.vocab, loaded.aux_vocabs, seq_len=loaded.seq_len)
    # what _head needs to re-tokenise a prefix
    src.adata, src.vocab, src.aux_vocabs, src.seq_len = adata, loaded.vocab, loaded.aux_vocabs, loaded.seq_len
    return src


def synthetic_adata(n: int, ids: list[str], seed: int, smoke: bool):
    import anndata as ad

    prof = synthetic.Profile(median_genes=120, small_median=40, min_genes=5) if smoke else synthetic.Profile()
    return ad.AnnData(
        X=synthetic.synthetic_counts(n, len(ids), seed=seed, profile=prof),
        obs=synthetic.synthetic_obs(n, seed),
        var=synthetic.synthetic_var(ids),
    )


def real_part(name: str, adata, label_key: str, a, rep: dict, save) -> None:
    """Embed real cells in fp32 and bf16 with a checkpoint made of their genes; agreement and speed."""
    import transcriptformer
    from transcriptformer.inference.engine import Engine

    outdir = Path(a.outdir)
    shape_name = "smoke" if a.smoke else "medium"
    ckpt = outdir / f"ckpt_{shape_name}_{name}"
    genes, assays = mc.genes_of_adata(adata, "ensembl_id")
    shape = mc.replace(mc.PRESETS[shape_name], n_genes=len(genes))
    if not (ckpt / "model_weights.pt").is_file():
        mc.make_checkpoint(ckpt, shape, genes=genes, extra_assays=assays)
    loaded = transcriptformer.load_model(ckpt)
    src = source_of(adata, loaded)
    entry = rep.setdefault(name, {})
    entry.update(
        {
            "cells": adata.n_obs,
            "genes_in_file": adata.n_vars,
            "vocabulary_genes": len(genes),
            "assays": assays,
            "label_key": label_key,
            "checkpoint_shape": mc.asdict(shape),
        }
    )
    timing = timed_runs(loaded, src, a.rounds)
    embs = timing.pop("_embeddings")
    entry["speed"] = timing
    labels = np.asarray(adata.obs[label_key].astype(str)) if label_key in adata.obs else None
    # the float32 round-off floor: the same cells one per batch
    floor = Engine(loaded, device="cpu", precision="32", batch_size=1, progress=False).run(src, ("embeddings",))
    entry["n_genes"] = {
        "median": float(np.median(floor.n_genes)),
        "max": int(floor.n_genes.max()),
        "zero": int((floor.n_genes == 0).sum()),
    }
    entry["bf16_vs_fp32"] = agreement(embs["32"], embs["bf16"], labels=labels)
    entry["fp32_batch1_vs_fp32"] = agreement(embs["32"], floor.embeddings, labels=labels)
    np.savez(outdir / f"bf16_{name}_embeddings.npz", fp32=embs["32"], bf16=embs["bf16"], fp32_batch1=floor.embeddings)
    save()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", default=",".join(PARTS))
    p.add_argument("--sapiens", help="checkpoint folder of the TF-Sapiens shape (make_checkpoint.py --preset sapiens)")
    p.add_argument("--mouse", default="/work/shared/data/mouse_val.h5ad")
    p.add_argument("--medium-cells", type=int, default=128)
    p.add_argument("--sapiens-cells", type=int, default=6)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int)
    p.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="before each timed run, wait up to this long for other processes to use < 5%% of the machine",
    )
    p.add_argument("--smoke", action="store_true", help="tiny shapes and few cells (checks the code in < 1 min)")
    p.add_argument("--outdir", default=str(OUT_DIR))
    p.add_argument("--json")
    a = p.parse_args(argv)
    parts = [x for x in a.parts.split(",") if x]
    global QUIET
    QUIET = (a.wait_quiet, 0.05) if a.wait_quiet else None
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    import transcriptformer

    Path(a.outdir).mkdir(parents=True, exist_ok=True)
    rep: dict = {
        "machine": machine_info(),
        "args": vars(a),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "uptime_start": os.getloadavg(),
    }

    def save() -> None:
        if a.json:
            Path(a.json).write_text(json.dumps(_jsonable(rep), indent=1))

    if "cpu" in parts:
        rep["cpu"] = cpu_facts()
        save()
    if "matmul" in parts:
        shapes = [(512, 512, 512)] if a.smoke else [(2048, 2048, 2048), (8192, 256, 1024), (4096, 2048, 2048)]
        rep["matmul"] = {
            "x".join(map(str, s)): {
                dt: matmul_rate(*s, dtype=dt, reps=3 if a.smoke else 5)["flops_per_s"] for dt in ("float32", "bfloat16")
            }
            for s in shapes
        }
        for v in rep["matmul"].values():
            v["bf16_over_fp32"] = v["bfloat16"] / v["float32"]
        print("matmul", rep["matmul"], file=sys.stderr, flush=True)
        save()
    if "speed_medium" in parts:
        shape = mc.PRESETS["smoke" if a.smoke else "medium"]
        ckpt = mc.ensure_checkpoint(Path(a.outdir) / f"ckpt_{'smoke' if a.smoke else 'medium'}", shape)
        loaded = transcriptformer.load_model(ckpt)
        n = 16 if a.smoke else a.medium_cells
        adata = synthetic_adata(n, mc.gene_ids(shape.n_genes), a.seed, a.smoke)
        print(f"speed_medium: {n} cells", file=sys.stderr, flush=True)
        t = timed_runs(loaded, source_of(adata, loaded), a.rounds, extra={"shape": mc.asdict(shape)})
        embs = t.pop("_embeddings")
        t["data_stats"] = synthetic.describe(adata.X)
        t["bf16_vs_fp32"] = agreement(embs["32"], embs["bf16"])
        rep["speed_medium"] = t
        save()
    if "speed_sapiens" in parts:
        if a.smoke:
            sap = mc.ensure_checkpoint(Path(a.outdir) / "ckpt_smoke_sapiens", mc.PRESETS["smoke_sapiens"])
        else:
            sap = a.sapiens
        if not sap:
            rep["speed_sapiens"] = {"skipped": "no --sapiens checkpoint given"}
        else:
            t0 = time.perf_counter()
            loaded = transcriptformer.load_model(sap)
            load_s = time.perf_counter() - t0
            n = 8 if a.smoke else a.sapiens_cells
            ids = list(loaded.vocab.genes)
            adata = synthetic_adata(n, ids, a.seed, a.smoke)
            print(f"speed_sapiens: {n} cells", file=sys.stderr, flush=True)
            t = timed_runs(loaded, source_of(adata, loaded), a.rounds, extra={"checkpoint": str(sap)})
            embs = t.pop("_embeddings")
            t["load_seconds"] = load_s
            t["data_stats"] = synthetic.describe(adata.X)
            t["bf16_vs_fp32"] = agreement(embs["32"], embs["bf16"])
            rep["speed_sapiens"] = t
            transcriptformer.clear_cache()
            del loaded
            save()
    if "real_mouse" in parts:
        import anndata as ad

        if not Path(a.mouse).is_file():
            rep["real_mouse"] = {"skipped": f"{a.mouse} not found"}
        else:
            adata = ad.read_h5ad(a.mouse)
            if a.smoke:
                adata = adata[:120].copy()
            print(f"real_mouse: {adata.n_obs} cells", file=sys.stderr, flush=True)
            real_part("mouse_val", adata, "cell_type", a, rep.setdefault("real", {}), save)
    if "real_pbmc" in parts:
        import transcriptformer.scanpy as tfs

        adata = tfs.datasets.pbmc68k_counts()
        if a.smoke:
            adata = adata[:120].copy()
        print(f"real_pbmc: {adata.n_obs} cells", file=sys.stderr, flush=True)
        real_part("pbmc68k", adata, "bulk_labels", a, rep.setdefault("real", {}), save)
    rep["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    rep["uptime_end"] = os.getloadavg()
    save()
    print(json.dumps(_jsonable({k: v for k, v in rep.items() if k not in ("machine", "args")}), indent=1)[:6000])


if __name__ == "__main__":
    main()
