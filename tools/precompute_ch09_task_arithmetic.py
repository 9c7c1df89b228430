"""Precompute chapter 09's task arithmetic (notebooks/09_production): too slow to run in full on 2 cores.

1. Train one LoRA adapter per task with the book's standard recipe (``lora_ref.tiny.runs.standard_fine_tune``,
   r = 4, seed 0): the date task ("2023-04-05 -> 05/04/2023") and its inverse, "iso"
   ("05/04/2023 -> 2023-04-05"). Save both as PEFT adapters in lora_ref/data/ch09_adapters/{date,iso}/.
2. Combine them with ``lora_ref.adapters.combine_adapters`` for each method ("cat", "linear", "svd")
   with weights (1 - gamma, gamma), gamma = 0, 0.1, ..., 1; and with "svd" at every rank q = 1 .. 8
   for gamma = 0.2, 0.5, 0.8. Score every combination on both tasks' held-out splits and on held-out
   text (``lora_ref.tiny.runs.evaluate``).

Writes lora_ref/data/ch09_task_arithmetic.json (scores to 6 significant figures). Deterministic
on one machine with a fixed thread count. The chapter loads the shipped adapters, re-runs part of
the sweep and asserts that it agrees.

    OMP_NUM_THREADS=2 MKL_DYNAMIC=FALSE .venv/bin/python tools/precompute_ch09_task_arithmetic.py
    ... --skip-training     re-score the shipped adapters without training them again
"""

import argparse
import time

import torch

from lora_ref import serving, shipped, tiny
from lora_ref.adapters import save_adapter
from lora_ref.tiny import runs

ADAPTERS = shipped.DATA / "ch09_adapters"
NAME = "ch09_task_arithmetic"
SETTINGS = dict(r=4, seed=0, tasks=["date", "iso"], methods=["cat", "linear", "svd"],
                gammas=[round(0.1 * i, 1) for i in range(11)], rank_gammas=[0.2, 0.5, 0.8], svd_ranks=list(range(1, 9)))


def _scores(model, tasks):
    """{task: {exact_match, loss_per_byte}, "text_loss_per_byte": ...} on the held-out splits."""
    ev = {task: runs.evaluate(model, task) for task in tasks}
    out = {task: {k: float(f"{ev[task][k]:.6g}") for k in ("exact_match", "loss_per_byte")} for task in tasks}
    out["text_loss_per_byte"] = float(f"{ev[tasks[0]]['text_loss_per_byte']:.6g}")
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-training", action="store_true")
    args = ap.parse_args()
    s = SETTINGS
    base = tiny.load_tiny_llama()
    seconds = {}
    if not args.skip_training:
        for task in s["tasks"]:
            t0 = time.perf_counter()
            model, _ = runs.standard_fine_tune(r=s["r"], seed=s["seed"], task=task, base=base)
            seconds[task] = round(time.perf_counter() - t0, 1)
            save_adapter(model, ADAPTERS / task, task_type="CAUSAL_LM")
            print(f"trained {task} in {seconds[task]} s", flush=True)
    paths = [ADAPTERS / task for task in s["tasks"]]
    result = {"settings": {**s, "recipe": runs.RECIPE.__dict__, "torch": torch.__version__,
                           "threads": torch.get_num_threads()},
              "base": _scores(base, s["tasks"]), "sweep": {}, "svd_ranks": {}}
    for method in s["methods"]:
        result["sweep"][method] = {}
        for gamma in s["gammas"]:
            model = serving.combined_model(base, paths, [1 - gamma, gamma], method)
            result["sweep"][method][gamma] = _scores(model, s["tasks"])
            print(method, gamma, result["sweep"][method][gamma], flush=True)
    for gamma in s["rank_gammas"]:
        result["svd_ranks"][gamma] = {}
        for q in s["svd_ranks"]:
            model = serving.combined_model(base, paths, [1 - gamma, gamma], "svd", q)
            result["svd_ranks"][gamma][q] = _scores(model, s["tasks"])
            print("svd", gamma, q, result["svd_ranks"][gamma][q], flush=True)
    out = shipped.save(NAME, result)
    print(f"wrote {out} ({out.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
