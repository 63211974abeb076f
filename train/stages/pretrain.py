"""Stages `pretrain` and `sample`: train a model from scratch on `config.data`, and sample a workdir."""
import os

import jax
from ml_collections import ConfigDict

from data.pipeline import Dataset, build_dataset
from data.seq2seq import Seq2SeqDataset, build_seq2seq_dataset
from data.tokenizer import load_tokenizer
from model.errors import UserError
from model.generate import generate_rows
from model.sampling import Sampling
from model.tokenizer import Tokenizer
from train import checkpoint
from train.loop import pretrain
from train.mesh import mesh_rules
from train.stages.eval import eval_hook
from train.stages.seq2seq_eval import report_exact_match
from train.trainer import Trainer, init_trainer
from train.workdir import tokenizer_dir


def print_samples(trainer: Trainer, tokenizer: Tokenizer, s: ConfigDict) -> list[str]:
  """Complete `sample.prompt` (after BOS, as documents start in training) and print each sample."""
  prompt = [tokenizer.bos_id] + tokenizer.encode(s.prompt)
  with mesh_rules(trainer.mesh):
    rows = generate_rows(trainer.eval_model, trainer.state.params, [prompt] * s.num_samples,
                         max_new_tokens=s.max_new_tokens, rng=jax.random.PRNGKey(s.seed),
                         sampling=Sampling(s.temperature, s.top_k, s.top_p, s.min_p),
                         stop_ids=(tokenizer.eos_id,), pad_id=tokenizer.pad_id).tokens
  texts = [s.prompt + tokenizer.decode(row) for row in rows]
  for i, text in enumerate(texts):
    print(f'--- sample {i} ---\n{text}', flush=True)
  return texts


def pretrain_dataset(cfg: ConfigDict, workdir: str) -> Dataset | Seq2SeqDataset:
  """The family's pretraining rows: seq2seq examples for the encoder-decoder, packed documents
  otherwise."""
  build = build_seq2seq_dataset if cfg.model.family == 'encoder_decoder' else build_dataset
  return build(cfg.data, cfg.seed, tokenizer_dir=tokenizer_dir(workdir),
               process_index=jax.process_index(), process_count=jax.process_count())


def pretrain_stage(cfg: ConfigDict, workdir: str) -> None:
  checkpoint.branch_from(cfg.train.branch_from, workdir, cfg.train.steps)
  dataset = pretrain_dataset(cfg, workdir)
  truth = dataset.info.get('true_entropy_nats_per_token')
  if truth is not None:
    print(f'source: true entropy {truth:.4f} nats/token (the best achievable eval loss)', flush=True)
  trainer, metrics = pretrain(cfg, workdir, dataset, eval_hook(cfg, dataset.tokenizer))
  if metrics.get('preempted'):
    return
  line = f'final eval_loss {metrics["eval_loss"]:.4f} nats/token'
  if truth is not None:
    line += f', true entropy {truth:.4f} (gap {metrics["eval_loss"] - truth:+.4f})'
  if cfg.model.family == 'encoder':  # masked LM: no bits/byte, and nothing to sample
    print(f'{line}, masked-token accuracy {metrics["eval_accuracy"]:.4f}', flush=True)
    return
  if cfg.model.family == 'encoder_decoder':  # seq2seq: greedy exact match instead of samples
    if cfg.data.seq2seq.exact_match:
      line += f', held-out exact match {report_exact_match(trainer, dataset, cfg, workdir):.4f}'
    print(line, flush=True)
    return
  if 'eval_bpb' in metrics:
    line += f', {metrics["eval_bpb"]:.4f} bits/byte'
  print(line, flush=True)
  for k, v in metrics.items():
    if k.startswith('eval/'):
      print(f'{k} {v:.4f}', flush=True)
  print_samples(trainer, dataset.tokenizer, cfg.sample)


def sample_stage(cfg: ConfigDict, workdir: str) -> None:
  """Load the latest checkpoint and the tokenizer saved beside it, and print completions."""
  if not os.path.isdir(tokenizer_dir(workdir)):
    raise UserError(f'{workdir} has no tokenizer/ folder; train there first (stage=pretrain)')
  if cfg.model.family != 'decoder':
    raise UserError(f'stage=sample needs model.family=decoder, got {cfg.model.family!r}; an '
                    'encoder gives embeddings: load_pretrained(workdir).encode(texts)')
  tokenizer = load_tokenizer(tokenizer_dir(workdir))
  trainer = init_trainer(cfg, tokenizer.vocab_size)
  trainer.state, _ = checkpoint.restore_latest(workdir, trainer.state)
  print_samples(trainer, tokenizer, cfg.sample)
