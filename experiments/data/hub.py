"""Hugging Face hub datasets by name (needs a network or a warm HF cache; local files never come here).

Names: ``glue/<config>`` for the GLUE tasks listed in :data:`GLUE` (hub id ``nyu-mll/glue``), or
``hub:<dataset id>`` with options after ``:`` as ``key=value`` pairs separated by ``,``::

    hub:imdb:text=text,label=label,dev=test
    hub:conll2003:tokens=tokens,label=ner_tags

Options: ``text``, ``text_b`` (sequence tasks) or ``tokens`` (token tasks); ``label`` (default
``label``); ``config``; ``train`` and ``dev`` split names (default ``train``/``validation``). Label names
come from the dataset's ``ClassLabel`` features when it has them.
"""

from __future__ import annotations

from experiments.data.readers import RawSplit

GLUE = {  # config -> (text column, second text column or None, dev split)
    "sst2": ("sentence", None, "validation"),
    "cola": ("sentence", None, "validation"),
    "mrpc": ("sentence1", "sentence2", "validation"),
    "rte": ("sentence1", "sentence2", "validation"),
    "wnli": ("sentence1", "sentence2", "validation"),
    "stsb": ("sentence1", "sentence2", "validation"),
    "qnli": ("question", "sentence", "validation"),
    "qqp": ("question1", "question2", "validation"),
    "mnli": ("premise", "hypothesis", "validation_matched"),
}
_OPTIONS = ("text", "text_b", "tokens", "label", "config", "train", "dev")


def parse_hub_name(name: str) -> tuple[str, dict[str, str]]:
    """``glue/sst2`` or ``hub:<id>[:k=v,...]`` -> (dataset id, options with defaults filled in)."""
    if name.startswith("glue/"):
        config = name[len("glue/"):]
        if config not in GLUE or config == "stsb":
            raise ValueError(f"unknown GLUE task {config!r}; known: "
                             f"{', '.join(sorted(c for c in GLUE if c != 'stsb'))}")
        text, text_b, dev = GLUE[config]
        options = {"config": config, "text": text, "label": "label", "train": "train", "dev": dev}
        if text_b:
            options["text_b"] = text_b
        return "nyu-mll/glue", options
    body = name[len("hub:"):]
    dataset_id, _, opts = body.partition(":")
    if not dataset_id:
        raise ValueError(f"{name!r}: expected hub:<dataset id>[:key=value,...]")
    options = {"label": "label", "train": "train", "dev": "validation"}
    for item in filter(None, opts.split(",")):
        key, eq, value = item.partition("=")
        if not eq or key not in _OPTIONS:
            raise ValueError(f"{name!r}: bad option {item!r}; allowed keys: {', '.join(_OPTIONS)}")
        options[key] = value
    if ("text" in options) == ("tokens" in options):
        raise ValueError(f"{name!r}: give exactly one of text= (sequence task) or tokens= (token task)")
    return dataset_id, options


def _class_names(feature) -> list[str] | None:
    names = getattr(feature, "names", None)
    if names is None and hasattr(feature, "feature"):  # Sequence(ClassLabel) or List(ClassLabel)
        names = getattr(feature.feature, "names", None)
    return list(names) if names is not None else None


def to_raw(dataset, source: str, options: dict[str, str]) -> tuple[RawSplit, list[str] | None]:
    """Converts one ``datasets.Dataset`` split to a :class:`RawSplit`; also returns the ClassLabel names
    of the label column, if any (labels are then those names)."""
    columns = [options[k] for k in ("text", "text_b", "tokens", "label") if k in options]
    missing = [c for c in columns if c not in dataset.column_names]
    if missing:
        raise ValueError(f"{source}: missing column(s) {missing}; the dataset has {dataset.column_names}")
    names = _class_names(dataset.features[options["label"]])
    as_label = (lambda v: names[v] if names and isinstance(v, int) and 0 <= v < len(names) else str(v))
    labels = dataset[options["label"]]
    if "tokens" in options:
        tags = [[as_label(t) for t in row] for row in labels]
        lines = [[i + 1] * len(t) for i, t in enumerate(tags)]
        return RawSplit(source, tags, lines, tokens=[list(map(str, t)) for t in dataset[options["tokens"]]]), names
    texts_b = [str(t) for t in dataset[options["text_b"]]] if "text_b" in options else None
    return RawSplit(source, [as_label(v) for v in labels], list(range(1, len(labels) + 1)),
                    texts=[str(t) for t in dataset[options["text"]]], texts_b=texts_b), names


def load_hub(name: str) -> tuple[RawSplit, RawSplit, list[str] | None, dict[str, str]]:
    """Downloads (or reads from the HF cache) a hub dataset; returns train, dev, label names, options."""
    import datasets

    dataset_id, options = parse_hub_name(name)
    splits = {}
    for which in ("train", "dev"):
        try:
            splits[which] = datasets.load_dataset(dataset_id, options.get("config"), split=options[which])
        except Exception as e:  # offline, unknown id, unknown split: one clear message
            raise RuntimeError(
                f"could not load hub dataset {dataset_id!r} (config {options.get('config')!r}, split "
                f"{options[which]!r}) for task {name!r}: {type(e).__name__}: {e}. Hub datasets need network "
                f"access or a warm HF cache; local files work offline with the 'tsv:', 'csv:', 'jsonl:' and "
                f"'conll:' task names.") from e
    train, names = to_raw(splits["train"], f"{name} [{options['train']}]", options)
    dev, _ = to_raw(splits["dev"], f"{name} [{options['dev']}]", options)
    return train, dev, names, options
