"""The RL stage: ``config`` (RLConfig), ``rollout`` (sampling), ``steps`` (the replaceable steps and
the advantage estimators), ``trainer`` (RLTrainer), ``demo`` (SFT -> RM -> RL) and ``cli``."""
