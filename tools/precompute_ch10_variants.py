"""Precompute chapter 10's fine-tunes of the tiny model with LoRA's variants (notebooks/10_variants).

Every run is a PEFT model of the shipped tiny model (``lora_ref.tiny.experiments.variant_model``)
trained by the book's one loop with the recipe's batches and schedule (AdamW, warm-up 10, cosine
to 0, 150 steps of 32 pairs), then scored by its held-out loss per answer byte:

* the inits at one budget, r = 8 on every linear layer but the output layer (alpha 16): LoRA, PiSSA,
  MiLoRA, OLoRA, LoRA-GA and DoRA, each at learning rates 2e-3, 5e-3 and 1e-2, seeds 0, 1, 2;
* DoRA's Delta M / Delta D: the effective weights of every q_proj and v_proj at 7 steps of full
  fine-tuning (the recipe's lr 1e-3) and of the LoRA and DoRA runs at lr 5e-3, seed 0
  (``EffectiveWeights``);
* VeRA at the rank that trains as many numbers as LoRA at r = 1 (lr 2e-2 to 4e-1) against LoRA
  at r = 1 (lr 2e-3, 5e-3, 1e-2), seeds 0, 1, 2.

Deterministic on one machine (float32, seeded); the chapter reruns LoRA and PiSSA at seed 0 and
asserts agreement. Writes lora_ref/data/ch10_variants.json (6 significant figures).

    .venv/bin/python tools/precompute_ch10_variants.py
"""

import time

import lora_ref
from lora_ref import shipped, tiny, variants
from lora_ref.tiny import experiments

MD_LAYERS = [f"model.layers.{i}.self_attn.{m}" for i in range(4) for m in ("q_proj", "v_proj")]
SETTINGS = dict(r=8, alpha=16.0, steps=150, seeds=[0, 1, 2], lrs=[2e-3, 5e-3, 1e-2],
                inits=["lora", "pissa", "milora", "olora", "loraga", "dora"],
                md_at=[0, 25, 50, 75, 100, 125, 149], md_layers=MD_LAYERS, full_lr=tiny.RECIPE.full_lr,
                md_lr=5e-3, vera_lrs=[2e-2, 5e-2, 1e-1, 2e-1, 4e-1], lora_r1_lrs=[2e-3, 5e-3, 1e-2], task="date",
                n_test=tiny.RECIPE.n_test)
NAME = "ch10_variants"


def g6(x):
    return float(f"{x:.6g}")


def vera_rank(model):
    """The VeRA rank that trains as many numbers per decoder layer as LoRA at r = 1, to the nearest integer."""
    shapes = [(m.out_features, m.in_features) for n, m in model.named_modules()
              if n.startswith("model.layers.0.") and hasattr(m, "in_features")]
    lora_1 = sum(variants.trainable_params("lora", d, k, 1) for d, k in shapes)
    return round((lora_1 - sum(d for d, _ in shapes)) / len(shapes))


def main():
    lora_ref.quiet()
    s, t0 = SETTINGS, time.perf_counter()
    base = tiny.load_tiny_llama()
    test = tiny.task_examples("test", s["n_test"], seed=1, task=s["task"])

    def run(variant, r, lr, seed, hook=None):
        model, out = experiments.variant_fine_tune(variant, r, s["steps"], seed=seed, base=base, lr=lr, alpha=s["alpha"],
                                                   task=s["task"], on_step=hook)
        row = {"loss": [g6(v) for v in out["losses"]], "test_loss": g6(tiny.loss_per_byte(model, test)),
               "trainable": model.get_nb_trainable_parameters()[0]}
        print(f"{variant:>6} r={r:<3} lr={lr:g} seed={seed}: held-out {row['test_loss']:.4f} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
        return row

    hooks = {m: experiments.EffectiveWeights(s["md_layers"], s["md_at"]) for m in ("full", "lora", "dora")}
    inits = {v: {lr: {seed: run(v, s["r"], lr, seed, hooks.get(v) if (lr, seed) == (s["md_lr"], 0) else None)
                      for seed in s["seeds"]} for lr in s["lrs"]} for v in s["inits"]}
    tiny.standard_fine_tune(None, 0, s["task"], base=base, steps=s["steps"], on_step=hooks["full"])

    md = {}
    for method, hook in hooks.items():
        weights = hook.result()
        md[method] = {step: {n: [g6(v) for v in variants.magnitude_direction_change(weights[0][n], W[n])]
                             for n in s["md_layers"]} for step, W in weights.items() if step > 0}

    r_vera = vera_rank(base)
    vera = {"r": r_vera,
            "vera": {lr: {seed: run("vera", r_vera, lr, seed) for seed in s["seeds"]} for lr in s["vera_lrs"]},
            "lora_r1": {lr: {seed: run("lora", 1, lr, seed) for seed in s["seeds"]} for lr in s["lora_r1_lrs"]}}
    out = shipped.save(NAME, {"settings": s, "inits": inits, "md": md, "vera": vera})
    print(f"wrote {out} ({out.stat().st_size:,} bytes) in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
