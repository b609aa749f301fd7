"""rlhf_fast.integrations.trl against TRL's own trainers: the same runs, stock and with enable().

The model is a tiny Qwen2 built from a config, in float64, with the demo task's word-level
tokenizer built locally; nothing is downloaded (HF_HUB_OFFLINE). Why float64: GRPO's gradient sums
A_i * d log p over a group whose advantages sum to 0, so with a near-uniform untrained model the
terms cancel and float32 rounding shows up at 1e-3 relative in the gradient. Measured: TRL's own
fused head and an eager log_softmax of model(...).logits differ by that much in float32, and ours
sits between; in float64 stock and ours agree to 1e-7 and the comparison below can be tight.
"""

from __future__ import annotations

import importlib.metadata
import math
import os
import socket
import warnings

import pytest
import torch
import torch.multiprocessing as mp

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before huggingface_hub reads it, at the peers' import
trl = pytest.importorskip("trl")
transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

from rlhf_fast.integrations import UntestedVersionWarning, check_version  # noqa: E402
from rlhf_fast.integrations import trl as rf_trl  # noqa: E402

# TRL's logs are float32 scalars even for a float64 model, so a relative 1e-5 (and 1e-6 absolute for
# values near 0) is float32 rounding of the logged number, not slack in the computation.
REL, ABS = 1e-5, 1e-6
METRICS = ("loss", "grad_norm", "kl", "entropy", "clip_ratio/low_mean", "clip_ratio/high_mean",
           "clip_ratio/region_mean", "clip_ratio/low_min", "clip_ratio/high_max", "cispo_clip_ratio",
           "policy_loss", "entropy_coef", "vespo/phi_seq_mean")  # fmt: skip


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from rlhf_fast.train.task import build_tokenizer

    tokenizer = build_tokenizer()
    config = transformers.Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    directory = tmp_path_factory.mktemp("tiny-qwen2")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        transformers.Qwen2ForCausalLM(config).to(torch.float64).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def prompts(n=8):
    from rlhf_fast.train.task import vocabulary

    words = vocabulary()[4:]
    return datasets.Dataset.from_dict({"prompt": [" ".join(words[i : i + 3]) for i in range(n)]})


def length_reward(completions, **kwargs):
    return [float(len(c) % 7) for c in completions]


def trainer_args(steps: int, **config) -> dict:
    """The TrainingArguments every trainer here shares (CPU, float64, SGD, a log line per step), with ``config``."""
    return dict(per_device_train_batch_size=4, max_steps=steps, optim="sgd", learning_rate=0.1, logging_steps=1,
                report_to=[], use_cpu=True, bf16=False, seed=0, save_strategy="no", disable_tqdm=True,
                model_init_kwargs={"dtype": torch.float64}) | config  # fmt: skip


def grpo_trainer(model_dir, out_dir, steps=5, **config):
    fields = trainer_args(steps, **({"num_generations": 4, "max_completion_length": 8, "beta": 0.1, "num_iterations": 2} | config))
    args = trl.GRPOConfig(output_dir=str(out_dir), **fields)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    return trl.GRPOTrainer(model=str(model_dir), reward_funcs=length_reward, args=args, train_dataset=prompts(),
                           processing_class=tokenizer)  # fmt: skip


def train_logs(trainer):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    return [entry for entry in trainer.state.log_history if "loss" in entry]


def assert_same_logs(stock, ours, keys=METRICS):
    assert len(stock) == len(ours) > 0
    compared = 0
    for step, (a, b) in enumerate(zip(stock, ours), start=1):
        for key in keys:
            if key in a:
                assert key in b, f"step {step}: {key} logged by stock TRL, not with rlhf_fast"
                assert math.isclose(a[key], b[key], rel_tol=REL, abs_tol=ABS), f"step {step} {key}: stock {a[key]!r}, ours {b[key]!r}"
                compared += 1
    return compared


# loss type and config -> a run that exercises it; epsilon 0.002 makes the second iteration clip.
GRPO_CASES = {
    "grpo": dict(loss_type="grpo", epsilon=0.002),
    "bnpo": dict(loss_type="bnpo", epsilon=0.002),
    "dr_grpo": dict(loss_type="dr_grpo", max_completion_length=8),
    "dapo": dict(loss_type="dapo", epsilon=0.002, epsilon_high=0.003),
    "cispo": dict(loss_type="cispo", epsilon_high=1.001),
    "sapo": dict(loss_type="sapo"),
    "vespo": dict(loss_type="vespo", top_entropy_quantile=0.5),
    "luspo-sequence": dict(loss_type="luspo", importance_sampling_level="sequence", use_bias_correction_kl=False),
    "grpo-sequence": dict(loss_type="grpo", importance_sampling_level="sequence", use_bias_correction_kl=False,
                          epsilon=0.002),
    "grpo-no-kl": dict(loss_type="grpo", beta=0.0),
    "grpo-top-entropy": dict(loss_type="grpo", top_entropy_quantile=0.2),
    "grpo-delta": dict(loss_type="grpo", delta=1.5, epsilon_high=0.28),
    # threshold 0: in each second iteration a negative-advantage sequence whose log-probs rose is dropped
    # (test_grpo_off_policy_mask_equals_stock_loss checks on one batch that some are and some are not)
    "grpo-off-policy-mask": dict(loss_type="grpo", off_policy_mask_threshold=0.0),
    "bnpo-entropy-bonus": dict(loss_type="bnpo", entropy_coef=0.05, top_entropy_quantile=0.5),
    # entropy_target above the tiny model's entropy: the bonus applies and its coefficient climbs each step
    "dapo-adaptive-entropy": dict(loss_type="dapo", use_adaptive_entropy=True, entropy_coef=0.05, entropy_target=10.0,
                                  entropy_coef_delta=0.02),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(GRPO_CASES))
def test_grpo_five_steps_equal_stock(case, tiny_dir, tmp_path):
    config = GRPO_CASES[case]
    stock = train_logs(grpo_trainer(tiny_dir, tmp_path / "stock", **config))
    ours = train_logs(rf_trl.enable(grpo_trainer(tiny_dir, tmp_path / "ours", **config)))
    assert len(stock) == 5
    assert assert_same_logs(stock, ours) >= 5 * 3
    if "epsilon" in config or "epsilon_high" in config and case != "grpo-delta":
        clipped = [e.get("clip_ratio/region_mean", e.get("cispo_clip_ratio", 0.0)) for e in stock]
        assert max(clipped) > 0, f"{case}: no clipping happened, so the clip metrics were not compared"


def test_grpo_enable_disable(tiny_dir, tmp_path):
    trainer = grpo_trainer(tiny_dir, tmp_path, steps=1)
    stock_loss = type(trainer)._compute_loss
    assert rf_trl.enable(trainer) is trainer and rf_trl.is_enabled(trainer)
    assert trainer._compute_loss.__func__ is not stock_loss
    assert rf_trl.enable(trainer) is trainer  # a second call changes nothing
    other = grpo_trainer(tiny_dir, tmp_path / "other", steps=1)
    assert "_compute_loss" not in other.__dict__, "enable patched the class, not the instance"
    rf_trl.disable(trainer)
    assert not rf_trl.is_enabled(trainer)
    assert trainer._compute_loss.__func__ is stock_loss
    assert trainer._get_per_token_logps_and_entropies.__func__ is type(trainer)._get_per_token_logps_and_entropies


def test_grpo_one_step_equal_stock_and_disable_restores(tiny_dir, tmp_path):
    """One step (the fast tier's check): enable matches stock, and disable goes back to stock's code."""
    stock = train_logs(grpo_trainer(tiny_dir, tmp_path / "a", steps=1, loss_type="grpo"))
    ours = train_logs(rf_trl.enable(grpo_trainer(tiny_dir, tmp_path / "b", steps=1, loss_type="grpo")))
    assert_same_logs(stock, ours)
    undone = rf_trl.disable(rf_trl.enable(grpo_trainer(tiny_dir, tmp_path / "c", steps=1, loss_type="grpo")))
    assert "_compute_loss" not in undone.__dict__
    again = train_logs(undone)
    assert all(a[k] == b[k] for a, b in zip(stock, again) for k in METRICS if k in a), "disable did not restore stock"


def config(tmp_path, **fields):
    fields.setdefault("report_to", [])
    return trl.GRPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, **fields)


def test_grpo_options_follow_the_readme_table(tmp_path):
    expect = {"grpo": ("ppo", "seq-mean-token-mean"), "bnpo": ("ppo", "token-mean"), "dapo": ("ppo", "token-mean"),
              "dr_grpo": ("ppo", "seq-mean-token-sum-norm"), "cispo": ("cispo", "token-mean"),
              "sapo": ("sapo", "seq-mean-token-mean"), "luspo": ("ppo", "seq-mean-token-sum")}  # fmt: skip
    for loss_type, (objective, agg) in expect.items():
        options = rf_trl.grpo_options(config(tmp_path, loss_type=loss_type, epsilon_high=4.0 if loss_type == "cispo" else None))
        assert (options.objective, options.agg) == (objective, agg), loss_type
    options = rf_trl.grpo_options(config(tmp_path, loss_type="dr_grpo", max_completion_length=64, beta=0.04))
    assert options.max_response_length == 64 and options.kl_coef == 0.04 and options.kl_is_correction
    options = rf_trl.grpo_options(config(tmp_path, loss_type="grpo", importance_sampling_level="sequence"))
    assert options.objective == "gspo"
    options = rf_trl.grpo_options(config(tmp_path, epsilon=0.2, epsilon_high=0.28, delta=2.0, top_entropy_quantile=0.2))
    assert (options.clip_eps, options.clip_eps_high, options.dual_clip, options.top_entropy_quantile) == (0.2, 0.28, 2.0, 0.2)
    options = rf_trl.grpo_options(config(tmp_path, loss_type="cispo", epsilon_high=5.0))
    assert options.clip_eps is None and options.clip_eps_high == pytest.approx(4.0)
    vllm = config(tmp_path, vllm_importance_sampling_mode="sequence_truncate", vllm_importance_sampling_clip_max=3.0)
    options = rf_trl.grpo_options(vllm, use_vllm=True)
    assert (options.rollout_is, options.rollout_is_mode, options.rollout_is_threshold) == ("sequence", "truncate", 3.0)
    vllm = config(tmp_path, vllm_importance_sampling_mode="token_truncate", vllm_importance_sampling_clip_max=2.0)
    assert rf_trl.grpo_options(vllm, use_vllm=True).rollout_is == "token"


@pytest.mark.parametrize("fields, option", [
    (dict(loss_type="vespo"), "loss_type='vespo'"),
    (dict(loss_type="cispo", epsilon_high=4.0, importance_sampling_level="sequence"), "importance_sampling_level='sequence'"),
    (dict(loss_type="grpo", importance_sampling_level="sequence", beta=0.1), "use_bias_correction_kl=True"),
    (dict(loss_type="cispo", epsilon_high=0.28), "epsilon_high=0.28"),
    (dict(delta=1.1, epsilon_high=0.28), "delta=1.1"),
])  # fmt: skip
def test_unsupported_grpo_options_raise_naming_them(tmp_path, fields, option):
    with pytest.raises(NotImplementedError, match=option.replace("(", r"\(")):
        rf_trl.grpo_options(config(tmp_path, **fields))


@pytest.mark.parametrize("mode, fields, option", [
    ("sequence_truncate", dict(vllm_importance_sampling_clip_max=0.9), "vllm_importance_sampling_clip_max=0.9"),
    ("token_truncate", dict(vllm_importance_sampling_clip_min=1.5), "vllm_importance_sampling_clip_min=1.5"),
])  # fmt: skip
def test_unsupported_vllm_correction_raises_naming_it(tmp_path, mode, fields, option):
    args = config(tmp_path, vllm_importance_sampling_mode=mode, **fields)
    with pytest.raises(NotImplementedError, match=option):
        rf_trl.grpo_options(args, use_vllm=True)


@pytest.mark.parametrize("mode, clip_min, want", [
    ("token_truncate", None, ("token", "truncate", None)),
    ("token_truncate", 0.5, ("token", "truncate", 0.5)),
    ("token_mask", None, ("token", "masked_weight", 0.0)),
    ("sequence_mask", 0.25, ("sequence", "masked_weight", 0.25)),
])  # fmt: skip
def test_vllm_correction_modes_map_to_rollout_is(tmp_path, mode, clip_min, want):
    args = config(tmp_path, vllm_importance_sampling_mode=mode, vllm_importance_sampling_clip_min=clip_min,
                  vllm_importance_sampling_clip_max=3.0)  # fmt: skip
    options = rf_trl.grpo_options(args, use_vllm=True)
    assert (options.rollout_is, options.rollout_is_mode, options.rollout_is_threshold_low) == want
    assert options.rollout_is_threshold == 3.0


def test_trl_has_no_liger_grpo_loss_to_repoint():
    """TRL 1.16 dropped use_liger_loss: its GRPOTrainer has no Liger GRPO loss to point at
    rlhf_fast.compat.liger (use_liger_kernel only patches the model's layers, not the loss), so the
    TRL route to our fused loss is enable(); the README says so. A TRL that brings the flag back fails here."""
    import trl.trainer.grpo_trainer as grpo_module

    assert "use_liger_loss" not in trl.GRPOConfig.__dataclass_fields__
    assert not hasattr(grpo_module, "LigerFusedLinearGRPOLoss")


def test_enable_refuses_a_trainer_it_does_not_know():
    with pytest.raises(TypeError, match="object is not a trainer it knows"):
        rf_trl.enable(object())


def test_version_outside_the_tested_range_warns(monkeypatch):
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "1.17.0" if name == "trl" else real(name))
    with pytest.warns(UntestedVersionWarning, match=r"trl 1\.17\.0 is installed, outside .*>=1\.16,<1\.17.*1\.16\.0"):
        with pytest.raises(TypeError):
            rf_trl.enable(object())
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "1.16.2" if name == "trl" else real(name))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UntestedVersionWarning)
        assert check_version("trl", "1.16.0", "1.16", "1.17") == "1.16.2"


def test_check_version_names_a_missing_package():
    with pytest.raises(ImportError, match="no-such-peer is not installed.*>=1.0,<2.0"):
        check_version("no-such-peer", "1.0", "1.0", "2.0")


def reward_trainer(model_dir, out_dir, steps=3, **config):
    fields = trainer_args(steps, **config)
    from rlhf_fast.train.task import vocabulary

    words = vocabulary()[4:]
    pairs = datasets.Dataset.from_dict({
        "prompt": [" ".join(words[i : i + 2]) for i in range(12)],
        "chosen": [" " + " ".join(words[i + 3 : i + 6]) for i in range(12)],
        "rejected": [" " + " ".join(words[i + 7 : i + 8]) for i in range(12)],
    })  # fmt: skip
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    return trl.RewardTrainer(model=str(model_dir), args=trl.RewardConfig(output_dir=str(out_dir), **fields),
                             train_dataset=pairs, processing_class=tokenizer)  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("center", [None, 0.01])
def test_reward_trainer_steps_equal_stock(center, tiny_dir, tmp_path):
    stock = train_logs(reward_trainer(tiny_dir, tmp_path / "stock", center_rewards_coefficient=center))
    ours = train_logs(rf_trl.enable(reward_trainer(tiny_dir, tmp_path / "ours", center_rewards_coefficient=center)))
    assert len(stock) == 3
    assert assert_same_logs(stock, ours, ("loss", "grad_norm", "accuracy", "margin", "mean_reward", "min_reward", "max_reward")) == 3 * 7


def test_reward_trainer_enable_disable(tiny_dir, tmp_path):
    trainer = rf_trl.enable(reward_trainer(tiny_dir, tmp_path, steps=1))
    assert "compute_loss" in trainer.__dict__
    rf_trl.disable(trainer)
    assert "compute_loss" not in trainer.__dict__


def sft_trainer(model_dir, out_dir, steps=3, **config):
    fields = trainer_args(steps, **config)
    from rlhf_fast.train.task import vocabulary

    words = vocabulary()[4:]
    data = datasets.Dataset.from_dict({
        "prompt": [" ".join(words[i : i + 2]) for i in range(12)],
        "completion": [" " + " ".join(words[i + 3 : i + 4 + i % 4]) for i in range(12)],
    })  # fmt: skip
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    return trl.SFTTrainer(model=str(model_dir), args=trl.SFTConfig(output_dir=str(out_dir), **fields),
                          train_dataset=data, processing_class=tokenizer)  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("accumulation", [1, 2])
def test_sft_trainer_steps_equal_stock(accumulation, tiny_dir, tmp_path):
    stock = train_logs(sft_trainer(tiny_dir, tmp_path / "stock", gradient_accumulation_steps=accumulation))
    ours = train_logs(rf_trl.enable(sft_trainer(tiny_dir, tmp_path / "ours", gradient_accumulation_steps=accumulation)))
    assert len(stock) == 3
    assert assert_same_logs(stock, ours, ("loss", "grad_norm", "entropy", "mean_token_accuracy", "num_tokens")) == 3 * 5


def test_sft_unsupported_loss_type_raises(tiny_dir, tmp_path):
    trainer = sft_trainer(tiny_dir, tmp_path, steps=1, loss_type="dft")
    with pytest.raises(NotImplementedError, match="loss_type='dft'"):
        rf_trl.enable(trainer)
    assert not rf_trl.is_enabled(trainer)


def trl_vllm_is_ratio(old, sampled, mask, mode, clip_min, clip_max):
    """TRL 1.16's vLLM importance-sampling ratio, copied from trl/trainer/grpo_trainer.py,
    ``_generate_and_score_completions`` ("Compute the importance sampling ratio when using vLLM",
    lines 2659-2708 of 1.16.0): that method needs a vLLM engine to run, so the test builds the
    batch it would build and runs TRL's own ``_compute_loss`` on it."""
    diff = torch.nan_to_num((old - sampled) * mask, nan=0.0)
    if mode in ("sequence_mask", "sequence_truncate"):
        diff = diff.sum(dim=-1, keepdim=True)
    ratio = torch.exp(diff)
    if mode in ("sequence_truncate", "token_truncate"):
        return torch.clamp(ratio, min=clip_min, max=clip_max)
    low = clip_min if clip_min is not None else -math.inf
    high = clip_max if clip_max is not None else math.inf
    return ratio.masked_fill((ratio < low) | (ratio > high), value=0.0)


def synthetic_vllm_batch(trainer, g, mode, clip_min, clip_max):
    """A batch as _generate_and_score_completions returns it with vLLM: sampler log-probs near the
    old ones (one unscored NaN) and TRL's importance-sampling ratio of them."""
    model = trainer.model
    B, P, R, V = 4, 3, 6, model.config.vocab_size
    completion_mask = torch.ones(B, R, dtype=torch.long)
    completion_mask[1, 4:] = 0
    prompt_ids, completion_ids = torch.randint(4, V, (B, P), generator=g), torch.randint(4, V, (B, R), generator=g)
    with torch.no_grad():
        logp, _, _ = trainer._get_per_token_logps_and_entropies(
            model, torch.cat([prompt_ids, completion_ids], 1), torch.cat([torch.ones(B, P, dtype=torch.long), completion_mask], 1), R)
    old = logp + 0.05 * torch.randn(B, R, generator=g, dtype=logp.dtype)
    sampled = old + 0.1 * torch.randn(B, R, generator=g, dtype=logp.dtype)
    sampled[0, 2] = float("nan")
    ratio = trl_vllm_is_ratio(old, sampled, completion_mask, mode, clip_min, clip_max)
    return {
        "prompt_ids": prompt_ids, "prompt_mask": torch.ones(B, P, dtype=torch.long), "completion_ids": completion_ids,
        "completion_mask": completion_mask, "advantages": torch.randn(B, generator=g, dtype=logp.dtype),
        "old_per_token_logps": old, "ref_per_token_logps": logp - 0.02, "sampling_per_token_logps": sampled,
        "importance_sampling_ratio": ratio, "num_items_in_batch": completion_mask.sum(),
    }  # fmt: skip


def assert_same_loss_and_grads(trainer, inputs, check=None):
    """TRL's _compute_loss on ``inputs``, then ours after enable(trainer): same loss and gradients."""
    model = trainer.model

    def loss_and_grads():
        model.zero_grad()
        loss = trainer._compute_loss(model, inputs)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    stock_loss, stock_grads = loss_and_grads()
    rf_trl.enable(trainer)
    if check is not None:
        check(trainer.__dict__["_rlhf_fast_options"])
    loss, grads = loss_and_grads()
    # Our policy losses are float32 by contract (their aggregation weights too), so float32 rounding
    # of each tensor's scale is the tolerance, even for this float64 model.
    torch.testing.assert_close(loss.double(), stock_loss.double(), rtol=1e-6, atol=1e-7)
    for ours, stock in zip(grads, stock_grads):
        torch.testing.assert_close(ours, stock, rtol=1e-5, atol=1e-6 * float(stock.abs().max()))
    return stock_loss


@pytest.mark.parametrize("mode, clip_min", [("token_truncate", None), ("sequence_truncate", None), ("token_truncate", 0.97),
                                            ("token_mask", None), ("sequence_mask", None), ("token_mask", 0.97),
                                            ("sequence_mask", 0.9), ("token_mask", "no clip_max"),
                                            ("token_truncate", "no clip_max")])  # fmt: skip
@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_grpo_vllm_correction_equals_stock_loss(mode, clip_min, loss_type, tiny_dir, tmp_path):
    """vLLM is not installed here, so the rollout is synthetic (``synthetic_vllm_batch``); then TRL's
    _compute_loss and ours on the same batch: same loss and gradients, for each vLLM mode. "no
    clip_max": clip_max None (no upper bound, rollout_is_threshold=inf) with clip_min 0.97."""
    clip_max = 1.05
    if clip_min == "no clip_max":
        clip_min, clip_max = 0.97, None
    trainer = grpo_trainer(tiny_dir, tmp_path, steps=1, loss_type=loss_type, vllm_importance_sampling_mode=mode,
                           vllm_importance_sampling_clip_max=clip_max, vllm_importance_sampling_clip_min=clip_min)  # fmt: skip
    trainer.current_gradient_accumulation_steps = 1
    trainer.use_vllm = trainer.vllm_importance_sampling_correction = True
    inputs = synthetic_vllm_batch(trainer, torch.Generator().manual_seed(0), mode, clip_min, clip_max)
    unbounded = mode.split("_")[0] + "_mask"  # the ratio before any bound
    raw = trl_vllm_is_ratio(inputs["old_per_token_logps"], inputs["sampling_per_token_logps"], inputs["completion_mask"],
                            unbounded, None, None)  # fmt: skip
    assert clip_max is None or (raw > clip_max).any(), "no ratio was above clip_max"
    if clip_min is not None:
        assert (raw < clip_min).any(), "no ratio was below clip_min"
    if mode.endswith("mask"):
        assert (inputs["importance_sampling_ratio"] == 0).any() and (inputs["importance_sampling_ratio"] > 0).any()

    def check(options):
        assert options.rollout_is_threshold == (math.inf if clip_max is None else clip_max)
        assert options.rollout_is == mode.split("_")[0]
        assert options.rollout_is_mode == ("truncate" if mode.endswith("truncate") else "masked_weight")

    assert_same_loss_and_grads(trainer, inputs, check)


def plain_batch(trainer, g):
    """A batch without vLLM's keys (no sampler log-probs, no IS ratio), old log-probs off the current ones."""
    inputs = synthetic_vllm_batch(trainer, g, "token_truncate", None, 2.0)
    del inputs["sampling_per_token_logps"], inputs["importance_sampling_ratio"]
    return inputs


@pytest.mark.parametrize("with_vllm", [False, True])
@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_grpo_off_policy_mask_equals_stock_loss(with_vllm, loss_type, tiny_dir, tmp_path):
    """TRL's off-policy sequence mask (off_policy_mask_threshold): stock and ours on one batch, with
    the sampler's log-probs (vLLM; one NaN) or the old ones as the mask's reference."""
    threshold = 0.0
    fields = dict(vllm_importance_sampling_mode="token_truncate", vllm_importance_sampling_clip_max=2.0) if with_vllm else {}
    trainer = grpo_trainer(tiny_dir, tmp_path, steps=1, loss_type=loss_type, off_policy_mask_threshold=threshold, **fields)
    trainer.current_gradient_accumulation_steps = 1
    g = torch.Generator().manual_seed(1)
    if with_vllm:
        trainer.use_vllm = trainer.vllm_importance_sampling_correction = True
        inputs = synthetic_vllm_batch(trainer, g, "token_truncate", None, 2.0)
    else:
        inputs = plain_batch(trainer, g)
    inputs["advantages"] = torch.tensor([-1.0, -0.5, 0.7, -1.2], dtype=inputs["advantages"].dtype)
    mask = inputs["completion_mask"]
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    with torch.no_grad():
        logp, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, torch.cat([inputs["prompt_mask"], mask], 1), mask.size(1))
    keep = trainer.get_off_policy_mask(inputs["advantages"].unsqueeze(1), logp, inputs.get("sampling_per_token_logps", inputs["old_per_token_logps"]),
                                       mask, threshold)  # fmt: skip
    assert 0 < keep[inputs["advantages"] < 0].sum() < 3, "the mask should drop some negative-advantage sequences, not all"
    assert_same_loss_and_grads(trainer, inputs)


@pytest.mark.parametrize("fields", [dict(loss_type="grpo", entropy_coef=0.05), dict(loss_type="dr_grpo", entropy_coef=-0.02),
                                    dict(loss_type="dapo", entropy_coef=0.05, top_entropy_quantile=0.5)],
                         ids=["grpo", "dr_grpo-negative", "dapo-top-entropy"])  # fmt: skip
def test_grpo_entropy_bonus_equals_stock_loss(fields, tiny_dir, tmp_path):
    """TRL's entropy bonus (a token mean whatever the loss_type): stock and ours on one batch, with
    gradient accumulation (the bonus is divided by the steps), and the policy_loss metric."""
    trainer = grpo_trainer(tiny_dir, tmp_path, steps=1, **fields)
    trainer.current_gradient_accumulation_steps = 2
    trainer.model.train()  # train mode: the bonus is divided by the accumulation steps, the metrics go to "train"
    inputs = plain_batch(trainer, torch.Generator().manual_seed(2))
    stock = assert_same_loss_and_grads(trainer, inputs)
    logged = trainer._metrics["train"]["policy_loss"]
    assert len(logged) == 2 and math.isclose(logged[0], logged[1], rel_tol=REL, abs_tol=1e-7)  # our loss is float32
    without = grpo_trainer(tiny_dir, tmp_path / "plain", steps=1, **(fields | {"entropy_coef": 0.0}))
    without.current_gradient_accumulation_steps = 2
    without.model.train()
    assert not torch.isclose(without._compute_loss(without.model, inputs), stock), "the bonus changed nothing"


def test_grpo_adaptive_entropy_updates_the_controller_as_stock(tiny_dir, tmp_path):
    """use_adaptive_entropy: same loss and gradients, and the same controller state after the step
    (the coefficient moved by entropy_coef_delta, the window's entropy recorded)."""
    fields = dict(loss_type="grpo", use_adaptive_entropy=True, entropy_coef=0.05, entropy_target=10.0)
    trainer = grpo_trainer(tiny_dir, tmp_path, steps=1, **fields)
    trainer.current_gradient_accumulation_steps = 1
    trainer.model.train()  # the controller updates in train mode only
    inputs = plain_batch(trainer, torch.Generator().manual_seed(3))
    before = (trainer.entropy_coef, trainer._last_world_entropy)
    trainer._last_world_entropy = 1.0  # below the target: the coefficient applies on this step
    model = trainer.model
    states = []
    for patched in (False, True):
        trainer.entropy_coef, trainer._last_world_entropy, trainer._entropy_window_stats = 0.05, 1.0, None
        if patched:
            rf_trl.enable(trainer)
        model.zero_grad()
        loss = trainer._compute_loss(model, inputs)
        loss.backward()
        states.append((loss.detach(), [p.grad.clone() for p in model.parameters()], trainer.entropy_coef, trainer._last_world_entropy))
    (stock, stock_grads, coef, world), (ours, grads, our_coef, our_world) = states
    assert trainer._metrics["train"]["entropy_coef"] == [coef, our_coef]
    assert before[0] == 0.05
    torch.testing.assert_close(ours.double(), stock.double(), rtol=1e-6, atol=1e-7)
    for a, b in zip(grads, stock_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * float(b.abs().max()))
    assert coef == our_coef == pytest.approx(0.05 + trainer.args.entropy_coef_delta)
    assert math.isclose(world, our_world, rel_tol=1e-6)  # TRL's fused head's entropies are float32


# ---------------------------------------------------------------------------------------------
# rlhf_fast.integrations.trl in a 2-process GRPOTrainer (CPU, gloo, DDP): stock and enable() agree on each rank.
#
# Where TRL's loss reduces across processes, ours must too: the top_entropy_quantile threshold is a
# quantile of the valid tokens' entropies of *all* processes (``get_high_entropy_mask`` gathers
# them), dapo / cispo divide by the token count of all processes (``num_items_in_batch``), and the
# gradient is averaged by DDP, which syncs only a graph built inside the wrapper's forward. Each rank
# gets its own batch (other prompts, other completion lengths, so a per-process quantile would mask
# other tokens: the test checks that it would) and computes the loss and gradient of that batch with
# stock TRL and with enable(trainer) through the same DDP wrapper (vespo too: dapo's normaliser). One spawn of 2 workers runs every
# case: start-up (importing TRL, building the trainers) is most of the time.
#
# Tolerances: the model is float64 (see test_integration_trl.py for why), but TRL's log-probs and
# entropies come from transformers' fused head in float32, so stock and ours differ at float32
# rounding: measured up to 2e-6 relative in the loss (vespo, whose weight exponentiates a sum of
# log-ratios; 5e-7 for the others), 7e-7 of the largest gradient entry, 3e-6 in the kl metric (a
# mean of differences of log-probs). A per-process quantile (what rlhf_fast did before) misses by
# 6e-2 to 6 relative in the loss and 7e-2 to 1 in the gradient on this batch.
# ---------------------------------------------------------------------------------------------

WORLD = 2
MP_RTOL, MP_ATOL = 1e-5, 1e-9
# case -> GRPOConfig fields; epsilon 0.02 with log-prob noise 0.05 makes some tokens clip
MP_CASES = {
    "grpo-top-entropy": dict(loss_type="grpo", top_entropy_quantile=0.2, epsilon=0.02),
    "dapo-top-entropy": dict(loss_type="dapo", top_entropy_quantile=0.5, epsilon=0.02, epsilon_high=0.03),
    "cispo-no-unused-search": dict(loss_type="cispo", epsilon_high=1.02, ddp_find_unused_parameters=False),
    "bnpo-entropy-bonus": dict(loss_type="bnpo", top_entropy_quantile=0.5, entropy_coef=0.05),
    "vespo-top-entropy": dict(loss_type="vespo", top_entropy_quantile=0.5),
}
B, P, K = 4, 3, 8  # completions per rank, prompt tokens, completion tokens


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _batch(trainer, rank: int) -> dict:
    """This rank's GRPO batch as ``_generate_and_score_completions`` leaves it: other tokens and
    completion lengths on each rank, old and reference log-probs near the model's own, float32
    advantages, and num_items_in_batch summed over the processes as TRL sums it."""
    g = torch.Generator().manual_seed(1000 + rank)
    vocab = trainer.model.config.vocab_size
    prompt_ids = torch.randint(4, vocab, (B, P), generator=g)
    prompt_mask = torch.ones(B, P, dtype=torch.long)
    prompt_mask[0, 0] = 0  # a left-padded prompt
    completion_ids = torch.randint(4, vocab, (B, K), generator=g)
    lengths = torch.randint(2 + 3 * rank, K + 1, (B,), generator=g)  # rank 1's completions are longer
    completion_mask = (torch.arange(K) < lengths.unsqueeze(1)).long()
    with torch.no_grad():
        input_ids = torch.cat([prompt_ids, completion_ids], 1)
        logp, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, input_ids, torch.cat([prompt_mask, completion_mask], 1), K
        )
    noise = lambda: 0.05 * torch.randn(B, K, generator=g, dtype=logp.dtype)  # noqa: E731
    return {
        "prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
        "completion_mask": completion_mask, "advantages": torch.randn(B, generator=g),
        "old_per_token_logps": logp + noise(), "ref_per_token_logps": logp + noise(),
        "num_items_in_batch": trainer.accelerator.gather(completion_mask.sum()).sum(),
    }  # fmt: skip


def _loss_and_grad(trainer, ddp, inputs):
    ddp.zero_grad(set_to_none=True)
    trainer._metrics["train"].clear()
    loss = trainer.compute_loss(ddp, inputs)
    loss.backward()
    grad = torch.cat([p.grad.flatten() for p in ddp.module.parameters()])
    metrics = {name: values[-1] for name, values in trainer._metrics["train"].items() if values}
    return loss.item(), grad, metrics


def _per_process_mask_differs(trainer, inputs, quantile) -> bool:
    """Whether this rank's own quantile (what rlhf_fast computed before) masks other tokens than TRL's."""
    with torch.no_grad():
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
        _, entropies, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, input_ids, attention_mask, K, compute_entropy=True
        )
    mask = inputs["completion_mask"].bool()
    global_mask = trainer.get_high_entropy_mask(entropies, mask, 1 - quantile)
    local_mask = (entropies >= torch.quantile(entropies[mask].float(), 1 - quantile)) & mask
    return bool((global_mask != local_mask).any())


def _worker(rank: int, port: int, model_dir: str, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD))  # fmt: skip
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    results = {}
    for case, config in MP_CASES.items():
        trainer = grpo_trainer(model_dir, os.path.join(out_dir, case), steps=1, **config)
        assert trainer.accelerator.num_processes == WORLD
        trainer.model.train()
        trainer.current_gradient_accumulation_steps = 1
        inputs = _batch(trainer, rank)
        ddp = trainer.accelerator.prepare_model(trainer.model)
        assert isinstance(ddp, torch.nn.parallel.DistributedDataParallel)
        stock = _loss_and_grad(trainer, ddp, inputs)
        ours = _loss_and_grad(rf_trl.enable(trainer), ddp, inputs)
        differs = _per_process_mask_differs(trainer, inputs, config["top_entropy_quantile"]) \
            if "top_entropy_quantile" in config else None  # fmt: skip
        results[case] = dict(stock=stock, ours=ours, per_process_mask_differs=differs)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.slow
def test_two_process_grpo_loss_and_gradient_equal_stock(tiny_dir, tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tiny_dir), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD)]
    for case, config in MP_CASES.items():
        for rank, results in enumerate(ranks):
            (stock_loss, stock_grad, stock_metrics), (ours_loss, ours_grad, ours_metrics) = results[case]["stock"], results[case]["ours"]  # fmt: skip
            where = f"{case}, rank {rank}"
            assert ours_loss == pytest.approx(stock_loss, rel=MP_RTOL, abs=MP_ATOL), f"{where}: loss"
            err = (ours_grad - stock_grad).abs().max().item()
            assert err <= MP_ATOL + MP_RTOL * stock_grad.abs().max().item(), f"{where}: max |grad error| {err:.3g}"
            for name, value in stock_metrics.items():
                assert ours_metrics.get(name) == pytest.approx(value, rel=MP_RTOL, abs=MP_ATOL), f"{where}: metric {name}"
        # DDP averaged the gradient: both ranks hold the same one (so ours went through the wrapper's sync)
        assert torch.equal(ranks[0][case]["ours"][1], ranks[1][case]["ours"][1]), f"{case}: gradients not synced"
        if "top_entropy_quantile" in config:
            assert any(r[case]["per_process_mask_differs"] for r in ranks), (
                f"{case}: a per-process quantile masks the same tokens, so the test cannot tell it from TRL's"
            )
        if config["loss_type"] in ("grpo", "dapo"):
            assert any(r[case]["stock"][2]["clip_ratio/region_mean"] > 0 for r in ranks), f"{case}: nothing clipped"
