"""Steps of ``gpu_session.sh``: this package and the published 0.6.1 on the same GPU, same cells, same checkpoint.

Every step adds its section to one JSON file (``--json``), so a session cut short keeps what it measured.

``prepare``   random checkpoint of a preset (``sapiens``: TF-Sapiens shape; ``metazoa``: the same network with
              the TF-Metazoa vocabulary, V = 247,389 tokens and a 512-wide gene head, SPEC §9) and synthetic
              cells written as h5ad with h5py (``synthetic.write_h5ad_chunked``); the cells' genes are the first
              23,823 vocabulary ids, which both vocabularies hold, so both presets read the same cells.
``matmul``    the card's bf16 ``torch.mm`` rate (8192^3) and fp32 (TF32 off), the reference for "% of matmul".
``ours``      ``transcriptformer`` (this checkout's ``src/``) in bf16 with attention ``auto``: a cold run
              (compilation) then a warm run; cells/s, tokens/s, model TFLOP/s and their fraction of the measured
              bf16 matmul rate, peak GPU memory (``torch.cuda.max_memory_allocated`` and ``nvidia-smi``), load time;
              an fp32 run (TF32 off, chunked attention) of the first ``--fp32-cells`` cells for the agreement.
``published`` the published CLI (``transcriptformer inference`` 0.6.1) from the wheels installed in ``--site``
              (run with ``PYTHONPATH=<site>`` only, so this checkout cannot shadow it), ``--batch-size 8`` (its
              default), bf16 autocast (``--config-override model.inference_config.precision=bf16-mixed``; its
              ``--precision`` flag offers only ``16-mixed``, which is float16 on CUDA, and ``32``), compiled
              block masks (its default): wall time, the prediction loop's time read from Lightning's progress bar,
              time to "Model weights loaded", peak GPU memory (``nvidia-smi``), and its embeddings compared with
              ours (bf16) and with our fp32 run.
``summary``   a short table of everything above.

Model FLOPs: ``transcriptformer.inference.batching.estimate_flops`` on the real tokens (the same count for both
tools; the published tool also runs the count head and the vocabulary-wide gene head on every batch, which that count
leaves out, so its "useful" rate is the embedding's FLOPs over its time).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import make_checkpoint as mc  # noqa: E402
import synthetic  # noqa: E402
from bench import _jsonable, compare  # noqa: E402

SAPIENS_GENES = mc.PRESETS["sapiens"].n_genes


def presets(smoke: bool) -> dict[str, mc.Shape]:
    if smoke:
        small = replace(mc.PRESETS["smoke_sapiens"], H=4)  # dk = 16, the least flex accepts
        return {"sapiens": small, "metazoa": replace(small, n_genes=20000, Hg=32)}
    return {"sapiens": mc.PRESETS["sapiens"], "metazoa": mc.PRESETS["metazoa"]}


# ------------------------------------------------------------------------------------------------
# results file, GPU memory sampler


def load_results(path: str) -> dict:
    p = Path(path)
    return json.loads(p.read_text()) if p.is_file() else {}


def save_section(path: str, key: str, value) -> None:
    rep = load_results(path)
    rep[key] = value
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(path).with_suffix(".tmp")
    tmp.write_text(json.dumps(_jsonable(rep), indent=1))
    tmp.replace(path)


class GpuMemorySampler:
    """Peak ``memory.used`` of GPU 0 from ``nvidia-smi`` every ``interval`` s (whole card: every process)."""

    def __init__(self, interval: float = 0.2):
        self.interval = interval
        self.peak_mib: float | None = None
        self.baseline_mib: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @staticmethod
    def read() -> float | None:
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                capture_output=True,
                text=True,
                timeout=5,
            ).stdout
            return float(out.strip().splitlines()[0])
        except (OSError, ValueError, IndexError, subprocess.SubprocessError):
            return None

    def __enter__(self):
        self.baseline_mib = self.read()
        if self.baseline_mib is None:
            return self

        def loop():
            while not self._stop.is_set():
                v = self.read()
                if v is not None:
                    self.peak_mib = max(self.peak_mib or 0.0, v)
                self._stop.wait(self.interval)

        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def result(self) -> dict:
        return {
            "nvidia_smi_peak_gb": None if self.peak_mib is None else self.peak_mib / 1024,
            "nvidia_smi_before_gb": None if self.baseline_mib is None else self.baseline_mib / 1024,
        }


# ------------------------------------------------------------------------------------------------
# steps


def step_prepare(a) -> None:
    import torch

    shape = presets(a.smoke)[a.preset]
    work = Path(a.work)
    ckpt = work / f"ckpt_{a.preset}"
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    t0 = time.perf_counter()
    if not (ckpt / "model_weights.pt").is_file():
        mc.make_checkpoint(ckpt, shape, device=dev, verify=False)
    entry = {"shape": mc.asdict(shape), "checkpoint_seconds": time.perf_counter() - t0}
    n_genes = min(shape.n_genes, 2000 if a.smoke else SAPIENS_GENES)
    ids = mc.gene_ids(n_genes)  # the first ids of every preset's vocabulary
    prof = synthetic.Profile(median_genes=120, small_median=40, min_genes=5) if a.smoke else synthetic.Profile()
    for n in sorted({a.cells, a.subset} - {0}):  # cells_<subset> holds the first cells of cells_<cells>
        path = work / f"cells_{n}.h5ad"
        if not path.is_file():
            entry[f"cells_{n}"] = synthetic.write_h5ad_chunked(
                path, a.cells, ids, seed=0, profile=prof, verbose=False, head=n
            )
    save_section(a.json, f"prepare_{a.preset}", entry)
    print(json.dumps(_jsonable(entry))[:2000])


def step_matmul(a) -> None:
    import torch
    from bench import matmul_rate

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = False
    n = 8192 if dev == "cuda" else 512
    entry = {
        "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu",
        "bf16": matmul_rate(n, n, n, dtype="bfloat16", device=dev, reps=10),
        "fp32_no_tf32": matmul_rate(n, n, n, dtype="float32", device=dev, reps=5),
    }
    if dev == "cuda":
        entry["bf16_model_shape_32768x2048x2048"] = matmul_rate(32768, 2048, 2048, dtype="bfloat16", device=dev)
    save_section(a.json, "matmul", entry)
    print(json.dumps(_jsonable(entry)))


def read_cells(path: Path):
    """The cells of an h5ad: AnnData if anndata is importable, else a minimal stand-in read with h5py."""
    try:
        import anndata as ad

        return ad.read_h5ad(path)
    except ImportError:
        import h5py
        import pandas as pd
        import scipy.sparse as sp

        with h5py.File(path, "r") as f:
            g = f["X"]
            X = sp.csr_matrix((g["data"][:], g["indices"][:], g["indptr"][:]), shape=tuple(g.attrs["shape"]))

            def col(group, name):
                obj = group[name]
                if isinstance(obj, h5py.Group):  # categorical
                    cats = [c.decode() if isinstance(c, bytes) else c for c in obj["categories"][:]]
                    return pd.Categorical.from_codes(obj["codes"][:], cats)
                return [v.decode() if isinstance(v, bytes) else v for v in obj[:]]

            obs = pd.DataFrame({"assay": col(f["obs"], "assay")})
            var = pd.DataFrame({"ensembl_id": col(f["var"], "ensembl_id")})
        return synthetic.MiniAnnData(X, obs, var)


def step_ours(a) -> None:
    """One process: load once, then for each ``--data``/``--tag`` pair a cold run (the first pair only: it
    includes compilation) and a warm run; the fp32 check on the first pair."""
    import torch

    import transcriptformer
    from transcriptformer.data.tokenizer import prepare_cells
    from transcriptformer.inference.batching import estimate_flops
    from transcriptformer.inference.engine import Engine

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    work = Path(a.work)
    datas, tags = a.data, a.tag
    if len(datas) != len(tags):
        raise SystemExit("ours: give one --tag per --data")
    common: dict = {"device": dev, "torch": torch.__version__, "src": transcriptformer.__file__}
    t0 = time.perf_counter()
    loaded = transcriptformer.load_model(work / f"ckpt_{a.preset}")
    common["load_seconds"] = time.perf_counter() - t0  # gene tables, build, torch.load, sha256 of the weights
    t0 = time.perf_counter()
    loaded.on(dev)
    if dev == "cuda":
        torch.cuda.synchronize()
    common["to_device_seconds"] = time.perf_counter() - t0
    eng = Engine(loaded, device=dev, precision="bf16", attention="auto", progress=False)
    common.update(attention=eng.attention, fuse=eng.fuse, max_tokens=eng.max_tokens)
    for i, (data, tag) in enumerate(zip(datas, tags, strict=True)):
        key = f"ours_{tag}"
        entry = dict(common, data=str(data))
        adata = read_cells(Path(data))
        source = prepare_cells(adata, loaded.vocab, loaded.aux_vocabs, seq_len=loaded.seq_len)
        entry["cells"] = int(source.n_obs)
        save_section(a.json, key, entry)
        if i == 0:  # compilation (flex probe, dynamic-shape flex, fused layer steps) happens here
            cold = eng.run(source, ("embeddings",))
            entry["cold_seconds"] = cold.seconds
            save_section(a.json, key, entry)
        if dev == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        with GpuMemorySampler() as mem:
            res = eng.run(source, ("embeddings",))
        tokens = np.minimum(res.n_genes + 1, loaded.seq_len)
        flops = float(estimate_flops(tokens, loaded))
        rate = load_results(a.json).get("matmul", {}).get("bf16", {}).get("flops_per_s")
        entry.update(
            seconds=res.seconds,
            cells_per_s=res.stats["cells"] / res.seconds,
            tokens=int(tokens.sum()),
            tokens_per_s=float(tokens.sum()) / res.seconds,
            model_tflops_per_s=flops / res.seconds / 1e12,
            fraction_of_bf16_matmul=(flops / res.seconds / rate) if rate else None,
            stats=res.stats,
            **mem.result(),
        )
        if dev == "cuda":
            entry["peak_gpu_mem_gb_torch"] = torch.cuda.max_memory_allocated() / 2**30
            entry["peak_gpu_reserved_gb_torch"] = torch.cuda.max_memory_reserved() / 2**30
        save_section(a.json, key, entry)
        out = {"bf16": res.embeddings}
        k = min(a.fp32_cells, source.n_obs) if i == 0 else 0
        if k:
            sub = (
                adata[:k]
                if hasattr(adata, "obs_names")
                else synthetic.MiniAnnData(adata.X[:k], adata.obs.iloc[:k], adata.var)
            )
            src32 = prepare_cells(sub, loaded.vocab, loaded.aux_vocabs, seq_len=loaded.seq_len)
            r32 = Engine(loaded, device=dev, precision="32", attention="chunked", progress=False).run(
                src32, ("embeddings",)
            )
            out["fp32"] = r32.embeddings
            entry["fp32_reference"] = {"cells": k, "seconds": r32.seconds, "attention": "chunked", "tf32": False}
            entry["bf16_vs_fp32"] = compare(res.embeddings[:k], r32.embeddings)
        elif i > 0 and (work / f"emb_ours_{tags[0]}.npz").is_file():
            z = np.load(work / f"emb_ours_{tags[0]}.npz")
            n = min(len(z["bf16"]), len(res.embeddings))  # the same first cells, other batch mates
            entry[f"vs_ours_{tags[0]}_bf16"] = compare(res.embeddings[:n], z["bf16"][:n])
            if "fp32" in z.files:
                out["fp32"] = z["fp32"][: min(len(z["fp32"]), n)]
        np.savez(work / f"emb_ours_{tag}.npz", **out)
        save_section(a.json, key, entry)
        print(json.dumps(_jsonable(entry))[:3000])


_BAR = re.compile(r"Predicting DataLoader 0: 100%\|[^|]*\|\s*(\d+)/(\d+)\s*\[(\d+):(\d+)(?::(\d+))?<")


def _loop_seconds(log: str) -> float | None:
    """Elapsed time of Lightning's prediction loop from its progress bar (``[MM:SS<`` or ``[H:MM:SS<``)."""
    found = list(_BAR.finditer(log))
    if not found:
        return None
    m = found[-1]
    a, b, c = m.group(3), m.group(4), m.group(5)
    return int(a) * 3600 + int(b) * 60 + int(c) if c is not None else int(a) * 60 + int(b)


def step_published(a) -> None:
    import h5py
    import torch

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    work = Path(a.work)
    tmp = Path(tempfile.mkdtemp(prefix="tf-published-", dir=work))
    cmd = [
        a.python,
        str(HERE / "_published_driver.py"),  # timers around its prediction loop (nothing else changes)
        "inference",
        "--checkpoint-path",
        str(work / f"ckpt_{a.preset}"),
        "--data-file",
        str(a.data[0]),
        "--output-path",
        str(tmp),
        "--output-filename",
        "out.h5ad",
        "--batch-size",
        str(a.batch_size),
        "--device",
        dev,
        "--precision",
        "16-mixed",
        "--config-override",
        "model.inference_config.precision=bf16-mixed",
    ]
    if dev == "cpu":
        cmd.append("--disable-compile-block-mask")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = a.site
    env["PYTHONUNBUFFERED"] = "1"
    entry: dict = {"command": " ".join(cmd), "device": dev, "batch_size": a.batch_size, "precision": "bf16-mixed"}
    a.tag = a.tag[0]
    key = f"published_{a.tag}"
    log: list[str] = []
    t_loaded = None
    t0 = time.perf_counter()
    with GpuMemorySampler() as mem:
        proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            log.append(line)
            if t_loaded is None and "Model weights loaded" in line:
                t_loaded = time.perf_counter() - t0
        proc.wait()
    wall = time.perf_counter() - t0
    text = "".join(log)
    entry.update(wall_seconds=wall, seconds_to_weights_loaded=t_loaded, returncode=proc.returncode, **mem.result())
    entry["log_tail"] = text[-3000:]
    if proc.returncode != 0:
        save_section(a.json, key, entry)
        print(text[-5000:])
        raise SystemExit(f"published CLI failed ({proc.returncode})")
    with h5py.File(tmp / "out.h5ad", "r") as f:
        emb = f["obsm"]["embeddings"][:].astype(np.float32)
    n = emb.shape[0]
    loop = None
    for line in text.splitlines():
        if line.startswith("TF_BENCH_PREDICT "):
            loop = json.loads(line.split(" ", 1)[1])
    entry.update(
        cells=n, cells_per_s_wall=n / wall, cells_per_s_after_load=(n / (wall - t_loaded)) if t_loaded else None
    )
    if loop:
        ends, cells = loop.pop("batch_end_seconds"), loop.pop("batch_cells")
        entry["predict"] = loop
        entry["predict_loop_seconds"] = loop["predict_seconds"]
        entry["cells_per_s_loop"] = n / loop["predict_seconds"]
        # steady state: without the first tenth of the batches (its first batch compiles the block mask)
        k = max(1, len(ends) // 10)
        if len(ends) > k + 1:
            entry["cells_per_s_steady"] = sum(cells[k:]) / (ends[-1] - ends[k - 1])
            entry["steady_excludes_batches"] = k
            entry["first_batch_seconds"] = ends[0]
        entry["peak_gpu_mem_gb_torch"] = loop.get("peak_gpu_mem_gb_torch")
    else:
        entry["predict_loop_seconds"] = _loop_seconds(text.replace("\r", "\n"))  # from the progress bar, 1 s steps
        entry["cells_per_s_loop"] = n / entry["predict_loop_seconds"] if entry["predict_loop_seconds"] else None
    ours = work / f"emb_ours_{a.tag}.npz"
    if ours.is_file():
        z = np.load(ours)
        entry["vs_ours_bf16"] = compare(emb, z["bf16"])
        if "fp32" in z.files:
            entry["vs_ours_fp32"] = compare(emb[: len(z["fp32"])], z["fp32"])
        mine = load_results(a.json).get(f"ours_{a.tag}", {})
        for k in ("loop", "steady"):
            if mine.get("cells_per_s") and entry.get(f"cells_per_s_{k}"):
                entry[f"ours_over_published_cells_per_s_{k}"] = mine["cells_per_s"] / entry[f"cells_per_s_{k}"]
        if mine.get("cells_per_s"):
            entry["ours_over_published_cells_per_s_wall"] = mine["cells_per_s"] / entry["cells_per_s_wall"]
    np.save(work / f"emb_published_{a.tag}.npy", emb)
    save_section(a.json, key, entry)
    shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(_jsonable({k: v for k, v in entry.items() if k != "log_tail"}))[:3000])


def step_summary(a) -> None:
    rep = load_results(a.json)
    lines = []
    mm = rep.get("matmul", {}).get("bf16", {}).get("flops_per_s")
    if mm:
        lines.append(f"bf16 matmul 8192^3: {mm / 1e12:.1f} TFLOP/s")
    for key, v in rep.items():
        if key.startswith("ours_"):
            lines.append(
                f"{key}: {v.get('cells', '?')} cells, {v.get('cells_per_s', float('nan')):.1f} cells/s warm "
                f"(cold {v.get('cold_seconds', float('nan')):.1f} s), {v.get('model_tflops_per_s', float('nan')):.1f} "
                f"TFLOP/s = {100 * (v.get('fraction_of_bf16_matmul') or float('nan')):.1f}% of bf16 matmul, "
                f"peak {v.get('peak_gpu_mem_gb_torch', float('nan')):.1f} GB (torch) / "
                f"{v.get('nvidia_smi_peak_gb') or float('nan'):.1f} GB (nvidia-smi), "
                f"load {v.get('load_seconds', float('nan')):.1f} s, "
                f"bf16 vs fp32 {v.get('bf16_vs_fp32', {}).get('cos_min', float('nan')):.6f} cos min"
            )
        if key.startswith("published_"):
            lines.append(
                f"{key}: rc={v.get('returncode')} {v.get('cells', '?')} cells, "
                f"wall {v.get('wall_seconds', float('nan')):.1f} s, "
                f"loop {v.get('predict_loop_seconds')} s -> {v.get('cells_per_s_loop')} cells/s "
                f"(steady {v.get('cells_per_s_steady')}), peak {v.get('peak_gpu_mem_gb_torch')} GB (torch) / "
                f"{v.get('nvidia_smi_peak_gb')} GB (nvidia-smi); vs ours bf16 {v.get('vs_ours_bf16')}; "
                f"ours/published: loop {v.get('ours_over_published_cells_per_s_loop')}, "
                f"steady {v.get('ours_over_published_cells_per_s_steady')}"
            )
    text = "\n".join(lines)
    save_section(a.json, "summary", lines)
    print(text)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("step", choices=["prepare", "matmul", "ours", "published", "summary"])
    p.add_argument("--json", required=True)
    p.add_argument("--work", default=str(HERE / "out" / "gpu-work"))
    p.add_argument("--preset", choices=["sapiens", "metazoa"], default="sapiens")
    p.add_argument("--cells", type=int, default=2048)
    p.add_argument("--subset", type=int, default=0, help="prepare: also write the first N cells as their own file")
    p.add_argument("--data", nargs="+", help="h5ad of the cells (ours: one or more; published: one)")
    p.add_argument("--tag", nargs="+", default=["sapiens"], help="a name per --data (results key suffix)")
    p.add_argument("--fp32-cells", type=int, default=256)
    p.add_argument("--site", help="published: folder the published wheels were installed into (pip --target)")
    p.add_argument("--python", default=sys.executable, help="published: the Python to run it with")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--smoke", action="store_true")
    a = p.parse_args(argv)
    Path(a.work).mkdir(parents=True, exist_ok=True)
    {
        "prepare": step_prepare,
        "matmul": step_matmul,
        "ours": step_ours,
        "published": step_published,
        "summary": step_summary,
    }[a.step](a)


if __name__ == "__main__":
    main()
