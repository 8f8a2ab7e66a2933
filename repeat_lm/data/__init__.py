"""Data: corpora, vocabularies, span corruption, SeqIO tasks, and the batches the trainer consumes."""

import os

# Before TensorFlow's first import: keep its C++ INFO/WARNING chatter out of training logs.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

# pylint: disable=g-import-not-at-top,wrong-import-position
from repeat_lm.data.pipeline import DatasetConfig, get_batches, model_feature_lengths, vocabulary_for
from repeat_lm.data.sources import Corpus, load_corpus
from repeat_lm.data.tasks import WIKI_TASK, span_corruption_task
from repeat_lm.data.vocab import default_vocabulary, t5_vocabulary

__all__ = [
    'Corpus', 'DatasetConfig', 'WIKI_TASK', 'default_vocabulary', 'get_batches', 'load_corpus',
    'model_feature_lengths', 'span_corruption_task', 't5_vocabulary', 'vocabulary_for',
]
