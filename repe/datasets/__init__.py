"""Datasets: contrast pairs, template-built pairs, the shipped data's loaders and user pairs files.

>>> from repe.datasets import load_caa, make_persona_pairs, load_pairs_file, list_concepts
>>> ds = load_caa("sycophancy")            # ContrastDataset of chat pairs, "(A" vs "(B"
>>> train, test = ds.split(0.8, seed=0)     # deterministic, disjoint
>>> ds.fingerprint()                        # stable content hash recorded in artifacts

The shipped data lives in ``repe/data`` (origins and licences in its README.md and SOURCE.txt files).
"""

from repe.datasets._paths import DATA_DIR, shipped_folders
from repe.datasets.behaviour import (
    CAA_BEHAVIOURS,
    EMOTION_TEMPLATE,
    EMOTIONS,
    MIXED_EMOTIONS,
    CAAItem,
    LabeledStatement,
    PersonaStatement,
    emotion_pairs,
    facts_honesty_pairs,
    load_ab_control,
    load_behaviour_prompts,
    load_caa,
    load_caa_items,
    load_emotions,
    load_facts,
    load_persona,
    load_truncated_outputs,
    persona_names,
    persona_pairs,
)
from repe.datasets.catalogue import available, list_concepts, load_concept
from repe.datasets.core import ContrastDataset, ContrastPair, DatasetNotFoundError, Side
from repe.datasets.io import iter_csv, iter_jsonl, load_pairs_file
from repe.datasets.neutral import load_neutral
from repe.datasets.preference import load_fictional_facts, load_value_instructions
from repe.datasets.questions import (
    Question,
    QuestionSet,
    list_question_sets,
    load_questions,
    question_set,
)
from repe.datasets.templates import (
    DEFAULT_PERSONA_TEMPLATE,
    make_persona_pairs,
    persona_side,
    token_prefixes,
)
from repe.datasets.values import (
    ETHICS_SUBSETS,
    REFUSAL_SPLITS,
    EthicsExample,
    HarmfulInstruction,
    MoralChoiceScenario,
    ValueItem,
    load_ethics,
    load_ethics_examples,
    load_moralchoice,
    load_moralchoice_items,
    load_moralchoice_templates,
    load_refusal,
    load_value_definitions,
    load_valuebench,
)

__all__ = [
    "load_neutral",
    "load_fictional_facts",
    "load_value_instructions",
    "load_ab_control",
    "load_behaviour_prompts",
    "CAA_BEHAVIOURS",
    "DATA_DIR",
    "DEFAULT_PERSONA_TEMPLATE",
    "EMOTIONS",
    "EMOTION_TEMPLATE",
    "ETHICS_SUBSETS",
    "MIXED_EMOTIONS",
    "REFUSAL_SPLITS",
    "CAAItem",
    "ContrastDataset",
    "ContrastPair",
    "DatasetNotFoundError",
    "EthicsExample",
    "HarmfulInstruction",
    "LabeledStatement",
    "MoralChoiceScenario",
    "PersonaStatement",
    "Question",
    "QuestionSet",
    "Side",
    "ValueItem",
    "available",
    "emotion_pairs",
    "facts_honesty_pairs",
    "iter_csv",
    "iter_jsonl",
    "list_concepts",
    "list_question_sets",
    "load_caa",
    "load_caa_items",
    "load_concept",
    "load_emotions",
    "load_ethics",
    "load_ethics_examples",
    "load_facts",
    "load_moralchoice",
    "load_moralchoice_items",
    "load_moralchoice_templates",
    "load_pairs_file",
    "load_persona",
    "load_questions",
    "load_refusal",
    "load_truncated_outputs",
    "load_value_definitions",
    "load_valuebench",
    "make_persona_pairs",
    "persona_names",
    "persona_pairs",
    "persona_side",
    "question_set",
    "shipped_folders",
    "token_prefixes",
]
