"""LoRA fine-tuning on real cells, with a held-out split: the evidence of issue 8.

The bundled demo model ``tf-demo`` is fine-tuned with LoRA adapters (the published example's defaults: r=4,
alpha=16, targets linear1 linear2 linears) on the training split of scanpy's bundled PBMCs (490 cells, the
split the demo model was trained on) and evaluated on the held-out 210 PBMCs it has never seen, with
:func:`transcriptformer.cell_losses` (the training objective per cell, no dropout) before and after. It also
records the adapter's size against the base weights, the training throughput and, for contrast, the same
fine-tuning of all weights (:func:`transcriptformer.train` on a copy of the model).

Usage::

    python benchmarks/finetune_real.py --json benchmarks/results/cpu/finetune_real.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

import transcriptformer
import transcriptformer.scanpy as tfs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", default=None)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()

    folder = tfs.models.path("tf-demo")
    held_out = set(json.loads((folder / "split.json").read_text())["pbmc_test"])
    pbmc = tfs.datasets.pbmc68k_counts()
    pbmc = pbmc[:, pbmc.var["ensembl_id"].notna().to_numpy()].copy()
    test = pbmc.obs_names.isin(held_out)
    train, val = pbmc[~test].copy(), pbmc[test].copy()
    base = transcriptformer.load_model("tf-demo")

    def held_out_loss(model) -> dict:
        df = transcriptformer.cell_losses(model, val, progress=False)
        return {"count_nll": float(df["count_nll"].mean()), "gene_nll": float(df["gene_nll"].mean()),
                "loss": float((df["count_nll"] + df["gene_nll"]).mean())}  # fmt: skip

    out: dict = {"loadavg_start": os.getloadavg(), "train_cells": train.n_obs, "held_out_cells": val.n_obs}
    out["before"] = held_out_loss(base)
    work = Path(tempfile.mkdtemp())
    try:
        t = time.perf_counter()
        adapter = transcriptformer.finetune(
            train, base, validation=val, output_dir=work / "lora", epochs=args.epochs, learning_rate=5e-4,
            max_tokens=4096, progress=False,
        )  # fmt: skip
        seconds = time.perf_counter() - t
        info = json.loads((adapter / "transcriptformer_adapter.json").read_text())
        record = json.loads((adapter / "training.json").read_text())
        out["lora"] = {
            "after": held_out_loss((base, adapter)),
            "history": [{k: v for k, v in h.items() if k != "step_losses"} for h in record["history"]],
            "seconds": seconds,
            "train_cells_per_s": args.epochs * train.n_obs / record["seconds"],
            "tokens_per_s": record["tokens_per_s"],
            "adapter_parameters": info["adapter_parameters"],
            "base_parameters": info["base_parameters"],
            "adapter_bytes": info["adapter_bytes"],
            "base_weights_bytes": (folder / "model_weights.pt").stat().st_size,
        }
        t = time.perf_counter()
        full = transcriptformer.train(
            base, train, validation=val, output_dir=work / "full", epochs=args.epochs, learning_rate=5e-4,
            max_tokens=4096, progress=False,
        )  # fmt: skip
        record = json.loads((full / "training.json").read_text())
        out["full"] = {
            "after": held_out_loss(full),
            "seconds": time.perf_counter() - t,
            "train_cells_per_s": args.epochs * train.n_obs / record["seconds"],
            "tokens_per_s": record["tokens_per_s"],
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out["loadavg_end"] = os.getloadavg()
    out["epochs"] = args.epochs
    print(json.dumps(out, indent=1))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    assert np.isfinite(out["lora"]["after"]["loss"])


if __name__ == "__main__":
    main()
