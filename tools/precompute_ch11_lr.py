"""Precompute chapter 11's learning-rate, alpha and batch-size sweeps of the tiny model (notebooks/11_choosing).

Every run is ``lora_ref.tiny.experiments.choice_run``: the book's one loop (AdamW without weight
decay, warm-up over the first tenth of the steps, cosine decay to 0) on the recipe's date pairs,
scored by the held-out loss per answer byte, seeds 0, 1, 2:

* ``lr``: full fine-tuning and LoRA on every linear layer but the output layer at r = 1, 4, 16, 64
  (alpha 16, s = 16 / r), 100 steps of 32 pairs, each over a grid of learning rates;
* ``alpha``: LoRA at r = 4 and r = 64 at lr 5e-3 over alpha = 2 .. 256, which holds the
  conventions alpha = 2r, alpha = 16 and rsLoRA's alpha = 16 (as alpha 16 sqrt(r) under s = alpha / r);
* ``alpha2r``: LoRA at r = 64 with alpha = 2r = 128 over a grid of learning rates (the exercise on
  predicting the best learning rate checks against it);
* ``batch``: full fine-tuning and LoRA at r = 16 with 3,200 training pairs in all at batch sizes
  8, 32 and 128 (400, 100 and 25 steps), each over four learning rates.

Deterministic on one machine (float32, seeded, one thread); the chapter reruns a few runs and asserts
agreement. Writes lora_ref/data/ch11_lr.json (6 significant figures).

    OMP_NUM_THREADS=1 .venv/bin/python tools/precompute_ch11_lr.py
"""

import time

import lora_ref
from lora_ref import shipped, tiny
from lora_ref.tiny import experiments

SETTINGS = dict(
    seeds=[0, 1, 2], steps=100, batch_size=32, alpha=16.0, task="date",
    ranks=[1, 4, 16, 64], full_lrs=[1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2], lora_lrs=[1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2],
    alpha_ranks=[4, 64], alphas=[2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0], alpha_lr=5e-3,
    alpha2r_r=64, alpha2r_lrs=[2e-4, 5e-4, 1e-3, 2e-3, 5e-3],
    batch_examples=3200, batch_sizes=[8, 32, 128], batch_r=16,
    batch_full_lrs=[5e-4, 1e-3, 2e-3, 5e-3], batch_lora_lrs=[2e-3, 5e-3, 1e-2, 2e-2])
NAME = "ch11_lr"


def g6(x):
    return float(f"{x:.6g}")


def main():
    lora_ref.quiet()
    s, t0 = SETTINGS, time.perf_counter()
    base = tiny.load_tiny_llama()
    cache = {}

    def run(r, lr, seed, alpha=None, steps=None, batch_size=None):
        alpha = None if r is None else (s["alpha"] if alpha is None else alpha)
        steps, batch_size = steps or s["steps"], batch_size or s["batch_size"]
        key = (r, lr, seed, alpha, steps, batch_size)
        if key not in cache:
            out = experiments.choice_run(base, r=r, lr=lr, alpha=alpha, steps=steps, batch_size=batch_size,
                                         seed=seed, task=s["task"])
            cache[key] = {"test_loss": g6(out["test_loss"]), "final_loss": g6(sum(out["loss"][-5:]) / 5)}
            print(f"r={r} alpha={alpha} lr={lr:g} bs={batch_size} steps={steps} seed={seed}: "
                  f"held-out {cache[key]['test_loss']:.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)
        return cache[key]

    def sweep(r, lrs, **kw):
        return {lr: {seed: run(r, lr, seed, **kw) for seed in s["seeds"]} for lr in lrs}

    out = {"settings": s}
    out["lr"] = {"full": sweep(None, s["full_lrs"]), **{r: sweep(r, s["lora_lrs"]) for r in s["ranks"]}}
    out["alpha"] = {r: {a: {seed: run(r, s["alpha_lr"], seed, alpha=a) for seed in s["seeds"]} for a in s["alphas"]}
                    for r in s["alpha_ranks"]}
    out["alpha2r"] = sweep(s["alpha2r_r"], s["alpha2r_lrs"], alpha=2.0 * s["alpha2r_r"])
    out["batch"] = {}
    for bs in s["batch_sizes"]:
        steps = s["batch_examples"] // bs
        out["batch"][bs] = {"full": sweep(None, s["batch_full_lrs"], steps=steps, batch_size=bs),
                            "lora": sweep(s["batch_r"], s["batch_lora_lrs"], steps=steps, batch_size=bs)}
    path = shipped.save(NAME, out)
    print(f"wrote {path} ({path.stat().st_size:,} bytes) in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
