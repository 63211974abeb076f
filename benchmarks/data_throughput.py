"""Data throughput: the tokenize stage (MB/s of text, tokens/s, peak RSS of the whole process tree,
Beam's workers included) next to a single-process Python loop doing the same work; and the loader
(data/stream.py): tokens/s delivered to the host per process, time to the first batch, peak RSS,
then training from the store (experiments/shakespeare_char.py settings) for each store size:
peak RSS and time to the first step, and the step time fed by the loader vs one cached batch.

  python benchmarks/data_throughput.py --part=tokenize --mb=100 --tokenizers=byte,spm_bpe:8000
  python benchmarks/data_throughput.py --part=load --load_mb=100,1000

The corpus is generated in a temporary folder (shuffled lines of tinyshakespeare plus random words,
files of --file_mb) and never kept unless --workdir is given.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAKESPEARE = os.path.join(ROOT, '..', 'shared', 'data', 'tinyshakespeare.txt')
MB = 1 << 20


def make_corpus(folder: str, mb: float, file_mb: float, seed: int = 0) -> str:
  """Files of shuffled Shakespeare lines, a random made-up word after one line in three; the glob."""
  rng = np.random.default_rng(seed)
  with open(SHAKESPEARE, encoding='utf-8') as f:
    lines = np.array([line for line in f.read().split('\n') if line.strip()], dtype=object)
  letters = np.array(list('abcdefghijklmnopqrstuvwxyz'))
  words = np.array([''.join(rng.choice(letters, rng.integers(3, 10))) for _ in range(50_000)], dtype=object)
  os.makedirs(folder, exist_ok=True)
  remaining, index = int(mb * MB), 0
  while remaining > 0:
    size = min(remaining, int(file_mb * MB))
    with open(os.path.join(folder, f'corpus-{index:04d}.txt'), 'w', encoding='utf-8') as f:
      written = 0
      while written < size:
        picked = lines[rng.integers(0, len(lines), 20_000)]
        extra = np.where(rng.random(len(picked)) < 1 / 3, ' ' + words[rng.integers(0, len(words), len(picked))], '')
        text = '\n'.join(picked + extra) + '\n'
        text = text[:size - written]
        f.write(text)
        written += len(text)
    remaining -= size
    index += 1
  return os.path.join(folder, '*.txt')


def run_measured(cmd: list[str]) -> tuple[str, float, float]:
  """(output, wall seconds, peak RSS in MB of the process and all its descendants together)."""
  start = time.time()
  proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env={**os.environ, 'PYTHONPATH': ROOT})
  peak = 0.0
  out_path = tempfile.mktemp()
  with open(out_path, 'w') as out:
    import threading
    pump = threading.Thread(target=lambda: shutil.copyfileobj(proc.stdout, out))
    pump.start()
    while proc.poll() is None:
      peak = max(peak, tree_rss_mb(proc.pid))
      time.sleep(1.0)  # a /proc scan costs CPU: sample once a second
    pump.join()
  with open(out_path) as f:
    output = f.read()
  os.remove(out_path)
  if proc.returncode:
    sys.exit(f'{" ".join(cmd)} failed:\n{output[-3000:]}')
  return output, time.time() - start, peak


def children_cpu_s() -> float:
  """User + system CPU seconds of every finished descendant (Beam's workers included)."""
  usage = resource.getrusage(resource.RUSAGE_CHILDREN)
  return usage.ru_utime + usage.ru_stime


def tree_rss_mb(pid: int) -> float:
  """Resident memory of pid and its descendants, summed (read from /proc)."""
  children: dict[int, list[int]] = {}
  rss: dict[int, int] = {}
  for entry in os.listdir('/proc'):
    if not entry.isdigit():
      continue
    try:
      with open(f'/proc/{entry}/status') as f:
        status = f.read()
    except OSError:
      continue
    ppid = int(re.search(r'PPid:\s+(\d+)', status).group(1))
    found = re.search(r'VmRSS:\s+(\d+) kB', status)
    children.setdefault(ppid, []).append(int(entry))
    rss[int(entry)] = int(found.group(1)) if found else 0
  total, todo = 0, [pid]
  while todo:
    p = todo.pop()
    total += rss.get(p, 0)
    todo += children.get(p, [])
  return total / 1024


BASELINE = '''
import json, sys, time
from ml_collections import ConfigDict
from data import blocks, store
from data.tokenize_beam import plan_units, _records
from data.tokenizer import load_tokenizer
source, store_dir, out, limit = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
start = time.time()
plan = blocks.plan_source(source, 0.1, 'strict', 4 * (1 << 20))
tokenizer = load_tokenizer(store_dir + '/tokenizer')
planned = time.time()
done = 0.0
with store.ShardWriter(out, 'all', 0, 1) as writer:
  for unit in plan_units(plan, 64 * (1 << 20)):
    for block in unit.blocks:
      if done >= limit:
        break
      for ids, starts in _records(tokenizer, [block], 65536, 'strict', '', [0]):
        writer.write(ids, starts)
      done += block.nbytes
  counts = writer.close()
print(json.dumps({'plan_s': planned - start, 'loop_s': time.time() - planned, 'tokens': counts['tokens'],
                  'bytes': done}))
'''


def tokenize_part(args, folder: str) -> None:
  glob = make_corpus(os.path.join(folder, 'corpus'), args.mb, args.file_mb)
  n_bytes = sum(os.path.getsize(os.path.join(folder, 'corpus', f)) for f in os.listdir(os.path.join(folder, 'corpus')))
  print(f'corpus: {n_bytes / MB:.0f} MB in {len(os.listdir(os.path.join(folder, "corpus")))} files; '
        f'{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}', flush=True)
  for spec in args.tokenizers.split(','):
    store = os.path.join(folder, 'store-' + spec.replace(':', '-'))
    cmd = [sys.executable, 'run.py', '--config=experiments/tokenize.py', f'--workdir={store}',
           f'--config.data.source=text:{glob}', f'--config.data.tokenizer={spec}']
    if args.workers:
      cmd.append(f'--config.data.store.workers={args.workers}')
    cpu = children_cpu_s()
    output, wall, peak = run_measured(cmd)
    cpu = children_cpu_s() - cpu
    timing = dict(re.findall(r'(planned|ready) in ([\d.]+)s', output))
    pipeline_s = float(re.search(r'pipeline ran in ([\d.]+)s', output).group(1))
    tokens = sum(v['tokens'] for v in json.load(open(os.path.join(store, 'manifest.json')))['splits'].values())
    stage_s = wall - float(timing['ready'])  # tokenizer training is reported apart, as the loop never trains
    limit = args.baseline_mb * MB if args.baseline_mb else float('inf')
    base_cpu = children_cpu_s()
    base_out, base_wall, base_peak = run_measured([sys.executable, '-c', BASELINE, f'text:{glob}', store,
                                                   os.path.join(folder, 'baseline'), str(limit)])
    base_cpu = children_cpu_s() - base_cpu
    base = json.loads(base_out.strip().splitlines()[-1])
    share = base['bytes'] / n_bytes  # the loop may cover only the first --baseline_mb: scale its time
    base_s = base['plan_s'] + base['loop_s'] / share
    if share == 1:
      assert base['tokens'] == tokens, (base['tokens'], tokens)
    print(f"tokenize {spec}: stage {wall:.1f}s wall (tokenizer {float(timing['ready']):.1f}s, "
          f"plan {float(timing['planned']):.1f}s, Beam pipeline {pipeline_s:.1f}s); without tokenizer training "
          f"{stage_s:.1f}s = {n_bytes / MB / stage_s:.2f} MB/s, {tokens / stage_s / 1e6:.2f} M tokens/s; "
          f"peak RSS (process tree) {peak:.0f} MB; CPU {cpu:.0f}s (user+sys, workers included)", flush=True)
    print(f"  single-process loop{f' (first {share:.0%} timed, scaled)' if share < 1 else ''}: "
          f"{base_s:.1f}s (plan {base['plan_s']:.1f}s, loop {base['loop_s'] / share:.1f}s) = "
          f"{n_bytes / MB / base_s:.2f} MB/s, {tokens / base_s / 1e6:.2f} M tokens/s; peak RSS {base_peak:.0f} MB; "
          f"CPU {base_cpu:.0f}s{' for the timed part' if share < 1 else ''}; speed-up {base_s / stage_s:.2f}x "
          f"(load average now {os.getloadavg()[0]:.1f})", flush=True)
    shutil.rmtree(os.path.join(folder, 'baseline'), ignore_errors=True)
  print(f'children max RSS (largest single process): {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024:.0f} MB')


LOADER = '''
import json, resource, sys, time
start = time.time()
from ml_collections import ConfigDict
from data.pipeline import build_dataset
store, index, count, batch, seq_len, n = sys.argv[1], *map(int, sys.argv[2:7])
data = build_dataset(ConfigDict({'source': 'tokens:' + store, 'tokenizer': 'byte'}), 0,
                     process_index=index, process_count=count)
it = data.train_iter(batch, seq_len)
first = next(it)
ready = time.time()
tokens = 0
for _ in range(n):
  tokens += int(next(it)['weights'].sum())
done = time.time()
it.close()
print(json.dumps({'first_batch_s': ready - start, 'tokens_per_s': tokens / (done - ready),
                  'rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
'''

STEP_TIME = '''
import json, sys, time
import jax
from experiments import shakespeare_char
from data.pipeline import build_dataset
from train.step import compile_train_step
from train.trainer import init_trainer
from train.mesh import global_batch, mesh_rules
from train.objectives import objective_for
cfg = shakespeare_char.get_config()
cfg.data.source, cfg.data.tokenizer = 'tokens:' + sys.argv[1], 'byte'
steps = int(sys.argv[2])
data = build_dataset(cfg.data, cfg.seed)
trainer = init_trainer(cfg, data.tokenizer.vocab_size)
it = data.train_iter(cfg.train.batch_size, cfg.train.seq_len)
objective = objective_for(trainer.model_cfg.family, data.tokenizer.pad_id)
with mesh_rules(trainer.mesh):
  cached = global_batch(next(it), trainer.mesh)
  step = compile_train_step(trainer, objective, cached)
  rng = jax.random.PRNGKey(0)
  out = {}
  for name in ('cached', 'loader', 'cached_again', 'loader_again'):
    state = trainer.state
    for i in range(steps + 5):
      if i == 5:
        jax.block_until_ready(state)
        t = time.perf_counter()
      batch = cached if name.startswith('cached') else global_batch(next(it), trainer.mesh)
      state, metrics = step(state, batch, rng)
    jax.block_until_ready(state)
    out[name] = (time.perf_counter() - t) / steps * 1000
    trainer.state = state
it.close()
print(json.dumps(out))
'''


def build_byte_store(folder: str, mb: float, shards: int = 8, seed: int = 0) -> str:
  """A byte-tokenized store of `mb` MB of text written in-process with data.store's shard writer
  (documents of 0.2-20 KB of shuffled Shakespeare lines, 1 in 100 held out for eval); the
  tokenize stage's own speed is --part=tokenize."""
  sys.path.insert(0, ROOT)
  from data import store as token_store
  from data.tokenizer import ByteTokenizer
  tok, rng = ByteTokenizer(), np.random.default_rng(seed)
  with open(SHAKESPEARE, 'rb') as f:
    lines = np.array([line + b'\n' for line in f.read().split(b'\n') if line.strip()], dtype=object)
  store = os.path.join(folder, 'store')
  start = time.time()
  writers = {split: [token_store.ShardWriter(store, split, i, n) for i in range(n)]
             for split, n in (('train', shards), ('eval', 1))}
  written, doc = 0, 0
  while written < mb * MB:
    text = b''.join(lines[rng.integers(0, len(lines), int(rng.integers(5, 500)))])
    ids = np.concatenate([[tok.bos_id], np.frombuffer(text, np.uint8), [tok.eos_id]]).astype(np.int32)
    split = 'eval' if doc % 100 == 99 else 'train'
    shard = writers[split][doc % len(writers[split])]
    for k, piece in enumerate(token_store.chunk(ids, token_store.CHUNK_TOKENS)):
      shard.write(piece, starts_document=k == 0)
    written, doc = written + len(text), doc + 1
  tok.save(os.path.join(store, token_store.TOKENIZER_DIR))
  entries = {split: token_store.split_entry(split, [w.close() for w in ws]) for split, ws in writers.items()}
  manifest = token_store.write_manifest(store, tok, entries, token_store.CHUNK_TOKENS)
  size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(store) for f in fs)
  print(f'store of {mb:.0f} MB of text: {manifest["splits"]["train"]["tokens"] / 1e6:.0f} M train tokens in '
        f'{manifest["splits"]["train"]["records"]} records, {size / MB:.0f} MB on disk, written in '
        f'{time.time() - start:.0f}s', flush=True)
  return store


def first_step_run(store: str, workdir: str, steps: int) -> tuple[float, float, float]:
  """run.py on experiments/shakespeare_char.py from the store: (seconds from launch to the first
  step's metrics, peak RSS of the process in MB, median step time in ms)."""
  cmd = [sys.executable, 'run.py', '--config=experiments/shakespeare_char.py', f'--workdir={workdir}',
         f'--config.data.source=tokens:{store}', '--config.data.tokenizer=byte', f'--config.train.steps={steps}',
         '--config.train.log_every=1', '--config.eval.every_steps=0', '--config.eval.max_batches=4',
         '--config.checkpoint.every_steps=0', '--config.sample.max_new_tokens=8']
  start = time.time()
  proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                          env={**os.environ, 'PYTHONPATH': ROOT})
  metrics, first, peak = os.path.join(workdir, 'metrics.jsonl'), None, 0.0
  while proc.poll() is None:
    peak = max(peak, tree_rss_mb(proc.pid))
    if first is None and os.path.exists(metrics) and os.path.getsize(metrics):
      first = time.time() - start
    time.sleep(0.05)
  if proc.returncode:
    sys.exit(f'{" ".join(cmd)} failed')
  with open(metrics) as f:
    times = sorted(json.loads(line)['step_time'] for line in f if 'eval_loss' not in line)
  return first, peak, 1000 * times[len(times) // 2]


def last_json(output: str) -> dict:
  """The last JSON line of a child's output (warnings may follow it)."""
  return json.loads([line for line in output.splitlines() if line.startswith('{')][-1])


def load_part(args, folder: str) -> None:
  """Acceptance 2: the loader alone, then training from the store, for each store size."""
  print(f'{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}', flush=True)
  for mb in map(float, args.load_mb.split(',')):
    here = os.path.join(folder, f'load-{mb:.0f}')
    store = build_byte_store(here, mb)
    for count in (1, 2):
      out, _, _ = run_measured([sys.executable, '-c', LOADER, store, '0', str(count), str(args.load_batch // count),
                                str(args.load_seq), str(args.load_batches)])
      r = last_json(out)
      print(f'  loader, process 0 of {count}, {args.load_batch // count}x{args.load_seq} per process: '
            f'{r["tokens_per_s"] / 1e6:.2f} M tokens/s to the host, first batch {r["first_batch_s"]:.1f}s '
            f'after launch, peak RSS {r["rss_mb"]:.0f} MB', flush=True)
    first, peak, step_ms = first_step_run(store, os.path.join(here, 'run'), args.train_steps)
    print(f'  training (shakespeare_char, {args.train_steps} steps): first step {first:.1f}s after launch, '
          f'peak RSS {peak:.0f} MB, median step {step_ms:.1f} ms', flush=True)
    out, _, _ = run_measured([sys.executable, '-c', STEP_TIME, store, str(args.train_steps)])
    r = last_json(out)
    print('  step time, ms (one cached batch vs fed by the loader, twice): ' +
          ', '.join(f'{k} {v:.2f}' for k, v in r.items()), flush=True)
    shutil.rmtree(here, ignore_errors=True)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--part', choices=('tokenize', 'load', 'all'), default='all')
  parser.add_argument('--mb', type=float, default=100, help='corpus size in MB')
  parser.add_argument('--file_mb', type=float, default=100, help='size of each corpus file')
  parser.add_argument('--tokenizers', default='byte,spm_bpe:8000')
  parser.add_argument('--baseline_mb', type=float, default=0,
                      help='time the single-process loop on the first MB only (0 = all) and scale')
  parser.add_argument('--workers', type=int, default=0, help='Beam local workers (0 = one per core)')
  parser.add_argument('--workdir', default='', help='keep the corpus and stores here (default: a temp dir)')
  parser.add_argument('--load_mb', default='100,1000', help='--part=load: store sizes, MB of text')
  parser.add_argument('--load_batch', type=int, default=64, help='--part=load: global batch, rows')
  parser.add_argument('--load_seq', type=int, default=1024, help='--part=load: row length')
  parser.add_argument('--load_batches', type=int, default=200, help='--part=load: batches timed')
  parser.add_argument('--train_steps', type=int, default=200, help='--part=load: training steps timed')
  args = parser.parse_args()
  folder = args.workdir or tempfile.mkdtemp(prefix='data_throughput_')
  try:
    if args.part in ('tokenize', 'all'):
      tokenize_part(args, folder)
    if args.part in ('load', 'all'):
      load_part(args, folder)
  finally:
    if not args.workdir:
      shutil.rmtree(folder, ignore_errors=True)


if __name__ == '__main__':
  main()
