"""TranscriptFormer for scanpy users.

>>> import transcriptformer.scanpy as tfs
>>> tfs.tl.embed(adata, model="tf-sapiens")  # doctest: +SKIP
"""

from . import datasets, pl, pp, tl

__all__ = ["datasets", "pl", "pp", "tl"]
