"""Issue 21, section 2: the TF-Sapiens shape on the CPU in float32, part by part, beside the published tool.

Three synthetic cells of 500, 1,500 and 2,047 genes (``--genes``) on a checkpoint of the TF-Sapiens shape
(``make_checkpoint.py DIR --preset sapiens``). Every configuration runs in a fresh process, interleaved round
by round in a rotating order:

* ``ours``      -- ``tfs.tl.embed(adata, model=DIR, precision="32")`` with this checkout's ``src/``: the load,
  ``--reps`` timed calls, then one more call with timers around every part of the forward;
* ``baseline``  -- the same with another ``src/`` (``--baseline-src``, e.g. a ``git archive`` of an older commit);
* ``published`` -- the published 0.6.1 command line (``--published PYTHON``, a venv made by
  ``setup_published_venv.sh``) on the same cells, ``--precision 32``, through ``_published_driver.py`` (which
  times its prediction loop); ``--published-compile`` keeps its compiled block masks (its default), else
  ``--disable-compile-block-mask``.

The parts: gene MLP (the engine's per-token cache), the Q/K/V projections, the attention kernel, the output
projection, the feed-forward (``linear1``, activation, ``linear2``), the two layer norms, the rest of each
layer (residual adds, head reshapes), the rest of ``encode`` (embedding gathers, count bias), the heads
(pooling), and everything of ``tl.embed`` outside the forward passes (tokenisation, planning, copies,
writing). Each part's arithmetic (FLOPs of the real positions, attention counted causally) over its time
gives its GFLOP/s, reported as a fraction of the float32 matmul rate measured in the same process
(``torch.mm``, median of 5: 2048^3 and 2048 x 2048 x 6144).

Usage::

    python benchmarks/sapiens_parts.py benchmarks/out/ckpt_sapiens --rounds 3 \\
        --baseline-src benchmarks/out/src-base --published benchmarks/out/published-venv/bin/python \\
        --json benchmarks/out/sapiens_parts.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

if os.environ.get("TF_BENCH_SRC"):
    sys.path.insert(0, os.environ["TF_BENCH_SRC"])

from _worker import run_worker  # noqa: E402
from bench import _jsonable, contention, cpu_snapshot, machine_info  # noqa: E402


def _mm_rates(threads: int | None) -> dict:
    import torch

    out = {}
    for m, k, n in ((2048, 2048, 2048), (2048, 2048, 6144)):
        a, b = torch.randn(m, k), torch.randn(k, n)
        a @ b
        ts = []
        for _ in range(5):
            t = time.perf_counter()
            a @ b
            ts.append(time.perf_counter() - t)
        out[f"{m}x{k}x{n}"] = 2 * m * k * n / statistics.median(ts) / 1e9
    return out


class Timers:
    """Seconds per named part, accumulated by wrappers (eager CPU ops are synchronous)."""

    def __init__(self) -> None:
        self.t: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self.on = False

    def wrap(self, name: str, fn):
        def timed(*args, **kwargs):
            if not self.on:
                return fn(*args, **kwargs)
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.t[name] = self.t.get(name, 0.0) + time.perf_counter() - t0
                self.cpu[name] = self.cpu.get(name, 0.0) + time.process_time() - c0

        return timed

    def hook(self, module, name: str) -> None:
        starts: list[tuple[float, float]] = []

        def pre(_m, _a):
            if self.on:
                starts.append((time.perf_counter(), time.process_time()))

        def post(_m, _a, _o):
            if self.on and starts:
                t0, c0 = starts.pop()
                self.t[name] = self.t.get(name, 0.0) + time.perf_counter() - t0
                self.cpu[name] = self.cpu.get(name, 0.0) + time.process_time() - c0

        module.register_forward_pre_hook(pre)
        module.register_forward_hook(post)


def instrument(timers: Timers, loaded) -> None:
    """Put timers around the parts of the forward (class attributes, so any copy of the network is timed)."""
    from transcriptformer.inference import engine as engine_mod
    from transcriptformer.model import attention as attn_mod
    from transcriptformer.model import network as net_mod

    net_mod.SelfAttention.project = timers.wrap("qkv_projection", net_mod.SelfAttention.project)
    net_mod.SelfAttention.merge = timers.wrap("out_projection", net_mod.SelfAttention.merge)
    attn_mod.Attend.__call__ = timers.wrap("attention_kernel", attn_mod.Attend.__call__)
    net_mod.GeneEmbedding.forward = timers.wrap("gene_mlp", net_mod.GeneEmbedding.forward)
    net_mod.EncoderLayer.forward = timers.wrap("layers_total", net_mod.EncoderLayer.forward)
    net_mod.TranscriptFormer.encode = timers.wrap("encode_total", net_mod.TranscriptFormer.encode)
    engine_mod.Engine._forward = timers.wrap("forward_total", engine_mod.Engine._forward)
    for layer in loaded.model.transformer_encoder.encoder_layers:
        timers.hook(layer.linear1, "ffn")
        timers.hook(layer.activation, "ffn")
        timers.hook(layer.linear2, "ffn")
        timers.hook(layer.norm1, "layer_norms")
        timers.hook(layer.norm2, "layer_norms")


def part_flops(widths: list[int], reals: list[int], loaded) -> dict:
    """FLOPs of each part for batches of one cell each: ``reals`` real positions (aux + START + genes)."""
    c = loaded.config.model
    E, Fd, L = c.embed_dim, c.model_dim, c.num_layers
    D = loaded.model.gene_embeddings.embedding.weight.shape[1]
    T = np.asarray(reals, dtype=np.float64)
    return {
        "qkv_projection": float(L * 2 * 3 * E * E * T.sum()),
        "attention_kernel": float(L * 2 * 2 * E * (T * (T + 1) / 2).sum()),
        "out_projection": float(L * 2 * E * E * T.sum()),
        "ffn": float(L * 2 * 2 * E * Fd * T.sum()),
        "gene_mlp_per_token": float(2 * (D * E + E * E) * T.sum()),
        "_per_unique_token": float(2 * (D * E + E * E)),
    }


def _parts(t: dict[str, float], total: float) -> dict[str, float]:
    """The parts from the timers' totals (the ``*_total`` timers nest the others)."""
    parts = {
        "gene_mlp": t.get("gene_mlp", 0.0),
        "qkv_projection": t.get("qkv_projection", 0.0),
        "attention_kernel": t.get("attention_kernel", 0.0),
        "out_projection": t.get("out_projection", 0.0),
        "ffn": t.get("ffn", 0.0),
        "layer_norms": t.get("layer_norms", 0.0),
    }
    parts["layer_rest"] = t["layers_total"] - sum(
        parts[k] for k in ("qkv_projection", "attention_kernel", "out_projection", "ffn", "layer_norms")
    )
    parts["encode_rest"] = t["encode_total"] - t["layers_total"] - parts["gene_mlp"]
    parts["heads"] = t["forward_total"] - t["encode_total"]
    parts["outside_forward"] = total - t["forward_total"]
    return parts


def worker_ours(spec: dict) -> dict:
    T0 = time.perf_counter()
    import anndata as ad
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    import transcriptformer
    import transcriptformer.scanpy as tfs

    t0 = time.perf_counter()
    loaded = transcriptformer.load_model(spec["checkpoint"])
    load_s = time.perf_counter() - t0
    adata = ad.read_h5ad(spec["data"])
    times, cpu_times, snaps = [], [], []
    emb = None
    for _ in range(spec["reps"]):
        a = cpu_snapshot()
        t0, c0 = time.perf_counter(), time.process_time()
        out = tfs.tl.embed(adata, model=loaded, precision="32", copy=True, progress=False)
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
        if len(times) == 1:  # imports, load, reading the file and the first call, as a script would
            first_end_to_end = time.perf_counter() - T0
        snaps.append(contention(a, cpu_snapshot()))
        emb = out.obsm["X_transcriptformer"]
    rates = _mm_rates(spec.get("threads"))
    timers = Timers()
    instrument(timers, loaded)
    timers.on = True
    a = cpu_snapshot()
    t0, c0 = time.perf_counter(), time.process_time()
    out = tfs.tl.embed(adata, model=loaded, precision="32", copy=True, progress=False)
    total, cpu_total = time.perf_counter() - t0, time.process_time() - c0
    timers.on = False
    parts_by = {
        which: _parts(t, total if which == "wall" else cpu_total)
        for which, t in (("wall", timers.t), ("cpu", timers.cpu))
    }
    params = out.uns["transcriptformer"]["params"]
    n_genes = np.asarray((adata.X > 0).sum(1)).ravel()
    A = loaded.model.num_aux
    reals = [int(min(g + 1, loaded.seq_len)) + A for g in n_genes]
    fl = part_flops(reals, reals, loaded)
    unique = int(np.unique(adata.X.nonzero()[1]).size) + 1
    fl["gene_mlp"] = fl.pop("_per_unique_token") * unique
    return {
        "config": spec["name"],
        "src": spec.get("src") or str(ROOT / "src"),
        "load_seconds": load_s,
        "seconds": times,
        "cpu_seconds": cpu_times,
        "end_to_end_first_call_seconds": first_end_to_end,
        "contention": snaps,
        "instrumented_seconds": total,
        "instrumented_contention": contention(a, cpu_snapshot()),
        "parts_seconds": parts_by["wall"],
        "parts_cpu_seconds": parts_by["cpu"],
        "parts_flops": fl,
        "matmul_gflops": rates,
        "params_precision": params.get("precision"),
        "loadavg": os.getloadavg(),
        "embeddings": np.asarray(emb).tolist(),
    }


def worker_published(spec: dict) -> dict:
    work = Path(tempfile.mkdtemp(prefix="tf-published-"))
    cmd = [spec["python"], str(HERE / "_published_driver.py"), "inference", "--checkpoint-path", spec["checkpoint"]]
    cmd += ["--data-file", spec["data"], "--batch-size", "8", "--precision", "32", "--device", "cpu"]
    cmd += ["--output-path", str(work), "--output-filename", "out.h5ad"]
    if not spec.get("compile"):
        cmd.append("--disable-compile-block-mask")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TF_BENCH_SRC")}
    if spec.get("threads"):
        env["OMP_NUM_THREADS"] = str(spec["threads"])
    a = cpu_snapshot()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    load = contention(a, cpu_snapshot())
    if proc.returncode != 0:
        raise RuntimeError(proc.stdout[-3000:] + proc.stderr[-3000:])
    predict = {}
    for line in (proc.stdout + proc.stderr).splitlines():
        if line.startswith("TF_BENCH_PREDICT "):
            predict = json.loads(line.split(" ", 1)[1])
    import h5py

    with h5py.File(work / "out.h5ad", "r") as f:
        emb = f["obsm"]["embeddings"][:]
    return {
        "config": spec["name"],
        "wall_seconds": wall,
        "cpu_seconds": ru.ru_utime + ru.ru_stime,
        "predict": predict,
        "contention": load,
        "loadavg": os.getloadavg(),
        "compile_block_mask": bool(spec.get("compile")),
        "embeddings": emb.astype(np.float32).tolist(),
    }


def main(argv=None) -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--_worker":
        spec = json.loads(sys.argv[2])
        fn = worker_published if spec["kind"] == "published" else worker_ours
        print(json.dumps(_jsonable(fn(spec))))
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("--genes", default="500,1500,2047")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--reps", type=int, default=2, help="timed tl.embed calls per process (after the load)")
    p.add_argument("--baseline-src", help="another src/ folder to run the same way")
    p.add_argument("--published", help="python of a venv with the published 0.6.1")
    p.add_argument("--published-compile", action="store_true", help="keep the published compiled block masks")
    p.add_argument("--only", default="ours,baseline,published")
    p.add_argument("--threads", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json")
    a = p.parse_args(argv)
    from padding import make_cells

    import transcriptformer

    loaded = transcriptformer.load_model(a.checkpoint)
    data = Path(a.json or "benchmarks/out/x.json").with_name("sapiens_cells.h5ad")
    data.parent.mkdir(parents=True, exist_ok=True)
    make_cells(list(loaded.vocab.genes), [int(x) for x in a.genes.split(",")], a.seed).write_h5ad(data)
    del loaded
    base = {"checkpoint": str(Path(a.checkpoint).resolve()), "data": str(data.resolve()), "threads": a.threads}
    configs = []
    only = a.only.split(",")
    if "ours" in only:
        configs.append({**base, "name": "ours", "kind": "ours", "reps": a.reps})
    if "baseline" in only and a.baseline_src:
        configs.append({**base, "name": "baseline", "kind": "ours", "reps": a.reps, "src": a.baseline_src})
    if "published" in only and a.published:
        configs.append(
            {
                **base,
                "name": "published",
                "kind": "published",
                "python": os.path.abspath(a.published),
                "compile": a.published_compile,
            }
        )
    report: dict = {
        "machine": machine_info(),
        "args": vars(a),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "runs": [],
    }

    def save() -> None:
        if a.json:
            Path(a.json).write_text(json.dumps(_jsonable(report), indent=1))

    for r in range(a.rounds):
        order = configs[r % len(configs) :] + configs[: r % len(configs)]
        for spec in order:
            before = os.getloadavg()
            res = run_worker(__file__, spec, timeout=3000)
            res["round"] = r
            res["loadavg_before"] = before
            report["runs"].append(res)
            secs = res.get("seconds") or [res.get("wall_seconds")]
            print(
                f"round {r} {spec['name']}: {[round(s, 2) for s in secs]} s, load {before[0]:.2f}"
                f" -> {os.getloadavg()[0]:.2f}",
                flush=True,
            )
            if "parts_seconds" in res:
                print("   parts (wall):", {k: round(v, 2) for k, v in res["parts_seconds"].items()}, flush=True)
                print("   parts (cpu): ", {k: round(v, 2) for k, v in res["parts_cpu_seconds"].items()}, flush=True)
                print("   matmul:", {k: round(v) for k, v in res["matmul_gflops"].items()}, flush=True)
            save()
    summary: dict = {}
    for spec in configs:
        runs = [x for x in report["runs"] if x["config"] == spec["name"]]
        if spec["kind"] == "ours":
            call = [min(x["seconds"]) for x in runs]
            summary[spec["name"]] = {
                "median_call_s": statistics.median(call),
                "calls": call,
                "median_load_s": statistics.median(x["load_seconds"] for x in runs),
            }
            rate = statistics.median(max(x["matmul_gflops"].values()) for x in runs)
            fl = runs[0]["parts_flops"]
            for which in ("parts_seconds", "parts_cpu_seconds"):
                parts = {k: statistics.median(x[which][k] for x in runs) for k in runs[0][which]}
                total = sum(parts.values())
                summary[spec["name"]][which] = {
                    k: {
                        "s": v,
                        "share": v / total,
                        "gflops": fl[k] / v / 1e9 if fl.get(k) else None,
                        "fraction_of_matmul": fl[k] / v / 1e9 / rate if fl.get(k) else None,
                    }
                    for k, v in parts.items()
                }
            summary[spec["name"]]["matmul_gflops_median"] = rate
        else:
            summary[spec["name"]] = {
                "median_wall_s": statistics.median(x["wall_seconds"] for x in runs),
                "walls": [x["wall_seconds"] for x in runs],
                "median_predict_s": statistics.median(x["predict"].get("predict_seconds", np.nan) for x in runs),
            }
    embs = {
        spec["name"]: np.asarray(next(x for x in report["runs"] if x["config"] == spec["name"])["embeddings"])
        for spec in configs
    }
    for x in report["runs"]:
        x.pop("embeddings", None)
    if "ours" in embs:
        summary["max_abs_diff_vs_ours"] = {k: float(np.abs(v - embs["ours"]).max()) for k, v in embs.items()}
    report["summary"] = summary
    save()
    print(json.dumps(_jsonable(summary), indent=1))


if __name__ == "__main__":
    main()
