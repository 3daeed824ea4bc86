"""The package stands alone: a wheel installed into a fresh virtual environment (no system site packages, the
repository not on the path, another current folder) runs the README's "Use the package" script and the CLI."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def sh(cmd, cwd, env=None, timeout=1800):
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    return r


def test_wheel_in_a_fresh_venv_builds_trains_saves_loads_predicts(tmp_path):
    dist = tmp_path / "dist"
    sh([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(dist), str(ROOT)], tmp_path)
    wheel = next(dist.glob("mmer-*.whl"))
    venv = tmp_path / "venv"
    sh([sys.executable, "-m", "venv", str(venv)], tmp_path)                    # system site packages off (the default)
    py = venv / "bin" / "python"
    pip = [str(py), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "-c", str(ROOT / "constraints.txt")]
    sh(pip + ["torch"], tmp_path)
    sh(pip + [str(wheel)], tmp_path)
    work = tmp_path / "work"; work.mkdir()
    shutil.copy(ROOT / "params.yaml", work / "params.yaml")
    script = re.search(r"<!-- package-script -->\s*```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)[1]
    (work / "use_mmer.py").write_text(script)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    where = sh([str(py), "-c", "import mmer; print(mmer.__file__)"], work, env).stdout
    assert str(venv) in where and str(ROOT) not in where, where                  # the installed package, not the checkout
    out = sh([str(py), "use_mmer.py"], work, env).stdout
    for section in ("baseline", "fdrl", "mgcma", "layer_adapter"): assert f"{section}: " in out, out
    assert "'label': " in out and "'probabilities': " in out, out
    bundle = work / "models" / "baseline" / "fold1"
    assert {"bundle.json", "model.safetensors", "encoders"} <= {p.name for p in bundle.iterdir()}
    wav = sorted((work / "data" / "embedded").rglob("*.wav"))[0]
    cli = sh([str(venv / "bin" / "mmer"), "predict", "--model", str(bundle), "--wav", str(wav), "--text", "how nice, the report is on the table."], work, env)
    assert '"label": ' in cli.stdout and '"probabilities": ' in cli.stdout, cli.stdout
    assert sh([str(py), "-m", "mmer", "--help"], work, env).stdout.startswith("usage: mmer")
