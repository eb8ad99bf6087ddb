"""Distil a fine-tuned teacher (a ``DIR/model`` written by finetune.py) into a smaller student.

Launch::

    python -m experiments.main --config=experiments/configs/distill.py:sst2,transformer3 --workdir=/tmp/d3 \\
        --config.teacher_dir=/tmp/sst2/model --config.data_dir=../shared/data/sst2

The argument is ``TASK,STUDENT`` with STUDENT one of

* ``transformer3``: a 3-layer Transformer initialised from the teacher's layers 0, 2, 4 (every other layer;
  DistilBERT's initialisation), Hinton KD (T = 4, 0.9 soft / 0.1 hard);
* ``bilstm``: a 1-layer BiLSTM over words (Tang et al. 2019), logit-MSE distillation on the training set plus
  an augmented transfer set (masking, same-tag replacement, n-gram sampling), labelled by the teacher (on
  SST-2 30,000 rows, one per sampled training sentence: Tang et al. used 20 per sentence, which would take the
  teacher hours to label on a CPU; raise ``augment.n_per_example`` / ``augment.max_examples`` on an accelerator);
* ``cnn_lstm``: the CNN-LSTM tagger over words and characters (Izsak et al. 2019) for token tasks (``wikiann``,
  ``wnut17``, ``synthetic_ner``): token-level KD from the teacher's logits at each word's first sub-token, KL x
  T^2 per real word (the ``distilbert`` preset: T = 2, 0.5 soft + 0.5 gold tags); word and character
  vocabularies built from the training split;
* ``transformer3_pkd`` / ``transformer3_tinybert``: the 3-layer student distilled with intermediate layers from a
  live teacher (the teacher runs in the step; see experiments/techniques/distill.py): Patient KD (PKD-skip:
  normalised [CLS] states of teacher layers 2 and 4, plus KL x T^2 and gold labels) or TinyBERT (embedding and
  hidden-state MSE and attention-score MSE onto teacher layers 0, 2, 4, 6, plus soft cross-entropy);
* ``transformer3_nokd`` / ``bilstm_nokd`` / ``cnn_lstm_nokd``: the same students trained on the gold labels only
  (the baseline every distillation figure is compared with).

Token tasks take only the ``cnn_lstm`` students (and default to ``cnn_lstm``); sequence tasks take the others.
The teacher is a Transformer fine-tuned on the same task (``finetune.py:wikiann`` writes ``DIR/model``)::

    python -m experiments.main --config=experiments/configs/distill.py:wikiann,cnn_lstm --workdir=/tmp/ner_kd \\
        --config.teacher_dir=/tmp/wikiann/model --config.data_dir=../shared/data/wikiann_en

The teacher's logits over the transfer set are computed once and cached in the workdir (on 2 CPU cores, 29 minutes
for the BiLSTM's 97,349 SST-2 transfer rows, so about 20 for the 67,349 training sentences). Measured on SST-2 from
the MiniLM teacher (dev accuracy 0.8933; final / best-checkpoint dev accuracy, training time after the logits):
transformer3 0.8612 / 0.8624 in 12 minutes (700 steps), transformer3_nokd 0.8647 / 0.8647 (11 minutes); over seeds
0, 1, 2 (final step, 2026-12-03, before the selection split: ``--config.selection=dev`` reproduces them) the means are
transformer3_nokd 0.8677, transformer3 0.8616, transformer3_pkd 0.8639, transformer3_tinybert 0.8452 (at this
length neither logit nor intermediate-layer KD beats gold labels; README, "Intermediate-layer distillation");
bilstm 0.8647 / 0.8681 in 21 minutes (3 epochs of the transfer set), bilstm_nokd 0.8360 / 0.8429 (14 minutes). On
WikiANN (en), from the teacher's span F1 0.7765 (5 epochs, 3,125 steps, 8 minutes after 9 minutes of teacher
logits): cnn_lstm 0.6107 final / 0.6147 best, cnn_lstm_nokd 0.6151 / 0.6167. On the training sentences alone the
teacher's soft tags add nothing over the gold tags: the student has no pretrained word vectors and levels off near
0.61 either way. With unlabeled text for the teacher to tag (``--config.transfer_file``: the 10,001 AG News texts of
../shared/data/agnews, label column cut off, HTML entities unescaped; 4,685 steps, 27 minutes) cnn_lstm reaches
0.6406 / 0.6437, 2.5-2.7 points above the gold-tag baseline. On MRPC (attentive BiLSTM pair student,
``--config.student.pooling=attention``, 3 epochs of the 3,668 training pairs + 3,668 augmented ones, 438 steps,
about 6 minutes after the logits; final / best dev accuracy): from the single-task teacher (0.8186) 0.6789 / 0.7206,
from the MRPC + RTE multi-task teacher (multitask.py, 0.8064) 0.6814 / 0.7157, bilstm_nokd (training pairs only, 219
steps) 0.6838 / 0.6838 -- all near the majority class (0.684): 3,668 pairs are too few for a BiLSTM trained from
scratch, with or without a teacher. The 3-layer Transformer on MRPC (344 steps, 15-19 minutes; final / best
accuracy, final F1): transformer3 0.7721 / 0.7721, F1 0.8468; transformer3_nokd 0.7574 / 0.7672, F1 0.8342."""

from __future__ import annotations

import ml_collections

from experiments.configs import finetune
from experiments.data.tasks import is_token_task

STUDENTS = ("transformer3", "transformer3_nokd", "transformer3_pkd", "transformer3_tinybert", "bilstm", "bilstm_nokd",
            "cnn_lstm", "cnn_lstm_nokd")
DISTILL_EPOCHS = {"wikiann": 5.0, "wnut17": 10.0}  # CNN-LSTM training epochs on the NER tasks


def get_config(arg: str = "synthetic,transformer3") -> ml_collections.ConfigDict:
    """``arg`` = ``TASK,STUDENT``; see the module docstring."""
    task, options = finetune.task_and_options(arg, STUDENTS)
    token_task = is_token_task(task)
    student = options[0] if options else ("cnn_lstm" if token_task else "transformer3")
    if len(options) > 1:
        raise ValueError(f"distill.py:{arg} names {len(options)} students {options}; give one: TASK,STUDENT")
    if student not in STUDENTS:
        raise ValueError(f"unknown student {student!r} for distill.py; allowed: {list(STUDENTS)}")
    base = student.rsplit("_", 1)[0] if student.endswith(("_nokd", "_pkd", "_tinybert")) else student
    family = base.rstrip("0123456789")
    if token_task != (family == "cnn_lstm"):
        raise ValueError(f"student {student!r} does not fit task {task!r}: token tasks (wikiann, wnut17, "
                         "synthetic_ner, conll:...) take cnn_lstm / cnn_lstm_nokd, sequence tasks the transformer3 "
                         "and bilstm students")
    base_task = "synthetic" if task == "synthetic_ner" else task
    c = finetune.training_config(base_task)
    finetune.task_defaults(c, base_task)
    c.task = task
    c.job = "distill"  # experiments.main runs the distillation job (experiments/jobs/distill.py)
    # config.teacher_dir: model directory of the fine-tuned teacher (DIR/model); required
    # unlabeled text the teacher labels for the student (Mukherjee & Awadallah 2020; Izsak et al. 2019): one example
    # per line (pairs: two tab-separated texts; token tasks: a sentence, split into words); None: training split only
    c.transfer_file = finetune._optional_str(None)
    # Few labels (Hinton et al.'s 3% experiment; XtremeDistil's 500 labels): keep only a seeded sample of the
    # training rows' gold labels (the sample depends on config.seed alone, so arms with one seed pair up)
    c.labelled = ml_collections.ConfigDict()
    c.labelled.examples = 0  # training rows kept with their gold labels; 0: all
    c.labelled.rest = "drop"  # the other rows: "drop" | "transfer" (teacher-labelled, soft targets only)

    c.student = ml_collections.ConfigDict()
    c.student.family = family  # transformer | bilstm | cnn_lstm
    c.student.num_layers = 3  # layers of a Transformer student / stacked BiLSTM layers (BiLSTM, CNN-LSTM)
    c.student.init = "every_other"  # Transformer student: "every_other" | "first" teacher layers, or "random"
    # Transformer student: a pretrained student to start from instead (a general-distillation model directory,
    # experiments/configs/general_distill.py, or a BERT checkpoint): its own depth and width, a fresh task head;
    # student.num_layers and student.init are then unused. None: built from the teacher
    c.student.model_dir = finetune._optional_str(None)
    c.student.embed_dim = 300  # BiLSTM, CNN-LSTM: word embedding width
    c.student.hidden_size = 150  # BiLSTM, CNN-LSTM: hidden units per direction
    c.student.mlp_hidden = 200  # BiLSTM: ReLU layer before the logits
    c.student.pooling = "max"  # BiLSTM: "max" | "mean" | "attention" over time
    c.student.dropout_rate = 0.1  # student dropout
    c.student.max_vocab = 50000  # BiLSTM, CNN-LSTM: word vocabulary cap (specials included), from the training text
    c.student.char_embed_dim = 30  # CNN-LSTM: character embedding width
    c.student.char_filters = 30  # CNN-LSTM: character CNN output channels
    c.student.char_kernel_size = 3  # CNN-LSTM: characters per convolution window
    c.student.max_word_chars = 20  # CNN-LSTM: characters kept per word (longer words keep their first ones)

    c.distill.preset = "hinton"  # the student's loss (experiments/techniques/distill.py); "none": gold labels only

    c.augment = ml_collections.ConfigDict()
    c.augment.n_per_example = 0  # synthetic transfer examples per training example (Tang et al.: 20 for SST-2)
    c.augment.max_examples = 0  # cap on the augmented rows (0: no cap), to bound the teacher's labelling time
    c.augment.p_mask = 0.1  # masking probability
    c.augment.p_pos = 0.1  # same-tag word replacement probability
    c.augment.p_ng = 0.25  # n-gram sampling probability

    c.checkpoint.best_metric = "span_f1" if token_task else "accuracy"
    if family == "cnn_lstm":
        c.student.num_layers = 1
        c.student.embed_dim = 100
        c.student.hidden_size = 100
        c.student.dropout_rate = 0.5  # the usual NER tagger dropout (Ma & Hovy 2016; Lample et al. 2016)
        c.optimizer.learning_rate = 1e-3
        c.optimizer.weight_decay = 0.0
        c.optimizer.warmup_fraction = 0.0
        c.optimizer.schedule = "constant"
        c.optimizer.grad_clip_norm = 5.0
        c.eval_batch_size = 128
        c.num_epochs = DISTILL_EPOCHS.get(task, c.num_epochs)
        c.distill.preset = "distilbert"  # KL x T^2 per real word, T = 2, 0.5 soft + 0.5 gold tags
    elif family == "transformer":
        c.optimizer.learning_rate = 1e-4
        c.num_epochs = 1.0 if task != "synthetic" else c.num_epochs
        if task == "sst2":  # a third of an epoch: the 3-layer student's step takes ~1 s on 2 CPU cores
            c.num_train_steps = 700
            c.eval_every_steps = 350
            c.checkpoint.every_steps = 350
        elif task == "mrpc":  # 3 epochs, the same steps as theseus.py:mrpc for a side-by-side comparison
            c.num_train_steps = 344
            c.eval_every_steps = c.checkpoint.every_steps = 115
    else:
        c.student.num_layers = 1  # Tang et al.: one BiLSTM layer
        c.optimizer.learning_rate = 1e-3
        c.optimizer.weight_decay = 0.0
        c.optimizer.warmup_fraction = 0.0
        c.optimizer.schedule = "constant"
        c.batch_size = 50
        c.eval_batch_size = 100
        c.num_epochs = 3.0 if task != "synthetic" else c.num_epochs
        c.distill.preset = "tang"
        if task != "synthetic":  # the teacher labels each transfer row once: ~1 min per 4,000 rows on 2 cores
            c.augment.n_per_example = 1
            c.augment.max_examples = 30000
    if student.endswith("_pkd"):
        c.distill.preset = "pkd"  # live teacher: patience loss on [CLS] of teacher layers 2, 4 (PKD-skip)
    elif student.endswith("_tinybert"):
        c.distill.preset = "tinybert"  # live teacher: embeddings, hidden states and attention of layers 2, 4, 6
    if student.endswith("_nokd"):
        c.distill.preset = "none"
        c.augment.n_per_example = 0
    return c


CONSTRAINTS = {**finetune.TRAINING_CONSTRAINTS, "job": dict(choices=("distill",)),
               "student.family": dict(choices=("transformer", "bilstm", "cnn_lstm")),
               "student.num_layers": dict(min=1), "student.init": dict(choices=("every_other", "first", "random")),
               "student.embed_dim": dict(min=1), "student.hidden_size": dict(min=1), "student.mlp_hidden": dict(min=1),
               "student.pooling": dict(choices=("max", "mean", "attention")),
               "student.dropout_rate": dict(min=0.0, max=0.99), "student.max_vocab": dict(min=3),
               "student.char_embed_dim": dict(min=1), "student.char_filters": dict(min=1),
               "student.char_kernel_size": dict(min=1), "student.max_word_chars": dict(min=1),
               "augment.n_per_example": dict(min=0), "augment.max_examples": dict(min=0),
               "augment.p_mask": dict(min=0.0, max=1.0), "augment.p_pos": dict(min=0.0, max=1.0),
               "augment.p_ng": dict(min=0.0, max=1.0), "labelled.examples": dict(min=0),
               "labelled.rest": dict(choices=("drop", "transfer"))}
