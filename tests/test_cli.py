"""The `transcriptformer` command: against the published outputs, its checks before any compute, its messages.

Most tests call ``transcriptformer.cli.main`` in this process (the ``cli`` fixture: exit status, stdout,
stderr; or ``helpers.run_cli``); ``test_installed_command``, ``test_python_dash_m`` and the SIGTERM test run
real processes, and the torchrun tests in test_engine.py run ``python -m transcriptformer.cli``.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest

import transcriptformer
import transcriptformer.scanpy as tfs
from helpers import DATA, TINY, checkpoint_entries, error_line, infer_args, run_cli, tar_bytes
from transcriptformer import cli
from transcriptformer.cli import inference as cli_inference
from transcriptformer.cli._common import CLIError
from transcriptformer.config import TranscriptFormerConfig
from transcriptformer.errors import TranscriptFormerWarning

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


# --- inference against the published outputs ------------------------------------------------------------------------


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


# --- messages, exit status, processes -------------------------------------------------------------------------------


def test_library_advice_in_the_command_lines_words(cli, tmp_path, tiny_path, human_h5ad):
    proc = cli("inference", "--checkpoint-path", tiny_path, "--data-file", human_h5ad, "--use-raw", "True",
               "--output-path", tmp_path / "o", check=False)  # fmt: skip
    assert proc.returncode == 1 and "--use-raw False" in proc.stderr and "layer=" not in proc.stderr, proc.stderr


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


SLOW_RUN = """
import sys, time
import transcriptformer.inference.outputs as engine
from transcriptformer.cli import main

original = engine.Accumulator.end_window

def slow(self, *args, **kwargs):
    original(self, *args, **kwargs)
    time.sleep(60)

engine.Accumulator.end_window = slow
sys.exit(main(sys.argv[1:]))
"""


def test_sigterm_removes_the_temporary_output_of_stream_output(tmp_path, tiny_path):
    """SLURM and containers stop jobs with SIGTERM: the streamed output's temporary file must go, as on Ctrl-C."""
    data = tmp_path / "cells.h5ad"
    tfs.datasets.tiny_human().write_h5ad(data)
    out = tmp_path / "out"
    script = tmp_path / "slow.py"
    script.write_text(textwrap.dedent(SLOW_RUN))
    args = ["inference", "--checkpoint-path", str(tiny_path), "--data-file", str(data), "--output-path", str(out)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(transcriptformer.__file__).parents[1]), *sys.path])}
    proc = subprocess.Popen(
        [sys.executable, str(script), *args, "--stream-output", "--no-progress"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None and not list(out.glob(".*.tmp")):
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()
        assert list(out.glob(".*.tmp")), "no temporary file to clean up"
        time.sleep(0.5)  # into the run
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err
    assert "terminated (SIGTERM)" in err
    assert list(out.iterdir()) == []


def test_inference_says_what_it_wrote_and_takes_v_after_the_sub_command(cli, tmp_path, tiny_path, human_h5ad):
    proc = cli(*infer_args(tiny_path, human_h5ad, tmp_path / "loud", "--llh"), "-v")  # -v after the sub-command
    out = tmp_path / "loud" / "embeddings.h5ad"
    last = proc.stdout.strip().splitlines()[-1]
    assert last == f"wrote {out}: 21 cells; obsm['embeddings'], uns['llh'], obsm['llh']"
    assert "matched 165 of 205 genes" in proc.stderr  # -v: INFO messages
    quiet = cli(*infer_args(tiny_path, human_h5ad, tmp_path / "quiet"))
    assert quiet.stdout.strip() == f"wrote {tmp_path / 'quiet' / 'embeddings.h5ad'}: 21 cells; obsm['embeddings']"
    assert "matched" not in quiet.stderr
    streamed = cli(*infer_args(tiny_path, human_h5ad, tmp_path / "streamed", "--stream-output"))
    assert streamed.stdout.strip().startswith(f"wrote {tmp_path / 'streamed' / 'embeddings.h5ad'}: 21 cells")


# --- inputs and outputs checked before the model loads --------------------------------------------------------------


@pytest.mark.parametrize("how", ["same-path", "hard-link", "symlink", "relative"])
def test_cli_refuses_an_output_that_is_an_input(tmp_path, tiny_path, h5ad, capsys, no_model_load, how):
    before = h5ad.read_bytes()
    out, name = tmp_path, h5ad.name
    if how == "hard-link":
        out = tmp_path / "o"
        out.mkdir()
        os.link(h5ad, out / "x.h5ad")
        name = "x.h5ad"
    elif how == "symlink":
        out = tmp_path / "o"
        out.mkdir()
        (out / "x.h5ad").symlink_to(h5ad)
        name = "x.h5ad"
    elif how == "relative":
        os.chdir(tmp_path)
        out = Path(".")
    code, err = run_cli(capsys, *infer_args(tiny_path, h5ad, out, "--output-filename", name))
    assert code == 1
    assert "is the input file" in error_line(err) and "would replace the input" in err
    assert h5ad.read_bytes() == before
    assert no_model_load == []


def test_cli_checks_the_output_before_loading_the_model(tmp_path, tiny_path, h5ad, capsys, monkeypatch, no_model_load):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir" / "sub").mkdir(parents=True)
    cases = [
        (("--output-filename", ""), "--output-filename is empty"),
        (("--output-filename", "  "), "--output-filename is empty"),
        (("--output-filename", "sub"), "is an existing folder"),
    ]
    for extra, message in cases:
        code, err = run_cli(capsys, *infer_args(tiny_path, h5ad, tmp_path / "adir", *extra))
        assert code == 1 and message in error_line(err), err
    code, err = run_cli(capsys, *infer_args(tiny_path, h5ad, tmp_path / "afile" / "deeper"))
    assert code == 1 and "afile is a file" in error_line(err)

    # a folder where nothing can be written (root ignores permission bits, so the write is made to fail)
    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(cli_inference.tempfile, "mkstemp", denied)
    code, err = run_cli(capsys, *infer_args(tiny_path, h5ad, tmp_path / "adir"))
    assert code == 1 and "cannot write to the output folder" in error_line(err) and "Permission denied" in err
    monkeypatch.undo()
    monkeypatch.setattr(cli_inference.os, "access", lambda *a, **k: False)
    code, err = run_cli(capsys, *infer_args(tiny_path, h5ad, tmp_path / "new" / "deeper"))
    assert code == 1 and "is not writable" in error_line(err)
    assert no_model_load == []
    assert not (tmp_path / "new").exists()


def test_cli_refuses_inputs_that_are_not_h5ad_before_loading(tmp_path, tiny_path, capsys, no_model_load):
    (tmp_path / "folder.h5ad").mkdir()
    (tmp_path / "text.h5ad").write_text("cell,gene\n")
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"] = np.zeros(3)
    for data, message in [
        (tmp_path / "folder.h5ad", "is a folder"),
        (tmp_path / "text.h5ad", "is not an h5ad file (not HDF5)"),
        (tmp_path / "other.h5", "not an AnnData"),
        (tmp_path / "missing.h5ad", "does not exist"),
    ]:
        code, err = run_cli(capsys, *infer_args(tiny_path, data, tmp_path / "out"))
        assert code == 1 and message in error_line(err) and str(data) in err
    assert no_model_load == []


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        (("--max-tokens", "0"), "--max-tokens"),
        (("--max-tokens", "-1"), "--max-tokens"),
        (("--batch-size", "0"), "--batch-size"),
        (("--clip-counts", "0"), "--clip-counts"),
        (("--config-override", "model.inference_config.batch_size=0"), "inference_config.batch_size=0"),
        (("--config-override", "model.inference_config.batch_size=1.5"), "inference_config.batch_size=1.5"),
    ],
)
def test_cli_options_follow_the_api_rules(tmp_path, tiny_path, h5ad, capsys, no_model_load, extra, named):
    code, err = run_cli(capsys, *infer_args(tiny_path, h5ad, tmp_path / "out", *extra))
    assert code == 1 and named in error_line(err)
    assert no_model_load == [] and not (tmp_path / "out").exists()


# --- --config-override ----------------------------------------------------------------------------------------------


def _overrides(*items: str):
    args = cli.build_parser().parse_args(
        [
            "inference",
            "--checkpoint-path",
            "x",
            "--data-file",
            "y",
            *[a for i in items for a in ("--config-override", i)],
        ]
    )
    return args, cli_inference._apply_overrides(args)


@pytest.mark.parametrize(
    ("text", "value"),
    [("true", True), ("False", False), ("1", True), ("0", False), ("yes", True), ("NO", False)],
)
def test_config_override_booleans_are_strict(text, value):
    args, _ = _overrides(f"model.data_config.filter_to_vocabs={text}", f"data_config.remove_duplicate_genes={text}")
    assert args.filter_to_vocabs is value and args.remove_duplicate_genes is value
    _, model = _overrides(f"model.model_config.attn_bias={text}")
    assert TranscriptFormerConfig().with_overrides(model).model.attn_bias is value


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ("model.data_config.filter_to_vocabs=off", "expected a boolean"),
        ("model.data_config.remove_duplicate_genes=2", "expected a boolean"),
        ("model.data_config.filter_to_vocabs=", "expected a boolean"),
        ("model.inference_config.emb_type=foo", "expected one of cell, cge"),
        ("model.inference_config.precision=8", "expected one of"),
        ("model.inference_config.device=tpu", "expected one of"),
        ("model.inference_config.output_keys.0=nonsense", "expected one of embeddings, llh, gene_llh"),
        ("model.inference_config.output_keys=[embeddings,llh]", "one item at a time"),
        ("model.inference_config.batch_size=abc", "expected a positive integer"),
        ("model.data_config.normalize_to_scale=-1", "expected a number >= 0"),
        ("model.data_config.normalize_to_scale=ten", "expected a number"),
        ("model.data_config.clip_counts=0", "expected a number > 0"),
        ("model.data_config.use_raw=maybe", "expected True, False or auto"),
        ("model.data_config.sort_genes=maybe", "expected a boolean"),
        ("model.data_config.sort_genes=yes", "only the default"),
        ("model.model_config.softcap=inf", "expected a finite number"),
        ("model.model_config.attn_bias=maybe", "expected a boolean"),
        ("model.model_config.num_layers=2.5", "expected an integer"),
        ("model.model_config.num_layers=true", "expected a number"),
        ("model.model_config.nonexistent=1", "has no key 'nonexistent'"),
        ("model.model_config.mu_link_fn=foo", "mu_link_fn='foo' is not supported"),
        ("model.nowhere.x=1", "unknown configuration key"),
    ],
)
def test_config_override_errors_name_the_key(item, message):
    key = item.split("=", 1)[0]  # as written
    with pytest.raises(CLIError, match=message) as info:
        _overrides(item)
    assert key in str(info.value)


def test_config_override_error_comes_before_the_model(tmp_path, tiny_path, h5ad, capsys, no_model_load):
    code, err = run_cli(
        capsys, *infer_args(tiny_path, h5ad, tmp_path / "o", "--config-override", "data_config.filter_to_vocabs=no!")
    )
    assert code == 1 and "data_config.filter_to_vocabs=no!" in error_line(err)
    assert no_model_load == []


def test_config_override_booleans_change_the_result(tmp_path, tiny_path, h5ad, capsys):
    """`filter_to_vocabs=no` means False (it used to mean True, by truthiness)."""
    outputs = {}
    for text in ("no", "false"):
        out = tmp_path / text
        code, err = run_cli(
            capsys, *infer_args(tiny_path, h5ad, out, "--config-override", f"data_config.filter_to_vocabs={text}")
        )
        assert code == 0, err
        outputs[text] = ad.read_h5ad(out / "embeddings.h5ad").obsm["embeddings"]
    api = tfs.tl.embed(tfs.datasets.tiny_human(), model=tiny_path, filter_to_vocab=False, copy=True)
    np.testing.assert_allclose(outputs["no"], api.obsm["X_transcriptformer"], atol=1e-6)
    np.testing.assert_array_equal(outputs["no"], outputs["false"])


# --- download -------------------------------------------------------------------------------------------------------


def test_cli_download_checks_its_folder(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    code, err = run_cli(capsys, "download", "tf-sapiens", "--checkpoint-dir", tmp_path / "afile", "--no-progress")
    assert code == 1 and "is a file" in error_line(err)


def test_cli_download_published_layout(registry_server, tmp_path, cli, monkeypatch):
    for top in ("tf_exemplar", "tf_metazoa"):
        registry_server.files[f"{top}.tar.gz"] = tar_bytes(checkpoint_entries(top=top))
    monkeypatch.setenv("TRANSCRIPTFORMER_BASE_URL", registry_server.url)
    proc = cli("download", "tf-sapiens", "--checkpoint-dir", tmp_path / "ckpts", "--no-progress", check=False)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "ckpts" / "tf_sapiens" / "model_weights.pt").read_bytes() == (
        TINY / "model_weights.pt"
    ).read_bytes()
    assert (tmp_path / "ckpts" / "tf_sapiens" / "vocabs" / "assay_vocab.json").is_file()
    proc = cli("download", "all", "--checkpoint-dir", tmp_path / "ckpts", "--no-progress", check=False)
    assert proc.returncode == 0, proc.stderr
    for top in ("tf_sapiens", "tf_exemplar", "tf_metazoa", "all_embeddings"):
        assert (tmp_path / "ckpts" / top).is_dir()
    assert registry_server.requests.count(registry_server.prefix + "tf_sapiens.tar.gz") == 1  # cached the second time
    monkeypatch.setenv("TRANSCRIPTFORMER_BASE_URL", "http://127.0.0.1:9/unreachable/")
    proc = cli("download", "tf-sapiens", "--checkpoint-dir", tmp_path / "none", check=False)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("transcriptformer: error:")]
    assert proc.returncode == 1 and len(errors) == 1 and "could not download" in errors[0], proc.stderr


def test_cli_download_of_what_ships_with_the_package(tmp_path, cli, registry_offline):
    """tf-demo and mouse-val are bundled: download copies them into --checkpoint-dir like any artifact."""
    import transcriptformer.scanpy as tfs

    proc = cli("download", "tf-demo", "--checkpoint-dir", tmp_path / "ckpts", check=False)
    assert proc.returncode == 0, proc.stderr
    copied = tmp_path / "ckpts" / "tf_demo"
    assert proc.stdout.strip().endswith(str(copied))
    assert (copied / "model_weights.pt").read_bytes() == (tfs.models.path("tf-demo") / "model_weights.pt").read_bytes()
    assert transcriptformer.load_model(copied).name == "tf_demo"
    (copied / "config.json").write_text("{}")  # present: kept as it is, unless --force
    assert cli("download", "tf-demo", "--checkpoint-dir", tmp_path / "ckpts", check=False).returncode == 0
    assert (copied / "config.json").read_text() == "{}"
    assert cli("download", "tf-demo", "--checkpoint-dir", tmp_path / "ckpts", "--force", check=False).returncode == 0
    assert (copied / "config.json").read_text() != "{}"
    assert [p.name for p in (tmp_path / "ckpts").iterdir()] == ["tf_demo"]  # no staging folder left
    proc = cli("download", "mouse-val", "--checkpoint-dir", tmp_path / "data", check=False)
    assert proc.returncode == 0 and (tmp_path / "data" / "mouse_val.h5ad").stat().st_size > 1e6


# --- finetune and train ---------------------------------------------------------------------------------------------


def test_cli_finetune_with_the_published_flags_and_inference_with_the_adapter(tiny_path, tiny_adata, tmp_path):
    pytest.importorskip("peft")
    from transcriptformer.cli import main

    tiny_adata.write_h5ad(tmp_path / "train.h5ad")
    code = main([
        "finetune", "--checkpoint-path", str(tiny_path), "--train-files", str(tmp_path / "train.h5ad"),
        "--lora-r", "4", "--lora-alpha", "16", "--lora-dropout", "0.0",
        "--lora-target-modules", "linear1", "linear2", "linears",
        "--epochs", "1", "--learning-rate", "0.01", "--batch-size", "8", "--seed", "3",
        "--output-dir", str(tmp_path / "adapter"), "--no-progress",
    ])  # fmt: skip
    assert code == 0 and (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    code = main([
        "inference", "--checkpoint-path", str(tiny_path), "--data-file", str(tmp_path / "train.h5ad"),
        "--adapter", str(tmp_path / "adapter"), "--output-path", str(tmp_path / "out"), "--no-progress",
    ])  # fmt: skip
    assert code == 0
    out = ad.read_h5ad(tmp_path / "out" / "embeddings.h5ad")
    expected = tfs.tl.embed(tiny_adata, model=(tiny_path, tmp_path / "adapter"), copy=True)
    np.testing.assert_allclose(out.obsm["embeddings"], expected.obsm["X_transcriptformer"], atol=1e-6)


def test_cli_train_a_new_model(tiny_path, tiny_adata, tmp_path, capsys):
    pytest.importorskip("peft")
    from transcriptformer.cli import main

    tiny_adata.write_h5ad(tmp_path / "train.h5ad")
    tables = [str(tiny_path / "vocabs" / f) for f in ("homo_sapiens_gene.h5", "mus_musculus_gene.h5")]
    args = ["train", "--gene-tables", *tables, "--assays", "10x 3' v3", "--embed-dim", "16", "--num-layers", "1",
            "--num-heads", "2", "--seq-len", "63", "--train-files", str(tmp_path / "train.h5ad"),
            "--output-dir", str(tmp_path / "model"), "--no-progress"]  # fmt: skip
    assert main([*args, "--dry-run"]) == 0 and not (tmp_path / "model").exists()
    assert main(args) == 0
    assert transcriptformer.load_model(tmp_path / "model").embed_dim == 16
    assert main([*args[:-3], "--output-dir", str(tmp_path / "model"), "--no-progress"]) == 1
    assert "resume" in capsys.readouterr().err
    # the shape flags describe a new model: with --checkpoint-path they are refused, not ignored
    again = ["train", "--checkpoint-path", str(tmp_path / "model"), "--embed-dim", "32", "--assays", "x",
             "--train-files", str(tmp_path / "train.h5ad"), "--output-dir", str(tmp_path / "more")]  # fmt: skip
    assert main(again) == 1 and not (tmp_path / "more").exists()
    assert "--embed-dim, --assays describe a new model" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["finetune", "train"])
def test_training_errors_name_the_flags(cli, tmp_path, tiny_path, human_h5ad, monkeypatch, no_model_load, command):
    (tmp_path / "afile").write_text("x")
    run = tmp_path / "run"
    run.mkdir()
    (run / "trainer_state.pt").write_bytes(b"x")
    base = [command, "--checkpoint-path", tiny_path, "--train-files", human_h5ad, "--no-progress", "--dry-run"]
    cases = [
        (["--output-dir", run], f"{run} holds an earlier training run; pass --resume to continue it"),
        (["--output-dir", tmp_path / "new", "--resume"], f"--resume but {tmp_path / 'new'} does not exist"),
        (["--output-dir", tmp_path / "afile"], f"{tmp_path / 'afile'} is a file; pass another --output-dir"),
        (["--output-dir", tmp_path / "afile" / "run"], "is a file; pass another --output-dir"),
    ]
    for extra, message in cases:
        proc = cli(*base, *extra, check=False)
        line = error_line(proc.stderr)
        assert proc.returncode == 1 and message in line, line
        assert "resume=True" not in line and "output_dir" not in line and "[Errno" not in line
    from transcriptformer.training import fit

    def denied(*args, **kwargs):  # root ignores permission bits: the write itself is made to fail
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(fit.tempfile, "mkstemp", denied)
    proc = cli(*base, "--output-dir", tmp_path / "unwritable", check=False)
    line = error_line(proc.stderr)
    assert proc.returncode == 1 and "Permission denied" in line and "pass a writable --output-dir" in line
    assert no_model_load == []  # every check before the model is loaded


def test_dry_run_reads_the_data_and_names_a_file_that_is_not_h5ad(cli, tmp_path, tiny_path, human_h5ad):
    pytest.importorskip("peft")
    base = ["finetune", "--checkpoint-path", tiny_path, "--output-dir", tmp_path / "run", "--dry-run"]
    proc = cli(*base, "--train-files", human_h5ad)
    assert "dry run: the model, the data and the output folder are ready" in proc.stdout
    assert not (tmp_path / "run").exists()
    text = tmp_path / "cells.h5ad"
    text.write_text("cell,gene\n")
    proc = cli(*base, "--train-files", text, check=False)
    assert proc.returncode == 1 and f"train file '{text}' is not an h5ad file (not HDF5)" in error_line(proc.stderr)


def test_an_adapter_folder_as_the_checkpoint_says_to_pass_it_with_adapter(tmp_path, h5ad, capsys):
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text("{}")
    code, err = run_cli(capsys, *infer_args(folder, h5ad, tmp_path / "out"))
    line = error_line(err)
    assert code == 1 and "is a LoRA adapter folder, not a checkpoint" in line
    assert "--checkpoint-path BASE --adapter" in line and "model=(" not in line


def test_the_adapter_advice_on_the_command_line_has_no_python_in_it(tmp_path, h5ad, capsys):
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text("{}")
    _, err = run_cli(capsys, *infer_args(folder, h5ad, tmp_path / "out"))
    line = error_line(err)
    assert "load_model(" not in line and "adapter=" not in line, line


def test_a_folder_given_as_training_data_is_called_a_folder(cli, tmp_path, tiny_path):
    (tmp_path / "cells.h5ad").mkdir()
    proc = cli("finetune", "--checkpoint-path", tiny_path, "--train-files", tmp_path / "cells.h5ad",
               "--output-dir", tmp_path / "run", "--dry-run", check=False)  # fmt: skip
    line = error_line(proc.stderr)
    assert proc.returncode == 1 and str(tmp_path / "cells.h5ad") in line
    assert "is a folder" in line, line


def _flags_of(command: str) -> set[str]:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")  # argparse keeps the sub-commands there
    return {flag for action in sub.choices[command]._actions for flag in action.option_strings}


@pytest.mark.parametrize("command", ["finetune", "train"])
def test_a_dry_run_makes_every_check_of_the_run(cli, tmp_path, tiny_path, human_h5ad, command):
    pytest.importorskip("peft")
    import torch

    nan = tfs.datasets.tiny_human()
    X = nan.X.toarray()
    X[1, 0], X[2, 0] = np.nan, -5  # column 0 is a gene of the vocabulary
    nan.X = X
    nan.write_h5ad(tmp_path / "nan.h5ad")
    run = tmp_path / "run"
    base = [command, "--checkpoint-path", tiny_path, "--output-dir", run, "--no-progress", "--dry-run"]
    cases = [
        (["--epochs", "0"], "epochs must be a positive integer"),
        (["--learning-rate", "100"], "learning_rate must be > 0 and at most 10"),
        (["--warmup-ratio", "5"], "warmup_ratio must be between 0 and 1"),
        (["--max-tokens", "0"], "max_tokens must be a positive integer"),
        (["--device", "cuda:99"], "device='cuda:99' but"),
        (["--attention", "flex"], "flex_attention cannot be differentiated on this device"),
        (["--train-files", tmp_path / "nan.h5ad"], "the counts in X contain NaN values"),
        (["--val-files", tmp_path / "nan.h5ad"], "the counts in X contain NaN values"),
    ]
    if command == "finetune":
        cases.append((["--lora-r", "64"], "lora_r=64 exceeds the width of"))
    for extra, message in cases:
        args = extra if "--train-files" in extra else ["--train-files", human_h5ad, *extra]
        if extra[0] == "--attention" and torch.cuda.is_available():
            continue  # flex_attention trains on CUDA
        proc = cli(*base, *args, check=False)
        line = error_line(proc.stderr)
        assert proc.returncode == 1 and message in line, (extra, line)
        assert not run.exists()
    proc = cli(*base, "--train-files", human_h5ad, "--val-files", human_h5ad)
    assert "dry run: the model, the data and the output folder are ready" in proc.stdout and not run.exists()


def test_training_advice_names_only_flags_the_command_has(cli, tmp_path, tiny_path, human_h5ad):
    pytest.importorskip("peft")
    dup = tfs.datasets.tiny_human()
    ids = dup.var["ensembl_id"].astype(str).tolist()
    ids[1] = ids[0]
    dup.var["ensembl_id"] = ids
    dup.write_h5ad(tmp_path / "dup.h5ad")
    adapter = transcriptformer.finetune(
        tfs.datasets.tiny_human()[:8], tiny_path, output_dir=tmp_path / "adapter", progress=False
    )
    for command in ("finetune", "train"):
        flags = _flags_of(command)
        assert {"--use-raw", "--remove-duplicate-genes", "--adapter", "--gene-col-name"} <= flags
        base = [command, "--output-dir", tmp_path / "run", "--no-progress", "--dry-run"]
        ckpt = ["--checkpoint-path", tiny_path]
        for args, advice, fixed in [
            (  # duplicate gene ids: the advice, and the flag it names works
                [*ckpt, "--train-files", tmp_path / "dup.h5ad"],
                "Pass --remove-duplicate-genes to keep the first column of each",
                ["--remove-duplicate-genes"],
            ),
            (  # counts from .raw of a file without one
                [*ckpt, "--train-files", human_h5ad, "--use-raw", "True"],
                "--use-raw True but the file has no .raw; pass --use-raw False",
                ["--use-raw", "False"],
            ),
            (  # an adapter given as the checkpoint
                ["--checkpoint-path", adapter, "--train-files", human_h5ad],
                f"--checkpoint-path BASE --adapter {adapter}",
                None,
            ),
        ]:
            line = error_line(cli(*base, *args, check=False).stderr)
            assert advice in line, line
            named = set(re.findall(r"(?<![\w-])--[a-z][a-z-]+", line))
            assert named and named <= flags, (command, named - flags)
            if fixed is not None:
                cli(*base, *args, *fixed)
        cli(*base, *ckpt, "--adapter", adapter, "--train-files", human_h5ad)  # the adapter advice, followed
    assert not (tmp_path / "run").exists()
    # each command's own flags only
    from transcriptformer.cli import in_flags

    assert in_flags("lower lora_r to at most 32", "finetune") == "lower --lora-r to at most 32"
    assert in_flags("lower lora_r to at most 32", "inference") == "lower lora_r to at most 32"
    assert in_flags("pass resume=True to continue it", "merge") == "pass resume=True to continue it"


def test_inputs_are_checked_before_the_model_is_loaded(tmp_path, tiny_adata, cli, registry_offline):
    """--gene-col-name and --use-raw typos are reported before tf-sapiens is loaded (here: could be downloaded)."""
    data = tmp_path / "cells.h5ad"
    tiny_adata.write_h5ad(data)
    base = ["inference", "--checkpoint-path", "tf-sapiens", "--data-file", data, "--output-path", tmp_path / "out"]
    for extra, match in (
        (["--gene-col-name", "nope"], "gene id column 'nope' not found"),
        (["--use-raw", "True"], "--use-raw True but the file has no .raw"),
    ):
        proc = cli(*base, *extra, "--no-progress", check=False)
        assert proc.returncode == 1 and match in proc.stderr and "download" not in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()


# --- several inputs: checked before the model, obs of mixed types, the run record, messages ------------------------


def _split(tmp_path, edit_a=None, edit_b=None) -> tuple[Path, Path]:
    """The tiny cells as two files, cells 0-9 and 10-20 (each file's categoricals keep only its categories);
    ``edit_a`` / ``edit_b`` change a file's AnnData before it is written."""
    adata = tfs.datasets.tiny_human()
    paths = []
    for name, part, edit in (("a", adata[:10].copy(), edit_a), ("b", adata[10:].copy(), edit_b)):
        part = edit(part) or part if edit else part
        path = tmp_path / f"{name}.h5ad"
        part.write_h5ad(path)
        paths.append(path)
    return paths[0], paths[1]


def _lognorm(adata: ad.AnnData) -> None:
    import scanpy as sc

    sc.pp.normalize_total(adata)
    sc.pp.log1p(adata)


def test_inputs_whose_obs_columns_differ_in_type_are_written(cli, tmp_path, tiny_path):
    """A bool column in one file only (CELLxGENE's is_primary_data), and a column of strings in one file and integers
    in the other: the output holds both, streamed or not (it was computed, then could not be written)."""

    def primary(adata):
        adata.obs["is_primary_data"] = True

    def numbered(adata):
        adata.obs["donor_id"] = np.arange(adata.n_obs)

    a, b = _split(tmp_path, primary, numbered)
    outs = [
        _infer(cli, tmp_path / d, tiny_path, [a, b], *extra) for d, extra in (("m", ()), ("s", ["--stream-output"]))
    ]
    for out in outs:
        primary_data = out.obs["is_primary_data"]
        assert primary_data.dtype == "boolean" and primary_data[:10].all() and primary_data[10:].isna().all()
        donors = ad.read_h5ad(a).obs["donor_id"].astype(str).tolist() + [str(i) for i in range(11)]
        assert out.obs["donor_id"].astype(str).tolist() == donors
    pd.testing.assert_frame_equal(outs[0].obs, outs[1].obs)


def test_an_obs_column_that_cannot_be_written_is_named_before_the_model_is_loaded(
    tmp_path, tiny_path, capsys, monkeypatch, no_model_load
):
    a, b = _split(tmp_path)
    original = cli_inference._obs

    def with_dates(adata, args, path):
        obs = original(adata, args, path)
        if path == str(b):  # a type h5ad cannot hold (an input read another way, e.g. SOMA, may have it)
            obs["sampled"] = pd.Timestamp("2024-01-01")
        return obs

    monkeypatch.setattr(cli_inference, "_obs", with_dates)
    code, err = run_cli(capsys, *infer_args(tiny_path, [a, b], tmp_path / "out"))
    line = error_line(err)
    assert code == 1 and "obs column 'sampled' cannot be written" in line, line
    assert f"data file {str(a)!r}: no such column" in line and f"data file {str(b)!r}: datetime64" in line
    assert "obs_keys" in line and no_model_load == []


def test_stream_output_writes_the_same_obs(cli, tmp_path, tiny_path):
    """Files whose categoricals have different categories: the streamed obs equals the in-memory one, dtypes too."""
    a, b = _split(tmp_path)
    plain = _infer(cli, tmp_path / "p", tiny_path, [a, b])
    streamed = _infer(cli, tmp_path / "s", tiny_path, [a, b], "--stream-output")
    assert isinstance(plain.obs["cell_type"].dtype, pd.CategoricalDtype)
    pd.testing.assert_frame_equal(streamed.obs, plain.obs)


def test_the_run_record_of_several_files_describes_each(cli, tmp_path, tiny_path):
    """counts_look_raw holds for every file; the facts of each file are lists in the order of data_file."""

    def lognorm_fewer_genes(adata):
        _lognorm(adata)
        return adata[:, 20:].copy()

    a, b = _split(tmp_path, edit_b=lognorm_fewer_genes)
    with pytest.warns(TranscriptFormerWarning, match="do not look like raw counts"):
        out = _infer(cli, tmp_path, tiny_path, [a, b])
    params = out.uns["transcriptformer"]["params"]
    assert list(params["data_file"]) == [str(a), str(b)]
    assert not params["counts_look_raw"] and list(params["counts_look_raw_per_file"]) == [True, False]
    assert list(params["n_genes"]) == [205, 185] and list(params["n_genes_matched"]) == [165, 149]
    assert list(params["counts_source"]) == ["X", "X"]
    assert isinstance(params["model"], str) and params["precision"] == "32"  # the same for every file: one value
    with pytest.warns(TranscriptFormerWarning, match="do not look like raw counts"):
        single = _infer(cli, tmp_path / "one", tiny_path, b)
    params = single.uns["transcriptformer"]["params"]
    assert params["n_genes"] == 185 and not params["counts_look_raw"] and "counts_look_raw_per_file" not in params


def test_every_input_is_checked_before_the_model_is_loaded_and_errors_name_it(
    tmp_path, tiny_path, capsys, no_model_load
):
    def duplicate_id(adata):
        ids = adata.var["ensembl_id"].astype(str).to_numpy().copy()
        ids[-1] = ids[5] + ".3"
        adata.var["ensembl_id"] = ids

    def with_raw(adata):
        adata.raw = adata.copy()

    def no_id_column(adata):
        del adata.var["ensembl_id"]

    cases = [
        (duplicate_id, [], "1 gene id(s) in var['ensembl_id'] appear more than once", "--remove-duplicate-genes"),
        (no_id_column, [], "gene id column 'ensembl_id' not found", "symbols_to_ensembl"),
    ]
    for edit_b, extra, message, flag in cases:
        a, b = _split(tmp_path, edit_b=edit_b)
        code, err = run_cli(capsys, *infer_args(tiny_path, [a, b], tmp_path / "out", *extra))
        line = error_line(err)
        assert code == 1 and line.startswith(f"transcriptformer: error: data file {str(b)!r}: {message}"), line
        assert flag in line
    a, b = _split(tmp_path, edit_a=with_raw)  # --use-raw True: the second file has no .raw
    code, err = run_cli(capsys, *infer_args(tiny_path, [a, b], tmp_path / "out", "--use-raw", "True"))
    line = error_line(err)
    assert line.startswith(f"transcriptformer: error: data file {str(b)!r}: --use-raw True but the file has no .raw")
    assert no_model_load == []
    a, b = _split(tmp_path, edit_b=duplicate_id)  # with the flag the duplicates pass: the model is loaded next
    code, err = run_cli(capsys, *infer_args(tiny_path, [a, b], tmp_path / "out", "--remove-duplicate-genes"))
    assert code == 1 and "a model was loaded" in err and len(no_model_load) == 1
    assert not (tmp_path / "out" / "embeddings.h5ad").exists()


def test_an_error_found_while_reading_a_later_input_names_it(tmp_path, tiny_path, capsys):
    def negative(adata):
        adata.X = adata.X.toarray()
        adata.X[3, :] = -1  # found while its cells are read (backed files are checked window by window)

    a, b = _split(tmp_path, edit_b=negative)
    code, err = run_cli(capsys, *infer_args(tiny_path, [a, b], tmp_path / "out"))
    line = error_line(err)
    assert code == 1 and line.startswith(
        f"transcriptformer: error: data file {str(b)!r}: the counts in X contain negative"
    )


def test_warnings_give_the_command_lines_advice(cli, tmp_path, tiny_path):
    """The library's warnings, like its errors, name the command's flags (inference has no layer=)."""
    import warnings

    adata = tfs.datasets.tiny_human()
    lognorm = adata.copy()
    _lognorm(lognorm)
    lognorm.raw = adata
    path = tmp_path / "lognorm_with_raw.h5ad"
    lognorm.write_h5ad(path)
    shown = warnings.showwarning
    with pytest.warns(TranscriptFormerWarning, match="do not look like raw counts") as record:
        _infer(cli, tmp_path, tiny_path, path, "--use-raw", "False")
    text = " ".join(str(w.message) for w in record if "raw counts" in str(w.message))
    assert "--use-raw" in text and "layer=" not in text, text
    assert warnings.showwarning is shown  # the command's rewriting ends with it
    with pytest.warns(TranscriptFormerWarning, match="layer=<layer of raw counts>"):  # the API's own words
        tfs.tl.embed(lognorm, tiny_path, layer="X", copy=True)


def test_pretrained_embedding_species_offline_advises_a_table_before_the_model_is_loaded(
    tmp_path, tiny_path, h5ad, capsys, registry_offline, no_model_load
):
    code, err = run_cli(
        capsys, *infer_args(tiny_path, h5ad, tmp_path / "out", "--pretrained-embedding", "mus_musculus")
    )
    line = error_line(err)
    assert code == 1 and "could not download" in line and "all_embeddings.tar.gz" in line, line
    assert "--pretrained-embedding <folder>/<species>_gene.h5" in line and "--checkpoint-path <folder>" not in line
    assert no_model_load == []  # the species name is resolved before the model is loaded


def test_inputs_sharing_cell_names_give_no_advice_to_make_them_unique(cli, tmp_path, tiny_path, human_h5ad):
    """The command makes shared cell names unique itself: anndata's advice to call obs_names_make_unique is not
    shown."""
    import warnings

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        out = _infer(cli, tmp_path, tiny_path, [human_h5ad, human_h5ad])
    assert not [w for w in record if "make_unique" in str(w.message) or "not unique" in str(w.message)], record
    assert out.obs_names.is_unique and list(out.obs_names[20:23]) == ["cell020", "cell000-1", "cell001-1"]
