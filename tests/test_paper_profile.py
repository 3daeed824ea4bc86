"""Rehearsal of the paper profile -- what a researcher with IEMOCAP and a GPU runs -- end to end through DVC.

A small IEMOCAP-format tree (two sessions, no embedded-corpus marker, so it reads as a real release) and small local
checkpoints saved with `save_pretrained` stand in for IEMOCAP and the papers' Hugging Face ids (wav2vec2-base,
bert-base-uncased, wavlm-base, roberta-base, whisper-small.en). `data.iemocap_root` is set, so `profile: auto` picks
the paper profile: encoders fine-tuned live with each model, Whisper transcribing, Whisper's encoder frozen and
cached once for both folds. One epoch, two folds, every variant of every table.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile as sf
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow


def run(cmd, cwd, ok=True, **kw):
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "DVC_NO_ANALYTICS": "1", "MPLBACKEND": "Agg"}
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, **kw)
    if ok: assert r.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
    return r


def make_tree_and_checkpoints(base: Path) -> tuple[Path, Path]:
    "A 2-session IEMOCAP-format release without the embedded marker, and tiny checkpoints saved as the papers' ids."
    from mmer.asr import save_tiny_whisper_asr
    from mmer.data.iemocap import read_iemocap
    from mmer.data.synth import make_embedded_iemocap
    from mmer.encoders import build_encoder
    release = make_embedded_iemocap(base / "corpora", seed=5, n_sessions=2, progress=False,
                                    per_speaker=dict(ang=3, hap=2, exc=1, sad=3, neu=3, fru=1, xxx=1))
    (release / "EMBEDDED_CORPUS.md").unlink()                                   # now it reads as a real release
    texts = list(read_iemocap(release, check_counts=False)["text"])
    ckpt = base / "checkpoints"
    for name, spec in (("wav2vec2-base", {"name": "tiny-wav2vec2"}), ("wavlm-base", {"name": "tiny-wavlm"}),
                       ("bert-base-uncased", {"name": "tiny-bert", "vocab_size": 200}),
                       ("roberta-base", {"name": "tiny-roberta", "vocab_size": 200})):
        build_encoder(spec, texts=texts).save_pretrained(ckpt / name)
    save_tiny_whisper_asr(ckpt / "whisper-small.en", texts)
    return release, ckpt


def paper_params(release: Path, ckpt: Path, check_counts: bool | None = False) -> dict:
    p = yaml.safe_load((ROOT / "params.yaml").read_text())
    p["data"].update(iemocap_root=str(release), folds=[1, 2], val_fraction=0.25)
    if check_counts is not None: p["data"]["check_counts"] = check_counts
    pp = p["profiles"]["paper"]
    pp["encoders"]["speech"] = {"name": str(ckpt / "wav2vec2-base"), "config": {"mask_time_prob": 0.0}}
    pp["encoders"]["text"] = {"name": str(ckpt / "bert-base-uncased"), "max_length": 64}
    for section in ("baseline", "fdrl", "mgcma", "layer_adapter"): pp[section]["train"]["epochs"] = 1
    pp["mgcma"]["model"].update(width=64, heads=4, tam_blocks=1)                 # the tiny encoders are 64 wide
    pp["layer_adapter"]["encoders"] = {
        "speech": {"name": str(ckpt / "wavlm-base"), "config": {"num_hidden_layers": 2, "mask_time_prob": 0.0}},
        "text": {"name": str(ckpt / "roberta-base"), "max_length": 64, "config": {"num_hidden_layers": 2}},
        "context": {"name": str(ckpt / "whisper-small.en"), "config": {"encoder_layers": 2}}}
    pp["layer_adapter"]["model"].update(width=64, heads=4)
    p["asr"]["whisper"].update(name=str(ckpt / "whisper-small.en"), max_new_tokens=8)
    return p


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    base = tmp_path_factory.mktemp("paper")
    release, ckpt = make_tree_and_checkpoints(base)
    proj = base / "proj"; proj.mkdir()
    for name in ("dvc.yaml", "settings.ini", ".dvcignore"): shutil.copy(ROOT / name, proj / name)
    shutil.copytree(ROOT / "nbs" / "experiments", proj / "nbs" / "experiments")
    shutil.copytree(ROOT / "mmer", proj / "mmer", ignore=shutil.ignore_patterns("__pycache__"))
    # without the explicit switch, the published-count check refuses the small tree, naming the counts
    (proj / "params.yaml").write_text(yaml.safe_dump(paper_params(release, ckpt, check_counts=None), sort_keys=False))
    r = run([sys.executable, "-m", "mmer.data.corpus", "params.yaml"], proj, ok=False)
    assert r.returncode != 0 and "counts differ from the IEMOCAP release" in r.stderr and "check_counts" in r.stderr, r.stderr[-2000:]
    (proj / "params.yaml").write_text(yaml.safe_dump(paper_params(release, ckpt), sort_keys=False))
    run(["dvc", "init", "--no-scm", "-q"], proj)
    # the four IEMOCAP papers (WavFusion's MELD and TDMER's MOSI pickles are other corpora: their own paths)
    run(["dvc", "repro", "report_baseline", "report_fdrl", "report_mgcma", "report_layer_adapter"], proj, timeout=3000)
    return proj


def test_tables_say_paper_profile_and_iemocap(project):
    for table in ("baseline", "fdrl_table2", "mgcma_table2", "layer_adapter_table2"):
        md = (project / "results" / "tables" / f"{table}.md").read_text()
        assert "Profile: paper" in md and "IEMOCAP at" in md and "NOT IEMOCAP" not in md, table
    wer = json.loads((project / "results" / "asr" / "wer.json").read_text())
    assert "whisper" in wer["engine"] and wer["overall"]["reference_words"] > 0


def test_encoders_fine_tuned_live_frozen_context_cached_once(project):
    for fold in (1, 2):
        assert sorted(p.name for p in (project / "data" / "features" / f"fold{fold}").iterdir()) == ["NOT_CACHED.md"]
        assert sorted(p.name for p in (project / "data" / "features_la" / f"fold{fold}").iterdir()) == ["NOT_CACHED.md", "context.json"]
    shared = sorted(p.suffix for p in (project / "data" / "features_la" / "shared").iterdir())
    assert shared == [".f16", ".json"]                                           # Whisper ran once for both folds
    ckpt = torch.load(project / "runs" / "layer_adapter" / "fold1" / "speech_text_context__mf_la" / "checkpoint.pt", weights_only=False)
    keys = ckpt["model"]
    assert any(k.startswith("inputs.encoders.speech.") for k in keys) and any(k.startswith("inputs.encoders.text.") for k in keys)
    assert not any("context" in k and k.startswith("inputs.encoders.") for k in keys)          # the frozen encoder is not trained
    trainable = sum(1 for k in keys if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))
    assert len(ckpt["optimizer"]["state"]) <= trainable
    fdrl = torch.load(project / "runs" / "fdrl" / "fold2" / "S0" / "checkpoint.pt", weights_only=False)["model"]
    assert any(k.startswith("inputs.encoders.speech.model.encoder.layers.") for k in fdrl)    # wav2vec2 fine-tuned with FDRL


def test_training_batches_hold_whole_utterances(project):
    "The paper profile trains on whole utterances: no adaptation-stage crop reaches the experiments."
    from mmer.core import load_params, resolve_profile
    from mmer.data.corpus import class_names
    from mmer.experiment import fold_split
    from mmer.features import experiment_inputs
    params = resolve_profile(load_params(project / "params.yaml"))
    assert params["profile"] == "paper" and params["encoders"]["finetune"]
    split = fold_split(params, 1)
    inputs = experiment_inputs(params, split, class_names(params), ["speech", "text"], 4, 0, project / "data" / "features" / "fold1")
    lengths = {u: sf.info(w).frames for u, w in zip(split["train"]["utt_id"], split["train"]["wav"])}
    seen = 0
    for batch in inputs.loaders["train"]:
        for u, n in zip(batch["utt_id"], batch["wave_len"].tolist()): assert n == lengths[u], (u, n, lengths[u]); seen += 1
    assert seen == len(lengths) and max(lengths.values()) > 16000 * 3.0          # including utterances longer than a 3-s crop
