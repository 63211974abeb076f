"""Every config field, documented once. Named experiments import this and override fields.

Select with `python run.py --config=experiments/NAME.py --workdir=DIR --config.train.steps=100`.
The config is locked: a misspelt key is an error, never a silently ignored setting.
"""
from ml_collections import ConfigDict


def get_config() -> ConfigDict:
  c = ConfigDict()
  c.seed = 0                      # model init, dropout and data order
  c.stage = 'pretrain'            # pretrain | sample | chat | sweep | scaling

  # ---- model ---------------------------------------------------------------------------------
  m = c.model = ConfigDict()
  m.family = 'decoder'            # decoder (GPT, causal LM) | encoder (BERT, masked LM)
  m.n_layers = 4
  m.d_model = 128
  m.n_heads = 4
  m.n_kv_heads = 0                # 0 = n_heads (MHA); 1 = MQA; in between = GQA
  m.head_dim = 0                  # 0 = d_model // n_heads
  m.d_ff = 0                      # 0 = 4 * d_model (relu/gelu) or 8/3 * d_model rounded to 64 (swiglu)
  m.vocab_size = 0                # 0 = take it from the tokenizer
  m.max_len = 0                   # 0 = train.seq_len; longest sequence for learned/sinusoidal tables
  m.pos_encoding = 'rope'         # rope | learned | sinusoidal | none
  m.rope_theta = 10000.0
  m.norm = 'rmsnorm'              # rmsnorm | layernorm
  m.norm_position = 'pre'         # pre | post
  m.norm_eps = 1e-5
  m.mlp = 'swiglu'                # swiglu | gelu (tanh approximation) | gelu_exact (erf, BERT) | relu
  m.use_bias = False              # biases in attention and MLP projections
  m.dropout = 0.0                 # residual dropout (after attention and MLP)
  m.attn_dropout = 0.0            # on attention probabilities (einsum path only)
  m.embed_dropout = 0.0           # on the embedded tokens
  m.tie_embeddings = True         # output layer = token embedding transposed
  m.type_vocab_size = 0           # token-type (BERT segment A/B) embeddings; 0 = none
  m.embed_norm = False            # norm after the summed embeddings (BERT)
  m.attention = 'einsum'          # einsum (reference) | xla | cudnn  (jax.nn.dot_product_attention)
  m.dtype = 'float32'             # compute dtype: float32 on CPU, bfloat16 on accelerators
  m.param_dtype = 'float32'
  m.scan_layers = False           # nn.scan over layers: compile time independent of depth
  m.remat = 'none'                # none | full | dots | dots_no_batch (see model/transformer.py)

  # ---- data ----------------------------------------------------------------------------------
  d = c.data = ConfigDict()
  d.source = 'synthetic'          # synthetic | text:GLOB | jsonl:GLOB:FIELD | tfds:NAME[:FIELD]
  d.tokenizer = 'char'            # byte | char | spm:PATH.model | spm_bpe:VOCAB | spm_unigram:VOCAB
  d.eval_fraction = 0.1           # held-out share (tail of each text file; every k-th document otherwise)
  d.data_dir = ''                 # tfds data_dir ('' = tfds default)
  s = d.synthetic = ConfigDict()  # a seeded Markov chain whose true entropy is known
  s.seed = 1234                   # fixes the language; independent of the run seed
  s.n_symbols = 24
  s.branching = 4                 # successors allowed per state
  s.concentration = 0.5           # Dirichlet concentration of the transition weights
  s.n_docs = 4000
  s.doc_len = 127                 # symbols per document; 127 + BOS + EOS = 128 pairs = one train.seq_len row

  # ---- training ------------------------------------------------------------------------------
  t = c.train = ConfigDict()
  t.steps = 1000
  t.batch_size = 32               # global batch, in rows of seq_len tokens
  t.seq_len = 128
  t.grad_accum = 1                # micro-batches per step (lax.scan); same update as the full batch
  t.optimizer = 'adamw'           # adamw | adafactor | lion
  t.lr = 1e-3                     # peak learning rate
  t.schedule = 'cosine'           # cosine | linear | constant | wsd (warmup-stable-decay)
  t.warmup_steps = 100
  t.min_lr_ratio = 0.1            # final lr = lr * min_lr_ratio (cosine, linear, wsd)
  t.decay_fraction = 0.2          # wsd: share of steps spent decaying
  t.b1 = 0.9
  t.b2 = 0.95
  t.eps = 1e-8
  t.weight_decay = 0.1
  t.decay_embeddings = False      # apply weight decay to embeddings too (never to norms/biases)
  t.clip_norm = 1.0               # global-norm clipping; 0 disables
  t.opt_state_dtype = 'float32'   # dtype of the optimizer's first moment (bfloat16 halves its memory)
  t.log_every = 10

  # ---- evaluation ----------------------------------------------------------------------------
  e = c.eval = ConfigDict()
  e.every_steps = 200             # 0 = only at the end
  e.max_batches = 0               # 0 = the full held-out split
  e.batch_size = 0                # 0 = train.batch_size

  # ---- checkpoints ---------------------------------------------------------------------------
  k = c.checkpoint = ConfigDict()
  k.every_steps = 500             # 0 = only at the end
  k.keep = 3
  k.async_save = True

  # ---- device mesh ---------------------------------------------------------------------------
  h = c.mesh = ConfigDict()
  h.data = -1                     # -1 = all remaining devices
  h.fsdp = 1
  h.tensor = 1
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

  # ---- sweeps (stage=sweep) and scaling studies (stage=scaling); see experiments/stages.py ------
  w = c.sweep = ConfigDict()
  w.experiment = ''               # config file every trial runs (with stage=pretrain): usually this file
  w.trials = 'trials'             # stage=sweep: its function trials(config) -> list of override dicts
  w.parallel = 1                  # trials running at once on this machine
  w.cpus_per_trial = 0            # pin each running trial to this many CPUs (0 = no pinning)
  w.retries = 1                   # restarts of a trial that ends unfinished (it resumes from its checkpoint)
  w.launcher = 'local'            # local (run trials here) | emit (write commands.sh and slurm.sbatch)
  w.slurm_header = ''             # emit: extra #SBATCH options, ';'-separated, e.g. '--gres=gpu:1;--time=60'
  w.plot_x = 'train.lr'           # stage=sweep: plot the final eval loss against this override ('' = none)

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
  g.bootstrap = 200               # resamples (runs drawn within each budget) for the 90% intervals

  # ---- inference and interop (stage=chat); see model/pretrained.py ------------------------------
  c.pretrained = ''               # model to load: workdir | FILE.gguf | HF llama folder | package:NAME
  return c
