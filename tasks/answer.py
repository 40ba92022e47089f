"""The answer flow's steps: the questions, checked and kept in the store by their content, and
the answers, keyed by the questions, the adapter's fingerprint and the decoding."""

from __future__ import annotations

import uuid

from prefect import task
from prefect.cache_policies import NO_CACHE

from finance_qlora.answering import (
    answer_questions,
    check_fit,
    read_questions,
    write_questions,
)
from finance_qlora.config import DeviceSettings, GenerationSettings, ModelConfig
from finance_qlora.modeling import load_tokenizer, model_context
from finance_qlora.parallel import process_count
from finance_qlora.records import AdapterRecord, AnswerRecord, QuestionRecord
from finance_qlora.store import sha256_file
from tasks.identity import StepIdentity, step_key
from tasks.load import data_options
from tasks.progress import Progress
from tasks.retries import (
    GPU_RETRIES,
    GPU_RETRY_DELAY_S,
    HUB_RETRIES,
    HUB_RETRY_DELAY_S,
    retry_unless_bad_input,
)
from tasks.secrets import hf_token
from tasks.store_access import StoreRef, clear_staging, local, publish, store_of


def checked_questions(
    store: StoreRef, source: str, model: ModelConfig, generation: GenerationSettings
) -> list[dict]:
    """The questions, each checked to fit the model's context with its answer; bad input
    raises before anything is written."""
    questions = read_questions(source, data_options(store, source))
    token = hf_token(model.hf_token_secret, model.name)
    context = model_context(model, token)
    check_fit(questions, load_tokenizer(model, token), context, generation.max_new_tokens, source)
    return questions


@task(
    name="questions",
    cache_policy=NO_CACHE,  # the file may change between runs: read it every time
    retries=HUB_RETRIES,
    retry_delay_seconds=HUB_RETRY_DELAY_S,
    retry_condition_fn=retry_unless_bad_input,
)
def load_questions(
    store: StoreRef, source: str, model: ModelConfig, generation: GenerationSettings
) -> QuestionRecord:
    questions = checked_questions(store, source, model, generation)
    staging = store_of(store).staging("questions", uuid.uuid4().hex)
    record = write_questions(questions, staging / "questions", source)
    key = sha256_file(record.questions_path)  # the same questions: the same folder
    published = publish(store, record, "questions", key)
    clear_staging(staging)
    return published


@task(
    name="answer",
    cache_policy=StepIdentity(kind="answers", entry=__name__),
    retries=GPU_RETRIES,
    retry_delay_seconds=GPU_RETRY_DELAY_S,
    retry_condition_fn=retry_unless_bad_input,
)
def answer(
    store: StoreRef,
    questions: QuestionRecord,
    adapter: AdapterRecord,
    model: ModelConfig,
    generation: GenerationSettings,
    devices: DeviceSettings | None = None,
) -> AnswerRecord:
    key = step_key()
    staging = store_of(store).staging("answers", key) / "answers"
    record = answer_questions(
        local(store, questions).questions_path,
        model,
        generation,
        staging,
        adapter,
        local(store, adapter).path,
        token=hf_token(model.hf_token_secret, model.name),
        on_progress=Progress("answers", "Questions answered"),
        processes=process_count(devices or DeviceSettings()),
    )
    return publish(store, record, "answers", key)
