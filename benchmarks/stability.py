"""Stability tools and Muon on the Shakespeare recipe (experiments/shakespeare_char.py): loss
curves as a PNG and a table of final figures.

  python benchmarks/stability.py --out=runs/stability            # all variants, ~4-6 min each
  python benchmarks/stability.py --out=/tmp/s --steps=100 --variants=unstable,tools   # smoke

Variants (each a run.py subprocess, resumed if its folder holds a finished run):
  recipe    the recipe itself (AdamW, lr 1e-3)
  unstable  lr 10x too high (1e-2)
  tools     lr 1e-2 with z-loss 1e-4, QK-norm and spike skipping (6 std devs)
  muon      Muon (matrices at lr 0.02) with AdamW at lr 1e-3 for embeddings and norms
  unstable30, tools30   the same two at lr 30x too high (3e-2)
Every run logs per-layer statistics every 50 steps, so the table gives the largest attention
logit seen: the quantity that grows without bound in a run that diverges (Wortsman et al. 2023).
"""
import json
import os
import subprocess
import sys

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = {
    'recipe': [],
    'unstable': ['--config.train.lr=1e-2'],
    'tools': ['--config.train.lr=1e-2', '--config.train.z_loss=1e-4', '--config.model.qk_norm=True',
              '--config.train.spike_threshold=6'],
    'muon': ['--config.train.optimizer=muon'],
    'unstable30': ['--config.train.lr=3e-2'],
    'tools30': ['--config.train.lr=3e-2', '--config.train.z_loss=1e-4', '--config.model.qk_norm=True',
                '--config.train.spike_threshold=6'],
}
flags.DEFINE_string('out', 'runs/stability', 'Folder of the runs, the PNG and results.json.')
flags.DEFINE_list('variants', list(VARIANTS), 'Variants to run, of ' + ', '.join(VARIANTS))
flags.DEFINE_integer('steps', 2000, 'Train steps of every run (the recipe has 2000).')
flags.DEFINE_string('data', os.path.join(ROOT, '..', 'shared', 'data', 'tinyshakespeare.txt'),
                    'Shakespeare text.')


def rows(workdir: str) -> list[dict]:
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f]


def run_variant(name: str, workdir: str, steps: int, data: str) -> None:
  done = [r for r in rows(workdir) if r['step'] == steps and 'eval_loss' in r]
  if done:
    return
  cmd = [sys.executable, 'run.py', '--config=experiments/shakespeare_char.py', f'--workdir={workdir}',
         f'--config.data.source=text:{data}', f'--config.train.steps={steps}',
         '--config.train.log_every=10', '--config.metrics.stats_every=50',
         f'--config.eval.every_steps={max(steps // 8, 1)}', '--config.sample.max_new_tokens=1',
         *VARIANTS[name]]
  print(f'{name}: {" ".join(cmd[2:])}', flush=True)
  result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
  if result.returncode:  # a diverged run ends with one error line: its curve is the result
    print(f'{name}: {result.stderr.strip().splitlines()[-1]}', flush=True)


def summary(name: str, workdir: str) -> dict:
  r = rows(workdir)
  evals = [x for x in r if 'eval_loss' in x]
  logit = [v for x in r for k, v in x.items() if k.startswith('logit_max/')]
  return {'variant': name, 'steps': max((x['step'] for x in r), default=0),
          'final_eval_loss': evals[-1]['eval_loss'] if evals else float('nan'),
          'best_eval_loss': min((x['eval_loss'] for x in evals), default=float('nan')),
          'skipped_steps': max((x.get('skipped_total', 0) for x in r), default=0),
          'max_attention_logit': max(logit, default=float('nan')),
          'clipped_fraction': r[-1].get('clipped_fraction', float('nan')) if r else float('nan')}


def plot(out: str, names: list[str]) -> str:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, (train_ax, eval_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
  for name in names:
    r = rows(os.path.join(out, name))
    train = [(x['step'], x['loss']) for x in r if 'loss' in x and 'eval_loss' not in x]
    evals = [(x['step'], x['eval_loss']) for x in r if 'eval_loss' in x]
    if train:
      train_ax.plot(*zip(*train), label=name, lw=0.8)
    if evals:
      eval_ax.plot(*zip(*evals), marker='o', label=name)
  for ax, title in ((train_ax, 'train loss'), (eval_ax, 'validation loss')):
    ax.set_xlabel('step')
    ax.set_ylabel('nats/char')
    ax.set_title(title)
    ax.set_ylim(1.3, 3.5)
    ax.grid(alpha=0.3)
    ax.legend()
  path = os.path.join(out, 'stability.png')
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  return path


def main(_):
  F = flags.FLAGS
  unknown = [v for v in F.variants if v not in VARIANTS]
  if unknown:
    sys.exit(f'error: unknown variants {unknown}; choose from {", ".join(VARIANTS)}')
  os.makedirs(F.out, exist_ok=True)
  for name in F.variants:
    run_variant(name, os.path.join(F.out, name), F.steps, F.data)
  results = [summary(name, os.path.join(F.out, name)) for name in F.variants]
  with open(os.path.join(F.out, 'results.json'), 'w') as f:
    json.dump(results, f, indent=2)
  print(f'{"variant":<10} {"steps":>5} {"final eval":>10} {"best eval":>9} {"skipped":>7} '
        f'{"max attn logit":>14} {"clipped":>7}')
  for r in results:
    print(f'{r["variant"]:<10} {r["steps"]:>5} {r["final_eval_loss"]:>10.4f} '
          f'{r["best_eval_loss"]:>9.4f} {r["skipped_steps"]:>7.0f} {r["max_attention_logit"]:>14.2f} '
          f'{r["clipped_fraction"]:>7.3f}')
  print(f'plot: {plot(F.out, F.variants)}')


if __name__ == '__main__':
  app.run(main)
