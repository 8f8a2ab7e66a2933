"""What tests/data's tests import (a module of its own name: `from conftest import` found another directory's
conftest when pytest was given tests/experiments and tests/data together)."""

import gzip
import json
from pathlib import Path

# ../shared beside the clone (in CI: ../shared relative to the checkout).
SHARED = Path(__file__).resolve().parents[2].parent / 'shared'
C4_SAMPLE = SHARED / 'data' / 'c4' / 'c4-sample.00000-of-00001.json.gz'
T5_VOCAB = SHARED / 'data' / 'vocab' / 't5_cc_all_32000.spm.model'
LENGTHS = {'inputs': 512, 'targets': 114}


def write_jsonl(path, texts, gz=False, raw_lines=()):
  data = b''.join(json.dumps({'text': t, 'url': 'u'}).encode() + b'\n' for t in texts) + b''.join(raw_lines)
  path.write_bytes(gzip.compress(data) if gz else data)
  return str(path)
