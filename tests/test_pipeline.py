"""Integration: the whole DVC pipeline on a very small configuration, in a scratch copy of the project.

Small = 2 sessions of a small embedded corpus, 2 folds, 1-2 epochs. Checks that every stage runs through
papermill, that tables and figures are written with the right rows and captions, that a second `dvc repro` does
nothing, that every module a stage's processes actually import is in its code fingerprint, and that a change
re-runs exactly the stages that read it.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow

# Loaded by every Python process of the pipeline (PYTHONPATH): at exit, record which mmer modules the process imported
# and for which DVC stage, so that the test can hold them against the stage's code fingerprint.
TRACER = """
import atexit, json, os, sys
def _log():
    path = os.environ.get("MMER_IMPORT_LOG")
    if path and os.environ.get("DVC_STAGE"):
        with open(path, "a") as f:
            f.write(json.dumps({"stage": os.environ["DVC_STAGE"], "modules": sorted(m for m in sys.modules if m == "mmer" or m.startswith("mmer."))}) + "\\n")
atexit.register(_log)
"""


def small_params() -> dict:
    p = yaml.safe_load((ROOT / "params.yaml").read_text())
    p["data"]["embedded"].update(sessions=2, per_speaker={"ang": 4, "hap": 2, "exc": 2, "sad": 4, "neu": 4, "fru": 1, "xxx": 1})
    p["data"]["folds"] = [1, 2]
    p["data"]["meld"]["embedded"]["per_class"] = 2
    p["data"]["val_fraction"] = 0.25
    for m in ("speech", "text"):
        p["encoders"]["adapt"][m]["epochs"] = 1
    p["baseline"]["train"]["epochs"] = 2
    p["fdrl"]["train"]["epochs"] = 2
    p["mgcma"]["train"]["epochs"] = 2
    p["layer_adapter"]["encoders"]["adapt"]["context"]["epochs"] = 1
    p["layer_adapter"]["train"]["epochs"] = 2
    p["wavfusion"]["data"]["protocol"] = "loso"                                     # 2 sessions: test on session 2
    p["wavfusion"]["runs"] = {"iemocap2": {"corpus": "iemocap", "fold": 2}, "meld": {"corpus": "meld", "fold": 0}}
    p["wavfusion"]["encoders"]["adapt"] = {"text": None, "speech": {"epochs": 1, "lr": 0.001, "batch_size": 8}}
    p["wavfusion"]["train"]["epochs"] = 1
    p["tdmer"]["data"]["embedded"]["sizes"] = {"train": 32, "valid": 12, "test": 16}
    p["tdmer"]["seeds"] = [0, 1]
    p["tdmer"]["train"]["epochs"] = 1
    return p


def run(cmd, cwd, extra_env=None, **kw):
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "HF_HUB_OFFLINE": "1", "DVC_NO_ANALYTICS": "1", **(extra_env or {})}
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, **kw)
    assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    return r


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    proj = tmp_path_factory.mktemp("proj")
    for name in ("dvc.yaml", "settings.ini", ".dvcignore"):
        shutil.copy(ROOT / name, proj / name)
    shutil.copytree(ROOT / "nbs" / "experiments", proj / "nbs" / "experiments")
    shutil.copytree(ROOT / "mmer", proj / "mmer", ignore=shutil.ignore_patterns("__pycache__"))
    (proj / "params.yaml").write_text(yaml.safe_dump(small_params(), sort_keys=False))
    run(["dvc", "init", "--no-scm", "-q"], proj)
    run(["dvc", "config", "core.analytics", "false"], proj)
    tracer = proj.parent / "tracer"; tracer.mkdir(); (tracer / "sitecustomize.py").write_text(TRACER)
    run(["dvc", "repro"], proj, timeout=900, extra_env={"PYTHONPATH": str(tracer), "MMER_IMPORT_LOG": str(proj.parent / "imports.jsonl")})
    return proj


def test_tables_and_figures_are_written(project):
    md = (project / "results" / "tables" / "baseline.md").read_text()
    assert "NOT IEMOCAP" in md and "tiny-wav2vec2" in md
    summary = pd.read_csv(project / "results" / "tables" / "baseline.csv")
    assert set(summary["variant"]) == {"fused", "speech_only", "text_only", "finetuned_speech", "finetuned_text"}
    assert (summary["folds"] == 2).all()
    assert summary["ua_mean"].between(0, 100).all()
    for fig in ("baseline_confusion", "baseline_curves", "encoders_adaptation_curves"):
        assert (project / "results" / "figures" / f"{fig}.png").read_bytes()[:4] == b"\x89PNG"
    metrics = json.loads((project / "results" / "metrics" / "baseline.json").read_text())
    assert set(metrics["fused"]) == {"wa", "ua", "f1_macro", "f1_weighted"}


def test_fdrl_tables_and_figures_are_written(project):
    t2 = pd.read_csv(project / "results" / "tables" / "fdrl_table2.csv")
    params = small_params()
    assert list(t2["variant"]) == list(params["fdrl"]["variants"])      # every ablation row is filled
    assert (t2["folds"] == 2).all()
    md = (project / "results" / "tables" / "fdrl_table2.md").read_text()
    assert "NOT IEMOCAP" in md and "| S0 FDRL |" in md and "79.44" in md   # ours beside the paper's
    assert "78.34" in (project / "results" / "tables" / "fdrl_table1.md").read_text()
    for fig in ("fdrl_fig3a_tsne", "fdrl_fig3b_centroids", "fdrl_mu", "fdrl_curves"):
        assert (project / "results" / "figures" / f"{fig}.png").read_bytes()[:4] == b"\x89PNG"
    hist = pd.read_csv(project / "results" / "fdrl" / "fold1" / "S0" / "history.csv")
    assert {"train_task", "train_global", "train_local", "train_modality", "train_orth", "train_predictor", "mu"} <= set(hist.columns)
    assert "seconds" not in hist.columns                                             # wall times live in results/timing
    s1 = pd.read_csv(project / "results" / "fdrl" / "fold1" / "S1" / "history.csv")
    assert (s1["train_global"] == 0).all() and (s1["train_modality"] == 0).all()     # the switch removed the terms


def test_mgcma_tables_and_figures_are_written(project):
    params = small_params()
    t2 = pd.read_csv(project / "results" / "tables" / "mgcma_table2.csv")
    t3 = pd.read_csv(project / "results" / "tables" / "mgcma_table3.csv")
    assert set(t2["variant"]) | set(t3["variant"]) == set(params["mgcma"]["variants"])   # every row of Tables II-III
    assert "80.24" in (project / "results" / "tables" / "mgcma_table1.md").read_text()
    assert "DAM + IAM + TAM" in (project / "results" / "tables" / "mgcma_table3.md").read_text()
    for fig in ("mgcma_fig3_tsne", "mgcma_curves"):
        assert (project / "results" / "figures" / f"{fig}.png").read_bytes()[:4] == b"\x89PNG"
    s4 = pd.read_csv(project / "results" / "mgcma" / "fold1" / "S4" / "history.csv")
    assert (s4["train_dist"] == 0).all() and (s4["train_inst"] == 0).all()        # no module, no alignment loss


def test_layer_adapter_tables_figures_and_asr(project):
    params = small_params()
    t1 = pd.read_csv(project / "results" / "tables" / "layer_adapter_table1.csv")
    t2 = pd.read_csv(project / "results" / "tables" / "layer_adapter_table2.csv")
    assert len(t2) == 16 and (t2["folds"] == 2).all()                                   # every cell of Table II
    assert set(t1["variant"]) | set(t2["variant"]) == set(params["layer_adapter"]["variants"])
    md = (project / "results" / "tables" / "layer_adapter_table2.md").read_text()
    assert "NOT IEMOCAP" in md and "| Speech + Text + Context / MF + LA |" in md and "77.73" in md and "WER" in md
    assert "SAMS" in (project / "results" / "tables" / "layer_adapter_table1.md").read_text()
    wer = json.loads((project / "results" / "asr" / "wer.json").read_text())
    assert 0.2 < wer["overall"]["wer"] < 0.45 and "simulated" in wer["engine"]
    transcripts = pd.read_csv(project / "data" / "asr" / "transcripts.csv", keep_default_na=False)
    assert (transcripts["reference"] != transcripts["hypothesis"]).mean() > 0.5
    for fig in ("layer_adapter_fig2_tsne", "layer_adapter_layer_weights", "layer_adapter_curves"):
        assert (project / "results" / "figures" / f"{fig}.png").read_bytes()[:4] == b"\x89PNG"
    w = json.loads((project / "results" / "layer_adapter" / "fold1" / "speech_text_context__mf_la" / "layer_weights.json").read_text())
    assert set(w) == {"speech", "text"} and abs(sum(w["speech"]) - 1) < 1e-5 and len(w["speech"]) == 4   # 4 tiny layers
    assert not (project / "results" / "layer_adapter" / "fold1" / "speech_text__none" / "layer_weights.json").exists()
    assert {"speech.json", "text.json", "context.json"} <= {p.name for p in (project / "data" / "features_la" / "fold1").iterdir()}


def test_every_fold_writes_predictions_of_its_own_session_only(project):
    from mmer.data.iemocap import read_iemocap
    df = read_iemocap(project / "data" / "embedded" / "IEMOCAP_full_release", classes=4)
    for fold in (1, 2):
        preds = pd.read_csv(project / "results" / "baseline" / f"fold{fold}" / "fused" / "test_predictions.csv")
        sessions = set(df.set_index("utt_id").loc[preds["utt_id"], "session"])
        assert sessions == {fold}
        assert len(preds) == (df["session"] == fold).sum()
        assert (project / "runs" / "executed" / f"baseline_fold{fold}.ipynb").exists()   # ran through papermill


def test_second_repro_does_nothing(project):
    out = run(["dvc", "repro"], project, timeout=120).stdout
    assert "didn't change, skipping" in out or "Data and pipelines are up to date" in out, out
    assert "Running stage" not in out, out


def test_bench_measures_every_paper_from_the_pipelines_caches(project):
    out = project / "bench.json"
    run([sys.executable, "-m", "mmer.bench", "--fold", "2", "--repeats", "1", "--json", str(out)], project, timeout=900,
        extra_env={"PYTHONPATH": str(project)})
    rows = {r["paper"]: r for r in json.loads(out.read_text())}
    assert set(rows) == {"baseline", "fdrl", "mgcma", "layer_adapter", "wavfusion", "tdmer"}, rows
    for paper, r in rows.items():
        assert r["bare_epoch_s"] > 0 and r["fit_epoch_s"] > 0 and r["peak_memory_mb"] > 0, r
        if paper == "tdmer": assert "live_epoch_s" not in r, r                    # given features: nothing to run live
        else: assert r["live_epoch_s"] > r["bare_epoch_s"], r                      # running the encoders costs more than the cache
    assert rows["wavfusion"]["live"] == ["speech", "text"], rows["wavfusion"]      # video stays cached


def test_every_stage_records_its_wall_time(project):
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    for stage in lock:
        if stage == "code": continue
        record = json.loads((project / "results" / "timing" / f"{stage}.json").read_text())
        assert record["stage"] == stage and record["exit_code"] == 0 and record["wall_seconds"] > 0, record
    details = json.loads((project / "results" / "timing" / "fdrl@1.json").read_text())["details"]
    assert set(details["variants"]) == set(small_params()["fdrl"]["variants"]) and details["workers"] >= 1


def test_modules_imported_at_run_time_are_in_the_stage_code_fingerprint(project):
    "Every mmer module a stage's processes imported (traced at exit) is listed in results/code/<stage>.txt."
    log = [json.loads(line) for line in (project.parent / "imports.jsonl").read_text().splitlines()]
    seen = {}
    for entry in log: seen.setdefault(entry["stage"].split("@")[0], set()).update(entry["modules"])
    assert {"corpus", "encoders", "fdrl", "mgcma", "layer_adapter", "report_fdrl"} <= set(seen), sorted(seen)
    from mmer.pipeline import fingerprint_name, stage_entries
    entries = stage_entries(project / "dvc.yaml")
    for stage, modules in seen.items():
        if stage not in entries: continue                                            # the `code` stage itself
        code_file = project / "results" / "code" / f"{fingerprint_name(entries[stage])}.txt"
        listed = {line.split()[1] for line in code_file.read_text().splitlines() if not line.startswith("#")}
        as_files = {f"mmer/{m[5:].replace('.', '/')}.py" if f"mmer/{m[5:].replace('.', '/')}.py" in listed else
                    f"mmer/{m[5:].replace('.', '/')}/__init__.py" for m in modules if m != "mmer"} | {"mmer/__init__.py"}
        missing = sorted(as_files - listed)
        assert not missing, f"stage {stage} imported {missing}, which its code fingerprint does not cover"


def _stale(project) -> set[str]:
    st = json.loads(run(["dvc", "status", "--json"], project).stdout or "{}")
    return {name for name, changes in st.items()
            if any(isinstance(c, dict) and (c.get("changed deps") or c.get("changed params")) for c in changes)}


def test_a_params_change_makes_exactly_its_readers_stale(project):
    original = (project / "params.yaml").read_text()
    try:
        for key_path, readers in (("profiles.paper.layer_adapter.train.epochs", {"la_encoders@1", "la_encoders@2", "layer_adapter@1",
                                                                                  "layer_adapter@2", "report_layer_adapter"}),
                                  ("fdrl.train.epochs", {"fdrl@1", "fdrl@2", "report_fdrl"})):
            params = yaml.safe_load(original)
            *parents, leaf = key_path.split(".")
            node = params
            for k in parents: node = node[k]
            node[leaf] = node[leaf] + 1
            (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
            assert _stale(project) == readers, key_path
    finally:
        (project / "params.yaml").write_text(original)
    assert _stale(project) == set()


def test_code_changes_rerun_exactly_the_stages_that_import_them(project):
    fdrl, mgcma = project / "mmer" / "models" / "fdrl.py", project / "mmer" / "models" / "mgcma.py"
    originals = {p: p.read_text() for p in (fdrl, mgcma)}
    try:
        # a new cell id in nbdev's markers and a comment: only the `code` stage runs, every other stage is up to date
        fdrl.write_text(originals[fdrl].replace("# %% ../../nbs/51_fdrl.ipynb #", "# %% ../../nbs/51_fdrl.ipynb #f", 1) + "# a comment\n")
        out = run(["dvc", "repro"], project, timeout=300).stdout
        assert "Running stage 'code'" in out and out.count("Running stage") == 1, out
        # a change to MGCMA's code makes exactly the MGCMA experiment stages stale (not its report, not FDRL)
        mgcma.write_text(originals[mgcma] + "\nRECOMPUTED = True\n")
        run(["dvc", "repro", "code"], project, timeout=120)
        assert _stale(project) == {"mgcma@1", "mgcma@2"}
    finally:
        for p, text in originals.items(): p.write_text(text)
        run(["dvc", "repro", "code"], project, timeout=120)
    assert _stale(project) == set()


def finetune_params_file(tmp_path, section: str, project: Path) -> Path:
    "The small params with encoders.finetune on (the papers' setting) and one epoch for `section` (data paths: `project`'s)."
    params = small_params()
    params["data"]["embedded"]["out"] = str(project / "data" / "embedded")     # relative paths are relative to the file
    params["encoders"]["finetune"] = True
    params[section]["train"]["epochs"] = 1
    pfile = tmp_path / "params.yaml"
    pfile.write_text(yaml.safe_dump(params, sort_keys=False))
    return pfile


def papermill(project, notebook: str, out, variants=None, **parameters):
    "Execute nbs/experiments/<notebook> with papermill in `project`, with `parameters` (and a variants list)."
    cmd = ["papermill", "--no-progress-bar", "-k", "python3", "--language", "python", str(project / "nbs" / "experiments" / notebook), str(out)]
    for key, value in {**parameters, "progress": False}.items(): cmd += ["-p", key, str(value)]
    return run(cmd + (["-y", f"variants: {variants}"] if variants else []), project, timeout=600)


def test_finetune_mode_trains_live_encoders_through_papermill(project, tmp_path):
    "encoders.finetune: true (the papers' setting) fine-tunes fresh encoders with the model instead of reading the cache."
    out = tmp_path / "results"
    papermill(project, "fdrl.ipynb", tmp_path / "fdrl.ipynb", ["S0"], fold=1, params_file=finetune_params_file(tmp_path, "fdrl", project),
              features_dir=tmp_path / "no_cache", out_dir=out, runs_dir=tmp_path / "runs")
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"S0"} and 0 <= metrics["S0"]["ua"] <= 1
    ckpt = __import__("torch").load(tmp_path / "runs" / "S0" / "checkpoint.pt", weights_only=False)
    assert any(k.startswith("inputs.encoders.speech.") for k in ckpt["model"]), "the live speech encoder is part of the trained model"
    assert any(k.startswith("inputs.encoders.text.") for k in ckpt["model"])


def test_layer_adapter_paper_mode_caches_only_the_frozen_context(project, tmp_path):
    "Fine-tuning (the paper's setting): WavLM and RoBERTa train live with the model, Whisper's states come from the cache."
    pfile, feats = finetune_params_file(tmp_path, "layer_adapter", project), tmp_path / "features"
    transcripts = project / "data" / "asr" / "transcripts.csv"
    papermill(project, "encoders.ipynb", tmp_path / "enc.ipynb", fold=1, params_file=pfile, paper="layer_adapter", transcripts=transcripts,
              out_dir=tmp_path / "enc", features_dir=feats, runs_dir=tmp_path / "encruns")
    assert sorted(p.name for p in feats.iterdir()) == ["NOT_CACHED.md", "context.json"]      # the frozen input only,
    assert sorted(p.suffix for p in (feats.parent / "shared").iterdir()) == [".f16", ".json"]  # encoded once for every fold
    out = tmp_path / "results"
    papermill(project, "layer_adapter.ipynb", tmp_path / "la.ipynb", ["speech_text_context__mf_la"], fold=1, params_file=pfile,
              features_dir=feats, transcripts=transcripts, out_dir=out, runs_dir=tmp_path / "runs")
    assert 0 <= json.loads((out / "metrics.json").read_text())["speech_text_context__mf_la"]["ua"] <= 1
    keys = __import__("torch").load(tmp_path / "runs" / "speech_text_context__mf_la" / "checkpoint.pt", weights_only=False)["model"]
    assert any(k.startswith("inputs.encoders.speech.") for k in keys) and any(k.startswith("inputs.encoders.text.") for k in keys)
    assert not any(k.startswith("inputs.encoders.context.") for k in keys)                # Whisper was never run in training
