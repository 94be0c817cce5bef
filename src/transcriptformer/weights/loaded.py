"""A checkpoint in memory: :class:`LoadedModel`, the network with its config and vocabularies."""

from __future__ import annotations

import copy
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._files import file_stamp
from ..config import TranscriptFormerConfig
from ..data.tokenizer import CellSource, TokenizeOptions, prepare_cells
from ..vocab import AuxVocab, GeneVocab
from .layout import WEIGHTS_FILE

if TYPE_CHECKING:
    import torch

    from ..model import TranscriptFormer

__all__ = ["LoadedModel"]


@dataclass
class LoadedModel:
    """A checkpoint in memory: the network (on CPU, eval mode) and everything needed to feed it.

    Attributes
    ----------
    model
        The network, float32 on CPU. Do not modify it: it is shared by every call that loads
        the same checkpoint. Its weights are memory-mapped from ``model_weights.pt`` (copy-on-write:
        changing them never changes the file).
    config
        The parsed ``config.json``.
    vocab
        Gene vocabulary (token ids).
    aux_vocabs
        Auxiliary vocabularies, in sequence order.
    path
        The checkpoint folder (``None`` for a model built in memory, e.g. by :func:`new_model`).
    name
        Registry name (``"tf-sapiens"``) or the folder's name.
    weights_sha256
        sha256 of ``model_weights.pt``.
    vocab_files
        The gene-table files the vocabulary was read from, by file name (copied by :func:`save_checkpoint`).
    adapter
        For a model with a LoRA adapter applied (:func:`load_model` with ``adapter=``): its folder, sha256 and
        whether it was merged into the weights; ``weights_sha256`` is then the base's.
    files
        Every file the checkpoint was read from, and their stamps (size, mtime, inode, ctime) at load time.
    mapped
        Whether the weights are memory-mapped from ``model_weights.pt`` (else read into memory).
    runtime
        What is kept per device across runs: the network's copy on each accelerator and the engine's
        per-device state (attention kernels, compiled code). Guarded by :attr:`lock`.
    """

    model: TranscriptFormer
    config: TranscriptFormerConfig
    vocab: GeneVocab
    aux_vocabs: tuple[AuxVocab, ...]
    path: Path | None
    name: str
    weights_sha256: str
    vocab_files: dict[str, Path] = field(default_factory=dict)
    adapter: dict[str, Any] | None = None
    files: dict[str, list[int]] = field(default_factory=dict, repr=False)
    mapped: bool = False
    runtime: dict[str, Any] = field(default_factory=dict, init=False, repr=False)
    lock: threading.RLock = field(default_factory=threading.RLock, init=False, repr=False)

    @property
    def seq_len(self) -> int:
        """Gene slots per cell ``S``."""
        return self.config.model.seq_len

    @property
    def identity(self) -> str:
        """What the weights in use are: ``weights_sha256``, or for an adapted model a digest of the base's identity.

        For an adapted model the digest covers the base's identity and the adapter's files: what an adapter
        trained on this model records, and what loading it checks.
        """
        return self.adapter["identity"] if self.adapter else self.weights_sha256

    @property
    def embed_dim(self) -> int:
        """Width of the embeddings."""
        return self.config.model.embed_dim

    def changed_files(self) -> list[str]:
        """The files of the checkpoint that changed on disk (or disappeared) since it was loaded."""
        out = []
        for f, stamp in self.files.items():
            try:
                if file_stamp(f) != stamp:
                    out.append(f)
            except OSError:
                out.append(f)
        return out

    def check_weights_unchanged(self) -> None:
        """Raise if ``model_weights.pt`` was rewritten in place since it was loaded.

        The weights are memory-mapped, so a file written over in place (``torch.save`` to the same path) would
        change the model under a running computation. Replacing the file (a new file renamed over it, what
        downloads do) or deleting it is harmless: the mapping keeps the old file.
        """
        if self.path is None or not self.mapped:  # built in memory, or read into memory
            return
        weights = str(self.path / WEIGHTS_FILE)
        stamp = self.files.get(weights)
        if stamp is None:
            return
        try:
            now = file_stamp(weights)
        except OSError:
            return
        if now[2] == stamp[2] and now != stamp:
            raise ValueError(
                f"{weights} was written over since {self.name} was loaded from it, so the loaded weights may have "
                "changed mid-way; load the model again (transcriptformer.load_model) and re-run. To update a "
                "checkpoint safely, write a new file and rename it over the old one."
            )

    def cells(self, adata: Any, options: TokenizeOptions, vocab: GeneVocab | None = None) -> CellSource:
        """``adata`` as this model reads it, validated (:func:`~transcriptformer.data.tokenizer.prepare_cells`).

        The model's vocabulary (or ``vocab``, e.g. built from another species' gene tables), auxiliary
        vocabularies, ``seq_len`` and zero-padding rule apply.
        """
        return prepare_cells(
            adata,
            self.vocab if vocab is None else vocab,
            self.aux_vocabs,
            seq_len=self.seq_len,
            pad_zeros=self.config.data.pad_zeros,
            options=options,
            model_name=self.name,
        )

    def on(self, device: torch.device | str) -> TranscriptFormer:
        """The network on ``device`` (copied once per device and kept in :attr:`runtime`)."""
        import torch  # lazily: loading a checkpoint's metadata needs no torch

        device = torch.device(device)
        if device.type == "cpu":
            return self.model
        key = f"model:{device}"
        with self.lock:
            if key not in self.runtime:
                # copy each tensor straight to the device (no intermediate copy of the mapped weights in memory)
                memo: dict[int, Any] = {}
                for p in self.model.parameters():
                    memo[id(p)] = torch.nn.Parameter(p.detach().to(device), requires_grad=False)
                for b in self.model.buffers():
                    memo[id(b)] = b.to(device)
                self.runtime[key] = copy.deepcopy(self.model, memo).eval()
            return self.runtime[key]
