"""Data for experiments: tasks by name, encoded into static-shape batches.

``load_task(name, data_dir, tokenizer=..., word_vocab=...)`` returns a :class:`TaskData` whose ``train``
and ``dev`` :class:`Split` objects yield dicts of numpy arrays (keys documented in
:mod:`experiments.data.features`; iteration, buckets and sharding in :mod:`experiments.data.batching`).
"""

from experiments.data.batching import IGNORE, Split, default_buckets
from experiments.data.subwords import HFTokenizer, SubwordTokenizer, as_subword_tokenizer
from experiments.data.tasks import TaskData, known_task_names, load_task
from experiments.data.vocab import CharVocab, WordVocab, split_words

__all__ = ["IGNORE", "CharVocab", "HFTokenizer", "Split", "SubwordTokenizer", "TaskData", "WordVocab",
           "as_subword_tokenizer", "default_buckets", "known_task_names", "load_task", "split_words"]
