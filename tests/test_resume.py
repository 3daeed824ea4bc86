"Killing training mid-epoch (SIGKILL) and running it again resumes from the last checkpoint."
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

SCRIPT = r'''
import sys, time, torch
from torch import nn
from mmer.train import fit
out = sys.argv[1]
g = torch.Generator().manual_seed(0)
y = torch.arange(96) % 4
x = torch.randn(96, 8, generator=g) + nn.functional.one_hot(y, 8).float() * 2
ds = [{"utt_id": str(i), "x": x[i], "label": y[i]} for i in range(96)]
class Slow(nn.Module):
    def __init__(self): super().__init__(); self.head = nn.Linear(8, 4)
    def forward(self, batch):
        time.sleep(0.05)  # ~0.3 s per epoch: long enough to be killed mid-epoch
        return {"logits": self.head(batch["x"])}
mk = lambda shuffle: torch.utils.data.DataLoader(ds, batch_size=16, shuffle=shuffle, generator=torch.Generator().manual_seed(0))
r = fit(Slow(), mk(True), mk(False), out, {"epochs": 12, "lr": 0.05, "progress": False})
print("RESUMED_FROM", r.resumed_from, "EPOCHS", len(r.history))
'''


def test_sigkill_mid_epoch_then_resume(tmp_path):
    script = tmp_path / "train.py"; script.write_text(SCRIPT)
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, str(script), str(out)], stdout=subprocess.PIPE, text=True)
    hist = out / "history.csv"
    deadline = time.time() + 120
    while time.time() < deadline:      # wait until at least 3 epochs are checkpointed, then kill mid-epoch
        if hist.exists() and len(hist.read_text().splitlines()) >= 4: break
        time.sleep(0.05)
    time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL); proc.wait()
    done = len(hist.read_text().splitlines()) - 1
    assert 3 <= done < 12, f"killed after {done} epochs; expected mid-run"
    import torch
    ckpt = torch.load(out / "checkpoint.pt", weights_only=False)   # never half-written: saved atomically
    assert ckpt["state"]["epoch"] >= done
    again = subprocess.run([sys.executable, str(script), str(out)], capture_output=True, text=True, check=True)
    words = again.stdout.split()
    resumed, epochs = int(words[words.index("RESUMED_FROM") + 1]), int(words[words.index("EPOCHS") + 1])
    assert resumed >= done and resumed < 12, again.stdout
    assert epochs == 12
