"""Encoder-decoder (T5) span-corruption pretraining on character-level Shakespeare: 15% of each
piece's characters, in spans of mean length 3, are replaced in the encoder input by sentinel ids
(reserved above the character vocabulary) and spelled out after them in the decoder target.
Encoder rows are 128 characters; a piece of 141 characters has 21 corrupted in 7 spans, so the
decoder target is 29 tokens. Run with
  python run.py --config=experiments/t5_span.py --workdir=runs/t5_span
"""
from experiments import base


def get_config():
  c = base.get_config()
  c.data.source, c.data.tokenizer = 'text:../shared/data/tinyshakespeare.txt', 'char'
  c.data.seq2seq.exact_match = 64  # whole spans are rarely exact at this size; shown for the record
  m = c.model
  m.family = 'encoder_decoder'
  m.n_layers, m.n_decoder_layers, m.n_heads, m.d_model, m.d_ff = 2, 2, 4, 128, 512
  m.pos_encoding, m.norm, m.mlp = 'relative', 'rmsnorm', 'gelu'
  t = c.train
  t.steps, t.batch_size, t.seq_len = 600, 32, 128
  t.lr, t.warmup_steps, t.weight_decay = 2e-3, 50, 0.01
  t.log_every = 50
  c.eval.every_steps, c.eval.max_batches = 200, 10
  c.checkpoint.every_steps = 300
  return c
