"""Imported by verl in each of its processes (VERL_USE_EXTERNAL_MODULES=rlhf_fast.integrations.verl_plugin,
or actor_rollout_ref.model.external_lib=rlhf_fast.integrations.verl_plugin): registers rlhf_fast there.
verl's Ray workers do not run the driver's code, so a module imported by name is how they learn it."""

from .verl import register

register()
