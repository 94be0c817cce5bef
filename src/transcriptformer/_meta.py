"""The package's version, and the versions of everything that matters for a bug report (``show_versions()``)."""

from __future__ import annotations

import platform
import sys
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("transcriptformer")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0+unknown"

PACKAGES = (
    "transcriptformer",
    "torch",
    "anndata",
    "scanpy",
    "numpy",
    "scipy",
    "pandas",
    "h5py",
    "pooch",
    "scikit-learn",
)


def versions() -> dict[str, str]:
    """Package versions, Python, platform and the accelerators torch can see."""
    import torch

    out = {}
    for name in PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    out["python"] = sys.version.split()[0]
    out["platform"] = platform.platform()
    out["torch threads"] = str(torch.get_num_threads())
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        out["cuda"] = f"{torch.version.cuda}: {', '.join(names)}"
    else:
        out["cuda"] = "not available"
    mps = getattr(torch.backends, "mps", None)
    out["mps"] = "available" if mps is not None and mps.is_available() else "not available"
    return out


def show_versions() -> None:
    """Print :func:`versions`, then the session report of :mod:`session_info` (modules the session imported)."""
    info = versions()
    width = max(map(len, info))
    print("\n".join(f"{k:<{width}}  {v}" for k, v in info.items()))
    import session_info

    try:
        print()
        session_info.show(html=False, dependencies=True)
    except ValueError:  # nothing imported in __main__ to report (e.g. called from a library)
        pass
    except Exception as e:  # noqa: BLE001 - a diagnostic must not fail: session_info walks every module
        print(f"(session_info could not list the imported modules: {type(e).__name__}: {e})")
