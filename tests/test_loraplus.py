"""lora_ref.torch.loraplus_optimizer against PEFT's create_loraplus_optimizer, and what LoRA+ does to a step."""

import copy
import logging

import pytest
import torch
from torch import nn

from lora_ref import oracles
from lora_ref import rank_scaling as rs
from lora_ref import torch as lt

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
peft_optimizers = pytest.importorskip("peft.optimizers")


class Net(nn.Module):
    """An embedding, two adapted linear layers with biases, a LayerNorm between them."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.fc1 = nn.Linear(8, 16)
        self.ln = nn.LayerNorm(16)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x):
        return self.fc2(torch.tanh(self.ln(self.fc1(self.emb(x)))))


EXTRA_TRAINABLE = ("ln.weight", "ln.bias", "fc1.bias")     # 1-D parameters a user may also train


def _pair(extra=(), seed=0):
    """Our LoRA model and PEFT's twin with the same A, B (B nonzero), and the same extra trainable parameters."""
    torch.manual_seed(seed)
    base = Net().double()
    ours = lt.add_lora(copy.deepcopy(base), ["fc1", "fc2"], r=2, alpha=4)
    with torch.no_grad():
        for m in lt.lora_modules(ours).values():
            m.lora_B.normal_()
    theirs = oracles.peft_twin(base, ours)
    for name in extra:                                       # fc1.bias lives in fc1.base_layer in both
        peft_name = name.replace("fc1.", "fc1.base_layer.")
        ours.get_parameter(peft_name).requires_grad_(True)
        theirs.base_model.model.get_parameter(peft_name).requires_grad_(True)
    return ours, theirs


def _ours_name(peft_name):
    """base_model.model.fc1.lora_A.default.weight -> fc1.lora_A (the names of lora_ref's parameters)."""
    name = peft_name.removeprefix("base_model.model.")
    for factor in ("lora_A", "lora_B"):
        name = name.replace(f"{factor}.default.weight", factor)
    return name


def _groups(opt, model, rename=lambda n: n):
    names = {id(p): rename(n) for n, p in model.named_parameters()}
    return [(g["lr"], g["weight_decay"], sorted(names[id(p)] for p in g["params"])) for g in opt.param_groups
            if g["params"]]


@pytest.mark.parametrize("extra", [(), EXTRA_TRAINABLE], ids=["factors only", "with 1-D parameters"])
@pytest.mark.parametrize("decay", [0.0, 0.1])
def test_groups_match_peft_create_loraplus_optimizer(extra, decay):
    ours, theirs = _pair(extra)
    kw = dict(lr=1e-3, loraplus_lr_ratio=16.0, loraplus_weight_decay=decay)
    mine = lt.loraplus_optimizer(ours, torch.optim.AdamW, **kw)
    peft_opt = peft_optimizers.create_loraplus_optimizer(theirs, torch.optim.AdamW, **kw)
    assert _groups(mine, ours) == _groups(peft_opt, theirs, _ours_name)
    if extra:   # the 1-D rule and the decay rule were exercised: LayerNorm and bias at lr * ratio, no decay
        assert (0.016, 0.0, ["fc1.base_layer.bias", "ln.bias", "ln.weight"]) in _groups(mine, ours)


def test_training_with_it_matches_peft_step_for_step():
    ours, theirs = _pair(EXTRA_TRAINABLE)
    kw = dict(lr=1e-2, loraplus_lr_ratio=8.0, loraplus_weight_decay=0.05)
    opts = [lt.loraplus_optimizer(ours, torch.optim.AdamW, **kw),
            peft_optimizers.create_loraplus_optimizer(theirs, torch.optim.AdamW, **kw)]
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        x, target = torch.randint(0, 10, (6,), generator=g), torch.randn(6, 4, generator=g, dtype=torch.float64)
        for model, opt in zip((ours, theirs), opts):
            opt.zero_grad()
            ((model(x) - target) ** 2).sum().backward()
            opt.step()
    theirs_params = {_ours_name(n): p for n, p in theirs.named_parameters()}
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p, theirs_params[name], rtol=1e-12, atol=1e-12, msg=name)
    assert float((ours.fc1.lora_A - _pair(EXTRA_TRAINABLE)[0].fc1.lora_A).detach().abs().max()) > 1e-3   # trained


def test_holds_exactly_the_trainable_parameters():
    ours, _ = _pair(EXTRA_TRAINABLE)
    opt = lt.loraplus_optimizer(ours, torch.optim.SGD, lr=0.1, loraplus_lr_ratio=4)
    in_opt = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(in_opt) == sorted(id(p) for p in ours.parameters() if p.requires_grad)
    assert len(in_opt) == len(set(in_opt)) == 4 + len(EXTRA_TRAINABLE)


def test_sgd_step_of_B_is_ratio_times_the_step_of_A():
    """eq-ch05-loraplus: one SGD step moves A by -lr dL/dA and B by -lambda lr dL/dB."""
    ours, _ = _pair()
    before = {n: p.detach().clone() for n, p in ours.named_parameters() if p.requires_grad}
    opt = lt.loraplus_optimizer(ours, torch.optim.SGD, lr=0.01, loraplus_lr_ratio=16)
    ours(torch.arange(5)).pow(2).sum().backward()
    grads = {n: p.grad.clone() for n, p in ours.named_parameters() if p.requires_grad}
    opt.step()
    for n, p in ours.named_parameters():
        if p.requires_grad:
            lr = 0.16 if "lora_B" in n else 0.01
            torch.testing.assert_close(p.detach(), before[n] - lr * grads[n], rtol=0, atol=1e-15, msg=n)


def test_under_adam_from_B_zero_it_is_alpha_times_ratio():
    """prop-ch05-loraplus-alpha: LoRA+ (s, lambda) = plain Adam at scale lambda s, with B's eps times lambda
    (prop-ch03-equivalence with a = 1, b = 1 / lambda); a power-of-2 lambda keeps every rescaling exact."""
    lam = 8.0
    torch.manual_seed(0)
    base = Net().double()
    plus = lt.add_lora(copy.deepcopy(base), ["fc1", "fc2"], r=2, alpha=4)            # B = 0, PEFT's init
    plain = lt.add_lora(copy.deepcopy(base), ["fc1", "fc2"], r=2, alpha=4 * lam)
    with torch.no_grad():
        for a, b in zip(lt.lora_modules(plus).values(), lt.lora_modules(plain).values()):
            b.lora_A.copy_(a.lora_A)
    q = rs.equivalent_settings(plus.fc1.scaling, 1e-2, lam * 1e-2, 1.0, 1 / lam, "adam")
    assert q["scaling"] == plain.fc1.scaling and q["lr_B"] == q["lr_A"] == 1e-2
    opt_plus = lt.loraplus_optimizer(plus, torch.optim.Adam, lr=1e-2, loraplus_lr_ratio=lam)
    A_params = [m.lora_A for m in lt.lora_modules(plain).values()]
    B_params = [m.lora_B for m in lt.lora_modules(plain).values()]
    opt_plain = torch.optim.Adam([{"params": A_params, "eps": q["eps_A"]}, {"params": B_params, "eps": q["eps_B"]}],
                                 lr=1e-2)
    g = torch.Generator().manual_seed(3)
    for _ in range(20):
        x, target = torch.randint(0, 10, (6,), generator=g), torch.randn(6, 4, generator=g, dtype=torch.float64)
        for model, opt in ((plus, opt_plus), (plain, opt_plain)):
            opt.zero_grad()
            ((model(x) - target) ** 2).sum().backward()
            opt.step()
    for a, b in zip(lt.lora_modules(plus).values(), lt.lora_modules(plain).values()):
        torch.testing.assert_close(lt.delta_w(a.lora_A, a.lora_B, a.scaling), lt.delta_w(b.lora_A, b.lora_B, b.scaling),
                                   rtol=1e-12, atol=1e-14)
        assert float(a.lora_B.detach().abs().max()) > 1e-2                          # it trained


def test_weight_decay_keyword_is_refused_with_the_keyword_to_use():
    ours, _ = _pair()
    with pytest.raises(ValueError, match="loraplus_weight_decay=0.01"):
        lt.loraplus_optimizer(ours, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16, weight_decay=0.01)


def test_model_without_lora_B_is_refused():
    with pytest.raises(ValueError, match="no trainable lora_B"):
        lt.loraplus_optimizer(Net(), torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16)


@pytest.mark.parametrize("lr, ratio", [(0.0, 16), (1e-3, -1.0), (float("nan"), 16)])
def test_bad_learning_rates_are_refused(lr, ratio):
    ours, _ = _pair()
    with pytest.raises(ValueError):
        lt.loraplus_optimizer(ours, torch.optim.AdamW, lr=lr, loraplus_lr_ratio=ratio)


def test_eight_bit_adam_keeps_embeddings_in_32_bit_as_peft_does():
    bnb = pytest.importorskip("bitsandbytes")
    ours, _ = _pair()
    manager = bnb.optim.GlobalOptimManager.get_instance()
    manager.module_weight_config_triple.clear()
    lt.loraplus_optimizer(ours, bnb.optim.AdamW8bit, lr=1e-3, loraplus_lr_ratio=16)
    assert (ours.emb, "weight", {"optim_bits": 32}) in manager.module_weight_config_triple
    manager.module_weight_config_triple.clear()
