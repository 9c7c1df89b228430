"""Precompute chapter 05's LoRA+ sweep (notebooks/05_gradients): 24 short fine-tunes of the tiny model,
too slow to run in full on 2 cores.

For lambda = eta_B / eta_A in {1, 2, 4, 8, 16, 32, 64} and seeds 0, 1, 2: a LoRA copy of the tiny model
(r = 8, alpha = 16, every linear layer but the output layer), 60 steps of AdamW with LoRA+'s groups
(``lora_ref.torch.loraplus_optimizer``) at eta_A = 1e-3, the book's batches and schedule (warm-up 10,
cosine to 0); then the held-out loss per answer byte. As a reference, plain LoRA at the recipe's
learning rate 5e-3 (lambda = 1), the same 60 steps and seeds. Deterministic on one machine
(float32 training, seeded); the chapter reruns lambda in {1, best} at seed 0 and asserts agreement.
Writes lora_ref/data/ch05_loraplus.json (training-loss curves and held-out losses, 6 significant figures).

    .venv/bin/python tools/precompute_ch05_loraplus.py
"""

import time

from lora_ref import shipped, tiny
from lora_ref.tiny import experiments

SETTINGS = dict(r=8, alpha=16.0, lr=1e-3, steps=60, warmup=10, ratios=[1, 2, 4, 8, 16, 32, 64], seeds=[0, 1, 2],
                reference_lr=tiny.RECIPE.lora_lr, task="date", n_test=tiny.RECIPE.n_test)
NAME = "ch05_loraplus"


def _round(run):
    return {"test_loss": float(f"{run['test_loss']:.6g}"), "loss": [float(f"{v:.6g}") for v in run["loss"]]}


def main():
    s, t0 = SETTINGS, time.perf_counter()
    base = tiny.load_tiny_llama()
    common = dict(steps=s["steps"], warmup=s["warmup"], task=s["task"], n_test=s["n_test"])
    runs, reference = {}, {}
    for lam in s["ratios"]:
        runs[lam] = {}
        for seed in s["seeds"]:
            run = experiments.loraplus_run(base, s["r"], lam, seed=seed, lr=s["lr"], alpha=s["alpha"], **common)
            runs[lam][seed] = _round(run)
            print(f"lambda={lam:>2} seed={seed}: held-out loss {run['test_loss']:.4f}  ({time.perf_counter() - t0:.0f} s)",
                  flush=True)
    for seed in s["seeds"]:
        run = experiments.loraplus_run(base, s["r"], 1, seed=seed, lr=s["reference_lr"], alpha=s["alpha"], **common)
        reference[seed] = _round(run)
        print(f"plain LoRA, lr {s['reference_lr']:g}, seed={seed}: held-out loss {run['test_loss']:.4f}", flush=True)
    out = shipped.save(NAME, {"settings": s, "runs": runs, "reference": reference})
    print(f"wrote {out} ({out.stat().st_size:,} bytes) in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
