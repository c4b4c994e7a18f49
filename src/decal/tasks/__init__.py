"""Decision tasks: the paper's four datasets, generic JSONL/CSV tasks, and a built-in generated task."""

from .schema import DecisionExample, PromptTemplate, Task

__all__ = ["DecisionExample", "PromptTemplate", "Task"]
