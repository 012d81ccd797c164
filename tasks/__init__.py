"""The task API and the built-in suites.

The API (what a plugin imports): :class:`Task`, :class:`Suite`, :func:`register_task`,
:func:`register_suite`, the :data:`TASKS` / :data:`SUITES` registries. (A method's per-task values are
data beside the method: ``peftbench.methods.PerTask``.) The built-in suites are the public modules of this package
(``vtab.py``, ``fgvc.py``, ``demo.py``), each registering its tasks when imported; a third-party
package adds tasks the same way and declares a ``peftbench.tasks`` entry point (a module, a Task, a
Suite or a list of them).
"""
from ._base import (
                    SUITES,
                    TASKS,
                    Suite,
                    Task,
                    default_data_root,
                    get_suite,
                    get_task,
                    normalise_task_name,
                    parse_names,
                    register_suite,
                    register_task,
                    task_splits,
)

__all__ = ["Task", "Suite", "TASKS", "SUITES", "register_task", "register_suite", "get_task", "get_suite",
           "default_data_root", "normalise_task_name", "parse_names", "task_splits"]
