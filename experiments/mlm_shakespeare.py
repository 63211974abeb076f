"""Encoder-only masked-LM pretraining on character-level Shakespeare: 15% of characters corrupted
(80% [MASK], 10% random, 10% unchanged), bidirectional attention, held-out masked-token accuracy
reported. The unigram baseline (always guess a space) scores 0.149 accuracy and 3.337 nats.

Pre-norm with RoPE (as shakespeare_char.py) learns far faster than BERT's post-norm recipe at this
size: the BERT options (`--config.model.norm_position=post --config.model.pos_encoding=learned
--config.model.embed_norm=True --config.model.norm_eps=1e-12`) end at 3.08 nats, 0.213 accuracy
after 1500 steps. Run with
  python run.py --config=experiments/mlm_shakespeare.py --workdir=runs/mlm_shakespeare
"""
from experiments import base


def get_config():
  c = base.get_config()
  c.data.source = 'text:../shared/data/tinyshakespeare.txt'
  c.data.tokenizer = 'char'
  m = c.model
  m.family = 'encoder'
  m.n_layers, m.n_heads, m.d_model, m.d_ff = 4, 4, 128, 512
  m.pos_encoding, m.norm, m.norm_position, m.mlp = 'rope', 'layernorm', 'pre', 'gelu_exact'
  m.use_bias, m.norm_eps = True, 1e-5
  t = c.train
  t.steps, t.batch_size, t.seq_len = 1500, 16, 128
  t.lr, t.warmup_steps, t.b2, t.weight_decay = 1e-3, 100, 0.99, 0.01
  t.log_every = 50
  c.eval.every_steps, c.eval.max_batches = 500, 20
  c.checkpoint.every_steps = 500
  return c
