"""The repository is consistent with itself: pins agree, mmer/ is what the notebooks export, notebooks are
clean, every name params.yaml uses resolves, and the package imports."""
import os
import shutil
import subprocess
import sys
from configparser import ConfigParser
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _settings():
    cfg = ConfigParser(delimiters=["="])
    cfg.read(ROOT / "settings.ini")
    return cfg["DEFAULT"]


def test_environment_yml_pins_match_settings():
    s = _settings()
    pip_path = s["requirements"].split() + s["dev_requirements"].split()
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    conda_pins = [p for p in pip_section if not p.startswith("-e")]
    assert sorted(conda_pins) == sorted(pip_path), (
        f"environment.yml and settings.ini disagree: only in environment.yml {sorted(set(conda_pins) - set(pip_path))}, "
        f"only in settings.ini {sorted(set(pip_path) - set(conda_pins))}")
    assert "torch==2.13.0" in pip_path


def test_settings_keep_papermill_parameters_tag():
    assert _settings()["allowed_cell_metadata_keys"].split() == ["tags"]


def _nbdev(cmd, cwd):
    "Run an nbdev command; without IN_TEST, which the in-process notebook tests set and nbdev_export obeys by doing nothing."
    env = {k: v for k, v in os.environ.items() if k != "IN_TEST"}
    subprocess.run([str(BIN / cmd)], cwd=cwd, env=env, check=True, capture_output=True)


def _copy_project(tmp_path):
    for name in ("settings.ini", "setup.py"):
        shutil.copy(ROOT / name, tmp_path / name)
    shutil.copytree(ROOT / "nbs", tmp_path / "nbs")
    shutil.copytree(ROOT / "mmer", tmp_path / "mmer")
    return tmp_path


def test_mmer_is_in_sync_with_the_notebooks(tmp_path):
    proj = _copy_project(tmp_path)
    for py in (proj / "mmer").rglob("*.py"):
        if py.name != "__init__.py": py.unlink()
    _nbdev("nbdev_export", proj)
    ours = {p.relative_to(ROOT / "mmer"): p.read_text() for p in (ROOT / "mmer").rglob("*.py")}
    theirs = {p.relative_to(proj / "mmer"): p.read_text() for p in (proj / "mmer").rglob("*.py")}
    assert set(ours) == set(theirs), f"files differ: {sorted(set(ours) ^ set(theirs))}"
    stale = [str(k) for k in ours if ours[k] != theirs[k]]
    assert not stale, f"mmer/ was edited by hand or not re-exported (run nbdev_export): {stale}"


def test_notebooks_are_clean(tmp_path):
    proj = _copy_project(tmp_path)
    _nbdev("nbdev_clean", proj)
    dirty = [str(p.relative_to(ROOT)) for p in (ROOT / "nbs").rglob("*.ipynb")
             if ".ipynb_checkpoints" not in p.parts and p.read_bytes() != (proj / p.relative_to(ROOT)).read_bytes()]
    assert not dirty, f"run nbdev_clean: {dirty}"


def test_experiment_notebooks_have_a_parameters_cell():
    import json
    for nb in (ROOT / "nbs" / "experiments").glob("*.ipynb"):
        cells = json.loads(nb.read_text())["cells"]
        assert any("parameters" in c.get("metadata", {}).get("tags", []) for c in cells), f"{nb.name}: no cell tagged 'parameters'"


def test_every_name_in_params_resolves():
    from mmer.core import MODELS
    from mmer.encoders import ENCODERS
    import mmer.models.baseline, mmer.models.fdrl, mmer.models.mgcma, mmer.models.layer_adapter_mf  # noqa: F401  (register)
    import mmer.models.tdmer  # noqa: F401
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for where, encoders in (("encoders", params["encoders"]), ("layer_adapter.encoders", params["layer_adapter"]["encoders"])):
        for modality in ("speech", "text", "context"):
            if modality not in encoders: continue
            name = encoders[modality]["name"]
            assert name in ENCODERS, f"params.yaml {where}.{modality}.name {name!r} is not a registered offline encoder"
    for section in ("baseline", "fdrl", "mgcma", "tdmer"):
        assert section in MODELS, f"params.yaml section {section!r} has no registered model"
    from mmer.experiment import variant_config
    dims = {"speech": 8, "text": 8, "context": 8}
    for section, model in (("fdrl", "fdrl"), ("mgcma", "mgcma"), ("layer_adapter", "layer_adapter_mf")):
        extra = {"num_hidden_states": {m: 3 for m in dims}} if section == "layer_adapter" else {}
        for name, variant in params[section]["variants"].items():
            config = variant_config(params[section], variant or {})
            MODELS.get(model)(4, dims, config["modalities"], **extra, **config["model"])  # every row builds


def test_tdmer_section_resolves():
    "Every TDMER row builds (embedded and paper profiles), uses real switches; the embedded data's defaults agree."
    from mmer.core import MODELS, resolve_profile
    from mmer.experiment import variant_config
    from mmer.models.tdmer import ABLATIONS, TDMERObjective, build_tdmer
    from mmer.data.mosi import MODALITIES
    from mmer.data.mosi_synth import CONVENTIONS, DEFAULT_EVIDENCE, Evidence
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert "tdmer" in MODELS
    dims = {"text": 12, "audio": 5, "vision": 7}
    used = set()
    for profile in ("embedded", "paper"):
        section = resolve_profile({**params, "profile": profile})["tdmer"]
        assert set(section["data"]["datasets"]) <= set(CONVENTIONS), section["data"]["datasets"]
        for name, variant in section["variants"].items():
            config = variant_config(section, variant or {})
            assert config["modalities"] and set(config["modalities"]) <= set(MODALITIES), (name, config["modalities"])
            model, loss_fn, callbacks = build_tdmer(config, dims)         # every row builds, loss options included
            assert isinstance(loss_fn, TDMERObjective) and callbacks == []
            used |= {k for k, v in config["model"].items() if k.startswith("use_") and v is False}
    assert used == set(ABLATIONS), f"switches without a row: {set(ABLATIONS) - used}; unknown: {used - set(ABLATIONS)}"
    evidence = params["tdmer"]["data"]["embedded"]["evidence"]
    assert {m: Evidence(**e) for m, e in evidence.items()} == DEFAULT_EVIDENCE, "params.yaml evidence != the generator's"


def test_package_imports_with_declared_dependencies():
    out = subprocess.run([sys.executable, "-c", "import mmer, mmer.train, mmer.report, mmer.data.corpus; print(mmer.__version__)"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == _settings()["version"]
