"""Held-out exact match of an encoder-decoder: greedy-decode each held-out input from [BOS] and
count the outputs equal to the target (with its EOS)."""
from typing import Sequence

import jax
from ml_collections import ConfigDict

from data.seq2seq import Example, Seq2SeqDataset, encoder_tokens
from model.generate import generate_rows
from model.sampling import Sampling
from train.mesh import mesh_rules
from train.metrics import MetricWriter
from train.trainer import Trainer


def exact_match(trainer: Trainer, examples: Sequence[Example], tokenizer, seq_len: int,
                batch_size: int) -> float:
  """Share of `examples` whose greedy decode is exactly the target; encoder inputs are cut as in
  training (input + EOS in seq_len tokens)."""
  bos, eos = tokenizer.bos_id, tokenizer.eos_id
  hits = 0
  with mesh_rules(trainer.mesh):
    for i in range(0, len(examples), batch_size):
      chunk = examples[i:i + batch_size]
      # Each chunk generates only as far as its longest target (+ EOS), so one call per chunk.
      rows = generate_rows(trainer.eval_model, trainer.state.params, [[bos]] * len(chunk),
                           encoder_inputs=[encoder_tokens(x, eos, seq_len) for x, _ in chunk],
                           max_new_tokens=max(len(y) for _, y in chunk) + 1,
                           rng=jax.random.PRNGKey(0), sampling=Sampling(temperature=0.0),
                           stop_ids=(eos,), pad_id=tokenizer.pad_id).tokens
      hits += sum(row.tolist() == [*y.tolist(), eos] for row, (_, y) in zip(rows, chunk))
  return hits / len(examples) if len(examples) else float('nan')


def report_exact_match(trainer: Trainer, dataset: Seq2SeqDataset, cfg: ConfigDict, workdir: str,
                       ) -> float:
  """Exact match over the first data.seq2seq.exact_match held-out examples, written to the run's
  metrics at the final step."""
  examples = dataset.eval_examples(cfg.train.seq_len)[:cfg.data.seq2seq.exact_match]
  score = exact_match(trainer, examples, dataset.tokenizer, cfg.train.seq_len,
                      cfg.eval.batch_size or cfg.train.batch_size)
  writer = MetricWriter(workdir, enabled=jax.process_index() == 0, config=cfg)
  writer.write(cfg.train.steps, {'exact_match': score, 'exact_match_examples': len(examples)})
  writer.close()
  return score
