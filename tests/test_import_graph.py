"""Dependencies point one way (DESIGN.md): training imports neither visualization, workers
nor flproject.observability (they subscribe to its signals), and training/fl, the engine,
imports no Django and nothing of training outside itself and training/queues.py.

Read from the source with `ast`, so that an import inside a function counts as much as one
at the top of a module.
"""

import ast
from collections.abc import Iterator
from pathlib import Path

from tests.conftest import PROJECT_ROOT

SUBSCRIBERS = ("visualization", "workers", "flproject.observability")
# What the engine may not import: the web stack and the Django project, and training's
# Django side (models, services, ...). training.fl and training.queues are allowed.
ENGINE_FORBIDDEN = ("django", "rest_framework", "channels", "celery", "flproject")
ENGINE_ALLOWED_FROM_TRAINING = ("training.fl", "training.queues")


def is_within(module: str, packages: tuple[str, ...]) -> bool:
    return any(module == package or module.startswith(f"{package}.") for package in packages)


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path, root: Path) -> Iterator[tuple[int, str]]:
    """(line, module) for each import in the file, relative ones made absolute. For `from
    package import name`, the module is `package.name`: the name may be a submodule."""
    package = module_name(path, root).split(".")
    if path.name != "__init__.py":
        package.pop()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package[: len(package) - node.level + 1]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            else:
                base = node.module or ""
            for alias in node.names:
                yield node.lineno, f"{base}.{alias.name}"


def offences(folder: Path, root: Path, forbidden) -> list[str]:
    """'file:line imports module' for each import under `folder` that `forbidden` refuses."""
    found = []
    for path in sorted(folder.rglob("*.py")):
        for line, module in imports(path, root):
            if forbidden(module):
                found.append(f"{path.relative_to(root)}:{line} imports {module}")
    return found


def engine_must_not_import(module: str) -> bool:
    if is_within(module, ENGINE_FORBIDDEN):
        return True
    return module.startswith("training.") and not is_within(module, ENGINE_ALLOWED_FROM_TRAINING)


def test_training_imports_none_of_its_subscribers():
    found = offences(
        PROJECT_ROOT / "training", PROJECT_ROOT, lambda module: is_within(module, SUBSCRIBERS)
    )

    assert found == [], "training must announce with signals, not call:\n" + "\n".join(found)


def test_the_engine_imports_no_django_and_nothing_else_of_training():
    found = offences(PROJECT_ROOT / "training" / "fl", PROJECT_ROOT, engine_must_not_import)

    assert found == [], "training/fl must stay plain Python:\n" + "\n".join(found)


def test_the_check_finds_relative_imports_and_imports_inside_functions(tmp_path):
    engine = tmp_path / "training" / "fl"
    engine.mkdir(parents=True)
    (engine / "__init__.py").write_text("")
    (engine / "sneaky.py").write_text(
        "from training.fl import local\n"
        "from training import queues\n"
        "\n"
        "def later():\n"
        "    from ..models import Round\n"
        "    import django.db\n"
    )

    found = offences(engine, tmp_path, engine_must_not_import)

    assert found == [
        "training/fl/sneaky.py:5 imports training.models.Round",
        "training/fl/sneaky.py:6 imports django.db",
    ]
