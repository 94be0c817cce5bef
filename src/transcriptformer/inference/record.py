"""The one record of how a result was made (``uns[key]["params"]``, the command line's output, training histories).

Imports no torch: the tools build it around runs made elsewhere.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .._meta import __version__
from ..weights.loaded import LoadedModel
from .options import RunOptions

__all__ = ["provenance"]


def provenance(
    tool: str,
    loaded: LoadedModel | None,
    *,
    options: RunOptions | None = None,
    stats: Mapping[str, Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """Everything needed to reproduce a result, h5ad-writable (no ``None``): the one record every tool writes.

    Parameters
    ----------
    tool
        The function or command that made the result.
    loaded
        The model: its name, folder (``"in memory"`` for one built in memory), the sha256 of its weights file and,
        for an adapted model, the adapter's folder, sha256 and whether it was merged. ``None`` for the tools
        that run no model (``transfer_labels``, ``umap``, ``celltype_similarity``, ``symbols_to_ensembl``).
    options
        The run options (every value, ``None`` written as ``"none"``).
    stats
        How the run went: device, precision and attention actually used, token budget, and any fallback.
    **extra
        Anything else the tool records; ``None`` values are left out.

    Returns
    -------
    dict
        The record, for ``uns[key]["params"]``, the command line's output and training histories.
    """
    params: dict[str, Any] = {"tool": tool}
    if loaded is not None:
        params["model"] = loaded.name
        params["model_path"] = str(loaded.path) if loaded.path is not None else "in memory"
        params["weights_sha256"] = loaded.weights_sha256
    if loaded is not None and loaded.adapter:
        params["adapter"] = loaded.adapter["path"]
        params["adapter_sha256"] = loaded.adapter["sha256"]
        params["adapter_merged"] = loaded.adapter["merged"]
    if options is not None:
        params.update(options.record())
        params["gene_key"] = options.gene_key if options.gene_key is not None else "var_names"
    if stats is not None and loaded is not None:
        params["seq_len"] = loaded.seq_len
        for key in ("device", "precision", "attention", "max_tokens", "attention_fallback"):
            if key in stats:
                params[key] = stats[key]
    params.update({k: v for k, v in extra.items() if v is not None})
    params["transcriptformer_version"] = __version__
    return params
