"""The task registry: `config.task` -> the task and its central evaluation.

`config.task.name` picks what the model learns and how it is scored:

  classification  softmax cross-entropy on labels; loss and accuracy
  lm              next token: loss per non-pad token, accuracy without
                  pad/eos/oov; `<split>_perplexity = exp(<split>_loss)`
  ctc             speech: CTC loss per label character, exact-match
                  accuracy; `<split>_cer`, `<split>_wer` of greedy decodes
                  (text from `data.speech.decode_ids`)
  contrastive     SimCLR (two augmented views, NT-Xent); scored by a linear
                  probe on the labelled data
                  (`ssl.linear_probe.probe_evaluation`)

`build(config.task, model, eval_batch_size)` returns `(core.Task,
core.evaluation.TaskEvaluation)`; a new task is one more `TASKS` entry.
"""

from __future__ import annotations

from typing import Any, Callable

from fedjax_eff.core import evaluation as evaluation_lib
from fedjax_eff.core import speech_metrics
from fedjax_eff.core import task as task_lib
from fedjax_eff.data import speech
from fedjax_eff.ssl.linear_probe import probe_evaluation
from fedjax_eff.ssl.simclr import contrastive_task

Built = tuple[task_lib.Task, evaluation_lib.TaskEvaluation]


def _classification(config, model, batch_size: int) -> Built:
  del config
  task = task_lib.classification()
  return task, evaluation_lib.standard_evaluation(model, task, batch_size)


def _lm(config, model, batch_size: int) -> Built:
  task = task_lib.next_token(config.pad_id, config.eos_id, config.oov_id)
  return task, evaluation_lib.standard_evaluation(
      model, task, batch_size, derived=evaluation_lib.with_perplexity)


def _ctc(config, model, batch_size: int) -> Built:
  del config
  task = task_lib.ctc()
  return task, evaluation_lib.standard_evaluation(
      model, task, batch_size,
      per_split=speech_metrics.build_error_rate_evaluator(
          model, speech.decode_ids, batch_size))


def _contrastive(config, model, batch_size: int) -> Built:
  t = contrastive_task(config.temperature, **dict(config.augment))
  task = task_lib.Task(inputs=t.inputs, loss=t.loss, correct=t.correct,
                       augment=t.augment)
  return task, probe_evaluation(
      model, task, batch_size, steps=config.probe_steps,
      max_examples=config.probe_max_examples)


TASKS: dict[str, Callable[..., Built]] = {
    'classification': _classification,
    'contrastive': _contrastive,
    'lm': _lm,
    'ctc': _ctc,
}


def build(config: Any, model, batch_size: int = 256) -> Built:
  """The task `config.name` names (with its knobs from `config`) and its
  evaluation of `model` in batches of `batch_size`."""
  if config.name not in TASKS:
    raise ValueError(f'config.task.name={config.name!r} is not one of '
                     f'{tuple(TASKS)}.')
  return TASKS[config.name](config, model, batch_size)
