"""UniVaR-style value embeddings (Cahyawijaya et al., "High-Dimension Human Value Representation in
Large Language Models"): embed a model's answers to value-eliciting questions so that answers from the
same *source* (model, persona, steering setting, sampling) land together, tell sources apart from single
answers, and map sources in 2-D.

The maths takes question-answer records and embeddings; it never generates (answers come from
``steering.evaluation.answers``, which runs the ordinary steered generation).

* :mod:`probes.valuemap.records` -- ``QARecord``, the unit everything works on;
* :mod:`probes.valuemap.encoder` -- the frozen sentence encoder (all-MiniLM-L6-v2, mean-pooled, L2-normalised);
* :mod:`probes.valuemap.head` -- the trainable projection head, multi-view sampling, symmetric InfoNCE,
  training with early stopping on held-out questions, and its artifact;
* :mod:`probes.valuemap.evaluate` -- source identification from single records (kNN, linear probe,
  TF-IDF baseline), acc@1/@3, weighted F1, bootstrap intervals over questions;
* :mod:`probes.valuemap.maps` -- per-source means projected to 2-D and the plotly value map.
"""

from probes.valuemap.evaluate import (
    IdentifyScores,
    bootstrap_difference,
    identify_knn,
    identify_linear,
    identify_tfidf,
    split_questions,
)
from probes.valuemap.head import HeadConfig, ValueHead, info_nce, train_head
from probes.valuemap.maps import project_sources, value_map_figure
from probes.valuemap.records import QARecord, read_records, write_records

__all__ = [
    "HeadConfig",
    "IdentifyScores",
    "QARecord",
    "ValueHead",
    "bootstrap_difference",
    "identify_knn",
    "identify_linear",
    "identify_tfidf",
    "info_nce",
    "project_sources",
    "read_records",
    "split_questions",
    "train_head",
    "value_map_figure",
    "write_records",
]
