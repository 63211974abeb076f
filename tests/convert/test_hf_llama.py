"""Hugging Face llama round trips: a random HF model imports with its logits, a model trained here
exports to a folder transformers opens with our logits, and broken folders fail in one line."""
import json
import os

import jax
import numpy as np
import pytest

from data.tokenizer import ByteTokenizer
from model import load_pretrained
from model.errors import UserError
from tests.convert.files import hf_logits, random_hf_llama
from tests.helpers import tiny_config
from train import checkpoint
from train.loop import init_trainer

TOKENS = np.random.default_rng(0).integers(0, 96, (2, 20))


@pytest.mark.parametrize('tie', [True, False])
def test_random_hf_llama_imports_with_the_same_logits(tmp_path, tie):
  model = random_hf_llama(tie)
  model.save_pretrained(tmp_path)
  lm = load_pretrained(str(tmp_path))
  assert lm.config.tie_embeddings == tie and lm.config.n_kv_heads == 2
  assert np.abs(lm.logits(TOKENS) - hf_logits(model, TOKENS)).max() <= 1e-4


def test_imported_layers_stack_for_a_scanned_fine_tune(tmp_path):
  """load_base(model.scan_layers=True) stacks a per-layer import for nn.scan: same logits, and
  unstacking gives back the imported tree exactly."""
  import dataclasses
  from model.convert.hf_llama import relayout
  random_hf_llama(True).save_pretrained(tmp_path)
  lm = load_pretrained(str(tmp_path))
  stacked = relayout(lm.params, lm.config, True)
  scanned = dataclasses.replace(lm.config, scan_layers=True)
  assert stacked['blocks']['layers']['block']['attn']['query']['kernel'].shape[0] == 2
  logits = lambda cfg, params: lm.build(cfg).apply({'params': params}, TOKENS)
  # nn.scan compiles the layers as one loop body: f32 rounding differs by ~1e-5 (a layout error
  # would be O(1))
  np.testing.assert_allclose(logits(scanned, stacked), logits(lm.config, lm.params), rtol=1e-4, atol=1e-4)
  back = relayout(stacked, scanned, False)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(lm.params)):
    np.testing.assert_array_equal(a, b)


def make_workdir(path: str, **model) -> None:
  """What run.py leaves behind: config.json, tokenizer/ and an orbax checkpoint (weights
  perturbed away from their small init so the logits are far from uniform)."""
  cfg = tiny_config(**model)
  cfg.mesh.data = -1  # trained over all 8 test devices, restored onto one
  trainer = init_trainer(cfg, ByteTokenizer.vocab_size)
  leaves, tree = jax.tree.flatten(trainer.state.params)
  keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
  noisy = [x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
  state = trainer.state.replace(params=jax.tree.unflatten(tree, noisy))
  manager = checkpoint.make_manager(path, keep=1, async_save=False)
  checkpoint.save(manager, 7, state, {'step': 7, 'tokens': 0, 'flops': 0.0})
  manager.wait_until_finished()
  manager.close()
  ByteTokenizer().save(os.path.join(path, 'tokenizer'))
  with open(os.path.join(path, 'config.json'), 'w') as f:
    json.dump(cfg.to_dict(), f)


@pytest.mark.parametrize('scan,tie', [(False, True), (True, False)])
def test_exported_model_opens_in_transformers_with_the_same_logits(tmp_path, scan, tie):
  from transformers import LlamaForCausalLM
  make_workdir(str(tmp_path / 'run'), scan_layers=scan, tie_embeddings=tie, rope_theta=500.0)
  lm = load_pretrained(str(tmp_path / 'run'))
  assert lm.config.scan_layers == scan and lm.tokenizer.vocab_size == ByteTokenizer.vocab_size
  lm.export_hf(str(tmp_path / 'hf'))
  hf = LlamaForCausalLM.from_pretrained(str(tmp_path / 'hf')).float().eval()
  tokens = TOKENS[:, :lm.config.max_len]
  ours = lm.logits(tokens)
  assert np.abs(ours).max() > 1.0  # not a near-uniform model, where any mapping would pass
  assert np.abs(ours - hf_logits(hf, tokens)).max() <= 1e-4


def broken_folder(tmp_path, edit) -> str:
  """A saved random HF llama whose tensors `edit` changed (dict name -> array, in place)."""
  from safetensors.numpy import load_file, save_file
  random_hf_llama(True).save_pretrained(tmp_path)
  path = str(tmp_path / 'model.safetensors')
  tensors = load_file(path)
  edit(tensors)
  save_file(tensors, path)
  return str(tmp_path)


def test_missing_tensor_is_a_one_line_error(tmp_path):
  folder = broken_folder(tmp_path, lambda t: t.pop('model.layers.1.mlp.up_proj.weight'))
  with pytest.raises(UserError, match='model.layers.1.mlp.up_proj.weight is missing') as e:
    load_pretrained(folder)
  assert '\n' not in str(e.value)


def test_misshaped_tensor_is_a_one_line_error(tmp_path):
  def shrink(t):
    t['model.layers.0.self_attn.k_proj.weight'] = t['model.layers.0.self_attn.k_proj.weight'][:8]
  with pytest.raises(UserError, match=r'k_proj.weight has shape \[8, 64\], config.json implies '
                                      r'\[32, 64\]') as e:
    load_pretrained(broken_folder(tmp_path, shrink))
  assert '\n' not in str(e.value)


def test_other_architecture_is_a_one_line_error(tmp_path):
  folder = broken_folder(tmp_path, lambda t: None)
  path = os.path.join(folder, 'config.json')
  with open(path) as f:
    config = json.load(f)
  with open(path, 'w') as f:
    json.dump({**config, 'model_type': 'gpt2'}, f)
  with pytest.raises(UserError, match="model_type 'gpt2' is not supported"):
    load_pretrained(folder)


def test_prompt_longer_than_the_context_is_a_one_line_error(tmp_path):
  random_hf_llama(True).save_pretrained(tmp_path)
  lm = load_pretrained(str(tmp_path))
  with pytest.raises(UserError, match='prompt 0 is 64 tokens but the model context is 64'):
    lm.generate([[1] * 64], max_new_tokens=4)
  with pytest.raises(UserError, match='65 tokens exceed the model context of 64'):
    lm.logits([1] * 65)
