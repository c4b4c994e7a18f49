"""Decision tasks: the paper's four datasets, generic JSONL/CSV tasks, and a built-in generated task.

`load_task(name, split, data_dir=None, reasoning=False)` returns a `Task`; `list_tasks()` lists
the named tasks. `BUILTIN_NAME` ("builtin") is the generated task that needs no download.
"""

from .builtin import BUILTIN_LABELS, BUILTIN_NAME, load_builtin
from .registry import TaskInfo, default_split, list_tasks, load_task, parse_spec
from .schema import DecisionExample, PromptTemplate, Task

__all__ = [
    "BUILTIN_LABELS",
    "BUILTIN_NAME",
    "DecisionExample",
    "PromptTemplate",
    "Task",
    "TaskInfo",
    "default_split",
    "list_tasks",
    "load_builtin",
    "load_task",
    "parse_spec",
]
