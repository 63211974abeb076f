"""FLOPs per token, device peak and MFU; metrics to JSONL, TensorBoard and the trackers."""
import json
import os
import platform
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

from model.config import ModelConfig
from train.tracking import (INFO_FILE, close_trackers, enabled_trackers, mirror, open_trackers,
                            run_metadata)
from train.workdir import write_text_atomic, write_json_atomic

# Dense bf16 peak FLOP/s per device (vendor datasheets, no sparsity).
PEAK_FLOPS = {
    'TPU v4': 275e12,
    'TPU v5 lite': 197e12,  # v5e
    'TPU v5e': 197e12,
    'TPU v5p': 459e12,
    'TPU v5': 459e12,
    'TPU v6 lite': 918e12,  # v6e (Trillium)
    'TPU v6e': 918e12,
    'NVIDIA A100': 312e12,
    'NVIDIA H100': 989e12,
    'NVIDIA H200': 989e12,
}


def matmul_params(cfg: ModelConfig) -> int:
  """Parameters that take part in matmuls, per token: attention and MLP projections, and the
  output layer (the unembedding counts even when tied). The embedding lookup is a gather: excluded.
  A mixture of experts counts its active parameters: the router and top_k experts."""
  attn = cfg.d_model * cfg.head_dim * (2 * cfg.n_heads + 2 * cfg.n_kv_heads)
  mlp = (3 if cfg.mlp == 'swiglu' else 2) * cfg.d_model * cfg.d_ff
  if cfg.mlp == 'moe':
    mlp = cfg.top_k * 3 * cfg.d_model * cfg.d_ff + cfg.d_model * cfg.n_experts
  decoder = cfg.decoder_layers * (2 * attn + mlp) if cfg.family == 'encoder_decoder' else 0
  return cfg.n_layers * (attn + mlp) + decoder + cfg.d_model * cfg.vocab_size


def adapter_params(cfg: ModelConfig) -> int:
  """LoRA parameters per token: rank · (fan-in + fan-out) for each targeted projection of each
  layer (an encoder-decoder's cross-attention projections carry adapters too)."""
  d, q, kv, f = cfg.d_model, cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.d_ff
  sizes = {'query': d + q, 'key': d + kv, 'value': d + kv, 'out': q + d, 'gate': d + f,
           'up': d + f, 'down': f + d}
  attn = sum(sizes[t] for t in ('query', 'key', 'value', 'out') if t in cfg.lora_targets)
  mlp = sum(sizes[t] for t in ('gate', 'up', 'down') if t in cfg.lora_targets)  # gate: swiglu only
  decoder = cfg.decoder_layers * (2 * attn + mlp) if cfg.family == 'encoder_decoder' else 0
  return cfg.lora_rank * (cfg.n_layers * (attn + mlp) + decoder)


def flops_per_token(cfg: ModelConfig, seq_len: int, causal: bool = True) -> float:
  """Training FLOPs per token = 6·N_matmul + 12·L·T·(h·k) (PaLM, appendix B).

  Under LoRA the frozen base computes no weight gradients, only the forward and the activation
  gradient (4·N_matmul), while the adapters train in full (6·N_adapter).

  The attention term (QK^T and AV, forward and backward) is halved for causal masks, since half
  of the score matrix is masked out; kernels that skip it do half the work. An encoder-decoder
  counts a token of both stacks (decoder rows taken as long as encoder rows: an upper bound when
  targets are shorter): bidirectional encoder, causal decoder self-attention, full cross-attention.
  """
  per_layer = 12 * seq_len * cfg.n_heads * cfg.head_dim
  weights = (4 if cfg.lora_rank else 6) * matmul_params(cfg) + 6 * adapter_params(cfg)
  if cfg.family == 'encoder_decoder':
    return weights + per_layer * (cfg.n_layers + 1.5 * cfg.decoder_layers)
  attention = cfg.n_layers * per_layer
  return weights + (attention / 2 if causal else attention)


def _cpu_cache_path() -> str:
  root = os.environ.get('XDG_CACHE_HOME', os.path.join(os.path.expanduser('~'), '.cache'))
  return os.path.join(root, 'lmlab', 'cpu_peak.json')


def measure_matmul_peak(n: int = 2048, repeats: int = 10) -> float:
  """FLOP/s of a jit-compiled f32 matmul on the default device: the honest CPU 'peak'."""
  x = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda a: a @ a)
  f(x).block_until_ready()
  best = float('inf')
  for _ in range(repeats):
    t0 = time.perf_counter()
    f(x).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2 * n ** 3 / best


def device_peak_flops(remeasure: bool = False) -> float:
  """Peak FLOP/s of one device: from the table for accelerators; on CPU measured and cached.

  The cache keeps the best measurement seen, since a busy machine can only make it look slower;
  `remeasure` (benchmarks/train_throughput.py --measure_peak) measures again and keeps the max.
  """
  device = jax.devices()[0]
  kind = getattr(device, 'device_kind', '')
  for name, peak in PEAK_FLOPS.items():
    if kind.startswith(name):
      return peak
  if device.platform != 'cpu':
    return float('nan')  # unknown accelerator: MFU is reported as NaN rather than guessed
  key = f'{platform.processor() or platform.machine()}|{os.cpu_count()}'
  path = _cpu_cache_path()
  try:
    with open(path) as f:
      cache = json.load(f)
  except (OSError, ValueError):
    cache = {}
  if key not in cache or remeasure:
    cache[key] = max(cache.get(key, 0.0), measure_matmul_peak())
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_json_atomic(path, cache)  # concurrent runs each write a whole file
  # Simulated CPU devices share the same cores: the per-device peak is the machine peak divided.
  return cache[key] / jax.device_count()


def summary_writer_class() -> type:
  """tensorboardX's SummaryWriter, imported without torch: tensorboardX imports torch when it is
  installed (5-6 s of every run's start-up) only to accept torch tensors, and we log floats."""
  if 'torch' in sys.modules:
    from tensorboardX import SummaryWriter
    return SummaryWriter
  sys.modules['torch'] = None  # `import torch` raises ImportError: tensorboardX's own fallback
  try:
    from tensorboardX import SummaryWriter
  finally:
    del sys.modules['torch']
  return SummaryWriter


class MetricWriter:
  """Appends one JSON object per line to metrics.jsonl and mirrors scalars to TensorBoard and to
  the trackers (wandb, MLflow) that the run's config turns on.

  Each row is one `write` of a whole line on an O_APPEND descriptor, so a crash leaves whole rows.
  A run resumed from step k (`resume_step`) first drops the rows after k, which the steps it is
  about to redo would otherwise duplicate; TensorBoard purges those steps the same way. Trackers
  cannot drop rows: a resumed run continues their runs and skips the steps they already hold (up
  to the last row metrics.jsonl had; CPU resume is exact, so those values stand), and a run from
  scratch (`resume_step` 0) starts new tracker runs. `config` is the run's whole config: its
  `metrics` section picks the trackers (train/tracking.py), which are given the run's metadata,
  also written to WORKDIR/run_info.json.
  """

  def __init__(self, workdir: str, enabled: bool = True, resume_step: int | None = None,
               config: ConfigDict | None = None):
    self.enabled = enabled
    if not enabled:
      return
    SummaryWriter = summary_writer_class()  # imported lazily: only the writing process needs it
    path = os.path.join(workdir, 'metrics.jsonl')
    self._trackers = self._open_trackers(workdir, config, resume_step)
    self._tracked_through = last_logged_step(path) if resume_step else None
    keep_rows_through(path, resume_step)
    self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    purge = None if resume_step is None else resume_step + 1
    self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard'), purge_step=purge)

  @staticmethod
  def _open_trackers(workdir: str, config: ConfigDict | None, resume_step: int | None) -> list:
    if config is None:
      return []
    m = config.get('metrics')
    classes = enabled_trackers(m)  # a missing library fails here, before any file is written
    metadata = run_metadata(config)
    write_json_atomic(os.path.join(workdir, INFO_FILE), metadata, indent=2)
    return open_trackers(classes, m, workdir, metadata, new_run=resume_step == 0)

  def write(self, step: int, metrics: dict[str, Any]) -> None:
    if not self.enabled:
      return
    clean = {k: (v.item() if isinstance(v, (np.generic, np.ndarray)) else v) for k, v in metrics.items()}
    line = (json.dumps({'step': step, **clean}) + '\n').encode()
    if os.write(self._fd, line) != len(line):  # a short write only happens when the disk is full
      raise OSError(28, f'metrics.jsonl: short write at step {step} (disk full?)')
    scalars = {k: v for k, v in clean.items() if isinstance(v, (int, float))}
    for k, v in scalars.items():
      self._tb.add_scalar(k, v, step)
    if self._trackers and (self._tracked_through is None or step > self._tracked_through):
      self._trackers = mirror(self._trackers, step, scalars)

  def close(self) -> None:
    if not self.enabled:
      return
    os.close(self._fd)
    close_trackers(self._trackers)
    try:
      self._tb.close()
    except OSError:  # disk full: the mirror loses its tail (metrics.jsonl is the record) ...
      for writer in (self._tb.all_writers or {}).values():
        writer.event_writer._closed = True  # ... and tensorboardX's atexit hook must not retry


def _row(line: str) -> dict | None:
  """A whole row of metrics.jsonl, or None for a line cut short by a crash (or not a row)."""
  try:
    row = json.loads(line) if line.endswith('\n') else None
  except ValueError:
    return None
  return row if isinstance(row, dict) else None


def last_logged_step(path: str) -> int | None:
  """The highest step of a whole row in `path` (None: no file, no rows)."""
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return max((row.get('step', 0) for row in map(_row, f) if row is not None), default=None)


def keep_rows_through(path: str, last_step: int | None) -> None:
  """Rewrite `path` (atomically) without the rows after `last_step` (None: keep every step) and
  without a line cut short by a crash; untouched when nothing would change."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    text = f.read()
  kept = []
  for line in text.splitlines(keepends=True):
    row = _row(line)
    if row is not None and (last_step is None or row.get('step', 0) <= last_step):
      kept.append(line)
  if ''.join(kept) != text:
    write_text_atomic(path, ''.join(kept))
