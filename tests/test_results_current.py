"""Committed results match committed code: no stage's code, notebook or params changed since dvc.lock.

Outputs that are simply absent (a fresh clone has no data/ or DVC cache) are not staleness; a changed
dependency that is itself another stage's output follows from an upstream change and is reported there.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _stage_outputs() -> list[str]:
    lock = yaml.safe_load((ROOT / "dvc.lock").read_text())
    return [o["path"] for st in lock["stages"].values() for o in st.get("outs", [])]


def stale_entries() -> list[str]:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    r = subprocess.run([str(BIN / "dvc"), "status", "--json"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    outputs = _stage_outputs()
    produced = lambda p: any(p == o or p.startswith(o.rstrip("/") + "/") or o.startswith(p.rstrip("/") + "/") for o in outputs)
    stale = []
    for stage, changes in json.loads(r.stdout or "{}").items():
        for change in changes:
            if not isinstance(change, dict): stale.append(f"{stage}: {change}"); continue
            for path, how in change.get("changed deps", {}).items():
                if not produced(path): stale.append(f"{stage}: {path} {how}")
            for path, how in change.get("changed params", {}).items() if isinstance(change.get("changed params"), dict) else []:
                stale.append(f"{stage}: params {path} {how}")
    return stale


def test_dvc_lock_matches_code_notebooks_and_params():
    assert (ROOT / "dvc.lock").exists(), "no dvc.lock: run `make repro` and commit dvc.lock with the results"
    stale = stale_entries()
    assert not stale, "results are stale (run `make repro` and commit dvc.lock and results/):\n" + "\n".join(stale)


def test_committed_tables_exist_for_every_report_output():
    lock = yaml.safe_load((ROOT / "dvc.lock").read_text())
    for name, st in lock["stages"].items():
        if not name.startswith("report"): continue
        for out in st.get("outs", []):
            if out["path"].startswith("results/"):
                assert (ROOT / out["path"]).exists(), f"{out['path']} (output of {name}) is not committed"
