"""Model families (Transformer, BiLSTM, CNN-LSTM), Hugging Face BERT import/export and model directories.

``models.save(path, family, config, params, ...)`` and ``models.load(path) -> (model, config, params)`` read and
write the self-describing model directories that every stage hands on (see :mod:`models.io`).
"""

from models.io import load, model_class, read_meta, save

__all__ = ["load", "model_class", "read_meta", "save"]
