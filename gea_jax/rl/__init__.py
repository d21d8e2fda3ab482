"""gea_jax.rl: the PPO core shared by the state-based MLP experts and the VLM agent.

Read in this order:
  distributions.py  categorical and tanh-Gaussian action heads (log-prob with the tanh correction)
  rollout.py        ``rollout(env_step_fn, policy_fn, env_state, key, length)``: lax.scan over any JAX env
  brax_env.py       ``BraxVecEnv``: vmap + action repeat + time limit + auto-reset + episode statistics
  gae.py            ``compute_gae`` (termination vs truncation)
  losses.py         clipped surrogate, clipped value loss, entropy; ``ppo_loss``
  normalization.py  running observation statistics
  networks.py       ``ActorCritic`` NNX MLP: ``model(obs) -> (distribution, value)``
  ppo.py            ``sgd_epochs`` (generic minibatch epochs) and ``PPO`` (one jitted training call,
                    envs sharded over the mesh's "envs" axes)
  toy_envs.py       ``PointMass``: a pure-JAX task with Brax's interface, for fast tests

A different policy (e.g. the VLM agent) plugs in at three points: its own ``policy_fn`` for ``rollout``
(returning the raw action to re-score and ``{"log_prob", "value"}``), its own loss that re-scores a minibatch
and calls ``ppo_loss``, and ``sgd_epochs`` to run the epochs of minibatch updates.
"""
