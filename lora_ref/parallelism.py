"""What LoRA changes when training runs on many devices (notebooks/12_distributed).

``lora_ref.distributed`` runs DDP and FSDP2 on the tiny model and counts the bytes they move;
this module holds the formulas the chapter reads those counts with, and carries them to real
configurations through ``lora_ref.budget``:

* data parallelism (DDP): the gradient bytes all-reduced per step (``ddp_grad_bytes``) and what
  a ring all-reduce sends per rank (``ring_allreduce_bytes``);
* sharded data parallelism (FSDP2, ZeRO-3): the parameter bytes all-gathered per step
  (``fsdp_gather_bytes``, ``fsdp_units``) and the memory per GPU of a sharded LoRA or QLoRA run
  (``memory_per_gpu``, ``gpus_needed``);
* time: compute against communication per step (``training_flops``, ``step_time``), with the
  bandwidths and peak throughput of a stated interconnect (``INTERCONNECTS``, ``H100_BF16_FLOPS``).

Pure Python over ``lora_ref.budget``; it never imports torch.
"""

from __future__ import annotations

from . import _checks, budget

__all__ = ["INTERCONNECTS", "H100_BF16_FLOPS", "STRATEGIES", "ddp_grad_bytes", "ring_allreduce_bytes", "fsdp_units",
           "fsdp_gather_bytes", "memory_per_gpu", "gpus_needed", "training_flops", "step_time"]

# One direction's bandwidth per GPU in bytes/s, from the vendors' data sheets: NVLink 4 on an H100 SXM5
# carries 900 GB/s in both directions together (NVIDIA H100 Tensor Core GPU datasheet), so 450 GB/s each
# way; one InfiniBand NDR port is 400 Gb/s = 50 GB/s (NVIDIA ConnectX-7 datasheet), one per GPU in a
# DGX H100; PCIe 5.0 x16 is 64 GB/s each way (PCI-SIG). Achieved bus bandwidth is lower (nccl-tests).
INTERCONNECTS = {
    "NVLink 4 (one H100 node)": 450e9,
    "InfiniBand NDR (between nodes)": 50e9,
    "PCIe 5.0 x16": 64e9,
}
# Dense bf16 tensor-core peak of an H100 SXM5 in FLOP/s (the datasheet's 1,979 TFLOPS is with sparsity).
H100_BF16_FLOPS = 989e12

STRATEGIES = ("DDP + LoRA", "FSDP + LoRA", "FSDP + QLoRA")


def _check_count(name, value, minimum=1):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {name}={value!r}")


def _check_positive(name, value):
    _checks.check_finite_scalar(name, value)
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {name}={value}")


# --------------------------------------------------------------------------- DDP


def ddp_grad_bytes(n_trainable, bytes_per_grad=4):
    """Bytes that DDP all-reduces per step: every trainable parameter's gradient, once.

        bytes = b N_train                     (b = 4 for fp32 gradients, 2 for bf16)

    Frozen parameters have no gradient and sit in no bucket, so LoRA moves b N_LoRA where full
    fine-tuning moves b N. The count does not depend on the number of processes W: each rank
    contributes its whole gradient (what the wire carries per rank is ``ring_allreduce_bytes``).

    Book: eq-ch12-ddp-bytes (notebooks/12_distributed).
    """
    _check_count("n_trainable", n_trainable, 0)
    _check_positive("bytes_per_grad", bytes_per_grad)
    return n_trainable * bytes_per_grad


def ring_allreduce_bytes(n_bytes, world_size):
    """Bytes each rank sends (and receives) in a ring all-reduce of n_bytes over W ranks.

        sent per rank = 2 (W - 1) / W n_bytes

    A reduce-scatter (W - 1 steps of n/W bytes) then an all-gather (W - 1 more): the bandwidth-optimal
    all-reduce (Patarasuk & Yuan 2009), and the factor by which nccl-tests turn an all-reduce's time into
    its "bus bandwidth". It tends to 2 n_bytes as W grows: the traffic per GPU hardly depends on W.

    Book: eq-ch12-ring (notebooks/12_distributed).
    """
    _check_count("n_bytes", n_bytes, 0)
    _check_count("world_size", world_size)
    return 2 * (world_size - 1) * n_bytes / world_size


# --------------------------------------------------------------------------- FSDP


def fsdp_units(config, r, target_modules="all-linear"):
    """The parameters of FSDP's units when every decoder layer is one ``fully_shard`` unit and the rest
    (embeddings, final norm, lm_head) the root unit: ``{"layer": per decoder layer, "root": ...,
    "n_layers": L}``, the LoRA factors counted in the layer that holds them (``r=None``: no LoRA).

    Book: eq-ch12-fsdp-gather (notebooks/12_distributed).
    """
    n_layers = int(config["num_hidden_layers"])
    parts = budget.base_param_breakdown(config)
    layer = (parts["linear weights"] + parts["linear biases"] + parts["layer norms"]) // n_layers
    lora = 0 if r is None else budget.lora_param_count(config, r, target_modules) // n_layers
    root = parts["embed_tokens"] + parts["final norm"] + parts["lm_head"]
    return {"layer": layer + lora, "root": root, "n_layers": n_layers}


def fsdp_gather_bytes(layer_params, n_layers, root_params, bytes_per_param=4, reshard_after_forward=True):
    """Bytes that FSDP2 all-gathers per step on each rank (the unsharded results), every parameter
    counted, frozen or not:

        reshard_after_forward=True (the default):   b (N_root + 2 L N_layer)
        reshard_after_forward=False (ZeRO-2 like):  b (N_root + L N_layer)

    The forward gathers every unit once; with resharding, the backward gathers each decoder layer
    again (the root unit, last to run forward and first backward, is kept). LoRA adds its factors
    to N_layer and takes nothing away: the frozen base is gathered on every step whatever r is.
    A rank receives (W - 1)/W of these bytes; the rest is its own shard.

    Book: eq-ch12-fsdp-gather (notebooks/12_distributed).
    """
    for name, value in (("layer_params", layer_params), ("n_layers", n_layers), ("root_params", root_params)):
        _check_count(name, value, 0)
    _check_positive("bytes_per_param", bytes_per_param)
    return bytes_per_param * (root_params + (2 if reshard_after_forward else 1) * n_layers * layer_params)


def memory_per_gpu(config, strategy, world_size, r=16, target_modules="all-linear"):
    """Static bytes per GPU (weights, gradients, optimizer state; no activations) of ``strategy``
    on W GPUs, from chapter 01's memory model (``budget.lora_memory``, ``budget.qlora_memory``):

        DDP + LoRA     M_LoRA                        every GPU holds a whole replica: W does not help
        FSDP + LoRA    M_LoRA / W  + 2 b N_layer     a 1/W shard of everything, plus the working set:
        FSDP + QLoRA   M_QLoRA / W + 2 b N_layer     the gathered layer and the next one, prefetched

    with b = 2 bytes per bf16 weight for LoRA and the NF4 bits per weight / 8 for QLoRA (FSDP gathers
    the 4-bit codes as they are stored, bitsandbytes' ``bnb_4bit_quant_storage``).

    Book: eq-ch12-memory (notebooks/12_distributed).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got strategy={strategy!r}")
    _check_count("world_size", world_size)
    units = fsdp_units(config, r, target_modules)
    if strategy == "DDP + LoRA":
        return budget.lora_memory(config, r, target_modules).total_bytes
    if strategy == "FSDP + LoRA":
        total, b = budget.lora_memory(config, r, target_modules).total_bytes, budget.BYTES_PER_PARAM["bf16"]
    else:
        total, b = budget.qlora_memory(config, r, target_modules).total_bytes, budget.nf4_bits_per_param() / 8
    return total / world_size + 2 * b * units["layer"]


def gpus_needed(config, strategy, gpu_bytes, r=16, target_modules="all-linear", max_gpus=1024):
    """The fewest GPUs of ``gpu_bytes`` each on which ``memory_per_gpu`` fits, or None if no number does
    (DDP's replica is larger than one GPU, or more than ``max_gpus`` would be needed).

    Book: eq-ch12-memory (notebooks/12_distributed).
    """
    _check_positive("gpu_bytes", gpu_bytes)
    for w in range(1, max_gpus + 1):
        if memory_per_gpu(config, strategy, w, r, target_modules) <= gpu_bytes:
            return w
        if strategy == "DDP + LoRA":
            return None
    return None


# --------------------------------------------------------------------------- time


def training_flops(n_base, n_trainable, tokens, full=False):
    """FLOPs of one training step over ``tokens`` tokens (matrix products only):

        full fine-tuning   6 N T          forward 2 N T, backward 4 N T (input and weight gradients)
        LoRA               4 N T + 6 P T  the backward still carries the input gradient through the
                                           frozen W0 (2 N T) but forms no weight gradient for it

    (Kaplan et al. 2020, Sec. 2.1: C = 6 N per token; attention's T^2 terms left out.)

    Book: eq-ch12-time (notebooks/12_distributed).
    """
    for name, value in (("n_base", n_base), ("n_trainable", n_trainable), ("tokens", tokens)):
        _check_count(name, value, 0)
    return 6 * n_base * tokens if full else 4 * n_base * tokens + 6 * n_trainable * tokens


def step_time(flops, comm_bytes, bandwidth, flops_per_s=H100_BF16_FLOPS, utilisation=0.4):
    """Seconds of one step: compute ``flops / (utilisation * flops_per_s)`` and communication
    ``comm_bytes / bandwidth`` (comm_bytes: what one GPU sends, e.g. ``ring_allreduce_bytes``).

        t_overlap = max(t_compute, t_comm)     DDP's buckets all-reduce while the backward runs
        t_serial  = t_compute + t_comm          no overlap

    Returns ``{"compute", "comm", "overlap", "serial"}``: the step lies between overlap and serial.

    Book: eq-ch12-time (notebooks/12_distributed).
    """
    for name, value in (("flops", flops), ("comm_bytes", comm_bytes)):
        _checks.check_finite_scalar(name, value)
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {name}={value}")
    _check_positive("bandwidth", bandwidth)
    _check_positive("flops_per_s", flops_per_s)
    if not 0 < utilisation <= 1:
        raise ValueError(f"utilisation must be in (0, 1], got utilisation={utilisation}")
    compute, comm = flops / (utilisation * flops_per_s), comm_bytes / bandwidth
    return {"compute": compute, "comm": comm, "overlap": max(compute, comm), "serial": compute + comm}
