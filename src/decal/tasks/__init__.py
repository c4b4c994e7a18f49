"""Decision tasks: the paper's four datasets, generic JSONL/CSV tasks, and a built-in generated task.

`load_task(name, split, data_dir=None, reasoning=False)` returns a `Task`; `list_tasks()` lists
the named tasks. `BUILTIN_NAME` ("builtin") and `VERDICTS_NAME` ("verdicts", whose examples carry
their true answer probabilities) are generated tasks that need no download.
"""

from .builtin import BUILTIN_LABELS, BUILTIN_NAME, load_builtin
from .registry import TaskInfo, default_split, list_tasks, load_task, parse_spec
from .schema import DecisionExample, PromptTemplate, Task
from .verdicts import VERDICTS_LABELS, VERDICTS_NAME, load_verdicts

__all__ = [
    "BUILTIN_LABELS",
    "BUILTIN_NAME",
    "DecisionExample",
    "PromptTemplate",
    "Task",
    "TaskInfo",
    "VERDICTS_LABELS",
    "VERDICTS_NAME",
    "default_split",
    "list_tasks",
    "load_builtin",
    "load_task",
    "load_verdicts",
    "parse_spec",
]
