"""Data: text sources, exact repeated token subsets, span corruption and UL2, SeqIO tasks, the trainer's batches."""

import os

# Before TensorFlow's first import: keep its C++ INFO/WARNING chatter out of training logs.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

# pylint: disable=g-import-not-at-top,wrong-import-position
from repeat_lm.data.denoisers import Denoiser, Objective
from repeat_lm.data.pipeline import (DatasetConfig, get_batches, model_feature_lengths, num_batches,
                                     source_token_count, vocabulary_for)
from repeat_lm.data.sources import Corpus, LocalText, load_corpus
from repeat_lm.data.tasks import WIKI_TASK, repeated_mixture, repeated_task, span_corruption_task
from repeat_lm.data.tfds_text import TfdsText
from repeat_lm.data.vocab import default_vocabulary, t5_vocabulary

__all__ = [
    'Corpus', 'DatasetConfig', 'Denoiser', 'LocalText', 'Objective', 'TfdsText', 'WIKI_TASK', 'default_vocabulary',
    'get_batches', 'load_corpus', 'model_feature_lengths', 'num_batches', 'repeated_mixture', 'repeated_task',
    'source_token_count', 'span_corruption_task', 't5_vocabulary', 'vocabulary_for',
]
