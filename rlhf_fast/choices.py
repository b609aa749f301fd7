"""The option vocabularies, defined once: ops, nn modules, the reference, the backends and the
training configs all take their accepted values from here. Plain tuples of strings, no torch."""

KL_ESTIMATORS = ("k1", "k2", "k3", "abs")
# The policy loss's KL term also takes verl's straight-through variants: the estimator's value, k2's gradient.
KL_LOSS_ESTIMATORS = KL_ESTIMATORS + ("k1+", "k3+", "abs+")
AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm", "token-sum")
GROUP_MODES = ("grpo", "drgrpo", "rloo")
# group_advantages over an arbitrary index (any group sizes, NaN scores left out) has two more.
INDEXED_GROUP_MODES = GROUP_MODES + ("passk", "opo")
# The RL trainer's advantage estimators (train/rl/steps.ADVANTAGE_ESTIMATORS), chosen apart from the algorithm.
ADVANTAGE_ESTIMATORS = ("gae", "grpo", "drgrpo", "rloo", "reinforce", "reinforce_plus_plus",
                        "reinforce_plus_plus_baseline", "grpo_passk", "opo", "gpg", "remax")
ROLLOUT_IS_LEVELS = ("token", "sequence", "geometric")
# "masked_weight": w inside the thresholds, 0 outside, the tokens kept in the normaliser (TRL's *_mask).
ROLLOUT_IS_MODES = ("truncate", "mask", "masked_weight")
BACKENDS = ("triton", "cuda", "host", "torch")
BACKEND_CHOICES = BACKENDS + ("auto",)
