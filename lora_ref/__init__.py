"""lora_ref: the reference implementation behind "The Mathematics of LoRA".

Pick a backend with one import; both have the same names, signatures and numbers:

    from lora_ref import numpy as lr      # or: from lora_ref import torch as lr
    A, B = lr.init_lora(d, k, r, seed=0)

Other modules: ``spectral`` (SVD, Eckart-Young, effective rank, subspace similarity),
``budget`` (parameter and memory counts from model configs), ``adapters`` (PEFT's
adapter file format). Importing ``lora_ref`` or ``lora_ref.numpy`` never imports torch.
"""

__version__ = "0.1.0"
