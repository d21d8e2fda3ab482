"""Default sections (model, data, RVQ, SFT, eval, mesh) of the agent configs, shared by configs/*.py.

Each named config (configs/default.py, configs/gea_smollm2.py, ...) starts from `agent_config()`.
"""

import ml_collections

from gea_jax.sharding import DEFAULT_RULES


def mesh_and_sharding(config):
  config.mesh = ml_collections.ConfigDict()
  config.mesh.shape = (-1, 1, 1)  # (data, fsdp, tensor); -1 = all remaining devices
  config.sharding = ml_collections.ConfigDict()
  config.sharding.rules = [[k, list(v) if isinstance(v, tuple) else v] for k, v in DEFAULT_RULES]
  return config


def agent_config():
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.data = ml_collections.ConfigDict()
  c.data.data_dir = ""            # "" = WORKDIR/data (built by the pipeline if missing)
  # the grid body sees its room turned so that it always faces up (grid_goto_ego): with the top-down view (grid_goto)
  # the agent did not see objects in its way and looped into them (77.6% / 79.2% of the expert on held-out seeds /
  # combinations over three seeds; egocentric, with the batch shares below, 88.0% / 87.0%; docs/benchmarks.md,
  # sessions 9-10)
  c.data.embodiments = "reacher,grid_goto_ego"
  # shares of the SFT batches (unnamed bodies weigh 1; "" = uniform). reacher gets 60%: with uniform shares its
  # held-out success was 75-88% over three seeds (mean 79.7%), at 3:2 84-92% (mean 88.6%) with the grid rows unchanged
  # (docs/benchmarks.md, session 10)
  c.data.weights = "reacher=3,grid_goto_ego=2"
  c.data.episodes = 200           # train episodes per embodiment
  # grid layouts are cheap (about 7 steps per episode; 10,000 take about a minute to build) and grounding words in
  # them needs many: with 1000 the grounding head (sft.grounding_weight) overfits the layouts (docs/benchmarks.md,
  # session 8)
  c.data.episodes_by_embodiment = "grid_goto=10000,grid_goto_ego=10000"
  c.data.heldout_episodes = 32    # per held-out split
  # DART demonstrations (data_pipelines.build): "reacher=0.3" = the train split's executed actions get Gaussian
  # noise of std 0.3 while the clean expert actions are recorded; "" = plain expert rollouts
  c.data.action_noise = ""
  # k steps in a window, the current one last. GEA (and the data pipeline's default) use 3; at this scale
  # k=3 lets the small agent copy its previous action (reacher 44% vs 84% held-out success with k=1,
  # docs/benchmarks.md), so the embedded default uses 1.
  c.data.history = 1
  c.data.image_size = 64
  c.data.normalization = "mean_std"
  # decoded episodes kept per process (LRU); when the dataset is larger, each epoch decodes every episode again
  c.data.cache_mb = 1024

  c.model = ml_collections.ConfigDict()
  c.model.train_mode = "full"     # "lora" | "full" | "frozen" (frozen LLM, train the rest: LLaRP)
  c.model.text_tokenizer = "smollm2"  # "smollm2" | HF dir | SentencePiece .model | .gguf
  c.model.text_len = 40
  c.model.use_state = True
  # state token: a GELU MLP of this width over the normalized state (0 = a linear projection). The expert's
  # control law is a nonlinear function of the state (reacher: inverse kinematics + PD); with the linear token the
  # agent alone on reacher reached 72-73% held-out success, with the MLP 84-88% (docs/benchmarks.md, session 6)
  c.model.state_hidden_dim = 256
  c.model.value_hidden_dim = 128
  # a linear head on the LLM's hidden state at each image slot, trained by SFT's grounding loss (sft.grounding_weight)
  c.model.grounding_head = True
  c.model.llm = ml_collections.ConfigDict()
  c.model.llm.source = "random"   # "random" (dims below) | "smollm2" | HF dir | .gguf
  c.model.llm.architecture = "llama"
  c.model.llm.hidden_size = 128
  c.model.llm.intermediate_size = 384
  c.model.llm.num_layers = 3
  c.model.llm.num_heads = 4
  c.model.llm.num_kv_heads = 2
  c.model.llm.dtype = "float32"   # compute dtype; parameters stay float32
  c.model.llm.remat = False
  c.model.lora = ml_collections.ConfigDict()
  c.model.lora.rank = 16
  c.model.lora.alpha = 32.0
  c.model.lora.target_modules = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
  c.model.vision = ml_collections.ConfigDict()
  c.model.vision.encoder = "tiny_cnn"  # "tiny_cnn" | "efficientnet_lite0" | "siglip"
  c.model.vision.pool_grid = (4, 4)   # image tokens per frame (16)
  c.model.vision.image_size = 0        # 0 = the encoder's own / the data's size
  c.model.vision.channels = (16, 32, 64)
  c.model.vision.coord_channels = True  # tiny_cnn: append (row, col) input channels (CoordConv)
  # tiny_cnn: FiLM-condition the encoder on the prompt's text (RT-1's FiLM-EfficientNet does this with the instruction)
  c.model.vision.text_film = False

  c.rvq = ml_collections.ConfigDict()
  c.rvq.num_levels = 2
  c.rvq.codebook_size = 64        # nmse 1.3e-4 on reacher at L=2; fewer classes for the policy than 512
  c.rvq.steps = 600
  c.rvq.batch_size = 512
  c.rvq.vocab_mode = "extend"

  c.sft = ml_collections.ConfigDict()
  c.sft.tokenizer_artifact = ""   # set by the pipeline (WORKDIR/rvq/artifact) or by hand
  # 3000: with 10,000 grid episodes and the grounding loss, 3000 steps gave reacher / grid seeds / grid combos 80% / 77% /
  # 83% of the experts against 78% / 69% / 84% after 2000 (seed 0; seed 1 at 3000: 89% / 75% / 72%; docs/benchmarks.md,
  # session 8)
  c.sft.steps = 3000
  c.sft.batch_size = 32
  c.sft.grad_accum = 1
  c.sft.lr = 1e-3
  c.sft.warmup_steps = 50
  c.sft.min_lr_ratio = 0.1
  c.sft.weight_decay = 0.01
  c.sft.grad_clip = 1.0
  c.sft.log_every = 25
  c.sft.eval_every = 0            # 0 = evaluate only at the end
  c.sft.checkpoint_every = 250
  c.sft.keep_checkpoints = 2
  c.sft.num_workers = 0
  # weight of the grounding loss (gea_jax.agent.grounding): at each image token, does it hold the object the
  # instruction names (label from the datasets' target_point; grid tasks have one, reacher not). Without it the
  # from-scratch agent ignored its frames on the grid (docs/benchmarks.md, sessions 7-8); 0 = off
  c.sft.grounding_weight = 0.5

  c.eval = ml_collections.ConfigDict()
  c.eval.episodes = 32
  c.eval.splits = ("heldout_seed", "heldout_combo")
  # greedy decoding for continuous actions, sampled for discrete ones (see gea_jax.eval.is_greedy)
  c.eval.decoding = "greedy_continuous"
  c.eval.expert_episodes = 32

  from gea_jax.train.ppo import ppo_defaults  # stage 2 (set ppo.iterations = 0 to skip it)
  c.ppo = ppo_defaults()

  mesh_and_sharding(c)
  return c
