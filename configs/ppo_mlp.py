"""State-based MLP PPO experts on Brax bodies (issue 6, part 2).

  python -m gea_jax.main --config=configs/ppo_mlp.py:inverted_pendulum --workdir=/tmp/ppo_ip
  python -m gea_jax.main --config=configs/ppo_mlp.py:pusher --workdir=/tmp/ppo_pusher
  python -m gea_jax.main --config=configs/ppo_mlp.py:reacher,cpu --workdir=/tmp/ppo_reacher   # CPU-sized

ENV is one of PRESETS. Hyperparameters are Brax's published PPO settings for each env (brax training
colab), except inverted_pendulum which uses a CPU-sized variant that solves it in ~250k steps; ",cpu" scales
any preset down to 256 envs for a laptop/CPU run. The trained policy acts on the Brax env's own state
observation (``brax.envs.get_environment(ENV, backend=...)``'s ``State.obs``); load it with
``gea_jax.train.ppo_mlp.load_policy(workdir)``.
"""

import ml_collections

# name: (total_env_steps, ppo overrides, env overrides)
_BRAX_PUBLISHED = {
    "inverted_pendulum": (1_000_000, dict(num_envs=256, batch_size=256, num_minibatches=8, unroll_length=5,
                                          num_epochs=4, discount=0.97, entropy_coef=1e-2, reward_scaling=10.0),
                          dict(episode_length=1000, action_repeat=1), 1000.0),
    "inverted_double_pendulum": (20_000_000, dict(num_envs=2048, batch_size=1024, num_minibatches=32, unroll_length=5,
                                                  num_epochs=4, discount=0.97, entropy_coef=1e-2,
                                                  reward_scaling=10.0),
                                 dict(episode_length=1000, action_repeat=1), 9000.0),
    "reacher": (50_000_000, dict(num_envs=2048, batch_size=256, num_minibatches=32, unroll_length=50, num_epochs=8,
                                 discount=0.95, entropy_coef=1e-3, reward_scaling=5.0),
                dict(episode_length=1000, action_repeat=4), -5.0),
    "pusher": (50_000_000, dict(num_envs=2048, batch_size=512, num_minibatches=16, unroll_length=30, num_epochs=8,
                                discount=0.95, entropy_coef=1e-2, reward_scaling=5.0),
               dict(episode_length=1000, action_repeat=1), None),
    "halfcheetah": (50_000_000, dict(num_envs=2048, batch_size=512, num_minibatches=32, unroll_length=20,
                                     num_epochs=8, discount=0.95, entropy_coef=1e-3, reward_scaling=1.0),
                    dict(episode_length=1000, action_repeat=1), None),
    "ant": (50_000_000, dict(num_envs=4096, batch_size=2048, num_minibatches=32, unroll_length=5, num_epochs=4,
                             discount=0.97, entropy_coef=1e-2, reward_scaling=10.0),
            dict(episode_length=1000, action_repeat=1), None),
}
PRESETS = tuple(_BRAX_PUBLISHED)


def get_config(arg: str = "inverted_pendulum") -> ml_collections.ConfigDict:
  name, *flags = [a.strip() for a in (arg or "inverted_pendulum").split(",")]
  if name not in _BRAX_PUBLISHED:
    raise ValueError(f"configs/ppo_mlp.py: unknown env preset {name!r}; expected one of {PRESETS}")
  unknown = set(flags) - {"cpu"}
  if unknown:
    raise ValueError(f"configs/ppo_mlp.py: unknown flag(s) {sorted(unknown)} in {arg!r}; expected 'cpu'")
  total, ppo, env, target = _BRAX_PUBLISHED[name]

  c = ml_collections.ConfigDict()
  c.trainer = "ppo_mlp"
  c.seed = 0
  c.total_env_steps = total
  # Stop early once the mean training-episode return reaches this (None: train for total_env_steps).
  c.target_return = ml_collections.FieldReference(target, field_type=float)

  c.env = ml_collections.ConfigDict()
  c.env.name = name
  c.env.backend = "positional"
  c.env.episode_length = env["episode_length"]
  c.env.action_repeat = env["action_repeat"]

  c.ppo = ml_collections.ConfigDict()
  c.ppo.num_envs = ppo["num_envs"]
  c.ppo.unroll_length = ppo["unroll_length"]
  c.ppo.batch_size = ppo["batch_size"]
  c.ppo.num_minibatches = ppo["num_minibatches"]
  c.ppo.num_epochs = ppo["num_epochs"]
  c.ppo.learning_rate = 3e-4
  c.ppo.entropy_coef = ppo["entropy_coef"]
  c.ppo.discount = ppo["discount"]
  c.ppo.gae_lambda = 0.95
  c.ppo.clip_eps = 0.3
  c.ppo.value_clip_eps = ml_collections.FieldReference(None, field_type=float)
  c.ppo.vf_coef = 0.5
  c.ppo.reward_scaling = ppo["reward_scaling"]
  c.ppo.normalize_advantage = True
  c.ppo.normalize_observations = True
  c.ppo.max_grad_norm = ml_collections.FieldReference(None, field_type=float)
  c.ppo.iterations_per_call = 4  # PPO iterations per jitted call (fewer dispatches)
  c.ppo.shuffle_blocks = 1  # set to the data-parallel size for communication-free shuffling

  c.network = ml_collections.ConfigDict()
  c.network.policy_hidden = (32, 32, 32, 32)  # Brax's PPO defaults
  c.network.value_hidden = (256, 256, 256, 256, 256)
  c.network.activation = "swish"

  c.mesh = ml_collections.ConfigDict()
  c.mesh.shape = (-1, 1, 1)  # envs split over all devices ("envs" -> ("data", "fsdp"))

  c.checkpoint_every_calls = 50
  c.keep_checkpoints = 2
  c.eval_episodes = 64  # deterministic episodes at the end of training, for the report

  if "cpu" in flags:
    c.ppo.num_envs = 256
    c.ppo.batch_size = 256
    c.ppo.num_minibatches = 8
    c.network.value_hidden = (128, 128, 128)
  return c
