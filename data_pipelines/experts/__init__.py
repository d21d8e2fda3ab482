"""Expert policies that generate demonstrations: registry (`get`, `register_policy`) and rollouts.

    from data_pipelines import experts
    episodes = experts.rollout("reacher", num_episodes=8, seed=0, task_split="train")
"""

from data_pipelines.experts.base import Expert, get, names, register_policy  # noqa: F401
from data_pipelines.experts.rollout import rollout, success_rate  # noqa: F401
