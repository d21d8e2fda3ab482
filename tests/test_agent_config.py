"""The embedded default's config knobs added for the agent: per-embodiment dataset sizes and eval decoding."""

import pytest

from gea_jax.agent.config import agent_config
from gea_jax.config_validation import ConfigError
from gea_jax.envs import make
from gea_jax.eval import is_greedy
from gea_jax.train import pipeline


def test_episodes_by_embodiment_overrides_and_errors():
  c = agent_config()
  c.data.embodiments = "reacher,grid_goto"
  c.data.episodes, c.data.episodes_by_embodiment = 50, "grid_goto=700"
  assert pipeline.episodes_per_embodiment(c) == {"reacher": 50, "grid_goto": 700}
  c.data.embodiments = "reacher"  # an entry for an embodiment the run does not use is ignored
  assert pipeline.episodes_per_embodiment(c) == {"reacher": 50}
  for bad, match in (("grid=5", "unknown embodiment"), ("grid_goto=0", "positive int"),
                     ("grid_goto:5", "name=positive int")):
    c.data.episodes_by_embodiment = bad
    with pytest.raises(ConfigError, match="data.episodes_by_embodiment"):
      pipeline.episodes_per_embodiment(c)
    with pytest.raises(ConfigError, match=match):
      pipeline.validate(c)


def test_eval_decoding_greedy_for_continuous_sampled_for_discrete():
  reacher, grid = make("reacher").spec, make("grid_goto").spec
  assert is_greedy("greedy_continuous", reacher) and not is_greedy("greedy_continuous", grid)
  assert is_greedy("greedy", grid) and not is_greedy("sampled", reacher)
  assert is_greedy(True, grid) and not is_greedy(False, reacher)
  with pytest.raises(ValueError, match="eval decoding"):
    is_greedy("argmax", reacher)
  c = agent_config()
  assert pipeline.eval_decoding(c) == "greedy_continuous"
  c.eval.decoding = "argmax"
  with pytest.raises(ConfigError, match="eval.decoding"):
    pipeline.validate(c)
  del c.eval["decoding"]
  c.eval.greedy = False  # configs written before eval.decoding
  assert pipeline.eval_decoding(c) is False


def test_ppo_embodiments_are_a_subset_of_the_data():
  from gea_jax.train import ppo
  c = agent_config()
  c.data.embodiments = "reacher,grid_goto"
  assert ppo.embodiment_names(c) == ["reacher", "grid_goto"]  # "" = every embodiment of the data
  c.ppo.embodiments = "grid_goto"
  pipeline.validate(c)
  assert ppo.embodiment_names(c) == ["grid_goto"]
  c.ppo.embodiments = "grid_goto,pusher"
  with pytest.raises(ConfigError, match="ppo.embodiments"):
    pipeline.validate(c)


def test_name_lists_are_read_alike_everywhere():
  """"a,b" with or without spaces, or a sequence: the same names for the data, PPO and the joint SFT batch."""
  from gea_jax.config_validation import name_list
  from gea_jax.train import ppo
  assert name_list("reacher, grid_goto,") == name_list(("reacher", "grid_goto")) == ["reacher", "grid_goto"]
  assert name_list("") == name_list(None) == name_list(" , ") == []
  assert name_list(5) == ["5"]  # a wrong type reaches the name checks (unknown embodiment), not a TypeError
  c = agent_config()
  c.data.embodiments = "reacher, grid_goto"
  c.ppo.embodiments = " grid_goto"
  pipeline.validate(c)
  assert pipeline.embodiment_names(c) == ["reacher", "grid_goto"] and ppo.embodiment_names(c) == ["grid_goto"]
  c.ppo.embodiments = " "  # blank: every body of the data, as ""
  assert ppo.embodiment_names(c) == ["reacher", "grid_goto"]
  c.ppo.sft_embodiments = "reacher , grid_goto"
  assert ppo.sft_embodiment_names(c.ppo, pipeline.embodiment_names(c)) == ["reacher", "grid_goto"]


def test_data_cache_mb_must_be_a_positive_number():
  c = agent_config()
  for bad in (0, -64):
    c.data.cache_mb = bad
    with pytest.raises(ConfigError, match="data.cache_mb"):
      pipeline.validate(c)


def test_data_action_noise_is_parsed_per_embodiment_and_validated():
  c = agent_config()
  c.data.embodiments = "reacher,grid_goto"
  assert pipeline.action_noise(c) == {}
  c.data.action_noise = "reacher=0.3,pusher=0.2"  # pusher is not in this run: ignored
  assert pipeline.action_noise(c) == {"reacher": 0.3}
  c.data.action_noise = "grid_goto=0.2"
  assert pipeline.action_noise(c) == {"grid_goto": 0.2}
  for bad in ("reacher", "reacher=-0.1", "reacher=x", "reachr=0.3", "grid_goto=1.5",
              "grid_putnext=0.2"):
    c.data.action_noise = bad
    with pytest.raises(ConfigError, match="data.action_noise"):
      pipeline.validate(c)


def test_mixture_weights_fill_unnamed_embodiments_and_name_bad_entries():
  from gea_jax.train.sft import mixture_weights
  c = agent_config()
  c.data.weights = ""
  assert mixture_weights(c, ["reacher", "grid_goto"]) is None  # uniform
  c.data.weights = "reacher=3,grid_goto_ego=2"
  assert mixture_weights(c, ["reacher", "grid_goto_ego"]) == {"reacher": 3.0, "grid_goto_ego": 2.0}
  # a run on other bodies: unnamed ones weigh 1, entries for bodies the run does not use are ignored
  assert mixture_weights(c, ["reacher", "pusher"]) == {"reacher": 3.0, "pusher": 1.0}
  assert mixture_weights(c, ["grid_goto"]) == {"grid_goto": 1.0}
  for bad, match in (("reacher:3", "name=positive number"), ("reacher=0", "name=positive number"),
                     ("reacher=x", "name=positive number"), ("reachr=3", "unknown embodiment"),
                     ("reacher=inf", "name=positive number"), ("=3", "name=positive number")):
    c.data.weights = bad
    with pytest.raises(ConfigError, match="data.weights.*" + match.replace("(", r"\(")):
      pipeline.validate(c)
