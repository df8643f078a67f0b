"""The built-in offline suites: which BIG-bench tasks each holds, where they come from, their licences.

The files under ``comoe/data/suite/`` are built from these specifications by ``comoe.tools.suite_builder``
(``scripts/build_suite.py``); loading them needs only this module's names.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

TEST_SIZE = 300
TRAIN_CAP = 1500


def normalize_space(text: str) -> str:
    return " ".join(text.split())


def _default_group(question: str) -> str:
    return normalize_space(question).lower()


def _winowhy_group(question: str) -> str:
    # "<Winograd sentence> The 'it' refers to X because <reason>." -> the Winograd sentence.
    return _default_group(question.split(" The '", 1)[0])


@dataclass(frozen=True)
class SuiteTask:
    """One task of the built-in suite and where it comes from."""

    name: str
    path: str  # under bigbench/benchmark_tasks/
    what: str  # one line: the skill it tests and its format
    source: str  # the corpus BIG-bench took it from
    license: str
    instruction: str = ""  # a line put before the input (BIG-bench's task_prefix, reworded where needed)
    suffix: str = ""  # a line put after the input
    group: Callable[[str], str] = field(default=_default_group, compare=False)
    test_size: int = TEST_SIZE  # test takes whole groups up to this many examples (a quarter of a small task)
    train_cap: int = TRAIN_CAP  # train keeps at most this many examples
    labels: tuple[
        str, ...
    ] = ()  # if set: keep only examples answered by one of these, offered as the options
    generative: bool = False  # answered by generating BIG-bench's ``target`` text, not by choosing an option


# The "hard" suite: the first built-in suite, reasoning tasks that SmolLM2-135M does not learn in minutes
# (its adapters mostly learn the answer prior). Kept with its files and names unchanged.
HARD_TASKS: tuple[SuiteTask, ...] = (
    SuiteTask(
        name="social_iqa",
        path="social_iqa",
        what="social commonsense: motivations, reactions and next events of people; 3 options",
        source=(
            "Social IQa (Sap et al., EMNLP 2019, https://allenai.org/data/socialiqa); BIG-bench holds its "
            "1,954-question dev set. It is the paper benchmark `siqa`'s validation split: do not mix the two."
        ),
        license="CC-BY-4.0 (Social IQa, AllenAI)",
    ),
    SuiteTask(
        name="strategyqa",
        path="strategyqa",
        what="yes/no questions whose reasoning steps are implicit (world knowledge, multi-hop)",
        source="StrategyQA (Geva et al., TACL 2021, https://allenai.org/data/strategyqa)",
        license="MIT (StrategyQA repository)",
    ),
    SuiteTask(
        name="winowhy",
        path="winowhy",
        what="is a given reason for a Winograd-schema pronoun resolution correct? 2 options",
        source=(
            "WinoWhy (Zhang, Zhao & Song, ACL 2020, https://github.com/HKUST-KnowComp/WinoWhy); its "
            "sentences are the Winograd Schema Challenge's WSC273 (Levesque et al., 2012)"
        ),
        license=(
            "distributed inside BIG-bench under Apache-2.0; WinoWhy's own licence is not stated in the "
            "sdist and was not verified here. WSC273 sentences: CC-BY-4.0"
        ),
        suffix="Is the reasoning above correct or incorrect?",
        group=_winowhy_group,
    ),
    SuiteTask(
        name="epistemic_reasoning",
        path="epistemic_reasoning",
        what="theory of mind as NLI: does a premise about who knows/thinks what entail the hypothesis?",
        source=(
            "written for BIG-bench (templated premise/hypothesis pairs; the embedded event descriptions "
            "read like image captions, possibly from an NLI corpus; the task README, not in the sdist, "
            "names its sources)"
        ),
        license="Apache-2.0 (BIG-bench); check the task README for the licence of the embedded sentences",
        instruction=(
            "Identify the relation between the following premise and hypothesis, choosing from the "
            "options 'entailment' or 'non-entailment'."
        ),
    ),
    SuiteTask(
        name="logical_fallacy_detection",
        path="logical_fallacy_detection",
        what="is an argument valid, or does it contain a formal/informal fallacy? 2 options",
        source="written for BIG-bench (informal fallacies and syllogisms with nonsense words)",
        license="Apache-2.0 (BIG-bench)",
    ),
    SuiteTask(
        name="elementary_math_qa",
        path="elementary_math_qa/question_only",
        what="elementary math word problems (GRE/GMAT style); 5 options",
        source="MathQA (Amini et al., NAACL 2019, https://math-qa.github.io), built on AQuA-RAT",
        license="Apache-2.0 (MathQA; AQuA-RAT is Apache-2.0 too)",
        instruction="What is the answer to the following math word problem?",
    ),
)

LEARNABLE_TEST_SIZE = 400
LEARNABLE_TRAIN_CAP = 1000

# Every task considered for the "learnable" suite: short inputs, different input styles and label spaces. ``LEARNABLE_NAMES`` picks the suite from them by validation measurements
# (scripts/select_suite.py, results/suite-selection/README.md); the others are not shipped.
LEARNABLE_CANDIDATES: tuple[SuiteTask, ...] = tuple(
    SuiteTask(test_size=LEARNABLE_TEST_SIZE, train_cap=LEARNABLE_TRAIN_CAP, **fields)  # type: ignore[arg-type]
    for fields in (
        dict(
            name="intent_recognition",
            path="intent_recognition",
            what="intent of a voice-assistant utterance (playlist, restaurant, weather, music, ...); 7 labels",
            source=(
                "SNIPS NLU benchmark (Coucke et al., 2018, https://github.com/snipsco/nlu-benchmark), "
                "converted for BIG-bench"
            ),
            license=(
                "distributed inside BIG-bench under Apache-2.0; the SNIPS benchmark's own licence was not "
                "verified here"
            ),
            instruction="Predict the intent of the utterance.",
        ),
        dict(
            name="multiemo_sentiment",
            path="multiemo/all_sentence_en",
            what="sentiment of one sentence of a consumer review (medicine, hotels, products, school); 4 labels",
            source=(
                "MultiEmo (Kocoń, Miłkowski & Kanclerz, ICCS 2021, https://clarin-pl.eu/dspace/handle/11321/798): "
                "PolEmo 2.0 reviews machine-translated to English; BIG-bench's multiemo/all_sentence_en"
            ),
            license="CC-BY-4.0 (MultiEmo, CLARIN-PL)",
            instruction="Is the sentiment of this opinion positive, negative, neutral or ambivalent?",
        ),
        dict(
            name="multiemo_polarity",
            path="multiemo/all_sentence_en",
            what="is one sentence of a consumer review positive or negative? 2 labels (MultiEmo's neutral and "
            "ambivalent sentences left out)",
            source=(
                "MultiEmo (Kocoń, Miłkowski & Kanclerz, ICCS 2021, https://clarin-pl.eu/dspace/handle/11321/798): "
                "PolEmo 2.0 reviews machine-translated to English; BIG-bench's multiemo/all_sentence_en"
            ),
            license="CC-BY-4.0 (MultiEmo, CLARIN-PL)",
            instruction="Is the sentiment of this opinion positive or negative?",
            labels=("positive", "negative"),
        ),
        dict(
            name="vitaminc_fact_verification",
            path="vitaminc_fact_verification",
            what="does a Wikipedia sentence support, refute or not decide a claim? 3 labels (True/False/Neither)",
            source=(
                "VitaminC (Schuster, Fisch & Barzilay, NAACL 2021, https://github.com/TalSchuster/VitaminC), "
                "built from Wikipedia revisions"
            ),
            license="CC-BY-SA-3.0 (VitaminC; Wikipedia text)",
            instruction=(
                "Based only on the quote from Wikipedia, is the claim True, False, or Neither (the quote does "
                "not say)?"
            ),
        ),
        dict(
            name="two_digit_addition",
            path="arithmetic/2_digit_addition",
            what="'What is 80 plus 29?' with 7 options (the sum, near misses, 'banana', 'house')",
            source="written for BIG-bench (arithmetic/2_digit_addition, generated)",
            license="Apache-2.0 (BIG-bench)",
        ),
        dict(
            name="two_digit_multiplication",
            path="arithmetic/2_digit_multiplication",
            what="'What is 53 times 23?' with 7 options (the product, near misses, 'banana', 'house')",
            source="written for BIG-bench (arithmetic/2_digit_multiplication, generated)",
            license="Apache-2.0 (BIG-bench)",
        ),
        dict(
            name="unit_identification",
            path="unit_conversion/unit_identification",
            what="which of 3 quantities (same number) is in the unit the question asks for? e.g. decaamps",
            source="written for BIG-bench (unit_conversion/unit_identification, generated)",
            license="Apache-2.0 (BIG-bench)",
        ),
        dict(
            name="color_hex",
            path="color/hex",
            what="the basic colour name closest to a HEX code (#8002c6 -> purple); 10 labels",
            source="written for BIG-bench (color/hex, generated from colour-naming data)",
            license="Apache-2.0 (BIG-bench)",
        ),
        dict(
            name="hyperbaton",
            path="hyperbaton",
            what="which of two phrases has the correct English adjective order? 2 labels (a/b)",
            source="written for BIG-bench (hyperbaton, generated)",
            license="Apache-2.0 (BIG-bench)",
        ),
        dict(
            name="sports_understanding",
            path="sports_understanding",
            what="is a sentence about a named athlete and a sport's action plausible? 2 labels",
            source="written for BIG-bench (sports_understanding, generated from athlete and action lists)",
            license="Apache-2.0 (BIG-bench)",
            instruction="Is the following sentence plausible or implausible?",
        ),
        dict(
            name="bbq_ambiguous",
            path="bbq_lite_json/gender_identity_ambig",
            what="BBQ, ambiguous contexts: which person does a stereotyped question ask about? 3 options (two "
            "people, or 'cannot be determined')",
            source="BBQ (Parrish et al., Findings of ACL 2022, https://github.com/nyu-mll/BBQ), gender identity",
            license="CC-BY-4.0 (BBQ)",
        ),
        dict(
            name="three_digit_division",
            path="arithmetic/3_digit_division",
            what="'What is 852 divided by 4?' with up to 7 options (the quotient, near misses, 'banana', 'house')",
            source="written for BIG-bench (arithmetic/3_digit_division, generated)",
            license="Apache-2.0 (BIG-bench)",
        ),
        dict(
            name="metaphor_boolean",
            path="metaphor_boolean",
            what="is the second sentence a correct paraphrase of the metaphoric first? 2 labels",
            source="written for BIG-bench (metaphor_boolean)",
            license="Apache-2.0 (BIG-bench)",
            instruction="Is the second sentence a correct paraphrase of the metaphoric first sentence?",
        ),
        dict(
            name="implicatures",
            path="implicatures",
            what="does Speaker 2's indirect answer mean yes or no? 2 labels",
            source="conversational implicatures (George & Mamidi, 2020), converted for BIG-bench",
            license="distributed inside BIG-bench under Apache-2.0; the source corpus's licence was not verified",
            instruction="Does Speaker 2's answer mean yes or no?",
        ),
        dict(
            name="fever_fact_check",
            path="fact_checker/fever",
            what="is a one-sentence claim about a Wikipedia entity true or false? 2 labels",
            source="FEVER (Thorne et al., NAACL 2018, https://fever.ai), via BIG-bench fact_checker",
            license="CC-BY-SA-3.0 (FEVER; Wikipedia text)",
        ),
        dict(
            name="social_support",
            path="social_support",
            what="is an online reply supportive, neutral or unsupportive? 3 labels",
            source="written for BIG-bench (social_support; replies from online Q&A)",
            license="distributed inside BIG-bench under Apache-2.0; the replies' source licence was not verified",
            instruction="Is the following message supportive, neutral or unsupportive?",
        ),
        dict(
            name="presuppositions_as_nli",
            path="presuppositions_as_nli",
            what="NLI on presupposition triggers: entailment, neutral or contradiction; 3 labels",
            source="written for BIG-bench (presuppositions_as_nli; premises adapted from fiction and news)",
            license="Apache-2.0 (BIG-bench)",
            instruction="Does sentence 1 entail sentence 2, contradict it, or neither (neutral)?",
        ),
    )
)

LEARNABLE_NAMES: tuple[str, ...] = (
    "intent_recognition",
    "multiemo_polarity",
    "unit_identification",
    "two_digit_multiplication",
    "three_digit_division",
    "bbq_ambiguous",
)
LEARNABLE_TASKS: tuple[SuiteTask, ...] = tuple(
    next(t for t in LEARNABLE_CANDIDATES if t.name == name) for name in LEARNABLE_NAMES
)

MATH_TEST_SIZE = 300
MATH_TRAIN_CAP = 500


def _arithmetic(digits: int, operation: str) -> SuiteTask:
    return SuiteTask(
        name=f"arithmetic_{digits}_digit_{operation}",
        path=f"arithmetic/{digits}_digit_{operation}",
        what=f"{digits}-digit {operation} ('What is 80 plus 29?'), answered by generating the number",
        source=(
            "the arithmetic tasks of Brown et al. (GPT-3, NeurIPS 2020, section 3.9.1: 2D+, 2D-, 3D+, ...), "
            "as BIG-bench's `arithmetic` task holds them; the paper's math table's 'Arithmetic' row"
        ),
        license="Apache-2.0 (BIG-bench)",
        generative=True,
        test_size=MATH_TEST_SIZE,
        train_cap=MATH_TRAIN_CAP,
    )


# The "math" suite: the paper's multi-task math setting as far as offline sources go. Brown et al.'s
# arithmetic, generated and scored by the final number (the 2-digit multiplication and 3-digit division
# subtasks are left out: the learnable suite holds them as multiple choice), and MathQA's word problems
# (built on AQuA-RAT) as multiple choice. GSM8K, SVAMP, MultiArith, AddSub, SingleEQ and AQuA come from the
# hub (`comoe tasks`).
MATH_TASKS: tuple[SuiteTask, ...] = (
    *(_arithmetic(d, op) for d in (2, 3, 4) for op in ("addition", "subtraction")),
    next(t for t in HARD_TASKS if t.name == "elementary_math_qa"),
)

# Named suites (``--tasks suite:hard``); the default suite comes first. "learnable" is the default: the six
# tasks SmolLM2-135M learns in one mixture within the main job's budget (results/suite-selection/README.md).
DEFAULT_SUITE = "learnable"
SUITES: dict[str, tuple[SuiteTask, ...]] = {
    "learnable": LEARNABLE_TASKS,
    "hard": HARD_TASKS,
    "math": MATH_TASKS,
}
SUITE_TASKS: tuple[SuiteTask, ...] = tuple(
    {task.name: task for tasks in SUITES.values() for task in tasks}.values()
)  # every shipped task, once (a task may be in two suites)
DEFAULT_SUITE_TASKS: tuple[str, ...] = tuple(task.name for task in SUITES[DEFAULT_SUITE])  # the default tasks
BUILTIN_TASKS: tuple[str, ...] = tuple(
    task.name for task in SUITE_TASKS
)  # every task load_task knows offline
SUITE_NAMES: dict[str, tuple[str, ...]] = {
    suite: tuple(task.name for task in tasks) for suite, tasks in SUITES.items()
}
