"""rlhf_fast.compat.liger against Liger-Kernel's own classes: the same constructor and forward
signatures, and, called the same way on padded random batches, the same loss, metrics and
gradients (w.r.t. the hidden states, the lm_head weight and its bias).

Liger's chunked GRPO loss is torch (run with compiled=False: torch.compile on a CPU would take
minutes); its cross-entropies are Triton kernels, which run here under TRITON_INTERPRET=1
(tests/conftest.py sets it on machines without a GPU). Every case is also checked against the
float64 formula (torch's cross-entropy, the reference policy loss), so the tests say something
where Liger is not installed.
"""

from __future__ import annotations

import inspect
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from numerics import policy_term_scale, random_mask, rel_err, tolerance

from rlhf_fast.compat import liger as ours

B, T, H, V = 5, 7, 16, 40
BUDGET = 2 * tolerance(torch.float32)  # two float32 computations of one formula


@pytest.fixture(scope="module")
def liger_grpo():
    return pytest.importorskip("liger_kernel.chunked_loss.grpo_loss", reason="Liger-Kernel is not installed")


@pytest.fixture(scope="module")
def liger_transformers():
    module = pytest.importorskip("liger_kernel.transformers", reason="Liger-Kernel is not installed")
    try:  # Triton must have a backend: a GPU, or the interpreter
        module.LigerCrossEntropyLoss()(torch.zeros(2, 3, requires_grad=True), torch.zeros(2, dtype=torch.long))
    except Exception as error:  # noqa: BLE001 - any failure means Liger's kernels cannot run here
        pytest.skip(f"Liger's Triton cross-entropy does not run here: {type(error).__name__}: {error}")
    return module


def _close(actual, expected, what, *, floor=None):
    err = rel_err(actual.detach(), expected.detach(), floor=floor)
    assert err <= BUDGET, f"{what}: rel err {err:.3g} > {BUDGET:.3g}"


def _grpo_batch(*, bias=True):
    hidden = torch.randn(B, T, H)
    weight = torch.randn(V, H) * 0.5
    b = torch.randn(V) * 0.1 if bias else None
    ids = torch.randint(0, V, (B, T))
    mask = random_mask(B, T, "mixed")
    mask[0, 0] = True
    adv = torch.randn(B)
    return hidden, weight, b, ids, mask.float(), adv


def _exact_logp(hidden, weight, bias, ids, temperature):
    logits = hidden.double() @ weight.double().T + (0 if bias is None else bias.double())
    return torch.log_softmax(logits / temperature, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1).float()


def _call_grpo(cls, init, hidden, weight, bias, **kwargs):
    x, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    b = None if bias is None else bias.clone().requires_grad_()
    loss, metrics = cls(**init)(x, w, bias=b, **kwargs)
    loss.backward()
    return loss, metrics, (x.grad, w.grad, None if b is None else b.grad)


GRPO_CASES = {
    "grpo": {"loss_type": "grpo"},
    "bnpo": {"loss_type": "bnpo"},
    "dr_grpo": {"loss_type": "dr_grpo", "max_completion_length": 9},
    "dapo": {"loss_type": "dapo"},
    "cispo": {"loss_type": "cispo", "epsilon_high": 1.3},
    "sapo": {"loss_type": "sapo"},
    "clip_higher_tempered": {"loss_type": "grpo", "epsilon_high": 0.28, "temperature": 0.7},
    "no_kl": {"loss_type": "dapo", "beta": 0.0, "use_ref_model": False},
    "sequence": {"loss_type": "grpo", "importance_sampling_level": "sequence", "epsilon_low": 0.05, "epsilon_high": 0.08},
    "delta": {"loss_type": "dapo", "delta": 1.5},
    "bias_corrected_kl": {"loss_type": "bnpo", "use_bias_correction_kl": True},
}  # fmt: skip
CALLS = ("plain", "num_items", "vllm_ratio", "on_policy", "ref_input")


@pytest.mark.parametrize("call", CALLS)
@pytest.mark.parametrize("case", list(GRPO_CASES))
def test_grpo_loss_matches_liger(liger_grpo, case, call):
    init = {"beta": 0.1, **GRPO_CASES[case]}
    hidden, weight, bias, ids, mask, adv = _grpo_batch()
    temperature = init.get("temperature", 1.0)
    logp = _exact_logp(hidden, weight, bias, ids, temperature)
    old = logp + 0.25 * torch.randn(B, T)
    ref = logp + 0.3 * torch.randn(B, T)
    kwargs = {"selected_token_ids": ids, "attention_mask": mask, "advantages": adv,
              "ref_per_token_logps": ref, "old_per_token_logps": old}  # fmt: skip
    if call == "num_items":
        kwargs["num_items_in_batch"] = 3 * int(mask.sum())
    elif call == "vllm_ratio":
        kwargs["vllm_is_ratio"] = torch.rand(B, T) * 1.5 + 0.25
    elif call == "on_policy":
        kwargs["old_per_token_logps"] = None
        old = logp
    elif call == "ref_input":
        ref_weight = weight + 0.05 * torch.randn(V, H)
        kwargs |= {"ref_per_token_logps": None, "ref_input": hidden + 0.05 * torch.randn(B, T, H),
                   "ref_weight": ref_weight, "ref_bias": bias}  # fmt: skip
        ref = _exact_logp(kwargs["ref_input"], ref_weight, bias, ids, temperature)
    stock = _call_grpo(liger_grpo.LigerFusedLinearGRPOLoss, {**init, "compiled": False}, hidden, weight, bias, **kwargs)
    mine = _call_grpo(ours.LigerFusedLinearGRPOLoss, init, hidden, weight, bias, **kwargs)

    scale = policy_term_scale(logp, old, adv, mask, "token-mean", ref_logp=ref, kl_coef=init["beta"])
    _close(mine[0], stock[0], "loss", floor=scale)
    assert len(mine[1]) == len(stock[1]), "metrics: (kl, clip_ratio) with beta, (clip_ratio,) without"
    names = ("kl", "clip_ratio") if len(stock[1]) == 2 else ("clip_ratio",)
    for name, a, b in zip(names, mine[1], stock[1]):
        if (name, init["loss_type"]) == ("clip_ratio", "cispo") or (name, init.get("use_bias_correction_kl")) == ("kl", True):
            continue  # counted differently on purpose (see rlhf_fast.compat.liger)
        _close(a, b, name, floor=1.0)
    for name, a, b in zip(("d / d _input", "d / d lin_weight", "d / d bias"), mine[2], stock[2]):
        _close(a, b, name)


@pytest.mark.parametrize(("init", "option"), [
    ({"loss_type": "luspo"}, "loss_type"),
    ({"loss_type": "vespo"}, "loss_type"),
    ({"loss_type": "cispo", "epsilon_high": 0.28}, "epsilon_high"),
    ({"delta": 1.1}, "delta"),
    ({"delta": 2.0, "importance_sampling_level": "sequence"}, "delta"),
    ({"use_bias_correction_kl": True, "importance_sampling_level": "sequence"}, "use_bias_correction_kl"),
])  # fmt: skip
def test_grpo_unsupported_options_name_themselves(init, option):
    with pytest.raises(NotImplementedError, match=option):
        ours.LigerFusedLinearGRPOLoss(**init)


@pytest.mark.parametrize(("init", "error"), [
    ({"loss_type": "dr_grpo"}, "max_completion_length"),
    ({"loss_type": "sapo", "importance_sampling_level": "sequence"}, "Sequence-level"),
    ({"sapo_temperature_neg": 0.0}, "sapo_temperature_neg"),
    ({"loss_type": "ppo"}, "loss_type"),
])  # fmt: skip
def test_grpo_invalid_options_raise_as_liger(init, error):
    with pytest.raises(ValueError, match=error):
        ours.LigerFusedLinearGRPOLoss(**init)


def _ce_case(n=24):
    labels = torch.randint(0, V, (n,))
    labels[torch.rand(n) < 0.3] = -100
    labels[0] = 3
    return labels


def _exact_ce(logits, labels, reduction, softcap=None):
    logits = logits.double()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return F.cross_entropy(logits, labels, ignore_index=-100, reduction=reduction)


@pytest.mark.parametrize("softcap", [None, 15.0])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_fused_linear_cross_entropy(softcap, reduction, request):
    hidden, weight, bias = torch.randn(24, H), torch.randn(V, H) * 0.8, torch.randn(V) * 0.1
    labels = _ce_case()
    results = []
    classes = [ours.LigerFusedLinearCrossEntropyLoss]
    if _liger_runs(request, softcap):
        classes.append(request.getfixturevalue("liger_transformers").LigerFusedLinearCrossEntropyLoss)
    for cls in classes:
        x, w, b = (t.clone().requires_grad_() for t in (hidden, weight, bias))
        loss = cls(reduction=reduction, softcap=softcap)(w, x, labels, b)
        (loss * torch.linspace(0.5, 1.5, loss.numel()).view(loss.shape)).sum().backward()
        results.append((loss, x.grad, w.grad, b.grad))
    x, w, b = (t.double().requires_grad_() for t in (hidden, weight, bias))
    exact = _exact_ce(x @ w.T + b, labels, reduction, softcap)
    (exact * torch.linspace(0.5, 1.5, exact.numel(), dtype=torch.float64).view(exact.shape)).sum().backward()
    expected = (exact, x.grad, w.grad, b.grad)
    for what, mine, want in zip(("loss", "d / d _input", "d / d lin_weight", "d / d bias"), results[0], expected):
        _close(mine, want.float(), f"vs float64 {what}")
    if len(results) == 2:
        for what, mine, stock in zip(("loss", "d / d _input", "d / d lin_weight", "d / d bias"), results[0], results[1]):
            _close(mine, stock.float(), f"vs Liger {what}")


@pytest.mark.parametrize("softcap", [None, 15.0])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy(softcap, reduction, request):
    logits, labels = torch.randn(24, V) * 3, _ce_case()
    results = []
    classes = [ours.LigerCrossEntropyLoss]
    if _liger_runs(request, softcap):
        classes.append(request.getfixturevalue("liger_transformers").LigerCrossEntropyLoss)
    for cls in classes:
        x = logits.clone().requires_grad_()
        loss = cls(reduction=reduction, softcap=softcap)(x, labels)
        (loss * torch.linspace(0.5, 1.5, loss.numel()).view(loss.shape)).sum().backward()
        results.append((loss, x.grad))
    x = logits.double().requires_grad_()
    exact = _exact_ce(x, labels, reduction, softcap)
    (exact * torch.linspace(0.5, 1.5, exact.numel(), dtype=torch.float64).view(exact.shape)).sum().backward()
    for what, mine, want in zip(("loss", "d / d _input"), results[0], (exact, x.grad)):
        _close(mine, want.float(), f"vs float64 {what}")
    if len(results) == 2:
        for what, mine, stock in zip(("loss", "d / d _input"), results[0], results[1]):
            _close(mine, stock.float(), f"vs Liger {what}")


def _liger_runs(request, softcap=None) -> bool:
    """Whether Liger's Triton cross-entropy can run this case here. Its soft-capped kernels fail
    under the Triton interpreter (tanh of a Python float), so on a CPU those cases are checked
    against the float64 formula only."""
    if softcap is not None and os.environ.get("TRITON_INTERPRET") == "1":
        return False
    try:
        request.getfixturevalue("liger_transformers")
    except pytest.skip.Exception:
        return False
    return True


@pytest.mark.parametrize(("cls", "init", "option"), [
    ("LigerFusedLinearCrossEntropyLoss", {"ce_weight": torch.ones(V)}, "ce_weight"),
    ("LigerFusedLinearCrossEntropyLoss", {"lse_square_scale": 1e-4}, "lse_square_scale"),
    ("LigerFusedLinearCrossEntropyLoss", {"label_smoothing": 0.1}, "label_smoothing"),
    ("LigerFusedLinearCrossEntropyLoss", {"use_token_scaling": True}, "use_token_scaling"),
    ("LigerFusedLinearCrossEntropyLoss", {"return_token_accuracy": True}, "return_token_accuracy"),
    ("LigerCrossEntropyLoss", {"weight": torch.ones(V)}, "weight"),
    ("LigerCrossEntropyLoss", {"return_z_loss": True}, "return_z_loss"),
    ("LigerCrossEntropyLoss", {"return_predicted_tokens": True}, "return_predicted_tokens"),
])  # fmt: skip
def test_cross_entropy_unsupported_options_name_themselves(cls, init, option):
    with pytest.raises(NotImplementedError, match=option):
        getattr(ours, cls)(**init)


def _params(fn):
    """Names, kinds and defaults (annotations are spelled differently: Optional[...] vs ... | None)."""
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]


@pytest.mark.parametrize(("name", "module"), [
    ("LigerFusedLinearGRPOLoss", "liger_kernel.chunked_loss"),
    ("LigerFusedLinearCrossEntropyLoss", "liger_kernel.transformers"),
    ("LigerCrossEntropyLoss", "liger_kernel.transformers"),
])  # fmt: skip
@pytest.mark.parametrize("method", ["__init__", "forward"])
def test_signatures_match_liger(name, module, method):
    theirs = getattr(pytest.importorskip(module, reason="Liger-Kernel is not installed"), name)
    assert _params(getattr(getattr(ours, name), method)) == _params(getattr(theirs, method))


def test_compat_does_not_import_liger():
    code = ("import sys, torch; from rlhf_fast.compat import liger; "
            "liger.LigerCrossEntropyLoss()(torch.randn(3, 5), torch.tensor([0, 1, -100])); "
            "assert not any(k.split('.')[0] == 'liger_kernel' for k in sys.modules), 'liger_kernel imported'")  # fmt: skip
    result = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
