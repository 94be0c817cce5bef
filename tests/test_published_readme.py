r"""The published TranscriptFormer README's commands, typed as written, work here.

The commands are kept below as the published README writes them (continuation backslashes included), one string
each, so that a change on either side shows as a difference here. Sources:

- ``README`` : github.com/czi-ai/transcriptformer's README at the revision with the "Fine-tuning with LoRA"
  section and the "Windows (CUDA) quick-start";
- ``PYPI_061``: the README of the PyPI release 0.6.1 (its long description), for the commands it adds.

Only the model and the data are substituted, and without touching the commands: ``download`` fetches from a
server on 127.0.0.1 (``TRANSCRIPTFORMER_BASE_URL``) that serves the bundled demo model under the published
tarball names (``tf_sapiens`` a human-only copy of it, as TF-Sapiens is human-only, so that mouse cells need
``--pretrained-embedding``), and the commands run in a folder where their data paths exist
(``test/data/human_val.h5ad``: PBMCs of :func:`~transcriptformer.scanpy.datasets.pbmc68k_counts` with their
labels as ``cell_type``; ``test/data/mouse_val.h5ad``: the bundled ``mouse_val``; ``path/to/train.h5ad``;
``./data/huge.h5ad``). The one absolute path, ``/path/to/custom/dir``, is replaced by a temporary folder.
"""

from __future__ import annotations

import importlib.util
import json
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pytest
import torch

import transcriptformer
import transcriptformer.scanpy as tfs
from helpers import PROXY_VARIABLES, RegistryServer, folder_entries, tar_bytes

ROOT = Path(__file__).parents[1]

# ------------------------------------------------------------------ the commands, as the published READMEs write them

README_DOWNLOAD = [
    "transcriptformer download tf-sapiens",
    "transcriptformer download tf-exemplar",
    "transcriptformer download tf-metazoa",
    "transcriptformer download all",
    "transcriptformer download all-embeddings",
    "transcriptformer download tf-sapiens --checkpoint-dir /path/to/custom/dir",
]

README_INFERENCE_HUMAN = r"""transcriptformer inference \
  --checkpoint-path ./checkpoints/tf_sapiens \
  --data-file test/data/human_val.h5ad \
  --output-path ./inference_results \
  --batch-size 8"""

README_INFERENCE_MOUSE = r"""transcriptformer inference \
  --checkpoint-path ./checkpoints/tf_sapiens \
  --data-file test/data/mouse_val.h5ad \
  --pretrained-embedding ./checkpoints/all_embeddings/mus_musculus_gene.h5 \
  --batch-size 8"""

README_CONFIG_OVERRIDE = r"""transcriptformer inference \
  --checkpoint-path ./checkpoints/tf_sapiens \
  --data-file test/data/human_val.h5ad \
  --config-override model.data_config.normalize_to_scale=10000 \
  --config-override model.inference_config.obs_keys.0=cell_type"""

README_HELP = ["transcriptformer inference --help", "transcriptformer download --help"]

README_LORA = r"""python finetune_lora.py \
  --checkpoint-path ./checkpoints/tf_sapiens \
  --train-files path/to/train.h5ad \
  --lora-r 4 \
  --lora-alpha 16 \
  --lora-dropout 0.0 \
  --lora-target-modules linear1 linear2 linears"""

# the Windows quick-start (PowerShell): its environment variables, and the smoke test run with them
README_WINDOWS_ENV = r"""$env:TORCH_COMPILE                           = '0'   # global: skip torch.compile
$env:TORCHDYNAMO_DISABLE                     = '1'   # belt-and-suspenders
$env:TORCH_NN_FLEX_ATTENTION_DISABLE_COMPILE = '1'   # flex-attention specific"""

README_WINDOWS_SMOKE = [
    r"transcriptformer download tf-sapiens --checkpoint-dir .\checkpoints",
    r"""transcriptformer inference `
    --checkpoint-path .\checkpoints\tf_sapiens `
    --data-file      test\data\human_val.h5ad `
    --output-path    .\inference_smoke `
    --batch-size     2""",
]

# commands the PyPI 0.6.1 README adds that work here
PYPI_061_INFERENCE = [
    r"""transcriptformer inference \
  --checkpoint-path ./checkpoints/tf_sapiens \
  --data-file test/data/human_val.h5ad \
  --emb-type cge \
  --batch-size 8""",
    r"""transcriptformer inference \
  --checkpoint-path ./checkpoints/tf_sapiens \
  --data-file test/data/human_val.h5ad \
  --num-gpus 4 \
  --batch-size 32""",
    r"""transcriptformer inference \
  --checkpoint-path ./checkpoints/tf_sapiens \
  --data-file ./data/huge.h5ad \
  --oom-dataloader \
  --n-data-workers 4 \
  --num-gpus 8""",
    r"""transcriptformer inference \
  --checkpoint-path ./checkpoints/tf_sapiens \
  --data-file test/data/human_val.h5ad \
  --emb-type cge \
  --output-filename cge_embeddings.h5ad""",
]

PYPI_061_DOWNLOAD_DATA = [
    'transcriptformer download-data --species "homo sapiens" --output-dir ./data/human',
    'transcriptformer download-data --species "homo sapiens,mus musculus" --output-dir ./data/multi_species',
    r"""transcriptformer download-data \
  --species "homo sapiens" \
  --output-dir ./data/human \
  --processes 8 \
  --max-retries 3 \
  --no-metadata""",
]
PYPI_061_HELP = "transcriptformer download-data --help"

# ... and those that do not (what they are for is not implemented here); if one starts to work, move it up
PYPI_061_UNSUPPORTED = [
    r"""transcriptformer inference \
  --checkpoint-path ./checkpoints/tf_sapiens \
  --data-file test/data/human_val.h5ad \
  --model-type esm2ce \
  --batch-size 8""",  # the ESM2-CE baseline
]
PYPI_061_MODULE = 'python -m transcriptformer.data.bulk_download --species "homo sapiens" --output-dir ./data/human'

#: The absolute paths of the commands, and what they become here (relative paths exist in the working folder).
SUBSTITUTE = {"/path/to/custom/dir": "custom/dir"}

N_CELLS = 24  # cells of each data file: enough for several batches, few enough for a fast test


def argv_of(command: str, *, powershell: bool = False) -> list[str]:
    """The argument list a shell gives the program: a POSIX shell's, or PowerShell's (` continues a line).

    PowerShell's paths are written with backslashes; they become forward slashes here (the same path on Windows).
    """
    if powershell:
        words = [w.replace("\\", "/") for w in command.replace("`\n", " ").split()]
    else:
        words = shlex.split(command.replace("\\\n", " "))
    return [SUBSTITUTE.get(w, w) for w in words]


def _finetune_lora_module():
    spec = importlib.util.spec_from_file_location("finetune_lora", ROOT / "finetune_lora.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def run(cli) -> Callable[..., subprocess.CompletedProcess]:
    """``run(command)``: the command, as a shell would split it, in this process (``check=False`` to fail)."""

    def run_command(command: str, check: bool = True, powershell: bool = False) -> subprocess.CompletedProcess:
        argv = argv_of(command, powershell=powershell)
        if argv[0] == "transcriptformer":
            return cli(*argv[1:], check=check)
        assert argv[:2] == ["python", "finetune_lora.py"], argv
        module = _finetune_lora_module()
        with pytest.MonkeyPatch.context() as m:  # the script's `transcriptformer finetune`, through the fixture
            m.setattr(transcriptformer.cli, "main", lambda args: cli(*args, check=check).returncode)
            code = module.main(argv[2:])
        assert code == 0 or not check, code
        return subprocess.CompletedProcess(argv, code)

    return run_command


# ------------------------------------------------------------------ the stand-ins: data files and tarballs


def _human_only(demo: Path, dest: Path) -> Path:
    """A copy of the demo model without its mouse genes (as TF-Sapiens is to the multi-species models)."""
    shutil.copytree(demo, dest, copy_function=shutil.copyfile)
    (dest / "vocabs" / "mus_musculus_gene.h5").unlink()
    config = json.loads((dest / "config.json").read_text())
    data = config["model"]["data_config"]
    data["esm2_mappings"] = ["homo_sapiens_gene.h5"]
    with h5py.File(demo / "vocabs" / "homo_sapiens_gene.h5") as f:
        keep = len(data["special_tokens"]) + len(f["keys"])  # the vocabulary: special tokens, then the tables
    (dest / "config.json").write_text(json.dumps(config, indent=1))
    state = torch.load(demo / "model_weights.pt", weights_only=True)
    size = state["gene_embeddings.embedding.weight"].shape[0]
    state = {k: v[:keep].clone() if v.shape and v.shape[0] == size else v for k, v in state.items()}
    torch.save(state, dest / "model_weights.pt")
    return dest


class Site:
    """A working folder where the README's data paths exist, and the stand-in artifacts (and their tarballs)."""

    def __init__(self, root: Path) -> None:
        demo = tfs.models.path("tf-demo")
        self.root = root
        self.models = root / "artifacts"
        self.sapiens = _human_only(demo, self.models / "tf_sapiens")
        self.embeddings = self.models / "all_embeddings"
        self.embeddings.mkdir()
        for species in ("homo_sapiens", "mus_musculus"):
            shutil.copyfile(demo / "vocabs" / f"{species}_gene.h5", self.embeddings / f"{species}_gene.h5")
        tarballs = {
            "tf_sapiens.tar.gz": folder_entries(self.sapiens, "tf_sapiens"),
            "tf_exemplar.tar.gz": folder_entries(demo, "tf_exemplar"),
            "tf_metazoa.tar.gz": folder_entries(demo, "tf_metazoa"),
            "all_embeddings.tar.gz": folder_entries(self.embeddings, "all_embeddings"),
        }
        self.tarballs = {name: tar_bytes(entries, compresslevel=1) for name, entries in tarballs.items()}
        pbmc = tfs.datasets.pbmc68k_counts()
        pbmc.obs["cell_type"] = pbmc.obs["bulk_labels"]
        self.work = root / "work"
        (self.work / "test" / "data").mkdir(parents=True)
        self.human = pbmc[:N_CELLS].copy()
        self.human.write_h5ad(self.work / "test" / "data" / "human_val.h5ad")
        tfs.datasets.mouse_val()[:N_CELLS].copy().write_h5ad(self.work / "test" / "data" / "mouse_val.h5ad")
        (self.work / "path" / "to").mkdir(parents=True)
        pbmc[N_CELLS : N_CELLS + 4].copy().write_h5ad(self.work / "path" / "to" / "train.h5ad")
        (self.work / "data").mkdir()
        shutil.copyfile(self.work / "test" / "data" / "human_val.h5ad", self.work / "data" / "huge.h5ad")
        # what the downloads put there (the inference tests do not depend on the download test)
        shutil.copytree(self.sapiens, self.work / "checkpoints" / "tf_sapiens")
        shutil.copytree(self.embeddings, self.work / "checkpoints" / "all_embeddings")

    def data_folder(self, dest: Path) -> None:
        """The README's data paths under ``dest``."""
        shutil.copytree(self.work / "test", dest / "test")


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Site:
    return Site(tmp_path_factory.mktemp("published-readme"))


@pytest.fixture
def server(site, monkeypatch):
    """The stand-in artifacts served on 127.0.0.1 under the published names; no proxy, no other server."""
    for var in PROXY_VARIABLES:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    served = RegistryServer(site.tarballs)
    monkeypatch.setenv("TRANSCRIPTFORMER_BASE_URL", served.url)
    yield served
    served.close()


@pytest.fixture
def in_site(site, monkeypatch) -> Path:
    monkeypatch.chdir(site.work)
    return site.work


def _embeddings(path: str | Path = "inference_results/embeddings.h5ad") -> ad.AnnData:
    return ad.read_h5ad(path)


# ------------------------------------------------------------------ README


def test_download_commands(site, server, tmp_path, monkeypatch, run):
    monkeypatch.chdir(tmp_path)
    for command in README_DOWNLOAD:
        run(command)
    for folder in ("tf_sapiens", "tf_exemplar", "tf_metazoa", "all_embeddings"):
        assert (tmp_path / "checkpoints" / folder).is_dir(), folder
    assert (tmp_path / "custom" / "dir" / "tf_sapiens" / "model_weights.pt").is_file()
    for name in ("tf_sapiens", "tf_exemplar", "tf_metazoa", "all_embeddings"):  # `all` reused what was there
        assert server.requests.count(f"/weights/{name}.tar.gz") == (2 if name == "tf_sapiens" else 1), name
    sapiens = transcriptformer.load_model(tmp_path / "checkpoints" / "tf_sapiens")
    assert len(sapiens.vocab) == len(transcriptformer.load_model(site.sapiens).vocab)
    assert (tmp_path / "checkpoints" / "all_embeddings" / "mus_musculus_gene.h5").is_file()


def test_inference_in_distribution(site, in_site, run):
    run(README_INFERENCE_HUMAN)
    out = _embeddings()
    assert out.obsm["embeddings"].shape == (N_CELLS, 64) and np.isfinite(out.obsm["embeddings"]).all()
    assert list(out.obs_names) == list(site.human.obs_names)
    assert out.uns["transcriptformer"]["params"]["batch_size"] == 8


def test_inference_out_of_distribution(in_site, run):
    """Mouse cells and the human-only model: the README's --pretrained-embedding supplies the mouse genes."""
    without = argv_of(README_INFERENCE_MOUSE)
    i = without.index("--pretrained-embedding")
    del without[i : i + 2]
    proc = run(shlex.join(without), check=False)
    assert proc.returncode == 1 and "none of the" in proc.stderr and "genes" in proc.stderr, proc.stderr
    run(README_INFERENCE_MOUSE)
    out = _embeddings()
    assert out.obsm["embeddings"].shape == (N_CELLS, 64) and np.isfinite(out.obsm["embeddings"]).all()
    params = out.uns["transcriptformer"]["params"]
    assert [Path(p).name for p in params["species_embedding"]] == ["mus_musculus_gene.h5"]
    assert params["n_genes_matched"] > 0


def test_config_override(in_site, run):
    run(README_CONFIG_OVERRIDE)
    out = _embeddings()
    assert list(out.obs.columns) == ["cell_type"]  # model.inference_config.obs_keys.0=cell_type
    assert out.uns["transcriptformer"]["params"]["normalize_to_scale"] == 10000
    run(README_INFERENCE_HUMAN)
    assert not np.allclose(_embeddings().obsm["embeddings"], out.obsm["embeddings"])  # the rescaling mattered


def test_help_commands(run):
    for command, flag in zip(README_HELP, ("--checkpoint-path", "--checkpoint-dir"), strict=True):
        proc = run(command)
        assert proc.returncode == 0 and flag in proc.stdout, command


def test_lora_example(in_site, run, capsys):
    run(README_LORA)
    # where the published script writes without --output-path: lora_weights.pt in the current folder
    tensors = torch.load(in_site / "lora_weights.pt", weights_only=True)
    assert tensors and all("lora_" in name for name in tensors)
    folder = in_site / "lora_weights"
    assert not (folder / "model_weights.pt").exists()  # only the adapter is saved
    info = json.loads((folder / "transcriptformer_adapter.json").read_text())
    assert info["lora_r"] == 4 and info["lora_alpha"] == 16
    assert info["target_modules"] == ["linear1", "linear2", "linears"]
    # 24 adapted layers: PEFT writes 20 or more as their endings ("linear1", "linears.0", ...), which load too
    assert "linear1" in json.loads((folder / "adapter_config.json").read_text())["target_modules"]
    tuned = transcriptformer.load_model("./checkpoints/tf_sapiens", adapter="lora_weights")
    assert tuned.adapter is not None
    # the same command again: the earlier adapter is kept, and the message says what to pass
    assert run(README_LORA, check=False).returncode == 1
    assert "--output-path" in capsys.readouterr().err
    assert torch.load(in_site / "lora_weights.pt", weights_only=True).keys() == tensors.keys()


def test_finetune_lora_runs_as_a_script():
    proc = subprocess.run(
        [sys.executable, "finetune_lora.py", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    for flag in ("--checkpoint-path", "--train-files", "--lora-target-modules", "--output-path", "--devices"):
        assert flag in proc.stdout, flag


def test_finetune_lora_maps_the_published_flags():
    module = _finetune_lora_module()
    args, extra = module.build_parser().parse_known_args(
        [*argv_of(README_LORA)[2:], "--devices", "0", "--precision", "16-mixed", "--learning-rate", "1e-4"]
    )
    folder, file = module.outputs(args)
    argv = module.finetune_argv(args, folder, extra)
    assert (folder, file) == (Path("lora_weights"), Path("lora_weights.pt"))
    assert argv[argv.index("--device") + 1] == "cpu" and argv[argv.index("--precision") + 1] == "16-mixed"
    assert argv[-2:] == ["--learning-rate", "1e-4"]  # other flags of `transcriptformer finetune` pass on
    args, _ = module.build_parser().parse_known_args([*argv_of(README_LORA)[2:], "--output-path", "adapters"])
    assert module.outputs(args) == (Path("adapters"), None)
    assert module._device("1") == "cuda" and module._device("cuda:1") == "cuda:1"


def test_windows_quick_start(site, server, tmp_path, monkeypatch, run):
    """The quick-start's three environment variables set during its smoke test; nothing here needs them."""
    variables = {}
    for line in README_WINDOWS_ENV.splitlines():
        name, value = line.split("#")[0].split("=")
        variables[name.strip().removeprefix("$env:")] = value.strip().strip("'")
    assert variables == {
        "TORCH_COMPILE": "0",
        "TORCHDYNAMO_DISABLE": "1",
        "TORCH_NN_FLEX_ATTENTION_DISABLE_COMPILE": "1",
    }
    site.data_folder(tmp_path)
    monkeypatch.chdir(tmp_path)
    plain = None
    for env in ({}, variables):
        with monkeypatch.context() as m:
            for name, value in env.items():
                m.setenv(name, value)
            for command in README_WINDOWS_SMOKE:
                run(command, powershell=True)
        out = _embeddings("inference_smoke/embeddings.h5ad")
        assert out.n_obs == N_CELLS and out.uns["transcriptformer"]["params"]["attention"] == "chunked"
        if plain is None:
            plain = out.obsm["embeddings"]
    np.testing.assert_array_equal(out.obsm["embeddings"], plain)


def test_flex_probe_with_compile_switched_off(monkeypatch):
    """With TORCHDYNAMO_DISABLE=1 torch.compile returns flex_attention uncompiled: the probe must say no.

    Uncompiled flex_attention runs, and agrees with the chunked kernel, but holds every attention score in memory;
    attention="auto" must not pick it on CUDA (where the probe runs), so the probe refuses before trying.
    """
    from transcriptformer.inference.devices import _probe_flex

    monkeypatch.setenv("TORCHDYNAMO_DISABLE", "1")
    assert _probe_flex(torch.device("cpu")) is None


# ------------------------------------------------------------------ PyPI 0.6.1's README


def test_pypi_061_inference_commands(in_site, run):
    cge, gpus, oom, cge_file = PYPI_061_INFERENCE
    run(cge)
    out = _embeddings()
    assert out.uns["cge_embeddings"].shape[0] == len(out.uns["cge_cell_indices"]) > N_CELLS
    run(gpus)
    assert _embeddings().obsm["embeddings"].shape == (N_CELLS, 64)
    run(oom)  # --oom-dataloader, --n-data-workers 4 and --num-gpus 8: accepted, without effect
    params = _embeddings().uns["transcriptformer"]["params"]
    assert params["n_data_workers"] == 4 and Path(params["data_file"][0]).name == "huge.h5ad"
    run(cge_file)
    assert "cge_gene_names" in ad.read_h5ad("inference_results/cge_embeddings.h5ad").uns


def test_pypi_061_download_data(site, tmp_path, monkeypatch, run):
    """The CELLxGENE Discover downloads, against a stand-in for its API on 127.0.0.1 serving two small datasets."""
    from transcriptformer.data import discover

    files = {}
    records = []
    for dataset, (label, term) in {
        "human-1": ("Homo sapiens", "NCBITaxon:9606"),
        "mouse-1": ("Mus musculus", "NCBITaxon:10090"),
    }.items():
        data = (site.work / "test" / "data" / f"{'human' if 'human' in dataset else 'mouse'}_val.h5ad").read_bytes()
        files[f"files/{dataset}.h5ad"] = data
        records.append({
            "dataset_id": dataset, "dataset_version_id": f"{dataset}-v1", "collection_id": "c", "collection_name": "C",
            "title": dataset, "organism": [{"label": label, "ontology_term_id": term}], "is_primary_data": [True],
            "cell_count": N_CELLS, "tissue": [], "assets": [{"filetype": "H5AD", "filesize": len(data), "url": ""}],
        })  # fmt: skip
    api = RegistryServer(files, prefix="/")
    for record in records:
        record["assets"][0]["url"] = f"{api.url}files/{record['dataset_id']}.h5ad"
    api.files["curation/v1/datasets"] = json.dumps(records).encode()
    for var in PROXY_VARIABLES:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv(discover.API_URL_ENV, api.url.rstrip("/"))
    monkeypatch.chdir(tmp_path)
    try:
        for command in PYPI_061_DOWNLOAD_DATA:
            run(command)
    finally:
        api.close()
    assert (tmp_path / "data" / "human" / "human-1" / "full.h5ad").read_bytes() == files["files/human-1.h5ad"]
    assert (tmp_path / "data" / "human" / "human-1" / "__success__").exists()
    assert (tmp_path / "data" / "human" / "dataset_metadata.json").is_file()
    assert {p.name for p in (tmp_path / "data" / "multi_species").iterdir() if p.is_dir()} == {"human-1", "mouse-1"}
    proc = run(PYPI_061_HELP)
    assert "--species" in proc.stdout and "--no-metadata" in proc.stdout


def test_pypi_061_commands_not_supported(in_site, run):
    for command in PYPI_061_UNSUPPORTED:
        proc = run(command, check=False)
        assert proc.returncode == 2 and "invalid choice" in proc.stderr, (command, proc.stderr)
    # the README's `python -m transcriptformer.data.bulk_download ...`: `transcriptformer download-data` here
    module = argv_of(PYPI_061_MODULE)[2]
    assert importlib.util.find_spec(module) is None


def test_n_data_workers_is_checked(in_site, run):
    proc = run("transcriptformer inference --checkpoint-path x --data-file y --n-data-workers -1", check=False)
    assert proc.returncode == 2 and "--n-data-workers" in proc.stderr
