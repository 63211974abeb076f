"""Files a crash can cut: JSON summaries are replaced whole; metrics.jsonl keeps whole rows, and a
resumed run drops the rows it is about to redo."""
import json
import os

import pytest

from train.metrics import MetricWriter, keep_rows_through
from train.workdir import write_json_atomic


def test_json_is_replaced_whole_or_not_at_all(tmp_path):
  path = tmp_path / 'summary.json'
  write_json_atomic(str(path), {'a': 1})
  with pytest.raises(TypeError):  # fails half-way through serialising
    write_json_atomic(str(path), {'a': 2, 'b': object()})
  assert json.loads(path.read_text()) == {'a': 1}
  assert os.listdir(tmp_path) == ['summary.json']  # no temporary left behind
  write_json_atomic(str(path), {'a': 3})
  assert json.loads(path.read_text()) == {'a': 3}


def test_resume_drops_redone_and_cut_rows(tmp_path):
  path = tmp_path / 'metrics.jsonl'
  path.write_text(''.join(json.dumps({'step': s, 'loss': s / 10}) + '\n' for s in range(1, 8))
                  + '{"step": 8, "lo')  # a crash mid-line
  keep_rows_through(str(path), 5)
  assert [json.loads(l)['step'] for l in path.read_text().splitlines()] == [1, 2, 3, 4, 5]
  writer = MetricWriter(str(tmp_path), resume_step=3)
  writer.write(4, {'loss': 0.25})
  writer.close()
  assert [json.loads(l) for l in path.read_text().splitlines()][-2:] == [
      {'step': 3, 'loss': 0.3}, {'step': 4, 'loss': 0.25}]
  before = path.stat().st_mtime_ns
  keep_rows_through(str(path), None)  # nothing to drop: the file is left alone
  assert path.stat().st_mtime_ns == before


def tensorboard_scalars(folder) -> dict[tuple[int, str], float]:
  """(step, tag) -> value of every scalar in the event files: TFRecord framing (length, its CRC,
  the Event proto, its CRC) parsed with tensorboardX's own protos."""
  import struct

  from tensorboardX.proto.event_pb2 import Event
  out = {}
  for name in sorted(os.listdir(folder)):
    data = (folder / name).read_bytes()
    at = 0
    while at < len(data):
      (length,) = struct.unpack('<Q', data[at:at + 8])
      event = Event.FromString(data[at + 12:at + 12 + length])
      at += 12 + length + 4
      for value in event.summary.value:
        out[(event.step, value.tag)] = value.simple_value
  return out


def test_tensorboard_mirrors_the_scalars_without_importing_torch(tmp_path):
  import subprocess
  import sys
  script = ('import sys; from train.metrics import MetricWriter; w = MetricWriter(sys.argv[1]); '
            'w.write(1, {"loss": 2.5, "note": "text"}); w.write(2, {"loss": 1.25}); w.close(); '
            'print("torch" in sys.modules)')
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  out = subprocess.run([sys.executable, '-c', script, str(tmp_path)], cwd=root, text=True,
                       capture_output=True, env={**os.environ, 'PYTHONPATH': root})
  assert out.stdout.strip() == 'False', out.stderr[-2000:]  # tensorboardX would import it: 5 s
  assert tensorboard_scalars(tmp_path / 'tensorboard') == {(1, 'loss'): 2.5, (2, 'loss'): 1.25}
