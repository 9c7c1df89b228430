"""lora_ref: the reference implementation behind "The Mathematics of LoRA".

Pick a backend with one import; both have the same names, signatures and numbers:

    from lora_ref import numpy as ln      # or: from lora_ref import torch as lt
    A, B = ln.init_lora(d, k, r, seed=0)

Other modules: ``targets`` (PEFT's target_modules rule), ``spectral`` (SVD, Eckart-Young,
effective rank, subspace similarity), ``budget`` (parameter and memory counts from model
configs), ``adapters`` (PEFT's adapter file format), ``quant`` (NF4, byte-exact with
bitsandbytes), ``tiny`` (a shipped tiny Llama, its data and the one training loop),
``shipped`` (the precomputed results), ``output`` (``quiet``, ``rounds_robustly``), ``figures``,
``exercises``, ``timing`` and ``source`` (what the chapters share); ``lora_ref.quiet()`` keeps
transformers, PEFT and bitsandbytes from printing into a notebook.
Importing ``lora_ref``, ``lora_ref.numpy``, ``lora_ref.targets`` or ``lora_ref.budget``
never imports torch.

Extras: ``lora_ref[torch]`` for the torch backend and adapter files, ``lora_ref[qlora]``
for ``tiny`` and ``quant`` with transformers, PEFT and bitsandbytes, ``lora_ref[book]``
for the figures.
"""

from .output import quiet

__version__ = "0.1.0"

__all__ = ["quiet", "__version__"]
