"""GPT-2 small (124M) for accelerators: 12 layers, 12 heads, width 768, context 1024, GPT-2 blocks
(LayerNorm, GELU, learned positions, tied embeddings), vocabulary 50,304 (GPT-2's 50,257 padded to
a multiple of 64), bf16 compute with f32 parameters, cuDNN flash attention.

The shape of acceptance 6 of the scale-out issue; time it with
  python benchmarks/train_throughput.py --config=experiments/gpt2_small.py
and train it on a corpus (the byte tokenizer fits under the padded vocabulary) with
  python run.py --config=experiments/gpt2_small.py --workdir=runs/gpt2 --config.data.source=text:GLOB
On CPU, add --config.model.dtype=float32 --config.model.attention=einsum. On a GPU, compare
--config.model.cudnn_segments=1 (the benchmark's rows are one document each; model/cudnn.py).
"""
from experiments import base


def get_config():
  c = base.get_config()
  c.data.source = 'text:../shared/data/tinyshakespeare.txt'
  c.data.tokenizer = 'byte'
  m = c.model
  m.n_layers, m.n_heads, m.d_model, m.d_ff = 12, 12, 768, 3072
  m.vocab_size, m.pos_encoding, m.norm, m.mlp = 50304, 'learned', 'layernorm', 'gelu'
  m.use_bias, m.tie_embeddings = True, True
  m.dtype, m.param_dtype, m.attention = 'bfloat16', 'float32', 'cudnn'
  t = c.train
  t.steps, t.batch_size, t.seq_len = 5000, 16, 1024
  t.lr, t.warmup_steps, t.b2, t.weight_decay = 6e-4, 200, 0.95, 0.1
  t.log_every = 10
  c.eval.every_steps = 500
  c.eval.max_batches = 20
  c.checkpoint.every_steps = 1000
  return c
