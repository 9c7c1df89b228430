"""Precompute chapter 11's rank-and-capacity sweep of the tiny model (notebooks/11_choosing).

Memorising random facts (``tiny.fact_examples``: "code of qzkvb: " -> "4821", 13.3 bits each) is a
task whose difficulty is its size. Every run is ``lora_ref.tiny.experiments.choice_run`` (the book's
one loop: AdamW without weight decay, warm-up over the first tenth of the steps, cosine decay to 0,
batches of 32), 400 steps, seeds 0, 1, 2, scored by the loss per answer byte on the facts
themselves:

* 64 facts (200 epochs) and 512 facts (25 epochs);
* full fine-tuning at three learning rates, and LoRA on every linear layer at r = 1, 4, 16, 64
  (alpha 16, s = 16 / r) at three learning rates each.

Deterministic on one machine (float32, seeded, one thread); the chapter reads it and reruns one run.
Writes lora_ref/data/ch11_rank.json (6 significant figures).

    OMP_NUM_THREADS=1 .venv/bin/python tools/precompute_ch11_rank.py
"""

import time

import lora_ref
from lora_ref import shipped, tiny
from lora_ref.tiny import experiments

SETTINGS = dict(seeds=[0, 1, 2], alpha=16.0, tasks=["facts-64", "facts-512"], steps=400, ranks=[1, 4, 16, 64],
                full_lrs=[5e-4, 1e-3, 2e-3], lora_lrs=[2e-3, 4e-3, 8e-3])
NAME = "ch11_rank"


def g6(x):
    return float(f"{x:.6g}")


def main():
    lora_ref.quiet()
    s, t0 = SETTINGS, time.perf_counter()
    base = tiny.load_tiny_llama()

    def seeds(task, r, lr):
        rows = {}
        for seed in s["seeds"]:
            out = experiments.choice_run(base, r=r, lr=lr, alpha=None if r is None else s["alpha"], task=task,
                                         steps=s["steps"], seed=seed)
            rows[seed] = {"test_loss": g6(out["test_loss"]), "final_loss": g6(sum(out["loss"][-5:]) / 5),
                          "trainable": out["trainable"]}
            print(f"{task} r={r} lr={lr:g} seed={seed}: {rows[seed]['test_loss']:.4f} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
        return rows

    out = {"settings": s, "rank": {}}
    for task in s["tasks"]:
        out["rank"][task] = {"full": {lr: seeds(task, None, lr) for lr in s["full_lrs"]},
                             **{r: {lr: seeds(task, r, lr) for lr in s["lora_lrs"]} for r in s["ranks"]}}
    path = shipped.save(NAME, out)
    print(f"wrote {path} ({path.stat().st_size:,} bytes) in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
