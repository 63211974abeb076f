"""A seeded order-1 Markov language whose true loss is known exactly: the floor a model can reach.

A document of n symbols is trained as inputs [BOS, x1..xn] -> targets [x1..xn, EOS]. x1 comes from
the initial distribution, x_t from row x_{t-1} of the transition matrix, and EOS is certain (the
length is fixed), so the expected loss per target is (H(initial) + sum_t E[H(P[x_{t-1}])]) / (n+1).
"""
from __future__ import annotations

import dataclasses
import string

import numpy as np
from ml_collections import ConfigDict

from model.errors import UserError

ALPHABET = string.ascii_lowercase + string.ascii_uppercase + string.digits + string.punctuation
RATE_STEPS = 10_000  # steps of the Cesaro average that defines the entropy rate


@dataclasses.dataclass(frozen=True, eq=False)
class MarkovChain:
  """transitions[i, j] = P(next = j | current = i); symbol i is rendered as alphabet[i]."""

  transitions: np.ndarray  # [S, S] float64, rows sum to 1
  initial: np.ndarray      # [S] float64
  alphabet: str            # S printable characters

  def sample(self, rng: np.random.Generator, n_docs: int, doc_len: int) -> np.ndarray:
    """Documents as symbol indices, int32 [n_docs, doc_len] (inverse-CDF, all docs at once)."""
    cumulative = np.cumsum(self.transitions, axis=1)
    cumulative[:, -1] = 1.0  # rounding must never let u fall past the last symbol
    docs = np.empty((n_docs, doc_len), np.int32)
    docs[:, 0] = rng.choice(len(self.initial), size=n_docs, p=self.initial)
    for t in range(1, doc_len):
      u = rng.random(n_docs)
      docs[:, t] = (u[:, None] >= cumulative[docs[:, t - 1]]).sum(axis=1)
    return docs

  def render(self, docs: np.ndarray) -> list[str]:
    """Documents of symbol indices as strings."""
    chars = np.frombuffer(self.alphabet.encode('ascii'), np.uint8)[docs]
    return [row.tobytes().decode('ascii') for row in chars]

  def nll(self, docs: np.ndarray) -> float:
    """Mean NLL (nats) of the true model per target of [x1..xn, EOS]; EOS costs 0."""
    first = -np.log(self.initial[docs[:, 0]]).sum()
    rest = -np.log(self.transitions[docs[:, :-1], docs[:, 1:]]).sum()
    return float((first + rest) / (docs.shape[0] * (docs.shape[1] + 1)))

  def doc_entropy(self, doc_len: int) -> float:
    """Expected NLL (nats) of a whole document under the true model: H(x1..xn, EOS)."""
    row_entropy = _entropy(self.transitions)
    marginal, total = self.initial, _entropy(self.initial)
    for _ in range(doc_len - 1):
      total += marginal @ row_entropy
      marginal = marginal @ self.transitions
    return float(total)

  def expected_nll(self, doc_len: int) -> float:
    """The true loss per target token when each symbol is one token: doc_entropy / (n + 1)."""
    return self.doc_entropy(doc_len) / (doc_len + 1)

  def entropy_rate(self) -> float:
    """Nats per symbol in the long run: the Cesaro limit of E[H(P[x_t])] from the initial distribution
    (defined for any chain, periodic or reducible)."""
    row_entropy = _entropy(self.transitions)
    marginal, total = self.initial, 0.0
    for _ in range(RATE_STEPS):
      total += marginal @ row_entropy
      marginal = marginal @ self.transitions
    return float(total / RATE_STEPS)


def markov_chain(cfg: ConfigDict) -> MarkovChain:
  """The chain `data.synthetic` describes; fixed by `cfg.seed` alone (not by n_docs or doc_len)."""
  n, branching, concentration = cfg.n_symbols, cfg.branching, cfg.concentration
  if not 2 <= n <= len(ALPHABET):
    raise UserError(f"data.synthetic.n_symbols={n} is out of range; use 2..{len(ALPHABET)}")
  if not 1 <= branching <= n:
    raise UserError(f"data.synthetic.branching={branching} is out of range; use 1..n_symbols ({n})")
  if concentration <= 0:
    raise UserError(f"data.synthetic.concentration={concentration} must be positive; use e.g. 0.5")
  rng = np.random.default_rng([cfg.seed, 0])
  transitions = np.zeros((n, n))
  for state in range(n):
    successors = rng.choice(n, size=branching, replace=False)
    transitions[state, successors] = rng.dirichlet(np.full(branching, float(concentration)))
  return MarkovChain(transitions, np.full(n, 1.0 / n), ALPHABET[:n])


def sample_documents(cfg: ConfigDict) -> tuple[MarkovChain, np.ndarray]:
  """The chain and its `n_docs` documents [n_docs, doc_len], both fixed by `cfg.seed`."""
  if cfg.n_docs < 2 or cfg.doc_len < 1:
    raise UserError(f"data.synthetic needs n_docs >= 2 and doc_len >= 1 (got {cfg.n_docs}, {cfg.doc_len}); "
                    "raise them")
  chain = markov_chain(cfg)
  return chain, chain.sample(np.random.default_rng([cfg.seed, 1]), cfg.n_docs, cfg.doc_len)


def _entropy(p: np.ndarray) -> np.ndarray:
  """Entropy (nats) along the last axis; 0 log 0 = 0."""
  logp = np.log(np.where(p > 0, p, 1.0))
  return -(p * logp).sum(axis=-1)
