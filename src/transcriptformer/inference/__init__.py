"""Inference: running a loaded model over cells and collecting the results.

:mod:`.devices` (device, precision, per-device state), :mod:`.batching` (batches under a token budget),
:mod:`.outputs` (what a forward pass can compute, collected in input order), :mod:`.engine` (the run loop),
:mod:`.pipeline` (AnnData -> arrays, and the provenance record), :mod:`.options` (the run options every tool
shares) and :mod:`.generation` (sampling cells). A layer above the weights, the network and the data; below
training and the user-facing tools. (Empty on purpose: importing :mod:`.options` must not import torch.)
"""
