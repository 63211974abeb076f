"""stage=chat: talk to a pretrained model on stdin, through its own chat template.

  python run.py --config=experiments/chat_smollm2.py                                  # interactive
  python run.py --config=experiments/chat_smollm2.py --config.sample.prompt='Hi!'     # one answer
"""
from ml_collections import ConfigDict

from model.errors import UserError
from model.pretrained import Pretrained, load_pretrained
from model.sampling import Sampling


def reply(lm: Pretrained, messages: list[dict[str, str]], s: ConfigDict) -> str:
  """The assistant's next message, sampled as `config.sample` says."""
  return lm.chat(messages, max_new_tokens=s.max_new_tokens, seed=s.seed,
                 sampling=Sampling(s.temperature, s.top_k, s.top_p, s.min_p)).strip()


def chat_stage(cfg: ConfigDict, workdir: str) -> None:
  """Answer `sample.prompt` once, or hold a conversation until an empty line or end of input."""
  del workdir  # nothing is written
  if not cfg.pretrained:
    raise UserError('config.pretrained is empty; set it to a workdir, a .gguf file, a Hugging Face '
                    'folder or package:NAME')
  lm = load_pretrained(cfg.pretrained)
  if cfg.sample.prompt:
    print(reply(lm, [{'role': 'user', 'content': cfg.sample.prompt}], cfg.sample), flush=True)
    return
  print(f'chatting with {cfg.pretrained}; an empty line or Ctrl-D ends the conversation',
        flush=True)
  messages: list[dict[str, str]] = []
  while True:
    try:
      text = input('> ').strip()
    except EOFError:
      break
    if not text:
      break
    messages.append({'role': 'user', 'content': text})
    answer = reply(lm, messages, cfg.sample)
    messages.append({'role': 'assistant', 'content': answer})
    print(answer, flush=True)
