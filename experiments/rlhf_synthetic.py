"""RLHF with known ground truth: a Markov language, a gold score, and every stage measured against it.

One command per stage (all four share data.synthetic, so they see the same chain and target class):

  python run.py --config=experiments/rlhf_synthetic.py:pretrain --workdir=runs/rlhf/base
  python run.py --config=experiments/rlhf_synthetic.py:reward --workdir=runs/rlhf/reward \\
      --config.pretrained=runs/rlhf/base
  python run.py --config=experiments/rlhf_synthetic.py:ppo --workdir=runs/rlhf/ppo \\
      --config.pretrained=runs/rlhf/base --config.rlhf.reward_model=runs/rlhf/reward
  python run.py --config=experiments/rlhf_synthetic.py:dpo --workdir=runs/rlhf/dpo \\
      --config.pretrained=runs/rlhf/base

or all of them for a few seeds, then a table of the before/after figures:

  python -m experiments.rlhf_synthetic --root=runs/rlhf --seeds=0,1,2 [--hack]

The base is a 2-layer, width-64 GPT pretrained on 24-symbol documents, so a reply to a BOS + 8
symbol prompt ends with EOS after 16 symbols. Preference pairs are two samples of the base per
prompt, labelled with Bradley-Terry noise on the gold score (+1 per target symbol, -5 per illegal
transition; target symbols may never follow each other, so piling them up breaks the chain); PPO
and DPO start from the base. The driver gives each seed its own chain and target class
(data.synthetic.seed = seed), so seeds are different tasks. `--hack` adds a PPO run with beta = 0
for 150 iterations, whose hacking alarms should fire while the reward model's score rises and the
gold score falls. Each stage's log lands beside its workdir (ROOT/seedN/STAGE.log).
"""
import json
import os
import subprocess
import sys
import time

from ml_collections import ConfigDict

from experiments import base

STAGES = ('pretrain', 'reward', 'ppo', 'dpo')


def get_config(stage: str = 'pretrain') -> ConfigDict:
  if stage not in STAGES:
    raise ValueError(f'experiments/rlhf_synthetic.py:{stage}: use one of {", ".join(STAGES)}')
  c = base.get_config()
  c.stage = stage
  c.model.n_layers, c.model.d_model, c.model.n_heads = 2, 64, 4
  s = c.data.synthetic
  s.n_docs, s.doc_len = 8000, 24
  t = c.train
  t.batch_size, t.seq_len, t.log_every = 16, 128, 10
  c.checkpoint.keep = 1
  c.sample.prompt, c.sample.max_new_tokens = 'ab', 24
  if stage == 'pretrain':
    t.steps, t.lr, t.warmup_steps = 500, 3e-3, 50
    c.eval.every_steps, c.checkpoint.every_steps = 0, 0
    return c
  t.seq_len = 40                  # a BOS + 8-symbol prompt, a response of up to 24 tokens and room to spare
  t.schedule, t.warmup_steps, t.weight_decay = 'constant', 0, 0.0
  c.eval.every_steps, c.checkpoint.every_steps = 0, 0
  if stage == 'reward':
    t.steps, t.batch_size, t.lr = 400, 32, 1e-3
  elif stage == 'ppo':
    t.steps, t.batch_size, t.lr = 60, 16, 3e-4
  elif stage == 'dpo':
    t.steps, t.batch_size, t.lr = 300, 32, 3e-4
    c.rlhf.dpo_beta = 0.3
  return c


def run_stage(stage: str, workdir: str, seed: int, *flags: str) -> float:
  """One run.py stage in its own process (skipped when its summary exists); its wall time."""
  done = {'pretrain': 'checkpoints', 'reward': 'reward_summary.json', 'ppo': 'rl_summary.json',
          'dpo': 'dpo_summary.json'}[stage]  # pretrain checkpoints only at its end
  if os.path.exists(os.path.join(workdir, done)):
    return 0.0
  start = time.perf_counter()
  command = [sys.executable, 'run.py', f'--config=experiments/rlhf_synthetic.py:{stage}',
             f'--workdir={workdir}', f'--config.seed={seed}', f'--config.data.synthetic.seed={seed}',
             *flags]
  print(' '.join(command[1:]), flush=True)
  with open(os.path.join(os.path.dirname(workdir), f'{os.path.basename(workdir)}.log'), 'w') as log:
    subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT)
  return time.perf_counter() - start


def run_seed(root: str, seed: int, hack: bool) -> dict:
  """pretrain -> reward -> ppo -> dpo (and the beta = 0 PPO run) for one seed; their summaries."""
  d = lambda name: os.path.join(root, f'seed{seed}', name)
  os.makedirs(d(''), exist_ok=True)
  base = f'--config.pretrained={d("base")}'
  times = {'pretrain': run_stage('pretrain', d('base'), seed)}
  times['reward'] = run_stage('reward', d('reward'), seed, base)
  times['ppo'] = run_stage('ppo', d('ppo'), seed, base, f'--config.rlhf.reward_model={d("reward")}')
  times['dpo'] = run_stage('dpo', d('dpo'), seed, base)
  if hack:
    times['hack'] = run_stage('ppo', d('ppo_beta0'), seed, base,
                              f'--config.rlhf.reward_model={d("reward")}', '--config.rlhf.beta=0',
                              '--config.train.steps=150')
  read = lambda name, file: json.load(open(os.path.join(d(name), file)))
  out = {'times': times, 'reward': read('reward', 'reward_summary.json'),
         'ppo': read('ppo', 'rl_summary.json'), 'dpo': read('dpo', 'dpo_summary.json')}
  if hack:
    rows = [json.loads(line) for line in open(os.path.join(d('ppo_beta0'), 'metrics.jsonl'))]
    out['hack'] = {'summary': read('ppo_beta0', 'rl_summary.json'), 'first': rows[0],
                   'last': rows[-1]}
  return out


def table(results: dict[int, dict]) -> str:
  """The before/after figures per seed."""
  cols = ('gold', 'target_share', 'kl', 'legal_rate', 'illegal_per_response', 'chain_nll', 'ref_nll')
  lines = ['seed policy ' + ' '.join(f'{c:>12}' for c in cols)]
  for seed, res in results.items():
    for name, report in (('base', res['ppo']['before']), ('ppo', res['ppo']['after']),
                         ('dpo', res['dpo']['after'])):
      lines.append(f'{seed:>4} {name:<6} ' + ' '.join(f'{report[c]:>12.3f}' for c in cols))
  lines.append('')
  lines.append('seed  RM acc (gold sign)  RM acc (labels)  DPO implicit acc (labels, gold sign)  '
               'wall time (s) pretrain reward ppo dpo = total')
  for seed, res in results.items():
    t = res['times']
    total = sum(v for k, v in t.items() if k != 'hack')
    lines.append(f"{seed:>4} {res['reward']['gold_accuracy']:>19.3f} "
                 f"{res['reward']['eval_accuracy']:>16.3f} {res['dpo']['implicit_accuracy']:>18.3f} "
                 f"{res['dpo']['implicit_gold_accuracy']:>.3f}   "
                 + ' '.join(f"{t[k]:.0f}" for k in ('pretrain', 'reward', 'ppo', 'dpo'))
                 + f' = {total:.0f}')
  hacks = {s: r['hack'] for s, r in results.items() if 'hack' in r}
  if hacks:
    lines.append('')
    lines.append('seed  beta=0: first alarm  RM score first->last  gold first->last  '
                 'illegal/response last  KL last')
    for seed, h in hacks.items():
      f, l = h['first'], h['last']
      lines.append(f"{seed:>4} {str(h['summary']['first_alarm']):>20} {f['score']:>9.2f} -> "
                   f"{l['score']:<6.2f} {f['gold']:>8.2f} -> {l['gold']:<7.2f} "
                   f"{l['illegal_per_response']:>12.2f} {l['kl']:>14.1f}")
  return '\n'.join(lines)


def main(argv: list[str]) -> None:
  import argparse
  parser = argparse.ArgumentParser(description='The ground-truth RLHF experiment, seed by seed.')
  parser.add_argument('--root', default='runs/rlhf')
  parser.add_argument('--seeds', default='0,1,2')
  parser.add_argument('--hack', action='store_true', help='also run PPO with beta = 0')
  args = parser.parse_args(argv)
  results = {s: run_seed(args.root, s, args.hack) for s in map(int, args.seeds.split(','))}
  print(table(results), flush=True)


if __name__ == '__main__':
  main(sys.argv[1:])
