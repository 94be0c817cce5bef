"""Weights on disk: the published checkpoint layout, loading and saving, downloads, and LoRA adapters.

:mod:`.layout` (the folder layout), :mod:`.loaded` (a checkpoint in memory), :mod:`.checkpoint` (load, build,
save), :mod:`.registry` (downloads, cached and verified) and :mod:`.adapter` (PEFT adapter files). A layer above
the network (:mod:`transcriptformer.model`) and the data (:mod:`transcriptformer.data`). Nothing here imports
torch until a model is loaded. (Empty on purpose: the command line imports :mod:`.registry` for its ``--help``
and must not pay for the rest.)
"""
