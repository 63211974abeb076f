"""Full fine-tuning of the quickstart model on a synthetic instruction set (copy a chain prefix).

  python run.py --config=experiments/quickstart.py --workdir=runs/quickstart
  python run.py --config=experiments/sft_quickstart.py --workdir=runs/sft_quickstart \
      --config.pretrained=runs/quickstart

The records come from the same Markov chain the base was trained on (data/formats.py
synthetic_instruct), so the base's character tokenizer spells them; the loss is on the reply only.
"""
from experiments import quickstart


def get_config():
  c = quickstart.get_config()
  c.stage = 'sft'
  c.pretrained = 'runs/quickstart'
  c.sft.train = 'synthetic_instruct'
  c.sft.eval_generate = 64
  c.sft.max_new_tokens = 16
  c.train.steps = 300
  c.train.lr = 1e-3
  c.train.warmup_steps = 20
  c.eval.every_steps = 100
  c.checkpoint.every_steps = 100
  return c
