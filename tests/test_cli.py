"""The `transcriptformer` command against the published outputs.

Most tests call ``transcriptformer.cli.main`` in this process (the ``cli`` fixture: exit status, stdout,
stderr); ``test_installed_command`` and ``test_python_dash_m`` run real processes, and the torchrun tests
in test_engine.py run ``python -m transcriptformer.cli``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pytest

import transcriptformer
from helpers import DATA

ATOL = 1e-5
EXE = shutil.which("transcriptformer") or str(Path(sys.executable).parent / "transcriptformer")


def run_exe(*args: str, check=True) -> subprocess.CompletedProcess:
    """The installed console script, in a new process."""
    proc = subprocess.run([EXE, *map(str, args)], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def human_h5ad(tmp_path_factory):
    import transcriptformer.scanpy as tfs

    path = tmp_path_factory.mktemp("data") / "tiny_human.h5ad"
    tfs.datasets.tiny_human().write_h5ad(path)
    return path


def _infer(cli, tmp_path, tiny_path, data, *extra) -> ad.AnnData:
    files = data if isinstance(data, list) else [data]
    cli(
        "inference",
        "--checkpoint-path",
        tiny_path,
        "--data-file",
        *files,
        "--output-path",
        tmp_path / "out",
        "--output-filename",
        "result.h5ad",
        "--precision",
        "32",
        "--no-progress",
        *extra,
    )
    out = ad.read_h5ad(tmp_path / "out" / "result.h5ad")
    assert not list((tmp_path / "out").glob("*.tmp")), "temporary file left behind"
    return out


def _same_obs(out, ref):
    assert out.n_obs == ref.n_obs
    for col in ref.obs.columns:
        np.testing.assert_array_equal(out.obs[col].astype(str).to_numpy(), ref.obs[col].astype(str).to_numpy())


def test_cell_embeddings(cli, tmp_path, tiny_path, human_h5ad, reference):
    out = _infer(cli, tmp_path, tiny_path, human_h5ad)
    ref = reference["cell"]
    assert out.n_vars == 0 and set(out.obsm) == {"embeddings"} and set(out.uns) == {"transcriptformer"}
    params = out.uns["transcriptformer"]["params"]  # how it was made, as the Python API records it
    assert params["tool"] == "inference" and len(params["weights_sha256"]) == 64 and params["precision"] == "32"
    assert list(out.obs_names) == list(ad.read_h5ad(human_h5ad).obs_names)  # the input's cell names are kept
    np.testing.assert_allclose(out.obsm["embeddings"], ref.obsm["embeddings"], atol=ATOL, rtol=0)
    assert out.obsm["embeddings"].dtype == np.float32
    _same_obs(out, ref)


def test_gene_ids_from_var_names(cli, tmp_path, tiny_path, human_h5ad, reference):
    """--gene-col-name var_names reads the ids from the var index (the API's gene_key=None)."""
    adata = ad.read_h5ad(human_h5ad)
    adata.var_names = adata.var.pop("ensembl_id").astype(str).to_numpy()
    path = tmp_path / "ids_in_index.h5ad"
    adata.write_h5ad(path)
    out = _infer(cli, tmp_path, tiny_path, path, "--gene-col-name", "var_names")
    np.testing.assert_allclose(out.obsm["embeddings"], reference["cell"].obsm["embeddings"], atol=ATOL, rtol=0)
    # a missing column: the error names the flag's value that reads var_names
    proc = cli(
        "inference",
        "--checkpoint-path",
        tiny_path,
        "--data-file",
        path,
        "--gene-col-name",
        "nope",
        "--output-path",
        tmp_path / "o",
        check=False,
    )
    assert proc.returncode == 1 and "--gene-col-name var_names" in proc.stderr, proc.stderr


def test_library_advice_in_the_command_lines_words(cli, tmp_path, tiny_path, human_h5ad):
    proc = cli("inference", "--checkpoint-path", tiny_path, "--data-file", human_h5ad, "--use-raw", "True",
               "--output-path", tmp_path / "o", check=False)  # fmt: skip
    assert proc.returncode == 1 and "--use-raw False" in proc.stderr and "layer=" not in proc.stderr, proc.stderr


def test_raw_input(cli, tmp_path, tiny_path, reference):
    out = _infer(cli, tmp_path, tiny_path, DATA / "tiny_human_raw.h5ad", "--use-raw", "auto")
    np.testing.assert_allclose(out.obsm["embeddings"], reference["raw_cell"].obsm["embeddings"], atol=ATOL, rtol=0)
    _same_obs(out, reference["raw_cell"])


def test_llh_published_override_and_flag(cli, tmp_path, tiny_path, human_h5ad, reference):
    ref = reference["llh"]
    # the published way: only llh
    out = _infer(cli, tmp_path, tiny_path, human_h5ad, "--config-override", "model.inference_config.output_keys.0=llh")
    assert "embeddings" not in out.obsm
    np.testing.assert_allclose(out.uns["llh"]["llh"].to_numpy(), ref.uns["llh"]["llh"].to_numpy(), atol=ATOL, rtol=0)
    np.testing.assert_allclose(out.obsm["llh"], ref.obsm["llh"], atol=ATOL, rtol=0)
    assert out.obsm["llh"].shape == (21, 1)
    # ours: embeddings and llh in one run
    out = _infer(cli, tmp_path, tiny_path, human_h5ad, "--llh")
    np.testing.assert_allclose(out.obsm["embeddings"], reference["cell"].obsm["embeddings"], atol=ATOL, rtol=0)
    np.testing.assert_allclose(out.uns["llh"]["llh"].to_numpy(), ref.uns["llh"]["llh"].to_numpy(), atol=ATOL, rtol=0)


def test_gene_llh(cli, tmp_path, tiny_path, human_h5ad, reference):
    out = _infer(
        cli, tmp_path, tiny_path, human_h5ad, "--config-override", "model.inference_config.output_keys.0=gene_llh"
    )
    np.testing.assert_allclose(out.obsm["gene_llh"], reference["gene_llh"].obsm["gene_llh"], atol=ATOL, rtol=0)


def test_cge(cli, tmp_path, tiny_path, human_h5ad, reference):
    out = _infer(cli, tmp_path, tiny_path, human_h5ad, "--emb-type", "cge", "--batch-size", "3")
    ref = reference["cge"].uns
    assert not out.obsm
    np.testing.assert_array_equal(out.uns["cge_cell_indices"], ref["cge_cell_indices"])
    np.testing.assert_array_equal(out.uns["cge_gene_names"].astype(str), ref["cge_gene_names"].astype(str))
    np.testing.assert_allclose(out.uns["cge_embeddings"], ref["cge_embeddings"], atol=ATOL, rtol=0)


def test_several_data_files_are_concatenated(cli, tmp_path, tiny_path, human_h5ad, reference):
    out = _infer(cli, tmp_path, tiny_path, [human_h5ad, DATA / "tiny_human_raw.h5ad"])
    assert out.n_obs == 42
    np.testing.assert_allclose(out.obsm["embeddings"][21:], reference["raw_cell"].obsm["embeddings"], atol=ATOL)
    assert out.obs_names.is_unique and out.obs_names[0] == "cell000"  # the inputs' names, made unique


def test_obs_keys_override_and_normalize(cli, tmp_path, tiny_path, human_h5ad):
    out = _infer(
        cli,
        tmp_path,
        tiny_path,
        human_h5ad,
        "--config-override",
        "model.inference_config.obs_keys.0=cell_type",
        "--config-override",
        "model.data_config.normalize_to_scale=100",
    )
    assert list(out.obs.columns) == ["cell_type"]
    import transcriptformer.scanpy as tfs

    expected = tfs.tl.embed(tfs.datasets.tiny_human(), model=tiny_path, normalize_to_scale=100, copy=True)
    np.testing.assert_allclose(out.obsm["embeddings"], expected.obsm["X_transcriptformer"], atol=1e-6)


def test_bad_input_exits_nonzero_with_one_line(cli, tmp_path, tiny_path, human_h5ad):
    cases = [
        ("--checkpoint-path", tmp_path / "missing", "--data-file", human_h5ad),
        ("--checkpoint-path", tiny_path, "--data-file", tmp_path / "missing.h5ad"),
        ("--checkpoint-path", tiny_path, "--data-file", human_h5ad, "--gene-col-name", "nope"),
        (
            "--checkpoint-path",
            tiny_path,
            "--data-file",
            human_h5ad,
            "--config-override",
            "model.data_config.sort_genes=true",
        ),
        ("--checkpoint-path", tiny_path, "--data-file", human_h5ad, "--config-override", "nonsense"),
    ]
    for args in cases:
        proc = cli("inference", *args, "--output-path", tmp_path / "o", check=False)
        assert proc.returncode == 1, proc.stderr
        err = [line for line in proc.stderr.splitlines() if line.startswith("transcriptformer: error:")]
        assert len(err) == 1, proc.stderr
        assert "Traceback" not in proc.stderr
    assert not (tmp_path / "o" / "embeddings.h5ad").exists()


def test_version_and_help(cli):
    proc = cli("--version")
    assert transcriptformer.__version__ in proc.stdout
    for args in (["--help"], ["inference", "--help"], ["download", "--help"]):
        proc = cli(*args)
        assert "usage: transcriptformer" in proc.stdout
    assert "--checkpoint-path" in cli("inference", "--help").stdout
    assert "--checkpoint-dir" in cli("download", "--help").stdout
    proc = cli("download", "tf-unknown", check=False)
    assert proc.returncode == 2 and "invalid choice" in proc.stderr
    proc = cli(check=False)
    assert proc.returncode == 2


def test_installed_command(tmp_path, human_h5ad):
    """The console script in a new process: main's status 1 is the exit status; one error line, no traceback."""
    proc = run_exe(
        "inference",
        "--checkpoint-path",
        tmp_path / "missing",
        "--data-file",
        human_h5ad,
        "--output-path",
        tmp_path,
        check=False,
    )
    assert proc.returncode == 1, proc.stderr
    err = [line for line in proc.stderr.splitlines() if line.startswith("transcriptformer: error:")]
    assert len(err) == 1, proc.stderr
    assert "Traceback" not in proc.stderr


def test_python_dash_m(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "transcriptformer", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and transcriptformer.__version__ in proc.stdout


def test_stream_output_writes_the_same_file(cli, tmp_path, tiny_path, human_h5ad, reference):
    """--stream-output fills obsm['embeddings'] in the output file window by window: same file contents."""
    streamed = _infer(
        cli, tmp_path / "s", tiny_path, [human_h5ad, DATA / "tiny_human_raw.h5ad"], "--llh", "--stream-output"
    )
    plain = _infer(cli, tmp_path / "p", tiny_path, [human_h5ad, DATA / "tiny_human_raw.h5ad"], "--llh")
    assert set(streamed.obsm) == set(plain.obsm) == {"embeddings", "llh"}
    np.testing.assert_array_equal(streamed.obsm["embeddings"], plain.obsm["embeddings"])
    np.testing.assert_allclose(streamed.obsm["embeddings"][:21], reference["cell"].obsm["embeddings"], atol=ATOL)
    np.testing.assert_array_equal(streamed.obsm["llh"], plain.obsm["llh"])
    np.testing.assert_array_equal(streamed.uns["llh"]["llh"], plain.uns["llh"]["llh"])
    assert streamed.obs.equals(plain.obs)


def test_output_permissions_and_use_raw_override(cli, tmp_path, tiny_path, reference):
    umask = os.umask(0)
    os.umask(umask)
    out = _infer(
        cli, tmp_path, tiny_path, DATA / "tiny_human_raw.h5ad", "--config-override", "model.data_config.use_raw=auto"
    )
    np.testing.assert_allclose(out.obsm["embeddings"], reference["raw_cell"].obsm["embeddings"], atol=ATOL)
    mode = (tmp_path / "out" / "result.h5ad").stat().st_mode & 0o777
    assert mode == 0o666 & ~umask  # like any file the user writes, not mkstemp's 0600


def test_published_index_and_quiet_by_default(cli, tmp_path, tiny_path, human_h5ad):
    out = _infer(cli, tmp_path, tiny_path, human_h5ad, "--published-index")
    assert list(out.obs_names) == [str(i) for i in range(out.n_obs)]  # the published tool's index
    proc = cli(
        "inference", "--checkpoint-path", str(tiny_path), "--data-file", str(human_h5ad),
        "--output-path", str(tmp_path / "quiet"), "--no-progress",
    )  # fmt: skip
    assert proc.returncode == 0 and "matched" not in proc.stderr  # INFO messages only with -v
    proc = cli(
        "-v", "inference", "--checkpoint-path", str(tiny_path), "--data-file", str(human_h5ad),
        "--output-path", str(tmp_path / "loud"), "--no-progress",
    )  # fmt: skip
    assert proc.returncode == 0 and "matched" in proc.stderr
