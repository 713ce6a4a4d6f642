"""Sphinx directives that write documentation from remsh's own tables.

``.. remsh-operation-summary::`` is the protocol reference's summary of
operations, made from the operation table (remsh.ops); ``.. remsh-method::
NAME`` documents a method of the master's ``Slave`` with the signature the
code has (the directive's content is the method's description).  Neither
needs anything but Sphinx and the remsh package beside this directory.
"""

import importlib
import os
import sys

from docutils.parsers.rst import Directive, directives
from docutils.statemachine import StringList

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from remsh import opsdoc  # noqa: E402


def _parse(directive, lines):
    from docutils import nodes

    node = nodes.container()
    node.document = directive.state.document
    directive.state.nested_parse(StringList(lines, source="remsh-docgen"), directive.content_offset, node)
    return node.children


class OperationSummary(Directive):
    """The summary table of every operation of the protocol."""

    has_content = False

    def run(self):
        return _parse(self, opsdoc.summary_table())


class MasterMethod(Directive):
    """A method of the master's Slave, its signature read from the code."""

    required_arguments = 1
    has_content = True
    option_spec = {"class": directives.unchanged}

    def run(self):
        module_name, _, class_name = self.options.get("class", "remsh.master.slave.Slave").rpartition(".")
        cls = getattr(importlib.import_module(module_name), class_name)
        lines = [f".. method:: {opsdoc.method_signature(cls, self.arguments[0])}", ""]
        lines += ["   " + line if line else "" for line in self.content]
        return _parse(self, lines)


def setup(app):
    app.add_directive("remsh-operation-summary", OperationSummary)
    app.add_directive("remsh-method", MasterMethod)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
