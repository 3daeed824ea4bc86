"""A run killed mid-epoch (SIGKILL) and resumed ends bit for bit where an uninterrupted run ends: same weights, same
history -- with random crops (the encoder-adaptation stage's UtteranceDataset) and dropout on."""
import os
import signal
import subprocess
import sys
import time

import pytest

SCRIPT = r'''
import sys, time
from pathlib import Path
import numpy as np, pandas as pd, soundfile as sf, torch
from torch import nn
from mmer.features import UtteranceDataset, raw_collate
from mmer.train import fit
data, out, slow = Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3])
rows = []
for i in range(48):                       # short wavs whose level says the class; crops of 0.05 s are drawn from them
    y = i % 4
    wave = np.random.default_rng(i).normal(0, 0.05 + 0.1 * y, 1600 + 160 * (i % 5)).astype("float32")
    sf.write(data / f"u{i}.wav", wave, 16000, subtype="FLOAT")
    rows.append({"utt_id": f"u{i}", "label": ["ang", "hap", "sad", "neu"][y], "wav": str(data / f"u{i}.wav"), "text": ""})
df = pd.DataFrame(rows)
classes = ["ang", "hap", "sad", "neu"]
mk = lambda frame, crop, shuffle: torch.utils.data.DataLoader(UtteranceDataset(frame, classes, crop_seconds=crop, seed=3),
    batch_size=8, shuffle=shuffle, collate_fn=raw_collate, generator=torch.Generator().manual_seed(0))
class Net(nn.Module):
    def __init__(self):
        super().__init__(); self.body = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 4))
    def forward(self, batch):
        time.sleep(slow)                  # slow enough to be killed mid-epoch
        w = batch["wave"][:, :800]
        feats = torch.stack([w.abs().mean(1), w.std(1), w.max(1).values, w.min(1).values], 1)
        return {"logits": self.body(feats * 10)}
torch.manual_seed(0)
r = fit(Net(), mk(df.iloc[:40], 0.05, True), mk(df.iloc[40:], None, False), out,
        {"epochs": 10, "lr": 0.05, "progress": False, "checkpoint_seconds": 0}, run_key="resume-test")
torch.save(r.model.state_dict(), out / "final.pt")
print("RESUMED_FROM", r.resumed_from, "EPOCHS", len(r.history))
'''


def _words(stdout):
    w = stdout.split()
    return int(w[w.index("RESUMED_FROM") + 1]) if w[w.index("RESUMED_FROM") + 1] != "None" else None, int(w[w.index("EPOCHS") + 1])


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_is_exact(tmp_path):
    import pandas as pd
    import torch
    script = tmp_path / "train.py"; script.write_text(SCRIPT)
    (tmp_path / "data").mkdir()
    full = subprocess.run([sys.executable, str(script), str(tmp_path / "data"), str(tmp_path / "full"), "0"],
                          capture_output=True, text=True, check=True)
    assert _words(full.stdout) == (None, 10)
    out = tmp_path / "cut"
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "data"), str(out), "0.02"], stdout=subprocess.PIPE, text=True)
    hist = out / "history.csv"
    deadline = time.time() + 120
    while time.time() < deadline:      # wait until at least 3 epochs are checkpointed, then kill mid-epoch
        if hist.exists() and len(hist.read_text().splitlines()) >= 4: break
        time.sleep(0.02)
    time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL); proc.wait()
    done = len(hist.read_text().splitlines()) - 1
    assert 3 <= done < 10, f"killed after {done} epochs; expected mid-run"
    ckpt = torch.load(out / "checkpoint.pt", weights_only=False)   # never half-written: saved atomically
    assert ckpt["state"]["epoch"] >= done
    again = subprocess.run([sys.executable, str(script), str(tmp_path / "data"), str(out), "0"], capture_output=True, text=True, check=True)
    resumed, epochs = _words(again.stdout)
    assert resumed is not None and done <= resumed < 10 and epochs == 10, again.stdout
    a, b = torch.load(tmp_path / "full" / "final.pt"), torch.load(out / "final.pt")
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run's"
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "full" / "history.csv"), pd.read_csv(hist))
