"""Precompute chapter 07's sweep of trained adapters (notebooks/07_trained_adapters): 13 standard
fine-tunes of the tiny model, too slow to run in the chapter (about 12 s each on 2 idle cores).

Runs: LoRA at r = 4, 8, 16, 64 with seeds 0, 1, 2, and full fine-tuning with seed 0, all through
``lora_ref.tiny.standard_fine_tune`` (one recipe, ``lora_ref.tiny.RECIPE``). For each run and each of
the 28 adapted matrices it stores what ``lora_ref.adapter_geometry.measure_update`` measures (effective
rank, amplification factors, overlaps and intruder dimensions), the run's held-out scores, and the
LoRA paper's phi between adapters: per layer the diagonal phi(i, i), i <= 8, for three pairs of A's and
four pairs of updates Delta W (their right singular vectors, so full fine-tuning enters too), and the
full (i, j) grids for the q_proj and v_proj of every layer (in hundredths, integers, for the heatmaps).
The run the chapter reruns live (LoRA r = 4, seed 0) also keeps its training loss at every step.

Deterministic on one machine (float32 training, fixed seeds, one thread: OMP_NUM_THREADS=1); other CPUs agree to a
tolerance the chapter states and checks by rerunning one run live. Numbers are kept to 6 significant
figures. ``--cache DIR`` keeps each run's updates and factors (torch.save) and reuses them.

    OMP_NUM_THREADS=1 .venv/bin/python tools/precompute_ch07_adapters.py [--cache /tmp/ch07_cache]
"""

import argparse
import dataclasses
import time
from pathlib import Path

import torch

from lora_ref import adapter_geometry as ag
from lora_ref import shipped, tiny
from lora_ref.tiny import experiments

SETTINGS = dict(ranks=[4, 8, 16, 64], seeds=[0, 1, 2], full_seeds=[0], top_k=10, eps=0.5, phi_diagonal=8,
                grid_modules=["self_attn.q_proj", "self_attn.v_proj"], live_run="r4_s0",
                pairs={"r8_r64": ["r8_s0", "r64_s0"], "seeds_r64": ["r64_s0", "r64_s1"],
                       "seeds_r8": ["r8_s0", "r8_s1"]},
                update_pairs={"r8_r64": ["r8_s0", "r64_s0"], "seeds_r64": ["r64_s0", "r64_s1"],
                              "seeds_r8": ["r8_s0", "r8_s1"], "r64_full": ["r64_s0", "full_s0"]})
NAME = "ch07_adapters"


def _g(x):
    """6 significant figures, recursively."""
    if isinstance(x, dict):
        return {k: _g(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_g(v) for v in x]
    if isinstance(x, float):
        return float(f"{x:.6g}")
    return x


def _run(r, seed, base, cache):
    """train_run's output, from the cache when it holds this run."""
    path = cache / f"r{r}_s{seed}.pt" if cache else None
    if path is not None and path.exists():
        return torch.load(path, weights_only=False)
    t0 = time.perf_counter()
    run = experiments.train_run(r, seed, base)
    print(f"trained r={r} seed={seed} in {time.perf_counter() - t0:.0f} s", flush=True)
    if path is not None:
        torch.save(run, path)
    return run


def main(cache=None):
    s = SETTINGS
    base = tiny.load_tiny_llama()
    plan = [(r, seed) for r in s["ranks"] for seed in s["seeds"]] + [(None, seed) for seed in s["full_seeds"]]
    runs, factors, updates = {}, {}, {}
    for r, seed in plan:
        key = f"r{r}_s{seed}" if r else f"full_s{seed}"
        run = _run(r, seed, base, cache)
        layers = experiments.measure_run(base, run, r, s["top_k"], s["eps"])
        for m in layers.values():
            m["overlap"] = [float(f"{c:.4g}") for c in m["overlap"]]          # 4 figures: cosines against eps
        runs[key] = {"scores": run["scores"], "loss": run["loss"], "layers": layers}
        if key == s["live_run"]:
            runs[key]["losses"] = run["losses"]                                # the chapter reruns this one live
        factors[key], updates[key] = run["A"], {name: dw.numpy() for name, dw in run["dw"].items()}
    names = list(runs["full_s0"]["layers"])
    n = s["phi_diagonal"]
    diagonal = {name: {pair: [ag.similarity_grid(factors[a][name], factors[b][name], n, n)[i, i] for i in range(n)]
                       for pair, (a, b) in s["pairs"].items()} for name in names}
    # the same on the updates themselves: phi of the top right-singular vectors of Delta W = s B A,
    # the input directions the update uses, weighted by B (and for full fine-tuning, which has no A)
    diagonal_dw = {name: {pair: [ag.similarity_grid(updates[a][name], updates[b][name], n, n)[i, i] for i in range(n)]
                          for pair, (a, b) in s["update_pairs"].items()} for name in names}
    grids = []
    for name in names:
        if any(name.endswith(m) for m in s["grid_modules"]):
            grids.append({"layer": name} | {
                pair: [[round(100 * float(v)) for v in row]                        # hundredths, for the heatmaps
                       for row in ag.similarity_grid(factors[a][name], factors[b][name],
                                                     min(factors[a][name].shape), min(factors[b][name].shape))]
                for pair, (a, b) in s["pairs"].items() if pair != "seeds_r8"})
    data = {"settings": s, "recipe": dataclasses.asdict(tiny.RECIPE), "base": tiny.evaluate(base), "runs": runs,
            "phi_diagonal": diagonal, "phi_diagonal_updates": diagonal_dw, "grids": grids}
    out = shipped.save(NAME, _g(data))
    print(f"wrote {out} ({out.stat().st_size:,} bytes)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache", type=Path, default=None, help="folder for each run's updates and factors")
    args = parser.parse_args()
    if args.cache:
        args.cache.mkdir(parents=True, exist_ok=True)
    main(args.cache)
