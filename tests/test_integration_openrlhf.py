"""rlhf_fast.integrations.openrlhf against OpenRLHF's own code: its PolicyLoss, ValueLoss,
PairWiseLoss, LogExpLoss, compute_approx_kl, log_probs_from_logits, compute_entropy and
Actor.forward (on tiny transformers models built from configs), called the same way on random
batches with padding, give the drop-ins' values and gradients; enable() / disable() swap the names
where OpenRLHF's trainers import them.

OpenRLHF's models package imports deepspeed, flash_attn and peft at module level (GPU training
stacks): where they are not installed, the ``openrlhf`` fixture stands in modules for them while
it imports OpenRLHF, and removes them (and OpenRLHF's modules) afterwards. The stand-ins are empty
but for flash_attn's unpad / pad helpers, which OpenRLHF's packed-samples path calls: those are
written out in torch below.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import inspect
import sys
import types
import warnings

import pytest
import torch
from numerics import policy_term_scale, random_mask, rel_err, tolerance

from rlhf_fast.integrations import UntestedVersionWarning
from rlhf_fast.integrations import openrlhf as ours

# Two float32 computations of one formula, each within the float32 budget of the exact value.
BUDGET = 2 * tolerance(torch.float32)


def _unpad_input(hidden, attention_mask):
    """flash_attn.bert_padding.unpad_input: the attended rows of [B, T, ...] and where they were."""
    indices = torch.nonzero(attention_mask.flatten()).flatten()
    lengths = attention_mask.sum(-1, dtype=torch.int32)
    cu_seqlens = torch.nn.functional.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
    return hidden.flatten(0, 1)[indices], indices, cu_seqlens, int(lengths.max()), lengths


def _pad_input(hidden, indices, batch, seqlen):
    """flash_attn.bert_padding.pad_input: the rows back at ``indices`` of [B, T, ...], zeros elsewhere."""
    out = hidden.new_zeros(batch * seqlen, *hidden.shape[1:])
    out[indices] = hidden
    return out.view(batch, seqlen, *hidden.shape[1:])


def _rearrange(x, pattern):
    assert pattern == "b s ... -> (b s) ...", pattern  # the only one OpenRLHF's packing uses
    return x.flatten(0, 1)


_STAND_INS = {
    "deepspeed": {"utils": types.SimpleNamespace(set_z3_leaf_modules=None)},
    "flash_attn": {},
    "flash_attn.bert_padding": {
        "index_first_axis": lambda x, indices: x[indices],
        "pad_input": _pad_input,
        "rearrange": _rearrange,
        "unpad_input": _unpad_input,
    },
    "flash_attn.utils": {},
    "flash_attn.utils.distributed": {"all_gather": None},
    "peft": {"LoraConfig": object, "TaskType": object, "get_peft_model": None},
    "peft.tuners": {},
    "peft.tuners.lora": {"LoraLayer": object},
}


def _missing(name: str) -> bool:
    try:
        return importlib.util.find_spec(name.split(".")[0]) is None
    except (ImportError, ValueError):
        return True


@pytest.fixture(scope="module")
def openrlhf():
    """OpenRLHF's models package (``.loss``, ``.utils``, ``.actor``), imported with stand-ins for
    its GPU-only imports where those are missing; everything is unloaded at the end."""
    pytest.importorskip("openrlhf", reason="OpenRLHF is not installed (pip install --no-deps openrlhf==0.11.2 pylatexenc)")
    before = set(sys.modules)
    missing = [name for name in _STAND_INS if _missing(name)]  # before a stand-in parent shadows its package
    with pytest.MonkeyPatch.context() as patch:
        for name, attrs in _STAND_INS.items():
            if name in missing:
                module = types.ModuleType(name)
                # A spec without a distribution: transformers' is_deepspeed_available() calls
                # find_spec("deepspeed"), which raises on a module whose __spec__ is None.
                module.__spec__ = importlib.machinery.ModuleSpec(name, None)
                module.__dict__.update(attrs)
                patch.setitem(sys.modules, name, module)
        try:
            models = importlib.import_module("openrlhf.models")
            importlib.import_module("openrlhf.models.utils")
        except ImportError as error:
            pytest.skip(f"openrlhf.models cannot be imported here: {error}")
        yield models
        ours.disable()
    for name in set(sys.modules) - before:
        if name.split(".")[0] == "openrlhf":
            del sys.modules[name]


def _eager(fn):
    """OpenRLHF's compute_entropy is torch.compile'd: compare against the function it wraps."""
    return getattr(fn, "_torchdynamo_orig_callable", fn)


def _ppo_batch(rows=7, tokens=12, *, per_sequence_adv=False):
    mask = random_mask(rows, tokens, "mixed")
    mask[0, :3] = True  # at least one valid token
    logp = -torch.rand(rows, tokens) * 3 - 0.05
    old = logp + 0.3 * torch.randn(rows, tokens)
    rollout = old + 0.2 * torch.randn(rows, tokens)
    adv = torch.randn(rows, 1).expand(rows, tokens).clone() if per_sequence_adv else torch.randn(rows, tokens)
    return mask, logp, old, rollout, adv


def _run_policy(loss_fn, logp, old, adv, mask, rollout, **batch_info):
    x = logp.clone().requires_grad_()
    out = loss_fn(x, old, adv, action_mask=mask, rollout_log_probs=rollout, **batch_info)
    out[0].backward()
    return out, x.grad


def _assert_close(actual, expected, what, *, scale=None):
    if expected is None:
        assert actual is None, f"{what}: expected None, got {actual}"
        return
    floor = scale if scale is not None else 0.01 * max(expected.numel(), 1) ** 0.5
    err = rel_err(actual.detach(), expected.detach().float(), floor=floor)
    assert err <= BUDGET, f"{what}: rel err {err:.3g} > {BUDGET:.3g}"


POLICY_CASES = {
    "ppo": {},
    "clip_higher": {"clip_eps_low": 0.2, "clip_eps_high": 0.28},
    "dual_clip": {"dual_clip": 3.0},
    "sample_level": {"token_level_loss": False},
    "gspo": {"policy_loss_type": "gspo", "clip_eps_low": 0.1, "clip_eps_high": 0.15},
    "token_mask": {"is_correction_level": "token", "is_correction_threshold": (0.8, 1.2)},
    "seq_mask": {"is_correction_level": "seq", "is_correction_threshold": (0.9, 1.1)},
    "token_clip": {"is_correction_level": "token", "is_correction_mode": "clip", "is_correction_threshold": (0.8, 1.2)},
    "token_binary_kl": {"is_correction_level": "token", "is_correction_gating": "binary_kl", "is_correction_threshold": (0.0, 0.02)},
    "seq_tv": {"is_correction_level": "seq", "is_correction_gating": "tv", "is_correction_threshold": (0.0, 0.05)},
    "gspo_corrected": {"policy_loss_type": "gspo", "is_correction_level": "token"},
}  # fmt: skip
BATCH_INFOS = {"local": {}, "global": {"dp_size": 2, "batch_num_tokens": 37.0, "global_batch_size": 11.0}}


@pytest.mark.parametrize("info", list(BATCH_INFOS))
@pytest.mark.parametrize("case", list(POLICY_CASES))
def test_policy_loss_matches_openrlhf(openrlhf, case, info):
    kwargs = POLICY_CASES[case]
    mask, logp, old, rollout, adv = _ppo_batch(per_sequence_adv=kwargs.get("policy_loss_type") == "gspo")
    stock_out, stock_grad = _run_policy(openrlhf.loss.PolicyLoss(**kwargs), logp, old, adv, mask, rollout, **BATCH_INFOS[info])
    our_out, our_grad = _run_policy(ours.PolicyLoss(**kwargs), logp, old, adv, mask, rollout, **BATCH_INFOS[info])
    agg = "token-mean" if kwargs.get("token_level_loss", True) and kwargs.get("policy_loss_type") != "gspo" else "seq-mean-token-mean"
    scale = policy_term_scale(logp, old, adv, mask, agg)
    _assert_close(our_out[0], stock_out[0], "loss", scale=scale)
    _assert_close(our_grad, stock_grad, "d loss / d log_probs")
    for name, a, b in zip(("clip_ratio", "ppo_kl", "vllm_kl", "is_filter_ratio"), our_out[1:], stock_out[1:]):
        _assert_close(a, b, name, scale=1.0)


def test_gspo_refuses_per_token_advantages():
    mask, logp, old, _, adv = _ppo_batch()
    with pytest.raises(ValueError, match="policy_loss_type='gspo'"):
        ours.PolicyLoss(policy_loss_type="gspo")(logp, old, adv, action_mask=mask)


@pytest.mark.parametrize(("kwargs", "option"), [
    ({"policy_loss_type": "cispo"}, "policy_loss_type"),
    ({"policy_loss_type": "gspo", "dual_clip": 3.0}, "dual_clip"),
    ({"is_correction_level": "sequence"}, "is_correction_level"),
    ({"is_correction_level": "seq", "is_correction_mode": "clip"}, "is_correction_mode"),
    ({"is_correction_level": "token", "is_correction_gating": "tv"}, "is_correction_gating"),
])  # fmt: skip
def test_policy_loss_errors_name_the_option(kwargs, option):
    with pytest.raises(ValueError, match=option):
        ours.PolicyLoss(**kwargs)


def test_correction_needs_rollout_log_probs():
    mask, logp, old, _, adv = _ppo_batch()
    with pytest.raises(ValueError, match="rollout_log_probs"):
        ours.PolicyLoss(is_correction_level="token")(logp, old, adv, action_mask=mask)


@pytest.mark.parametrize("info", list(BATCH_INFOS))
@pytest.mark.parametrize("token_level_loss", [True, False])
@pytest.mark.parametrize("clip_eps", [None, 0.2])
def test_value_loss_matches_openrlhf(openrlhf, clip_eps, token_level_loss, info):
    mask = random_mask(6, 9, "mixed")
    mask[0, 0] = True
    values, old_values, returns = torch.randn(6, 9), torch.randn(6, 9), torch.randn(6, 9)
    results = []
    for cls in (openrlhf.loss.ValueLoss, ours.ValueLoss):
        x = values.clone().requires_grad_()
        loss = cls(clip_eps, token_level_loss)(x, old_values, returns, action_mask=mask, **BATCH_INFOS[info])
        loss.backward()
        results.append((loss, x.grad))
    (stock, stock_grad), (mine, my_grad) = results
    _assert_close(mine, stock, "value loss")
    _assert_close(my_grad, stock_grad, "d loss / d values")


@pytest.mark.parametrize("margin", [False, True])
@pytest.mark.parametrize("name", ["PairWiseLoss", "LogExpLoss"])
def test_pairwise_losses_match_openrlhf(openrlhf, name, margin):
    chosen, rejected = torch.randn(16) * 2, torch.randn(16) * 2
    extra = torch.rand(16) if margin else None
    results = []
    for cls in (getattr(openrlhf.loss, name), getattr(ours, name)):
        c, r = chosen.clone().requires_grad_(), rejected.clone().requires_grad_()
        loss = cls()(c, r, extra)
        loss.backward()
        results.append((loss, c.grad, r.grad))
    for what, mine, stock in zip(("loss", "d / d chosen", "d / d reject"), results[1], results[0]):
        _assert_close(mine, stock, f"{name} {what}")


@pytest.mark.parametrize("with_old", [False, True])
@pytest.mark.parametrize("unbiased", [False, True])
@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_compute_approx_kl_matches_openrlhf(openrlhf, estimator, unbiased, with_old):
    logp = -torch.rand(5, 40) * 3
    base = logp + torch.randn(5, 40) * 0.5
    base[0, :4] = logp[0, :4] + torch.tensor([12.0, 30.0, -12.0, -30.0])  # past both clamps, k3's pre-clamp included
    old = logp + 0.4 * torch.randn(5, 40)
    old[1, :2] = logp[1, :2] - 5.0  # an importance weight above its cap of 10
    results = []
    for fn in (openrlhf.utils.compute_approx_kl, ours.compute_approx_kl):
        x, b = logp.clone().requires_grad_(), base.clone().requires_grad_()
        kl = fn(x, b, log_probs_old=old if with_old else None, kl_estimator=estimator, unbiased_gradient=unbiased)
        upstream = torch.randn_like(kl, generator=torch.Generator().manual_seed(0))
        (kl * upstream).sum().backward()
        results.append((kl, x.grad, b.grad))
    for what, mine, stock in zip(("kl", "d / d log_probs", "d / d log_probs_base"), results[1], results[0]):
        assert torch.isfinite(mine).all(), what
        _assert_close(mine, stock, f"{estimator} {what}")


def test_compute_approx_kl_rejects_unknown_estimator():
    with pytest.raises(ValueError, match="kl_estimator"):
        ours.compute_approx_kl(torch.zeros(2, 3), torch.zeros(2, 3), kl_estimator="k4")


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_log_probs_and_entropy_match_openrlhf(openrlhf, temperature):
    logits = torch.randn(3, 10, 50) * 2
    labels = torch.randint(0, 50, (3, 10))
    results = []
    for lp_fn, ent_fn in ((openrlhf.utils.log_probs_from_logits, _eager(openrlhf.utils.compute_entropy)),
                          (ours.log_probs_from_logits, ours.compute_entropy)):  # fmt: skip
        x = logits.clone().requires_grad_()
        tempered = x * 1.0  # OpenRLHF's divides its argument in place
        logp = lp_fn(tempered, labels, temperature=temperature)
        entropy = ent_fn(x / temperature)
        (logp.sum() + 0.3 * entropy.sum()).backward()
        results.append((logp, entropy, x.grad))
    for what, mine, stock in zip(("log-probs", "entropy", "d / d logits"), results[1], results[0]):
        _assert_close(mine, stock, what)


VOCAB = 61


def _tiny_lm(family: str) -> torch.nn.Module:
    """A float32 causal LM from a config (no download), in eval mode: no dropout between the two runs."""
    transformers = pytest.importorskip("transformers")
    configs = {
        "llama": lambda: transformers.LlamaConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, pad_token_id=0, tie_word_embeddings=False),
        # GPT-2 ties lm_head to the token embedding (wte).
        "gpt2": lambda: transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4),
        # Cohere scales the head's output by config.logit_scale (rlhf_fast.hf.head_options).
        "cohere": lambda: transformers.CohereConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, pad_token_id=0, logit_scale=0.5),
    }  # fmt: skip
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(configs[family]()).float().eval()
    # As Actor.__init__ sets it when it loads the model; with a cache, transformers would not
    # separate packed samples by their position_ids (OpenRLHF's packing relies on it).
    model.config.use_cache = False
    return model


def _actor_batch(rows=3, tokens=11, actions=5):
    """sequences [B, T], attention_mask (left-padded prompts, right-padded responses), action_mask [B, A]."""
    generator = torch.Generator().manual_seed(1)
    sequences = torch.randint(1, VOCAB, (rows, tokens), generator=generator)
    attention_mask = torch.ones(rows, tokens, dtype=torch.long)
    attention_mask[0, :2] = 0
    attention_mask[1, -2:] = 0
    sequences[attention_mask == 0] = 0
    action_mask = attention_mask[:, -actions:].bool()
    action_mask[2, 1] = False
    return sequences, attention_mask, action_mask


def _head_must_not_run(model, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the lm_head's forward ran: the [B, T, V] logits were built")

    monkeypatch.setattr(model.get_output_embeddings(), "forward", refuse)


def _actor_run(forward, actor, sequences, attention_mask, action_mask, kwargs):
    """forward(actor, ...)'s log-probs, entropy (or None) and every parameter's gradient of a
    weighted sum of both (fixed random weights, so that no position's error can cancel)."""
    actor.model.zero_grad(set_to_none=True)
    out = forward(actor, sequences, action_mask, attention_mask=attention_mask, **kwargs)
    logp, output = out if kwargs.get("return_output") else (out, None)
    generator = torch.Generator().manual_seed(2)
    loss = (logp * torch.randn(logp.shape, generator=generator)).sum()
    entropy = None
    if kwargs.get("return_entropy"):
        entropy = output.entropy
        loss = loss + (entropy * torch.randn(entropy.shape, generator=generator)).sum()
    loss.backward()
    grads = {name: p.grad.clone() for name, p in actor.model.named_parameters() if p.grad is not None}
    return logp.detach(), None if entropy is None else entropy.detach(), grads


def _assert_actor_runs_equal(mine, stock, what):
    (logp, entropy, grads), (stock_logp, stock_entropy, stock_grads) = mine, stock
    assert logp.dtype == torch.float32 and logp.shape == stock_logp.shape, f"{what}: {logp.dtype} {tuple(logp.shape)}"
    _assert_close(logp, stock_logp, f"{what} log-probs")
    if stock_entropy is not None:
        assert entropy.shape == stock_entropy.shape, f"{what}: entropy {tuple(entropy.shape)}"
    _assert_close(entropy, stock_entropy, f"{what} entropy")
    assert grads.keys() == stock_grads.keys(), f"{what}: parameters with a gradient differ"
    for name, grad in stock_grads.items():
        _assert_close(grads[name], grad, f"{what} d / d {name}")


ACTOR_CASES = {
    # PPO's actor step: action log-probs, output.entropy, a temperature.
    "actions_entropy": ({"return_output": True, "return_entropy": True}, 0.7, False),
    # The reference model's and the experience maker's call: action log-probs only.
    "actions": ({}, 1.0, False),
    # SFT / DPO: every next-token log-prob, no action_mask.
    "all_logprobs": ({"return_output": True, "return_logprobs": True}, 0.8, False),
    # packing_samples: the padding removed, one [1, N] row.
    "packed": ({"return_output": True, "return_entropy": True}, 0.7, True),
}


@pytest.mark.parametrize("case", list(ACTOR_CASES))
@pytest.mark.parametrize("family", ["llama", "gpt2", "cohere"])
def test_fused_actor_matches_openrlhf_actor(openrlhf, monkeypatch, family, case):
    """actor_forward (hidden states and lm_head, linear_token_logprobs) against OpenRLHF's
    Actor.forward (the model's logits): log-probs, entropy and every parameter's gradient; the
    lm_head's forward never runs in the fused one."""
    from openrlhf.models import actor as actor_module

    # OpenRLHF's entropy is torch.compile'd; the stock run uses the eager function it wraps.
    monkeypatch.setattr(actor_module, "compute_entropy", _eager(actor_module.compute_entropy))
    kwargs, temperature, packed = ACTOR_CASES[case]
    actor = openrlhf.Actor(_tiny_lm(family), temperature=temperature)
    actor.packing_samples = packed  # set by Actor.__init__ only when it loads the model itself
    sequences, attention_mask, action_mask = _actor_batch()
    if kwargs.get("return_logprobs"):
        action_mask = None
    stock = _actor_run(openrlhf.Actor.forward, actor, sequences, attention_mask, action_mask, kwargs)
    _head_must_not_run(actor.model, monkeypatch)
    mine = _actor_run(ours.actor_forward, actor, sequences, attention_mask, action_mask, kwargs)
    _assert_actor_runs_equal(mine, stock, f"{family} {case}")
    if action_mask is not None:
        assert (mine[0][~action_mask] == 0).all(), "masked actions' log-probs must be 0"


def _refusal_actor(**attrs):
    """What actor_forward reads of an OpenRLHF Actor, around a tiny llama."""
    return types.SimpleNamespace(model=_tiny_lm("llama"), temperature=1.0, packing_samples=False, **attrs)


REFUSED = ["logits", "return_entropy", "ring_attn_group", "is_vlm", "mm_inputs", "attention_mask", "action_mask",
           "output_router_logits", "zero_stage=3"]  # fmt: skip


@pytest.mark.parametrize("option", REFUSED)
def test_fused_actor_refuses_what_it_cannot_serve(option):
    actor = _refusal_actor(is_vlm=option == "is_vlm")
    sequences, attention_mask, action_mask = _actor_batch()
    args, kwargs = [sequences, action_mask], {"attention_mask": attention_mask, "return_output": True}
    match = option
    if option == "logits":
        args[1], match = None, "action_mask=None and return_logprobs=False"
    elif option == "return_entropy":
        kwargs.update(return_output=False, return_entropy=True)
    elif option == "ring_attn_group":
        kwargs["ring_attn_group"] = object()
    elif option == "mm_inputs":
        kwargs["pixel_values"] = torch.zeros(1)
    elif option == "attention_mask":
        kwargs["attention_mask"] = None
    elif option == "action_mask":
        args[1] = torch.ones(3, sequences.shape[1], dtype=torch.bool)  # A must be < T
    elif option == "output_router_logits":
        actor.model.config.output_router_logits = True
    elif option == "zero_stage=3":
        actor.model.lm_head.weight.ds_id = 0  # what deepspeed.zero.Init puts on the parameters it partitions
    with pytest.raises(ValueError, match=match):
        ours.actor_forward(actor, *args, **kwargs)


def test_enable_routes_openrlhf_actor_and_trainers(openrlhf, monkeypatch):
    from openrlhf.models import actor as actor_module

    # The ray trainers need ray, vllm and deepspeed; stand-in modules holding OpenRLHF's names test the table.
    for module_name, names in ours.TRAINERS.items():
        stand_in = types.ModuleType(module_name)
        for name in names:
            setattr(stand_in, name, getattr(openrlhf.utils if name == "compute_approx_kl" else openrlhf.loss, name))
        monkeypatch.setitem(sys.modules, module_name, stand_in)
    # OpenRLHF's entropy is torch.compile'd; the stock run uses the eager function it wraps.
    monkeypatch.setattr(actor_module, "compute_entropy", _eager(actor_module.compute_entropy))

    actor = openrlhf.Actor(_tiny_lm("llama"), temperature=0.8)
    actor.packing_samples = False  # set by Actor.__init__ only when it loads the model itself
    sequences, attention_mask, action_mask = _actor_batch()
    kwargs = {"return_output": True, "return_entropy": True}

    def call(actor, *args, **kwargs):
        return actor(*args, **kwargs)

    stock = _actor_run(call, actor, sequences, attention_mask, action_mask, kwargs)
    originals = {(m, n): getattr(sys.modules[m], n) for m, names in (ours.DEFINITIONS | ours.TRAINERS).items() for n in names}
    stock_forward = openrlhf.Actor.forward
    patched = ours.enable()
    try:
        assert set(patched) == {f"{m}.{n}" for m, n in originals} | {"openrlhf.models.actor.Actor.forward"}
        assert ours.enable() == patched  # idempotent
        for (module_name, name) in originals:
            assert getattr(sys.modules[module_name], name) is getattr(ours, name), f"{module_name}.{name}"
        assert openrlhf.Actor.forward is ours.actor_forward
        with monkeypatch.context() as head:
            _head_must_not_run(actor.model, head)
            mine = _actor_run(call, actor, sequences, attention_mask, action_mask, kwargs)
        # fused_actor=False: OpenRLHF's forward, on the log_probs_from_logits / compute_entropy drop-ins.
        assert "openrlhf.models.actor.Actor.forward" not in ours.enable(fused_actor=False)
        assert openrlhf.Actor.forward is stock_forward
        on_logits = _actor_run(call, actor, sequences, attention_mask, action_mask, kwargs)
    finally:
        ours.disable()
    for (module_name, name), original in originals.items():
        assert getattr(sys.modules[module_name], name) is original, f"{module_name}.{name} not restored"
    assert openrlhf.Actor.forward is stock_forward, "Actor.forward not restored"
    _assert_actor_runs_equal(mine, stock, "enable() Actor.forward")
    _assert_actor_runs_equal(on_logits, stock, "enable(fused_actor=False) Actor.forward")


def test_enable_skips_trainers_that_cannot_import(openrlhf):
    with pytest.warns(UserWarning, match="not patched"):
        patched = ours.enable()
    try:
        assert "openrlhf.models.loss.PolicyLoss" in patched
    finally:
        ours.disable()


def test_version_outside_tested_range_warns(openrlhf, monkeypatch):
    assert ours.check_openrlhf_version() == importlib.metadata.version("openrlhf")
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.13.1")
    with pytest.warns(UntestedVersionWarning, match=r"openrlhf 0\.13\.1 .*0\.11\.2"):
        ours.check_openrlhf_version()


@pytest.mark.parametrize("name", ["PolicyLoss", "ValueLoss", "PairWiseLoss", "LogExpLoss"])
def test_class_signatures_match_openrlhf(openrlhf, name):
    for method in ("__init__", "forward"):
        assert _params(getattr(getattr(ours, name), method)) == _params(getattr(getattr(openrlhf.loss, name), method)), f"{name}.{method}"


@pytest.mark.parametrize("name", ["compute_approx_kl", "log_probs_from_logits", "compute_entropy"])
def test_function_signatures_match_openrlhf(openrlhf, name):
    assert _params(getattr(ours, name)) == _params(_eager(getattr(openrlhf.utils, name)))


def test_actor_forward_signature_matches_openrlhf(openrlhf):
    assert _params(ours.actor_forward) == _params(openrlhf.Actor.forward)


def _params(fn):
    """Names, kinds and defaults (annotations are spelled differently: Optional[...] vs ... | None)."""
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]


def test_drop_ins_do_not_import_openrlhf():
    code = ("import sys, torch; import rlhf_fast.integrations.openrlhf as m; "
            "m.PolicyLoss()(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2)); "
            "assert not any(k.split('.')[0] == 'openrlhf' for k in sys.modules), 'openrlhf imported'")  # fmt: skip
    import subprocess

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
