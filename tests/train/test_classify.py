"""Sequence classification through stage sft: an encoder workdir (a few masked-LM steps) with a new
class head learns a separable task, and labels.json maps class ids back to labels; under LoRA only
the adapters and the head train; pooling ignores padding; a decoder base is refused."""
import functools
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data.pipeline import build_dataset
from experiments.base import get_config
from model.config import model_config
from model.errors import UserError
from model import load_pretrained
from model.heads import build_classifier
from model.transformer import mean_pool
from tests.helpers import tiny_config
from train.loop import init_trainer, pretrain
from train.stages.sft import sft_stage
from train.workdir import write_config


@pytest.fixture(scope='module')
def encoder(tmp_path_factory) -> str:
  """A 1-layer char encoder after 5 masked-LM steps on the synthetic chain, as run.py leaves it."""
  workdir = str(tmp_path_factory.mktemp('encoder'))
  cfg = tiny_config(family='encoder', n_layers=1)
  cfg.mesh.data = -1
  cfg.train.steps, cfg.train.seq_len, cfg.eval.max_batches, cfg.checkpoint.every_steps = 5, 32, 1, 0
  cfg.data.synthetic.n_docs, cfg.data.synthetic.doc_len = 100, 31
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    json.dump(cfg.to_dict(), f)
  pretrain(cfg, workdir, build_dataset(cfg.data, cfg.seed, tokenizer_dir=os.path.join(workdir, 'tokenizer')))
  return workdir


def classify_config(base: str, data: str, steps: int):
  c = get_config()
  c.stage, c.pretrained, c.sft.train = 'sft', base, f'classify:{data}'
  c.train.steps, c.train.batch_size, c.train.seq_len, c.train.lr, c.train.warmup_steps = steps, 8, 32, 3e-3, 5
  c.eval.every_steps, c.checkpoint.every_steps = 0, 0
  return c


def separable(path, n: int = 200) -> str:
  """Texts over 'abcd' are 'low', over 'uvwx' 'high': one letter tells the class."""
  rng = np.random.default_rng(0)
  labels = rng.choice(['low', 'high'], n)
  texts = [''.join(rng.choice(list('abcd' if y == 'low' else 'uvwx'), rng.integers(3, 40))) for y in labels]
  path.write_text(''.join(json.dumps({'text': t, 'label': y}) + '\n' for t, y in zip(texts, labels)))
  return str(path)


def test_classifier_learns_a_separable_task(encoder, tmp_path):
  workdir = tmp_path / 'classify'
  os.makedirs(workdir)
  cfg = classify_config(encoder, separable(tmp_path / 'c.jsonl'), steps=40)
  write_config(str(workdir), cfg)  # as run.py does
  sft_stage(cfg, str(workdir))
  summary = json.loads((workdir / 'sft_summary.json').read_text())
  assert summary['after']['eval_accuracy'] >= 0.95 and summary['after']['eval_loss'] < summary['before']['eval_loss']
  assert json.loads((workdir / 'labels.json').read_text()) == ['high', 'low']
  # load_pretrained reopens the workdir as the classifier it trained (encoder + LoRA-free head)
  lm, rows = load_pretrained(str(workdir)), [json.loads(line) for line in open(tmp_path / 'c.jsonl')]
  rows = [r for r in rows if len(r['text']) < 28][:50]  # within the 32-token context
  predicted = [int(np.argmax(lm.logits(lm.prompt_ids(r['text'])))) for r in rows]
  assert np.mean([['high', 'low'][k] == r['label'] for k, r in zip(predicted, rows)]) >= 0.95


def test_lora_trains_adapters_and_the_class_head_only():
  cfg, build = tiny_config(family='encoder', n_layers=1), functools.partial(build_classifier, n_classes=3)
  plain = init_trainer(cfg, 16, jax.devices()[:1], build=build)
  encoder = {k: v for k, v in plain.state.params.items() if k != 'class_head'}
  cfg.lora.rank, cfg.lora.targets = 2, 'query,value'
  trainer = init_trainer(cfg, 16, jax.devices()[:1], model_cfg=plain.model_cfg, init_params=encoder,
                         build=build, fresh=('class_head',))
  assert trainer.state.params['class_head']['kernel'].shape == (32, 3)
  assert 'class_head' not in trainer.frozen
  adapters = {k: v for k, v in trainer.state.params.items() if k != 'class_head'}
  assert {str(p[-1].key) for p, _ in jax.tree_util.tree_leaves_with_path(adapters)} == {'lora_a', 'lora_b'}


def test_classification_needs_an_encoder_base():
  with pytest.raises(UserError, match='fine-tunes an encoder'):
    build_classifier(model_config(tiny_config().model, 16, 16), n_classes=2)


@pytest.mark.parametrize('pool', ['mean', 'first'])
def test_pooled_logits_ignore_padding(pool):
  """The head reads the mean over real tokens or the first one: more padding changes nothing."""
  model = build_classifier(model_config(tiny_config(family='encoder').model, 16, 16), n_classes=3, pool=pool)
  tokens = jnp.asarray([[1, 5, 6, 7, 2] + [0] * 11], jnp.int32)
  segments = (tokens > 0).astype(jnp.int32)
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), tokens))['params']
  logits = model.apply({'params': params}, tokens, None, segments)
  hidden = model.apply({'params': params}, tokens, None, segments, method='features')
  pooled = mean_pool(hidden, segments) if pool == 'mean' else hidden[:, 0]
  head = params['class_head']
  np.testing.assert_allclose(logits, pooled @ head['kernel'] + head['bias'], rtol=1e-5, atol=1e-6)
  shorter = model.apply({'params': params}, tokens[:, :8], None, segments[:, :8])
  np.testing.assert_allclose(shorter, logits, rtol=1e-5, atol=1e-6)

