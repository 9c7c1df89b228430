"""Precompute chapter 06's sweep (notebooks/06_eckart_young): full fine-tunes of the tiny model,
their ΔW spectra, every ΔW truncated to rank r, and LoRA trained at the same r, for three seeds.

Too slow for the chapter (24 standard runs of ~12 s on 2 idle cores); the chapter reruns the full
fine-tune of seed 0 and its truncations live and asserts agreement with this file.
Every run goes through lora_ref.tiny.standard_fine_tune (the book's recipe), every score through
lora_ref.tiny.evaluate, every truncation through lora_ref.low_rank. Deterministic on one machine
(float32 training: another CPU agrees to a few digits, which the chapter's tolerance covers).

    OMP_NUM_THREADS=1 .venv/bin/python tools/precompute_ch06_rank_of_finetune.py

(one thread: on a shared machine it is the faster setting, and it fixes the order of every sum).

Writes lora_ref/data/ch06_rank_of_finetune.json (6 significant figures).
"""

import math
from dataclasses import asdict

import numpy as np

from lora_ref import low_rank, shipped, spectral, tiny
from lora_ref.tiny import experiments

SETTINGS = dict(task="date", seeds=[0, 1, 2], lora_ranks=[1, 2, 4, 8, 16, 32, 64], full_rank=128, tau=0.9,
                recipe=asdict(tiny.RECIPE))
NAME = "ch06_rank_of_finetune"


def g6(x):
    return float(f"{float(x):.6g}")


def scores(s):
    return {key: g6(v) for key, v in s.items()}


def distance(updates, reference):
    """sqrt(sum over layers ||ΔW - ΔW_ref||_F^2) / sqrt(sum over layers ||ΔW_ref||_F^2)."""
    num = sum(float(np.sum((np.asarray(updates[n]) - np.asarray(reference[n])) ** 2)) for n in reference)
    return math.sqrt(num / sum(float(np.sum(np.asarray(reference[n]) ** 2)) for n in reference))


def norm_ratio(updates, reference):
    """sqrt(sum over layers ||ΔW||_F^2) / sqrt(sum over layers ||ΔW_ref||_F^2)."""
    return math.sqrt(sum(float(np.sum(np.asarray(updates[n]) ** 2)) for n in reference)
                     / sum(float(np.sum(np.asarray(reference[n]) ** 2)) for n in reference))


def one_seed(base, seed):
    s = SETTINGS
    full, _ = tiny.standard_fine_tune(None, seed, s["task"], base=base)
    updates = {n: dw.numpy() for n, dw in tiny.weight_updates(base, full).items()}
    sigma = {n: spectral.singular_values(dw) for n, dw in updates.items()}
    truncation_ranks = s["lora_ranks"] + [s["full_rank"]]
    out = {
        "full": scores(tiny.evaluate(full, s["task"])),
        "spectra": {n: [g6(v) for v in sg] for n, sg in sigma.items()},
        "rank_for_energy": {n: low_rank.rank_for_energy(sg, s["tau"]) for n, sg in sigma.items()},
        # W0 + ΔW_r in the adapted layers, every other parameter the base's (what LoRA can change) ...
        "truncated": {r: scores(v) for r, v in
                      experiments.truncation_scores(base, updates, truncation_ranks, s["task"]).items()},
        # ... or the full fine-tune's (its embeddings, norms and output layer moved too)
        "truncated_rest_tuned": {r: scores(v) for r, v in
                                 experiments.truncation_scores(base, updates, s["lora_ranks"], s["task"], full).items()},
        "truncation_distance": {r: g6(distance(low_rank.truncate_updates(updates, r), updates))
                                for r in s["lora_ranks"]},
        "lora": {}, "lora_distance": {}, "lora_norm_ratio": {},
    }
    for r in s["lora_ranks"]:
        lora, _ = tiny.standard_fine_tune(r, seed, s["task"], base=base)
        out["lora"][r] = scores(tiny.evaluate(lora, s["task"]))
        lora_updates = {n: dw.numpy() for n, dw in tiny.weight_updates(base, lora).items()}
        out["lora_distance"][r] = g6(distance(lora_updates, updates))
        out["lora_norm_ratio"][r] = g6(norm_ratio(lora_updates, updates))
        print(f"seed {seed}, r = {r}: truncated {out['truncated'][r]}, LoRA {out['lora'][r]}", flush=True)
    return out


def main():
    base = tiny.load_tiny_llama()
    runs = {"base": scores(tiny.evaluate(base, SETTINGS["task"])), "seeds": {}}
    for seed in SETTINGS["seeds"]:
        runs["seeds"][seed] = one_seed(base, seed)
        out = shipped.save(NAME, {"settings": SETTINGS, "runs": runs})   # after each seed
        print(f"wrote {out} ({out.stat().st_size:,} bytes), seeds {list(runs['seeds'])}", flush=True)


if __name__ == "__main__":
    main()
