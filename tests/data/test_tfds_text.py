"""TFDS sources without network: a locally built `c4/en:3.0.1`, and `c4/en:3.1.0` through `tfds.testing.mock_data`."""

import numpy as np
import pytest
import seqio
import tensorflow as tf
import tensorflow_datasets as tfds

from repeat_lm.data import sources, stats, subset, tasks, tfds_text

N_TRAIN, N_VALIDATION = 300, 30


@pytest.fixture(scope='module')
def local_c4(tmp_path_factory, c4_docs):
  """The C4 sample's first documents written as a real TFDS dataset `c4/en:3.0.1` (files + metadata)."""
  data_dir = tmp_path_factory.mktemp('tfds')
  out = data_dir / 'c4' / 'en' / '3.0.1'
  out.mkdir(parents=True)
  features = tfds.features.FeaturesDict({'text': tfds.features.Text(), 'url': tfds.features.Text(),
                                         'timestamp': tfds.features.Text()})
  splits = {'train': c4_docs[:N_TRAIN], 'validation': c4_docs[N_TRAIN:N_TRAIN + N_VALIDATION]}
  for split, docs in splits.items():
    with tf.io.TFRecordWriter(str(out / f'c4-{split}.tfrecord-00000-of-00001')) as w:
      for doc in docs:
        w.write(features.serialize_example({'text': doc, 'url': 'u', 'timestamp': 't'}))
  tfds.folder_dataset.write_metadata(data_dir=str(out), features=features, split_infos=None, check_data=False,
                                     filename_template='{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}')
  return str(data_dir)


def read(source, split):
  return list(source.documents(split, sources.ReadStats()))


def test_reads_a_built_c4_in_order(local_c4, c4_docs):
  source = tfds_text.TfdsText('c4/en:3.0.1', data_dir=local_c4)
  assert read(source, 'train') == c4_docs[:N_TRAIN]
  assert read(source, 'validation') == c4_docs[N_TRAIN:N_TRAIN + N_VALIDATION]
  sliced = tfds_text.TfdsText('c4/en:3.0.1', train_split='train[:90%]', validation_split='train[90%:]',
                              data_dir=local_c4)  # one split held out by slicing, as for Wikipedia
  assert read(sliced, 'train') + read(sliced, 'validation') == c4_docs[:N_TRAIN]


def test_a_tfds_task_by_name_has_the_exact_subset(local_c4, c4_path, t5_vocab_file, monkeypatch):
  monkeypatch.setenv('REPEAT_LM_T5_VOCAB', t5_vocab_file)
  tasks.register_source('c4local', tfds_text.TfdsText('c4/en:3.0.1', data_dir=local_c4))
  name = tasks.ensure_registered('repeat_lm.c4local.t5.span.d14.e1')  # 2^14 tokens x 2^1 epochs
  assert tasks.spec(name).epochs == 2
  s = stats.task_stats(name)
  assert s['unique_source_tokens'] == 2**14 and s['epochs'] == 2 and s['doc_repeats_min'] == s['doc_repeats_max'] == 2
  # The same text as the JSONL copy of the same documents.
  jsonl = subset.build_store(sources.LocalText(c4_path), 'train', seqio.SentencePieceVocabulary(t5_vocab_file, 100),
                             2**14)
  np.testing.assert_array_equal(tasks.store(name, 'train').tokens, jsonl.tokens)
  train, validation = tasks.store(name, 'train'), tasks.store(name, 'validation')
  assert not {train.document(i).tobytes() for i in range(train.num_documents)} & \
      {validation.document(i).tobytes() for i in range(validation.num_documents)}


def test_mocked_c4_v310_with_bad_records(c4_docs, t5_vocab_file, monkeypatch):
  monkeypatch.setenv('REPEAT_LM_T5_VOCAB', t5_vocab_file)
  bad = [b'', b'   \n ', 'caf\xe9'.encode('latin-1'), b'x' * (sources.MAX_DOCUMENT_CHARS + 10)]
  texts = {'train': bad + [d.encode() for d in c4_docs[:100]], 'validation': [d.encode() for d in c4_docs[100:110]]}

  def as_dataset(self, split, **kwargs):
    del kwargs
    assert (self.name, str(self.version)) == ('c4', '3.1.0')
    return tf.data.Dataset.from_tensor_slices({'text': texts[str(split)], 'url': [b'u'] * len(texts[str(split)]),
                                               'timestamp': [b't'] * len(texts[str(split)])})

  with tfds.testing.mock_data(as_dataset_fn=as_dataset):
    name = tasks.ensure_registered('repeat_lm.c4v310.t5.span.d13.e1')
    store = tasks.store(name, 'train')
    validation = tasks.store(name, 'validation')
  assert store.num_tokens == 2**13 and validation.num_documents == 10
  assert store.info['read_skipped_empty'] == 2 and store.info['read_replaced_invalid_utf8'] == 1
  assert store.info['read_truncated_long'] == 1


def test_a_missing_tfds_dataset_is_a_clear_error(tmp_path):
  source = tfds_text.TfdsText('c4/en:3.0.1', data_dir=str(tmp_path))
  with pytest.raises(FileNotFoundError, match=str(tmp_path)):
    read(source, 'train')


@pytest.mark.parametrize('name', ['c4/en:3.0.1', 'c4/en:3.1.0'])  # 3.1.0's builder constructs; reading fails
def test_an_unprepared_tfds_dataset_error_names_the_fix(tmp_path, name):
  with pytest.raises(FileNotFoundError, match=r'data_dir` / \$TFDS_DATA_DIR'):
    read(tfds_text.TfdsText(name, data_dir=str(tmp_path)), 'train')


def test_a_version_the_installed_tfds_cannot_prepare_says_to_copy_it(tmp_path):
  # "Prepare it there first" sent users of the `c4` source (T5's c4/en:3.0.1) to a Beam job that the pinned TFDS's
  # C4 code cannot run for that version (it prepares 3.1.0 and 2.x); the files can only be copied in.
  with pytest.raises(FileNotFoundError, match=r'cannot prepare version 3\.0\.1 \(its code prepares 3\.1\.0, .*copy '
                     r'gs://tfds-data/datasets/c4/en/3\.0\.1.*`c4v310`'):
    read(tfds_text.TfdsText('c4/en:3.0.1', data_dir=str(tmp_path)), 'train')
  with pytest.raises(FileNotFoundError, match='Prepare it there first') as e:  # a version the code prepares
    read(tfds_text.TfdsText('c4/en:3.1.0', data_dir=str(tmp_path)), 'train')
  assert 'cannot prepare' not in str(e.value)


def test_two_readings_of_one_dataset_get_two_task_names():
  # Only the dataset name made the tag: Wikipedia with 1% or 10% held out, or another text feature, registered as
  # one task (repeat_lm.wikipedia_20230601pen.t5.span.d20.e2), the second silently replacing the first.
  readings = [tfds_text.TfdsText('wikipedia/20230601.en', train_split='train[:99%]', validation_split='train[99%:]'),
              tfds_text.TfdsText('wikipedia/20230601.en', train_split='train[:90%]', validation_split='train[90%:]'),
              tfds_text.TfdsText('wikipedia/20230601.en', text_key='title'),
              tfds_text.TfdsText('wikipedia/20230601.en', max_document_chars=1000)]
  names = [tasks.repeated_task(r, unique_tokens=2**20, epochs=4) for r in readings]
  assert len(set(names)) == len(readings)
  assert [tasks.spec(n).source for n in names] == readings
  assert tfds_text.TfdsText('c4/en:3.0.1', data_dir='/elsewhere').tag == 'c4_en_v3p0p1'  # a copy: the same text
