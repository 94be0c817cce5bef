"""Plots of TranscriptFormer results (``tfs.pl``), as scanpy's ``sc.pl``.

As in scanpy, ``tl`` computes and writes and ``pl`` draws: a plot reads what a ``tl`` function wrote, never
computes or writes into ``adata``, and says which ``tl`` call to make when something is missing (or was
computed from an embedding that has changed since). Every function takes ``ax`` (draw into existing axes),
``show`` (``False``: return the axes instead of showing), ``save`` (``True`` or a suffix of the file name:
written to ``sc.settings.figdir`` in ``sc.settings.file_format_figs``, named as scanpy names its figures) and
``return_fig`` (return the figure).
"""

from ._cells import celltype_similarity, label_transfer, llh, species_umap, umap
from ._genes import gene_embeddings
from ._prompts import rank_regulators

__all__ = [
    "celltype_similarity",
    "gene_embeddings",
    "label_transfer",
    "llh",
    "rank_regulators",
    "species_umap",
    "umap",
]


def __dir__() -> list[str]:
    return __all__
