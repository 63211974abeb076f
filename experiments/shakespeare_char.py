"""nanoGPT's CPU recipe for character-level Shakespeare (README "I only have a macbook"): GPT-2
blocks (LayerNorm, GELU, d_ff = 4·d, no biases, tied embeddings), 4 layers, 4 heads, width 128,
context 64, batch 12, 2000 steps, AdamW lr 1e-3 cosine to 1e-4, β2 0.99, warmup 100, clip 1.0.

One change from nanoGPT: RoPE instead of learned positions. With learned positions (nanoGPT's
GPT-2 table, `--config.model.pos_encoding=learned`) this recipe ends at 1.900-1.910 on the full
validation split; RoPE, at the same FLOPs, reaches 1.77. nanoGPT reports 1.88. Run with
  python run.py --config=experiments/shakespeare_char.py --workdir=runs/shakespeare \
    --config.data.source=text:../shared/data/tinyshakespeare.txt
"""
from experiments import base


def get_config():
  c = base.get_config()
  c.data.source = 'text:../shared/data/tinyshakespeare.txt'
  c.data.tokenizer = 'char'
  c.data.eval_fraction = 0.1
  m = c.model
  m.n_layers, m.n_heads, m.d_model, m.d_ff = 4, 4, 128, 512
  m.pos_encoding, m.norm, m.mlp, m.norm_eps = 'rope', 'layernorm', 'gelu', 1e-5
  m.use_bias, m.tie_embeddings, m.dropout = False, True, 0.0
  t = c.train
  t.steps, t.batch_size, t.seq_len = 2000, 12, 64
  t.lr, t.min_lr_ratio, t.warmup_steps, t.schedule = 1e-3, 0.1, 100, 'cosine'
  t.b1, t.b2, t.weight_decay, t.clip_norm = 0.9, 0.99, 0.1, 1.0
  t.decay_embeddings = True  # nanoGPT decays every 2-D parameter, the embedding included
  t.log_every = 50
  c.eval.every_steps = 500
  c.checkpoint.every_steps = 1000
  c.sample.prompt = 'ROMEO:'
  c.sample.max_new_tokens = 300
  return c
