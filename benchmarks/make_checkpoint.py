"""Write a random TranscriptFormer checkpoint folder in the published layout (for benchmarks).

The folder holds what the published ``transcriptformer inference --checkpoint-path DIR`` reads
(SPEC §1):

* ``config.json`` -- ``model`` with ``model_config``, ``data_config`` and ``loss_config``, laid out
  like the packaged tiny checkpoint's;
* ``model_weights.pt`` -- a plain state_dict (name -> tensor, float32) whose keys and shapes follow
  SPEC §9, loadable with ``torch.load(weights_only=True)`` and ``strict=True``;
* ``vocabs/assay_vocab.json`` -- ``{"unknown": 0, ...}``;
* ``vocabs/homo_sapiens_gene.h5`` -- ``keys`` (byte strings, vocabulary order) and a group
  ``arrays`` with one vector of width ``D`` per key.

The state_dict is built straight from the shapes (no module is instantiated, no per-element
Python work), so even the TF-Sapiens shape (~430 M floats, 1.7 GB) takes seconds. Weights are
``N(0, std)`` (default 0.02), LayerNorm weights 1 and every bias 0, so activations stay sane.

Usage::

    python benchmarks/make_checkpoint.py benchmarks/out/ckpt_medium --preset medium
    python benchmarks/make_checkpoint.py /tmp/sapiens --preset sapiens
    python benchmarks/make_checkpoint.py DIR --E 32 --F 64 --L 1 --H 2 --seq-len 2047 --D 16 --n-genes 20000
    python benchmarks/make_checkpoint.py DIR --preset medium --genes-from cells.h5ad --gene-column ensembl_id

``--genes-from H5AD`` makes the vocabulary of the genes of a dataset (``var[--gene-column]``, or
``var_names`` with ``--gene-column index``; version suffixes stripped, empty and duplicate ids
dropped, file order kept) instead of synthetic ids, so that real cells can be embedded; ``n_genes``
becomes their number. The assay labels of its ``obs["assay"]`` are added to the assay vocabulary.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import h5py
import numpy as np
import torch

SPECIAL_TOKENS = ["unknown", "[PAD]", "[START]", "[END]", "[RD]", "[CELL]", "[MASK]"]
ASSAYS = {"unknown": 0, "10x 3' v2": 1, "10x 3' v3": 2, "10x 5' v1": 3, "10x 5' v2": 4, "Smart-seq2": 5}


@dataclass(frozen=True)
class Shape:
    E: int = 256  # embed_dim
    F: int = 1024  # model_dim (FFN width)
    L: int = 4  # num_layers
    H: int = 8  # num_heads
    seq_len: int = 2047
    D: int = 2560  # ESM2 width
    n_genes: int = 20000
    Hg: int = 256  # gene-id head hidden width
    seed: int = 0
    std: float = 0.02
    esm_std: float = 0.5

    @property
    def V(self) -> int:
        return self.n_genes + len(SPECIAL_TOKENS)


PRESETS = {
    # medium: a quarter-width model at the released sequence length and ESM width
    "medium": Shape(E=256, F=1024, L=4, H=8, seq_len=2047, D=2560, n_genes=20000, Hg=256),
    # the shape of the released TF-Sapiens (SPEC §9): V = 23,830 with 7 special tokens
    "sapiens": Shape(E=2048, F=2048, L=12, H=16, seq_len=2047, D=2560, n_genes=23823, Hg=2048),
    # the TF-Sapiens network with the vocabulary of the released TF-Metazoa (SPEC §9): V ~ 247,389 tokens incl. the
    # 7 special ones, gene-id head 512 wide (the real TF-Metazoa's layer count and widths equal TF-Sapiens')
    "metazoa": Shape(E=2048, F=2048, L=12, H=16, seq_len=2047, D=2560, n_genes=247382, Hg=512),
    # small model at the real sequence length, for the data-pipeline (streaming) benchmark
    "stream": Shape(E=32, F=64, L=1, H=2, seq_len=2047, D=16, n_genes=20000, Hg=16),
    # sizes for --smoke runs
    "smoke": Shape(E=32, F=64, L=2, H=4, seq_len=255, D=16, n_genes=2000, Hg=16),
    "smoke_sapiens": Shape(E=64, F=64, L=2, H=4, seq_len=255, D=32, n_genes=2000, Hg=64),
}


def gene_ids(n_genes: int) -> list[str]:
    """Synthetic Ensembl-like human gene ids, in vocabulary order."""
    return [f"ENSG{i:011d}" for i in range(1, n_genes + 1)]


def genes_of_h5ad(path: str | os.PathLike, column: str = "ensembl_id") -> tuple[list[str], list[str]]:
    """(gene ids, assay labels) of an h5ad: ``var[column]`` (``"index"``: ``var_names``) without version
    suffixes, empty or duplicate ids, in file order; the distinct values of ``obs["assay"]`` if present."""
    import anndata as ad

    a = ad.read_h5ad(path, backed="r")
    try:
        return genes_of_adata(a, column)
    finally:
        a.file.close()


def genes_of_adata(adata, column: str = "ensembl_id") -> tuple[list[str], list[str]]:
    """:func:`genes_of_h5ad` for an AnnData object."""
    values = adata.var_names if column == "index" else adata.var[column]
    ids, seen = [], set()
    for v in values:
        if not isinstance(v, str) or not v.strip() or v.strip().lower() in ("nan", "none"):
            continue
        g = v.strip().split(".")[0] if v.startswith("ENS") else v.strip()
        if g not in seen:
            seen.add(g)
            ids.append(g)
    assays = sorted({str(x) for x in adata.obs["assay"].unique()}) if "assay" in adata.obs.columns else []
    return ids, assays


def state_dict_shapes(s: Shape, n_assay: int = len(ASSAYS)) -> dict[str, tuple[int, ...]]:
    """Keys and shapes of the published state_dict (SPEC §9), no attention/FFN biases."""
    E, F, V, D, Hg = s.E, s.F, s.V, s.D, s.Hg
    shapes: dict[str, tuple[int, ...]] = {
        "gene_embeddings.embedding.weight": (V, D),
        "gene_embeddings.mlp.layers.0.weight": (E, D),
        "gene_embeddings.mlp.layers.0.bias": (E,),
        "gene_embeddings.mlp.layers.2.weight": (E,),
        "gene_embeddings.mlp.layers.2.bias": (E,),
        "gene_embeddings.mlp.layers.4.weight": (E, E),
        "gene_embeddings.mlp.layers.4.bias": (E,),
        "aux_embeddings.assay.weight": (n_assay, E),
    }
    for layer in range(s.L):
        p = f"transformer_encoder.encoder_layers.{layer}."
        shapes[p + "linear1.weight"] = (F, E)
        shapes[p + "linear2.weight"] = (E, F)
        for i in range(4):
            shapes[p + f"self_attn.linears.{i}.weight"] = (E, E)
        for n in ("norm1", "norm2"):
            shapes[p + f"{n}.weight"] = (E,)
            shapes[p + f"{n}.bias"] = (E,)
    shapes.update(
        {
            "mu.gene_embedding.weight": (V, 1),
            "mu.mlp.layers.0.weight": (E // 2, 2 * E),
            "mu.mlp.layers.0.bias": (E // 2,),
            "mu.mlp.layers.2.weight": (E // 2,),
            "mu.mlp.layers.2.bias": (E // 2,),
            "mu.mlp.layers.4.weight": (1, E // 2),
            "mu.mlp.layers.4.bias": (1,),
            "gene_id_head.layers.0.weight": (Hg, E),
            "gene_id_head.layers.0.bias": (Hg,),
            "gene_id_head.layers.2.weight": (Hg,),
            "gene_id_head.layers.2.bias": (Hg,),
            "gene_id_head.layers.4.weight": (V, Hg),
            "gene_id_head.layers.4.bias": (V,),
        }
    )
    return shapes


def _is_layernorm(key: str) -> bool:
    return ".norm1." in key or ".norm2." in key or ".layers.2." in key


def random_state_dict(s: Shape, device: str = "cpu", n_assay: int = len(ASSAYS)) -> dict[str, torch.Tensor]:
    """Random weights for ``s``: N(0, std), ESM table N(0, esm_std), LayerNorm 1/0, biases 0 (float32, CPU)."""
    g = torch.Generator(device=device).manual_seed(s.seed)
    state = {}
    for key, shape in state_dict_shapes(s, n_assay).items():
        if _is_layernorm(key):
            t = torch.ones(shape) if key.endswith(".weight") else torch.zeros(shape)
        elif key.endswith(".bias"):
            t = torch.zeros(shape)
        else:
            std = s.esm_std if key == "gene_embeddings.embedding.weight" else s.std
            t = torch.empty(shape, device=device).normal_(0.0, std, generator=g).cpu()
        state[key] = t.contiguous()
    return state


def config_json(s: Shape) -> dict:
    """config.json in the published layout (as the packaged tiny checkpoint's)."""
    block_len = 128
    aux_len = 1
    return {
        "model": {
            "model_config": {
                "_target_": "transcriptformer.data.dataclasses.ModelConfig",
                "log_counts_eps": 1e-06,
                "num_heads": s.H,
                "num_layers": s.L,
                "model_dim": s.F,
                "embed_dim": s.E,
                "dropout": 0.1,
                "activation": "gelu",
                "attn_bias": False,
                "fw_bias": False,
                "mu_link_fn": "softmax",
                "softcap": 10,
                "seq_len": s.seq_len,
                "aux_len": aux_len,
                "block_len": block_len,
                "gene_head_hidden_dim": s.Hg,
                "use_aux": True,
                "compile_block_mask": False,
            },
            "data_config": {
                "_target_": "transcriptformer.data.dataclasses.DataConfig",
                "aux_cols": "assay",
                "esm2_mappings": ["homo_sapiens_gene.h5"],
                "special_tokens": SPECIAL_TOKENS,
                "pad_zeros": True,
                "gene_pad_token": "[PAD]",
                "aux_pad_token": "unknown",
                "gene_col_name": "ensembl_id",
                "pin_memory": True,
                "aux_vocab_path": None,
                "esm2_mappings_path": None,
                "clip_counts": None,
                "filter_to_vocabs": None,
                "filter_outliers": None,
                "normalize_to_scale": 0,
                "n_data_workers": 1,
                "sort_genes": None,
                "randomize_genes": None,
                "min_expressed_genes": None,
            },
            "loss_config": {
                "_target_": "transcriptformer.data.dataclasses.LossConfig",
                "gene_id_loss_weight": 1.0,
                "softplus_approx": True,
            },
        }
    }


def write_gene_table(path: Path, ids: list[str], vectors: np.ndarray) -> None:
    """The published ESM2 table: ``keys`` (byte strings) and ``arrays/<key>`` (length D)."""
    with h5py.File(path, "w", libver="latest") as f:
        f.create_dataset("keys", data=np.array([k.encode() for k in ids], dtype="S"))
        arrays = f.create_group("arrays")
        for k, v in zip(ids, vectors, strict=True):
            arrays.create_dataset(k, data=v)


def make_checkpoint(
    folder: str | os.PathLike,
    shape: Shape,
    *,
    device: str = "cpu",
    verify: bool = True,
    genes: list[str] | None = None,
    extra_assays: list[str] | None = None,
) -> Path:
    """Write a random checkpoint for ``shape`` into ``folder`` (created; overwritten).

    ``genes``: the vocabulary's gene ids (default :func:`gene_ids`; their number must be ``shape.n_genes``);
    ``extra_assays``: labels added to the assay vocabulary.
    """
    genes = gene_ids(shape.n_genes) if genes is None else list(genes)
    if len(genes) != shape.n_genes:
        raise ValueError(f"{len(genes)} gene ids for n_genes={shape.n_genes}")
    assays = dict(ASSAYS)
    for label in extra_assays or []:
        assays.setdefault(label, len(assays))
    folder = Path(folder)
    (folder / "vocabs").mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    state = random_state_dict(shape, device=device, n_assay=len(assays))
    torch.save(state, folder / "model_weights.pt")
    (folder / "config.json").write_text(json.dumps(config_json(shape), indent=2))
    (folder / "vocabs" / "assay_vocab.json").write_text(json.dumps(assays, indent=1))
    # the table's values are overwritten by the state_dict at load time; write the same ones
    esm = state["gene_embeddings.embedding.weight"][len(SPECIAL_TOKENS) :].numpy()
    write_gene_table(folder / "vocabs" / "homo_sapiens_gene.h5", genes, esm)
    (folder / "shape.json").write_text(json.dumps(asdict(shape), indent=1))
    source = folder / "genes_source.json"
    if genes != gene_ids(shape.n_genes):  # ensure_checkpoint never reuses such a folder for synthetic ids
        source.write_text(json.dumps({"n_genes": len(genes), "first": genes[:3], "assays": assays}, indent=1))
    else:
        source.unlink(missing_ok=True)
    n = sum(t.numel() for t in state.values())
    print(f"wrote {folder} ({n / 1e6:.1f} M parameters) in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    if verify:
        verify_checkpoint(folder, shape)
    return folder


def verify_checkpoint(folder: str | os.PathLike, shape: Shape) -> None:
    """Load with the project's loader (strict) and check the vocabulary size."""
    from transcriptformer.weights.checkpoint import build_model

    loaded = build_model(folder)
    assert len(loaded.vocab) == shape.V, (len(loaded.vocab), shape.V)
    assert loaded.seq_len == shape.seq_len
    assert (loaded.vocab.pad, loaded.vocab.start, loaded.vocab.end) == (1, 2, 3)


def ensure_checkpoint(folder: str | os.PathLike, shape: Shape, *, device: str = "cpu") -> Path:
    """Reuse ``folder`` if it was written for ``shape``, else (re)write it."""
    folder = Path(folder)
    meta = folder / "shape.json"
    if meta.is_file() and (folder / "model_weights.pt").is_file() and not (folder / "genes_source.json").exists():
        try:
            if Shape(**json.loads(meta.read_text())) == shape:
                return folder
        except TypeError:
            pass
    return make_checkpoint(folder, shape, device=device)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folder")
    p.add_argument("--preset", choices=sorted(PRESETS), default="medium")
    for name in ("E", "F", "L", "H", "D", "Hg", "seed"):
        p.add_argument(f"--{name}", type=int)
    p.add_argument("--seq-len", type=int)
    p.add_argument("--n-genes", type=int)
    p.add_argument("--std", type=float)
    p.add_argument("--device", default="cpu", help="where random numbers are drawn (cuda is faster for big shapes)")
    p.add_argument("--genes-from", metavar="H5AD", help="vocabulary = the genes of this h5ad (see above)")
    p.add_argument("--gene-column", default="ensembl_id", help="var column of --genes-from ('index': var_names)")
    p.add_argument("--no-verify", action="store_true")
    a = p.parse_args(argv)
    over = {k: getattr(a, k) for k in ("E", "F", "L", "H", "D", "Hg", "seed", "seq_len", "n_genes", "std")}
    genes, assays = genes_of_h5ad(a.genes_from, a.gene_column) if a.genes_from else (None, None)
    if genes is not None:
        if a.n_genes is not None and a.n_genes != len(genes):
            p.error(f"--n-genes {a.n_genes} but {a.genes_from} has {len(genes)} distinct gene ids")
        over["n_genes"] = len(genes)
    shape = replace(PRESETS[a.preset], **{k: v for k, v in over.items() if v is not None})
    make_checkpoint(a.folder, shape, device=a.device, verify=not a.no_verify, genes=genes, extra_assays=assays)


if __name__ == "__main__":
    main()
