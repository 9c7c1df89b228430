"""Precompute chapter 03's rank sweep (notebooks/03_scaling): too slow to run in full on 2 cores.

Deterministic: PEFT's init drawn from numpy seeds, float32 training with torch's SGD and Adam.
Writes lora_ref/data/ch03_rank_sweep.json (loss and gradient-norm curves, 6 significant figures).
The chapter reruns a part of it live and asserts agreement.

    .venv/bin/python tools/precompute_ch03_rank_sweep.py
"""

from lora_ref import rank_scaling as rs
from lora_ref import shipped

SETTINGS = dict(ranks=[2, 4, 8, 16, 32, 64, 128, 256], rules=["alpha/r", "alpha/sqrt(r)"], alpha=8.0,
                steps=100, d=256, k=256, decay=0.5, seed=0,
                lr={"sgd": 0.1, "adam": 2e-3})
NAME = "ch03_rank_sweep"


def main():
    s = SETTINGS
    runs = {}
    for optimizer, lr in s["lr"].items():
        sweep = rs.rank_sweep(s["ranks"], s["rules"], optimizer, s["alpha"], lr, s["steps"],
                              d=s["d"], k=s["k"], decay=s["decay"], seed=s["seed"])
        runs[optimizer] = {rule: {r: {key: [float(f"{v:.6g}") for v in vals] for key, vals in out.items()}
                                  for r, out in by_r.items()} for rule, by_r in sweep.items()}
    out = shipped.save(NAME, {"settings": s, "runs": runs})
    print(f"wrote {out} ({out.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
