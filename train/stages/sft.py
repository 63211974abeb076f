"""Stage `sft`: supervised fine-tuning of a pretrained model on instruction data, every weight or
LoRA adapters only, with the pretraining loop, mesh and checkpoints.

  python run.py --config=experiments/sft_smollm2_gsm8k.py --workdir=runs/sft
  python run.py --config=experiments/chat_smollm2.py --config.pretrained=runs/sft   # talk to it

Loss is on completion (assistant) tokens only (data/sft.py); held-out completion loss is measured
before training and at every eval, and greedy replies to `sft.eval_generate` held-out prompts are
scored by exact match (GSM8K: the final number) before and after.

The same stage fine-tunes on other data by the kind of `sft.train` (`sft_task`): `text:GLOB` trains
every token with the base family's pretraining loss (domain adaptation), `classify:GLOB` puts a
class head on an encoder (python experiments/classify_shakespeare.py shows both bases).
"""
import dataclasses
import functools
import json
import os
import resource
from typing import Any, Callable

import flax.linen as nn
import jax
from ml_collections import ConfigDict

from data.classify import build_classify_dataset
from data.rows import TrainData
from data.sft import SftDataset, build_sft_dataset, build_text_dataset, render, resolve_template
from model.config import ModelConfig
from model.errors import UserError
from model.heads import build_classifier, lm_backbone
from model.lora import count_params
from model.convert.hf_llama import relayout
from model.pretrained import Pretrained, load_pretrained
from model.sampling import Sampling
from model.transformer import build_model
from train import checkpoint
from train.eval.generation import Generator
from train.loop import evaluate, run_training
from train.step import make_eval_step
from train.workdir import write_summary
from train.objectives import LossFn, causal_lm_loss, classification_loss, objective_for
from train.trainer import Trainer, inference_params, init_trainer

SUMMARY_FILE = 'sft_summary.json'

# Compute settings a fine-tuning run may change; the architecture always comes from the base.
COMPUTE_FIELDS = ('dtype', 'attention', 'cudnn_segments', 'remat', 'dropout', 'attn_dropout',
                  'embed_dropout', 'scan_layers')


def load_base(cfg: ConfigDict) -> Pretrained:
  """The model `config.pretrained` names, with config.model's compute settings applied."""
  if not cfg.pretrained:
    raise UserError(f'stage={cfg.stage} fine-tunes a model: set --config.pretrained to a workdir, '
                    'a .gguf file, a Hugging Face folder or package:NAME')
  base = load_pretrained(cfg.pretrained)
  if base.tokenizer is None:
    raise UserError(f'{cfg.pretrained} ships no tokenizer; stage={cfg.stage} needs one')
  base.params = relayout(base.params, base.config, cfg.model.scan_layers)
  base.config = dataclasses.replace(base.config, **{f: cfg.model[f] for f in COMPUTE_FIELDS})
  return base


def prompt_ids(tokenizer: Any, question: str, template: str) -> list[int]:
  """A one-turn user prompt followed by the template's generation prompt."""
  messages = [{'role': 'user', 'content': question}, {'role': 'assistant', 'content': ''}]
  rendered = render(tokenizer, messages, template)
  return rendered.ids[:rendered.reply_start].tolist()


def generation_report(trainer: Trainer, dataset: SftDataset, s: ConfigDict) -> dict[str, Any]:
  """Exact match on the first `sft.eval_generate` held-out prompts, and the probe's reply: greedy
  replies from the eval suite's generator (train/eval/generation.py), so the gsm8k eval task
  reports the same figure on the same checkpoint."""
  out: dict[str, Any] = {}
  generator = Generator(trainer.eval_model, inference_params(trainer), trainer.mesh,
                        max_new_tokens=s.max_new_tokens, sampling=Sampling(0.0))
  if s.eval_generate:
    prompts = dataset.eval_prompts[:s.eval_generate]
    replies = generator.replies(dataset.tokenizer, [p for p, _ in prompts])
    out['exact_match'] = dataset.exact_match(replies)
    out['example_reply'] = replies[0]
  if s.probe:
    template = resolve_template(dataset.tokenizer, s.template)
    out['probe_reply'] = generator.replies(dataset.tokenizer,
                                           [prompt_ids(dataset.tokenizer, s.probe, template)])[0]
  return out


def held_out(metrics: dict[str, float]) -> dict[str, float]:
  """The eval figures the summary keeps: loss, and accuracy (next token, or class)."""
  return {'eval_loss': metrics['eval_loss'], 'eval_accuracy': metrics['eval_accuracy']}


def peak_rss_gib() -> float:
  """Peak resident memory of this process so far (Linux reports KiB)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


@dataclasses.dataclass(frozen=True)
class Task:
  """What the kind of `sft.train` decides: the rows, the loss, and the model the base goes into."""
  dataset: TrainData
  objective: Callable[[Callable[..., Any]], LossFn]
  summary: str  # a line about the data, printed before training
  loss_name: str  # what the held-out loss measures
  build: Callable[[ModelConfig, bool], nn.Module] = build_model
  head: str = ''  # a new head trained from its random init in place of the base's LM head


def sft_task(cfg: ConfigDict, base: Pretrained) -> Task:
  """Instruction records (every kind data/formats.py reads), `text:GLOB` or `classify:GLOB`."""
  kind = cfg.sft.train.partition(':')[0]
  launch = (cfg.seed, jax.process_index(), jax.process_count())
  lm = dict(loss_chunk=cfg.train.loss_chunk, z_loss=cfg.train.z_loss > 0)  # token-level losses
  if kind == 'text':
    data = build_text_dataset(cfg.sft, base.tokenizer, *launch)
    i = data.info
    return Task(data, objective_for(base.config.family, base.tokenizer.pad_id, **lm),
                f"sft data: {len(data.train_tokens.n_pairs)} train / {len(data.eval_tokens.n_pairs)} eval "
                f"text documents ({i['train_target_tokens']} trainable tokens, all of them)", 'text')
  if kind == 'classify':
    data = build_classify_dataset(cfg.sft, base.tokenizer, cfg.train.seq_len, *launch)
    i = data.info
    return Task(data, classification_loss,
                f"sft data: {i['train_examples']} train / {i['eval_examples']} eval examples of "
                f"{i['n_classes']} classes (truncated {i['train_truncated']}, dropped {i['train_dropped']} "
                f"by sft.overlong={cfg.sft.overlong!r}; majority class scores "
                f"{i['eval_majority_accuracy']:.4f} eval accuracy), pooling {cfg.sft.pool}",
                'classification', functools.partial(build_classifier, n_classes=i['n_classes'],
                                                    pool=cfg.sft.pool), 'class_head')
  data = build_sft_dataset(cfg.sft, base.tokenizer, cfg.train.seq_len, *launch, cfg.data.synthetic)
  i = data.info
  return Task(data, functools.partial(causal_lm_loss, **lm),
              f"sft data: {i['train_examples']} train / {i['eval_examples']} eval examples "
              f"({i['train_trainable_tokens']} trainable tokens; truncated {i['train_truncated']}, "
              f"dropped {i['train_dropped']} by sft.overlong={cfg.sft.overlong!r}), "
              f"template {i['template']}", 'completion')


def sft_stage(cfg: ConfigDict, workdir: str) -> None:
  t = cfg.train
  base = load_base(cfg)
  task = sft_task(cfg, base)
  dataset, info = task.dataset, task.dataset.info
  print(task.summary, flush=True)
  if 'labels' in info:  # class i is labels[i]
    write_summary(workdir, 'labels.json', info['labels'], indent=None)
  trainer = init_trainer(cfg, base.config.vocab_size, model_cfg=base.config, build=task.build,
                         init_params=lm_backbone(base.params) if task.head else base.params,
                         fresh=(task.head,) if task.head else ())
  del base  # the trainer holds the only copy of the base weights
  trained, total = count_params(trainer.state.params), count_params(trainer.variables())
  print(f'training {trained:,} of {total:,} parameters'
        + (f' (LoRA rank {cfg.lora.rank} on {cfg.lora.targets})' if cfg.lora.rank else ''), flush=True)

  per_host = t.batch_size // jax.process_count()
  train_iter = dataset.train_iter(per_host, t.seq_len)
  eval_batches = dataset.eval_batches(cfg.eval.batch_size or per_host, t.seq_len,
                                      cfg.eval.max_batches)
  summary_path = os.path.join(workdir, SUMMARY_FILE)
  summary: dict[str, Any] = {}
  if checkpoint.latest_step(workdir) is None:  # before any training
    eval_step = make_eval_step(trainer, task.objective)
    before = evaluate(trainer, eval_step, trainer.state.params, eval_batches, 0.0)
    summary['before'] = {**held_out(before), **generation_report(trainer, dataset, cfg.sft)}
    print(f"before: {summary['before']}", flush=True)
    write_summary(workdir, SUMMARY_FILE, summary)
  elif os.path.exists(summary_path):
    with open(summary_path, encoding='utf-8') as f:
      summary = json.load(f)

  metrics = run_training(trainer, task.objective, train_iter, eval_batches, workdir, info)
  if metrics.get('preempted'):
    return
  summary['after'] = {**held_out(metrics), **generation_report(trainer, dataset, cfg.sft)}
  summary['peak_rss_gib'] = peak_rss_gib()
  write_summary(workdir, SUMMARY_FILE, summary)
  print(f"after: {summary['after']}", flush=True)
  if 'before' in summary:
    before, after = summary['before'], summary['after']
    b, a = before['eval_loss'], after['eval_loss']
    print(f'held-out {task.loss_name} loss {b:.4f} -> {a:.4f} ({(a - b) / b:+.1%}), accuracy '
          f"{before['eval_accuracy']:.4f} -> {after['eval_accuracy']:.4f}", flush=True)
  print(f"peak RSS {summary['peak_rss_gib']:.2f} GiB", flush=True)
