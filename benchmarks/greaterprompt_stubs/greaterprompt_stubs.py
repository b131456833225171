"""Registers the stand-ins in this folder under the names greaterprompt's
optimizer.py imports, before greaterprompt is imported:

    from .core.TextGrad.textgrad_ollm import textgrad as tg
    from .core.TextGrad.textgrad_ollm.textgrad.tasks import load_task
    from .core.TextGrad.textgrad_ollm.textgrad.engine.local_model_openai_api import ChatExternalClient
    from .core.pe2.cli import ape_apo_pe2_optimizer

These are submodules of the installed package, so putting a folder on sys.path
cannot shadow them; instead each stand-in file is loaded under its dotted name
into sys.modules, which the import system consults first. Nothing in the
installed package is edited. Usage (this folder on sys.path):

    import greaterprompt_stubs; greaterprompt_stubs.install()
    from greaterprompt.optimizer import GreaterOptimizer
"""
import importlib.util
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
TG = "greaterprompt.core.TextGrad.textgrad_ollm.textgrad"

# dotted name -> (file in this folder, is a package); parents before children
STUBS = [
    (TG, "_textgrad_stub/__init__.py", True),
    (TG + ".tasks", "_textgrad_stub/tasks.py", False),
    (TG + ".engine", "_textgrad_stub/engine/__init__.py", True),
    (TG + ".engine.local_model_openai_api", "_textgrad_stub/engine/local_model_openai_api.py", False),
    ("greaterprompt.core.pe2.cli", "pe2_cli.py", False),
]


def install() -> list[str]:
    installed = []
    for name, rel, is_pkg in STUBS:
        if name in sys.modules:
            continue
        path = os.path.join(HERE, rel)
        spec = importlib.util.spec_from_file_location(
            name, path, submodule_search_locations=[os.path.dirname(path)] if is_pkg else None)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        installed.append(name)
    return installed
