"""Forget tasks: the offline benchmark generated from a seed (:mod:`eval.tasks.offline`) and the loaders from
public unlearning benchmarks (TOFU, WMDP, MMLU, MUSE, LUME) into our :class:`~core.schema.ForgetTask` schema.

* :mod:`eval.tasks.spec`: one entry point, :func:`load_task_spec`, turns a short spec string (``tofu:forget05``,
  ``lume:task3``, ``path/to/task.json``...) into a task, from the sources registered in ``TASK_SOURCES``;
* :mod:`eval.tasks.tofu`, :mod:`eval.tasks.wmdp` (with MMLU), :mod:`eval.tasks.muse`, :mod:`eval.tasks.lume`:
  one loader per public benchmark;
* :mod:`eval.tasks.records`: the record readers and validators the loaders share, their errors and the data root;
  :mod:`eval.tasks.names`: the person-name extraction TOFU and LUME share.

The public names are re-exported here; the loaders import only the standard library, pydantic and :mod:`core`
(pyarrow when a parquet file is read), so importing :mod:`eval.tasks.offline` stays light.
Performance harnesses are elsewhere, in :mod:`eval.bench`.
"""

from eval.tasks.lume import LUME_TASKS, load_lume, story_names
from eval.tasks.muse import MUSE_CORPORA, load_muse
from eval.tasks.names import extract_person_name
from eval.tasks.records import (
    DATA_ENV,
    DataFilesNotFoundError,
    MissingDependencyError,
    TaskSpecError,
    default_data_root,
    read_records,
)
from eval.tasks.spec import SPEC_FORMS, TASK_SOURCES, load_task_spec, parse_task_spec
from eval.tasks.tofu import load_tofu
from eval.tasks.wmdp import WMDP_DOMAINS, WMDP_RELATED_MMLU, load_mmlu, load_wmdp, mmlu_subjects_in

__all__ = [
    "DATA_ENV", "LUME_TASKS", "MUSE_CORPORA", "SPEC_FORMS", "TASK_SOURCES", "WMDP_DOMAINS", "WMDP_RELATED_MMLU",
    "DataFilesNotFoundError", "MissingDependencyError", "TaskSpecError", "default_data_root", "extract_person_name",
    "load_lume", "load_mmlu", "load_muse", "load_task_spec", "load_tofu", "load_wmdp", "mmlu_subjects_in",
    "parse_task_spec", "read_records", "story_names",
]
