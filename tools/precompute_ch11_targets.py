"""Precompute chapter 11's target and dropout sweeps of the tiny model (notebooks/11_choosing).

Every run is ``lora_ref.tiny.experiments.choice_run`` (the book's one loop: AdamW without weight
decay, warm-up over the first tenth of the steps, cosine decay to 0, batches of 32), seeds 0, 1, 2:

* ``targets``: LoRA on q and v, on the four attention maps, on the three MLP maps and on all seven,
  each at the rank that trains about as many numbers as all seven at r = 4
  (``hyperparams.equal_budget_ranks``), on the date task (100 steps, two learning rates, held-out
  loss) and on memorising 256 random facts (``tiny.fact_examples``, 300 steps, scored on the
  facts themselves);
* ``dropout``: LoRA at r = 16 with lora_dropout rho = 0, 0.1, 0.3 on a short run (100 steps over the
  4,000 date pairs, less than one epoch) and a long one (400 steps over the first 128 pairs,
  100 epochs), scored on the held-out pairs.

Deterministic on one machine (float32, seeded, one thread); the chapter reruns a few runs and asserts
agreement. Writes lora_ref/data/ch11_targets.json (6 significant figures).

    OMP_NUM_THREADS=1 .venv/bin/python tools/precompute_ch11_targets.py
"""

import time

import lora_ref
from lora_ref import hyperparams, shipped, tiny
from lora_ref.tiny import experiments

SETTINGS = dict(
    seeds=[0, 1, 2], alpha=16.0,
    target_sets=list(experiments.TARGET_SETS), target_reference=("all-linear", 4),
    target_date_steps=100, target_date_lrs=[5e-3, 1e-2], target_facts="facts-256", target_facts_lr=3e-3, target_facts_steps=300,
    dropout_r=16, dropout_lr=5e-3, dropout_ps=[0.0, 0.1, 0.3],
    dropout_short=dict(steps=100, n_train=None), dropout_long=dict(steps=400, n_train=128))
NAME = "ch11_targets"


def g6(x):
    return float(f"{x:.6g}")


def main():
    lora_ref.quiet()
    s, t0 = SETTINGS, time.perf_counter()
    base = tiny.load_tiny_llama()

    def run(**kw):
        out = experiments.choice_run(base, alpha=None if kw.get("r") is None else s["alpha"], **kw)
        row = {"test_loss": g6(out["test_loss"]), "final_loss": g6(sum(out["loss"][-5:]) / 5),
               "trainable": out["trainable"]}
        print(f"{kw}: scored {row['test_loss']:.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)
        return row

    def seeds(**kw):
        return {seed: run(seed=seed, **kw) for seed in s["seeds"]}

    out = {"settings": s, "targets": {}, "dropout": {}}
    ref, r_ref = s["target_reference"]
    ranks = hyperparams.equal_budget_ranks(tiny.CONFIG, experiments.TARGET_SETS, ref, r_ref)
    for name in s["target_sets"]:
        r = ranks[name]["r"]
        out["targets"][name] = {
            "r": r, "params": ranks[name]["params"],
            "date": {lr: seeds(r=r, lr=lr, targets=name, steps=s["target_date_steps"]) for lr in s["target_date_lrs"]},
            "facts": seeds(r=r, lr=s["target_facts_lr"], targets=name, task=s["target_facts"],
                           steps=s["target_facts_steps"])}
    for length in ("short", "long"):
        kw = s[f"dropout_{length}"]
        out["dropout"][length] = {p: seeds(r=s["dropout_r"], lr=s["dropout_lr"], dropout=p, **kw)
                                  for p in s["dropout_ps"]}
    path = shipped.save(NAME, out)
    print(f"wrote {path} ({path.stat().st_size:,} bytes) in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
