"""Cells as the model reads them: AnnData -> token windows (:mod:`.tokenizer`), and gene ids (:mod:`.gene_ids`).

A layer above :mod:`transcriptformer.config` and :mod:`transcriptformer.vocab` and below the weights: nothing here
runs a model or imports torch. (Empty on purpose: importing a module of the package runs this file first.)
"""
