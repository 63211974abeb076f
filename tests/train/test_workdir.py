"""Reopening workdirs: a reward model and a LoRA reward model come back with their score head
through `load_pretrained`, giving the same scores as the reward stage's own loader."""
import numpy as np
import pytest

from model import load_pretrained
from train.stages.reward import load_reward_model
from tests.train.test_rlhf_stages import run_stage


@pytest.mark.slow
@pytest.mark.parametrize('lora', [0, 2])
def test_reward_workdir_reopens_with_its_head(tmp_path, lora):
  base, rm = tmp_path / 'base', tmp_path / 'reward'
  run_stage('pretrain', base, **{'train.steps': 2})
  run_stage('reward', rm, pretrained=str(base), **{'train.steps': 2, 'lora.rank': lora})
  tokens = np.asarray([[1, 5, 6, 7, 8, 9, 10, 11], [1, 12, 13, 14, 15, 16, 17, 18]], np.int32)
  rows = {'tokens': tokens, 'positions': np.tile(np.arange(8, dtype=np.int32), (2, 1)),
          'segment_ids': np.ones_like(tokens)}
  want = load_reward_model(str(rm)).raw_scores(rows)
  got = load_pretrained(str(rm)).logits(tokens)  # per-token scores [b, t]
  assert got.shape == tokens.shape
  np.testing.assert_allclose(got[:, -1], want, rtol=1e-5, atol=1e-6)
