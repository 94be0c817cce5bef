"""Run the published ``transcriptformer`` CLI (0.6.1) with timers around its prediction loop; nothing else changes.

Usage: ``PYTHONPATH=<site with the published wheel> python _published_driver.py inference --checkpoint-path ...``

``pytorch_lightning.Trainer.predict`` and the model's ``predict_step`` are wrapped: the first gives the loop's
time (data loading and tokenisation in the main process, as the published tool runs with 0 workers, plus the
forward passes) and the peak GPU memory PyTorch allocated; the second a timestamp after every batch (the
published step copies the embeddings to the CPU per batch, so the GPU is synchronised there anyway). One line
``TF_BENCH_PREDICT {json}`` is printed at the end of the loop. Imports nothing of this repository.
"""

from __future__ import annotations

import json
import sys
import time


def main() -> None:
    import pytorch_lightning as pl
    import torch
    from transcriptformer.model.model import Transcriptformer

    stamps: list[tuple[float, int]] = []
    step = Transcriptformer.predict_step

    def timed_step(self, batch, batch_idx):
        out = step(self, batch, batch_idx)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        stamps.append((time.perf_counter(), int(batch.gene_counts.shape[0])))
        return out

    predict = pl.Trainer.predict

    def timed_predict(self, *args, **kwargs):
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        out = predict(self, *args, **kwargs)
        if cuda:
            torch.cuda.synchronize()
        info = {"predict_seconds": time.perf_counter() - t0, "batches": len(stamps)}
        info["cells"] = sum(n for _, n in stamps)
        info["batch_end_seconds"] = [round(t - t0, 4) for t, _ in stamps]
        info["batch_cells"] = [n for _, n in stamps]
        if cuda:
            info["peak_gpu_mem_gb_torch"] = torch.cuda.max_memory_allocated() / 2**30
            info["peak_gpu_reserved_gb_torch"] = torch.cuda.max_memory_reserved() / 2**30
        print("TF_BENCH_PREDICT " + json.dumps(info), flush=True)
        return out

    Transcriptformer.predict_step = timed_step
    pl.Trainer.predict = timed_predict
    from transcriptformer.cli import main as cli

    sys.argv[0] = "transcriptformer"
    cli()


if __name__ == "__main__":
    main()
