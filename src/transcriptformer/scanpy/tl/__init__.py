"""Tools: TranscriptFormer results written into the user's AnnData (``tfs.tl``), as scanpy's ``sc.tl``.

Every tool that runs a model takes the same tokenisation and engine options (documented once, in
:class:`~transcriptformer.inference.options.RunOptions`), validates them and the input before any compute, and
writes nothing until everything has been computed: on error the AnnData is left as it was. The keys each tool
writes are listed in the documentation's conventions page.
"""

from ._embed import embed, transcriptformer
from ._generate import generate
from ._genes import contextual_gene_embeddings, gene_embeddings, gene_embeddings_by_group
from ._labels import celltype_similarity, transfer_labels
from ._likelihood import likelihood
from ._prompts import gene_interactions, next_gene, rank_regulators
from ._umap import umap

__all__ = [
    "celltype_similarity",
    "contextual_gene_embeddings",
    "embed",
    "gene_embeddings",
    "gene_embeddings_by_group",
    "gene_interactions",
    "generate",
    "likelihood",
    "next_gene",
    "rank_regulators",
    "transcriptformer",
    "transfer_labels",
    "umap",
]


def __dir__() -> list[str]:
    return __all__
