"""Training: the published objective, the fit loop behind ``train`` and ``finetune``, and LoRA adapters.

:mod:`.objective` (the loss and its per-cell evaluation), :mod:`.fit` (one loop for full training and LoRA
fine-tuning) and :mod:`.lora` (wrapping layers with adapters). A layer above inference (its batching, devices and
evaluation) and the weights; below the user-facing tools.
"""
