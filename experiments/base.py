"""Every config field, documented once. Named experiments import this and override fields.

Select with `python run.py --config=experiments/NAME.py --workdir=DIR --config.train.steps=100`.
The config is locked: a misspelt key is an error, never a silently ignored setting.
"""
from ml_collections import ConfigDict


def get_config() -> ConfigDict:
  c = ConfigDict()
  c.seed = 0                      # model init, dropout and data order
  c.stage = 'pretrain'            # pretrain | sample | chat | eval | sweep | scaling | hparams | sft | reward | ppo | grpo | dpo | tokenize

  # ---- model ---------------------------------------------------------------------------------
  m = c.model = ConfigDict()
  m.family = 'decoder'            # decoder (GPT, causal LM) | encoder (BERT, masked LM) | encoder_decoder (T5, seq2seq)
  m.n_layers = 4                  # encoder_decoder: the encoder's layers
  m.n_decoder_layers = 0          # encoder_decoder: the decoder's layers (0 = n_layers)
  m.d_model = 128
  m.n_heads = 4
  m.n_kv_heads = 0                # 0 = n_heads (MHA); 1 = MQA; in between = GQA
  m.head_dim = 0                  # 0 = d_model // n_heads
  m.d_ff = 0                      # 0 = 4 * d_model (relu/gelu) or 8/3 * d_model rounded to 64 (swiglu)
  m.vocab_size = 0                # 0 = take it from the tokenizer
  m.max_len = 0                   # 0 = train.seq_len; longest sequence for learned/sinusoidal tables
  m.pos_encoding = 'rope'         # rope | learned | sinusoidal | relative (T5 bias on the logits) | none
  m.rope_theta = 10000.0
  m.relative_buckets = 32         # relative: learned bias buckets per stack (half per direction in an encoder)
  m.relative_max_distance = 128   # relative: distances beyond this share the last bucket
  m.norm = 'rmsnorm'              # rmsnorm | layernorm
  m.norm_position = 'pre'         # pre | post
  m.norm_eps = 1e-5
  m.mlp = 'swiglu'                # swiglu | gelu (tanh approximation) | gelu_exact (erf, BERT) | relu
                                  # | moe (mixture of SwiGLU experts of d_ff each: model/moe.py)
  m.n_experts = 8                 # moe: experts per layer
  m.top_k = 2                     # moe: experts each token is routed to
  m.capacity_factor = 0.0         # moe: 0 = dropless (jax.lax.ragged_dot); > 0 = slots per expert
                                  #   = factor · top_k · tokens / n_experts per sequence, overflow dropped
  m.balance_loss = 0.01           # moe: weight of the load-balancing loss (Switch Transformer)
  m.router_z_loss = 0.001         # moe: weight of the router z-loss (ST-MoE)
  m.use_bias = False              # biases in attention and MLP projections
  m.dropout = 0.0                 # residual dropout (after attention and MLP)
  m.attn_dropout = 0.0            # on attention probabilities (einsum path only)
  m.embed_dropout = 0.0           # on the embedded tokens
  m.tie_embeddings = True         # output layer = token embedding transposed
  m.type_vocab_size = 0           # token-type (BERT segment A/B) embeddings; 0 = none
  m.embed_norm = False            # norm after the summed embeddings (BERT)
  m.attention = 'einsum'          # einsum (reference) | xla | cudnn (jax.nn.dot_product_attention)
                                  # | splash (Pallas TPU kernel; interpreted off TPU: model/splash.py)
  m.cudnn_segments = 0            # cudnn: causal self-attention told each row's documents instead of
                                  #   a dense mask: 1 = plain causal (one document per row), M > 1 = cuDNN's
                                  #   packed layout (Hopper+); rows with more fall back to the mask (model/cudnn.py)
  m.dtype = 'float32'             # compute dtype: float32 on CPU, bfloat16 on accelerators
  m.param_dtype = 'float32'
  m.scan_layers = False           # nn.scan over layers: compile time independent of depth
  m.remat = 'none'                # none | full | dots | dots_no_batch (see model/transformer.py)
  m.parameterization = 'sp'       # sp | mup: µP (init std, Adam lr of the layers' matrices and experts, the
                                  #   logits and router logits scale with d_model / mup_base_width; the base
                                  #   width's run is SP's)
  m.mup_base_width = 0            # mup: the width whose tuned hyperparameters transfer (0 = d_model)
  m.mup_output_mult = 1.0         # mup: the logits' multiplier, tuned at the base width like the lr
  m.mup_init_mult = 1.0           # mup: the layers' projection init std multiplier, tuned there too
  m.qk_norm = False               # RMSNorm of each head's queries and keys before RoPE (OLMo 2, Gemma 3)
  m.attn_softcap = 0.0            # > 0: attention logits become c·tanh(logits / c) (Gemma 2: 50; einsum, splash)
  m.logit_softcap = 0.0           # > 0: output logits become c·tanh(logits / c) (Gemma 2: 30)

  # ---- LoRA adapters (fine-tuning and RLHF stages); the base weights stay frozen ---------------
  a = c.lora = ConfigDict()
  a.rank = 0                      # 0 = train every weight; > 0 = train only rank-r adapters
  a.alpha = 16.0                  # adapter scale = alpha / rank
  a.targets = 'query,value'       # 'all' or a comma list of query,key,value,out,gate,up,down

  # ---- data ----------------------------------------------------------------------------------
  d = c.data = ConfigDict()
  d.source = 'synthetic'          # synthetic | text:GLOB | jsonl:GLOB:FIELD | tfds:NAME[:FIELD]
                                  # pretrain also: tokens:STORE | mixture:STORE1=W1,STORE2=W2 (token stores, data/stream.py)
                                  # encoder_decoder also: seq2seq:reverse | seq2seq:sort | seq2seq_jsonl:GLOB
  d.tokenizer = 'char'            # byte | char | spm:PATH.model | spm_bpe:VOCAB | spm_unigram:VOCAB
  d.eval_fraction = 0.1           # held-out share (tail of each text file; every k-th document otherwise)
  d.data_dir = ''                 # tfds data_dir ('' = tfds default)
  d.decode_errors = 'strict'      # text that is not UTF-8 (tokenize stage): strict (stop, naming the file) | replace | ignore
  o = d.store = ConfigDict()      # stage=tokenize: the token store it writes (data/store.py, data/tokenize_beam.py)
  o.chunk_tokens = 65536          # longest record; longer documents become consecutive records
  o.block_mb = 4.0                # text a worker reads and tokenizes at once: bounds its memory
  o.shard_mb = 16.0               # text per shard (each split has at least one; more shards than workers balance them)
  o.tokenizer_sample_mb = 64.0    # spm_bpe/spm_unigram: train text sampled (evenly spaced blocks) before input_sentence_size
  o.workers = 0                   # local runner's worker processes (0 = one per core)
  o.beam_options = ''             # Beam pipeline options, e.g. '--runner=DataflowRunner --project=P ...' (cluster runs)
  s = d.synthetic = ConfigDict()  # a seeded Markov chain whose true entropy is known
  s.seed = 1234                   # fixes the language; independent of the run seed
  s.n_symbols = 24
  s.branching = 4                 # successors allowed per state
  s.concentration = 0.5           # Dirichlet concentration of the transition weights
  s.n_docs = 4000
  s.doc_len = 127                 # symbols per document; 127 + BOS + EOS = 128 pairs = one train.seq_len row
  q = d.seq2seq = ConfigDict()    # model.family=encoder_decoder: data/seq2seq.py
  q.n_symbols = 16                # seq2seq:reverse|sort: alphabet size (letters a, b, ...)
  q.min_len = 8                   # seq2seq:reverse|sort: shortest and longest strings
  q.max_len = 32
  q.n_eval = 500                  # seq2seq:reverse|sort: held-out strings (never trained on)
  q.noise_density = 0.15          # span corruption (any text source): share of tokens corrupted
  q.mean_span = 3.0               # span corruption: mean length of a corrupted span
  q.sentinels = 100               # span corruption: sentinel ids reserved above the tokenizer's vocabulary
  q.exact_match = 500             # held-out examples greedy-decoded at the end for exact match (0 = none)

  # ---- training ------------------------------------------------------------------------------
  t = c.train = ConfigDict()
  t.steps = 1000
  t.batch_size = 32               # global batch, in rows of seq_len tokens
  t.seq_len = 128
  t.grad_accum = 1                # micro-batches per step (lax.scan); same update as the full batch
  t.optimizer = 'adamw'           # adamw | adafactor | lion | muon (matrices and experts; AdamW at train.lr for embeddings,
                                  #   output layer, routers, norms, biases)
  t.muon_lr = 0.02                # muon: learning rate of the matrices (scaled like train.lr by the schedule)
  t.lr = 1e-3                     # peak learning rate
  t.schedule = 'cosine'           # cosine | linear | constant | wsd (warmup-stable-decay)
  t.warmup_steps = 100
  t.min_lr_ratio = 0.1            # final lr = lr * min_lr_ratio (cosine, linear, wsd)
  t.decay_fraction = 0.2          # wsd: share of steps spent decaying
  t.decay_steps = 0               # wsd: steps spent decaying (> 0: overrides decay_fraction)
  t.decay_shape = 'linear'        # wsd: linear | sqrt (1 - sqrt of the decay's progress: Hägele et al. 2024)
  t.branch_from = ''              # 'RUN_WORKDIR:STEP': start from that run's checkpoint (weights, optimizer,
                                  #   data position), e.g. a wsd cooldown branched off a constant-lr run
  t.b1 = 0.9
  t.b2 = 0.95
  t.eps = 1e-8
  t.weight_decay = 0.1
  t.decay_embeddings = False      # apply weight decay to embeddings too (never to norms/biases)
  t.clip_norm = 1.0               # global-norm clipping; 0 disables
  t.opt_state_dtype = 'float32'   # dtype of the optimizer's first moment (bfloat16 halves its memory)
  t.loss_chunk = 0                # > 0 (< seq_len): logits and loss this many positions of each row at a time (no [batch,
                                  #   seq_len, vocab] array)
  t.z_loss = 0.0                  # > 0: adds z_loss · log(Z)^2 per token to the training loss (PaLM: 1e-4); eval loss excludes it
  t.spike_threshold = 0.0         # > 0: skip a step whose loss or grad norm is this many std devs above its running mean
  t.spike_warmup = 20             # steps of running statistics gathered before any step is skipped
  t.max_skips = 10                # that many skipped steps in a row end the run (it diverged)
  t.ema_decay = 0.0               # > 0: eval (and the saved EMA) uses an exponential moving average of the weights
  t.log_every = 10

  # ---- evaluation ----------------------------------------------------------------------------
  e = c.eval = ConfigDict()
  e.every_steps = 200             # 0 = only at the end
  e.max_batches = 0               # 0 = the full held-out split
  e.batch_size = 0                # 0 = train.batch_size
  e.tasks = ''                    # task suite run at every eval and by stage=eval: 'NAME=KIND:ARG,...' (train/eval/tasks.py)
  e.task_examples = 0             # items (documents, questions) read per task (0 = all)
  e.task_batch_size = 16          # rows per scoring or generation call of the task suite
  e.max_new_tokens = 256          # gsm8k/generate tasks: longest reply
  e.temperature = 0.0             # gsm8k/generate tasks: 0 = greedy
  e.template = 'auto'             # gsm8k tasks: chat template, as sft.template (auto | model | default)

  # ---- metrics and experiment tracking (metrics.jsonl and TensorBoard always) ------------------
  x = c.metrics = ConfigDict()
  x.stats_every = 0               # per-layer RMS of params, grads, updates and activations every k steps (0 = off)
  x.wandb = False                 # also log to Weights & Biases (pip install '.[wandb]')
  x.wandb_project = 'lmlab'
  x.wandb_entity = ''             # '' = the account's default
  x.wandb_name = ''               # '' = the workdir's name
  x.wandb_mode = 'offline'        # offline (no network; `wandb sync --id ID WORKDIR/wandb/offline-run-*` later) | online
                                  # (ID in WORKDIR/tracking.json; a resumed run continues the same wandb and MLflow runs)
  x.mlflow = False                # also log to MLflow (pip install '.[mlflow]')
  x.mlflow_uri = ''               # tracking URI; '' = SQLite, WORKDIR/mlflow.db (MLflow 3 refuses a file store unless MLFLOW_ALLOW_FILE_STORE=true)
  x.mlflow_experiment = 'lmlab'

  # ---- profiler: one jax.profiler trace window (TensorBoard/XProf, Perfetto) --------------------
  q = c.profile = ConfigDict()
  q.start_step = 0                # first traced step (0 = off); the trace goes to WORKDIR/profile
  q.steps = 5                     # steps traced
  q.top_ops = 10                  # ops printed by time after the window

  # ---- checkpoints ---------------------------------------------------------------------------
  k = c.checkpoint = ConfigDict()
  k.every_steps = 500             # 0 = only at the end
  k.at_steps = ()                 # also save at these steps (a WSD study's branch points)
  k.keep = 3
  k.async_save = True

  # ---- device mesh ---------------------------------------------------------------------------
  h = c.mesh = ConfigDict()
  h.data = -1                     # -1 = all remaining devices
  h.fsdp = 1
  h.tensor = 1
  h.expert = 1                    # experts of model.mlp=moe split over this axis; elsewhere it splits the batch
  h.coordinator = ''              # multi-process: 'host:port' of process 0 ('' = auto-detect TPU pod/SLURM)
  h.num_processes = 0             # with coordinator: total processes
  h.process_id = -1               # with coordinator: this process (-1 = from the environment)

  # ---- sampling ------------------------------------------------------------------------------
  p = c.sample = ConfigDict()
  p.prompt = ''
  p.max_new_tokens = 200
  p.temperature = 0.8             # 0 = greedy
  p.top_k = 0                     # 0 = off
  p.top_p = 1.0                   # 1 = off
  p.min_p = 0.0                   # 0 = off; else keep tokens with p >= min_p * p(top token)
  p.num_samples = 1
  p.seed = 0

  # ---- sweeps (stage=sweep) and scaling studies (stage=scaling); see train/stages/studies.py ------
  w = c.sweep = ConfigDict()
  w.experiment = ''               # config file every trial runs (with stage=pretrain): usually this file
  w.trials = 'trials'             # stage=sweep: its function trials(config) -> list of override dicts
  w.parallel = 1                  # trials running at once on this machine
  w.cpus_per_trial = 0            # pin each running trial to this many CPUs (0 = no pinning)
  w.retries = 1                   # restarts of a trial that ends unfinished (it resumes from its checkpoint)
  w.launcher = 'local'            # local (run trials here) | emit (write commands.sh and slurm.sbatch)
  w.slurm_header = ''             # emit: extra #SBATCH options, ';'-separated, e.g. '--gres=gpu:1;--time=60'
  w.plot_x = 'train.lr'           # stage=sweep: plot the final eval loss against this override ('' = none)
  w.plot_panels = ''              # stage=sweep: one panel per value of this override ('' = one plot)

  g = c.scaling = ConfigDict()
  g.ladder = '1x16,2x16,1x32,2x32,2x48,3x48,3x64,3x80,4x96'  # candidate models, LAYERSxWIDTH
  g.head_dim = 16                 # attention heads = width / head_dim
  g.budgets = (3e11, 6e11, 1.2e12, 2.4e12, 4.8e12)  # compute budgets C, FLOPs (= 6·N·D)
  g.sizes_per_budget = 5          # consecutive ladder models trained per budget
  g.tokens_per_param = 30.0       # guess of D/N at the optimum: centres each budget's models on it
  g.lr = 3e-3                     # lr rule: lr · (lr_width / width)**lr_exponent
  g.lr_width = 64                 #            · (batch / lr_batch)**lr_batch_exponent
  g.lr_exponent = 1.0
  g.lr_batch = 8
  g.lr_batch_exponent = 0.5
  g.lr_check = (0.5, 2.0)         # lr multipliers also run on the smallest budget's end models; () = none
  g.min_steps = 1000              # batch rule: halve the batch (to min_batch) until a run has min_steps
  g.min_batch = 2                 # rows of train.seq_len tokens
  g.max_batch = 8                 # on CPU, bigger batches fall out of cache and cost more per token
  g.warmup_fraction = 0.05        # warmup steps as a share of each run (a fixed warmup swamps small runs)
  g.design = 'isoflop'            # isoflop (one cosine run per point) | wsd (one constant-lr run per size,
                                  #   each point a cooldown branched off it: Hägele et al. 2024)
  g.cooldown_fraction = 0.2       # wsd: share of each point's steps spent cooling down
  g.cooldown_shape = 'sqrt'       # wsd: linear | sqrt (1-sqrt, Hägele et al.'s best)
  g.reference = ''                # wsd: workdir of a finished isoflop study to compare exponent and FLOPs with
  g.bootstrap = 200               # resamples (runs drawn within each budget) for the 90% intervals
  g.metric = 'eval_loss'          # final metric the laws are fitted to, e.g. eval/NAME/bpb (lower = better)

  # ---- lr_opt(C) and B_opt(C) (stage=hparams, DeepSeek LLM 2024); see experiments/studies/hparams.py.
  # Each budget trains scaling.ladder's model nearest N* (scaling.tokens_per_param) with scaling's lr
  # rule and warmup_fraction.
  h = c.hparams = ConfigDict()
  h.budgets = (4e10, 8e10, 1.6e11, 3.2e11, 6.4e11)  # compute budgets C, FLOPs; each trial spends its C within 1%
  h.holdout = 1                   # largest budgets left out of the fits and predicted from them
  h.lr_grid = (0.25, 0.5, 1.0, 2.0, 4.0)  # multipliers of scaling's lr rule at each trial's width and batch
  h.batch_grid = (2, 4, 8)        # batch sizes tried at every budget, rows of train.seq_len tokens
  h.min_steps = 200               # fewest optimizer steps a trial may get (shorter runs judge lr badly)
  h.bootstrap = 200               # resamples (trials drawn within each budget) for the 90% intervals
  h.metric = 'eval_loss'          # final metric the optima minimise, e.g. eval/NAME/bpb (lower = better)

  # ---- inference and interop (stage=chat); see model/pretrained.py ------------------------------
  c.pretrained = ''               # model to load: workdir | FILE.gguf | HF llama folder | package:NAME (stage=eval: the model evaluated)

  # ---- supervised fine-tuning data (stage=sft); see data/formats.py and data/sft.py --------------
  f = c.sft = ConfigDict()
  f.train = 'synthetic_instruct'  # prompt_completion:GLOB | chat:GLOB | gsm8k:GLOB | hh:GLOB | synthetic_instruct
                                  # | text:GLOB (plain text, every token trained: domain adaptation)
                                  # | classify:GLOB ({"text", "label"} records; an encoder base gets a class head)
  f.eval = ''                     # same forms (text and classify: the same kind); '' = hold out eval_fraction
  f.eval_fraction = 0.1           # with eval='': every k-th train record (text: each file's tail) is held out
  f.template = 'auto'             # auto (the tokenizer's chat template if it has one, else default) | model | default
  f.overlong = 'truncate'         # examples over train.seq_len + 1 tokens: truncate (keep the head) | drop
  f.pool = 'mean'                 # classify: the class head reads the mean over the text | first (BERT's [CLS])
  f.max_examples = 0              # train records read, before the hold-out (0 = all)
  f.eval_generate = 0             # eval prompts greedy-decoded and scored by exact match (0 = none)
  f.max_new_tokens = 256          # longest generated reply in that eval
  f.probe = ''                    # a question answered greedily before and after (forgetting check)

  # ---- RLHF (stages reward, ppo, grpo, dpo); see train/stages/reward.py, ppo_stage.py, dpo_stage.py --
  r = c.rlhf = ConfigDict()
  r.data = 'synthetic'            # synthetic (ground truth: pairs sampled from config.pretrained, labelled by
                                  # the chain's gold score; data.synthetic must be the base's) | hh:GLOB (Anthropic HH)
  r.pairs = 4096                  # reward, dpo: preference pairs, hold-out included (hh: the first that fit train.seq_len)
  r.eval_pairs = 512              # reward, dpo: of those, held out for pairwise accuracy
  r.prompt_len = 8                # synthetic: chain symbols in a prompt (after BOS)
  r.n_target = 6                  # synthetic: symbols of the gold score's target class (+1 each)
  r.illegal_penalty = 5.0         # synthetic: gold penalty per illegal transition
  r.label_temperature = 1.0       # synthetic: label noise, P(a preferred) = sigmoid((gold_a - gold_b) / T); 0 = none
  r.stats_samples = 512           # reward: reference-policy samples that fix the score normalisation (mean 0, std 1)
  r.reward_model = ''             # ppo, grpo: workdir of a stage=reward run
  r.second_reward_model = ''      # ppo, grpo: a reward run on other pairs (other seed): disagreement detector ('' = off)
  r.rollout_batch = 64            # ppo, grpo: samples per iteration (train.steps iterations, train.batch_size per minibatch)
  r.epochs = 4                    # ppo, grpo: passes over each rollout batch
  r.response_len = 24             # ppo, grpo: longest response in tokens (EOS included); longer ones are cut
  r.temperature = 1.0             # ppo, grpo: sampling temperature; log-probs are those of logits / temperature
  r.no_eos_penalty = 1.0          # ppo, grpo: taken off the normalised score of a response cut before its EOS
  r.kl_estimator = 'k1'           # ppo: per-token KL penalty, k1 (log p - log q) | k3 ((r - 1) - log r)
  r.beta = 0.2                    # ppo: KL coefficient on the normalised score (grpo: of its k3 KL loss term)
  r.kl_target = 0.0               # ppo: > 0 = adaptive beta steering the KL (nats/response) to this; 0 = fixed beta
  r.kl_horizon = 10000            # ppo: adaptive controller horizon in samples
  r.clip_eps = 0.2                # ppo, grpo: policy ratio clip
  r.value_clip_eps = 0.2          # ppo: value clip around the rollout's values
  r.entropy_coef = 0.0            # ppo: entropy bonus per token (grpo has none)
  r.gamma = 1.0                   # ppo: discount
  r.lam = 0.95                    # ppo: GAE lambda
  r.critic_lr = 0.0               # ppo: critic learning rate (0 = train.lr)
  r.critic_from_reward = True     # ppo: critic starts as the reward model (else the base with a fresh head)
  r.group_size = 4                # grpo: samples per prompt (advantages relative to the group; no critic)
  r.dpo_beta = 0.1                # dpo: beta of the implicit reward beta * (log pi - log pi_ref)
  r.max_kl = 10.0                 # hacking alarm: KL to the reference, nats/response
  r.nll_margin = 0.5              # hacking alarm: reference NLL of samples above its own samples', nats/token
  r.max_disagreement = 0.3        # hacking alarm: share of sample pairs the two reward models order differently
  r.stop_on_hacking = False       # end ppo/grpo once alarms fire in hacking_patience iterations in a row
  r.hacking_patience = 3
  r.eval_prompts = 256            # ppo, grpo, dpo: held-out prompts sampled for the before/after report
  return c
