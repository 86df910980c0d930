"""A web process starts without the engine's heavy libraries: PyTorch, MONAI, scikit-learn,
matplotlib and MLflow are imported by the requests and tasks that use them, not by the ASGI
application, the URL configuration, the views, the apps' ready() or `manage.py check`.

Each check runs in a fresh interpreter (this one has loaded everything) and reads its
sys.modules. Their speed is measured by benchmarks/startup.py, not here.
"""

import json
import subprocess
import sys

from tests.conftest import PROJECT_ROOT, service_env

HEAVY = ("torch", "monai", "sklearn", "matplotlib", "mlflow", "opacus")

# A web process of the distributed mode (a broker URL: no embedded worker in the process),
# with every URL's view imported, then `manage.py check` run in it.
WEB_PROCESS = f"""
import json, sys
import flproject.asgi
from django.core.management import call_command
from django.urls import get_resolver

def views(patterns):
    for pattern in patterns:
        if hasattr(pattern, "url_patterns"):
            yield from views(pattern.url_patterns)
        else:
            yield pattern.callback

assert len(list(views(get_resolver().url_patterns))) > 50
call_command("check", verbosity=0)
print(json.dumps(sorted(name for name in {HEAVY!r} if name in sys.modules)))
"""


def web_process_env(tmp_path) -> dict[str, str]:
    return service_env(
        DJANGO_SETTINGS_MODULE="flproject.settings.local",
        DATABASE_URL=f"sqlite:///{tmp_path / 'db.sqlite3'}",
        # Never connected to: only importing is checked.
        REDIS_URL="redis://127.0.0.1:1/0",
    )


def heavy_modules_loaded(code: str, env: dict[str, str]) -> list[str]:
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_web_process_imports_no_engine_library(tmp_path):
    # given a fresh web process, when its application, URLs and views load and the system
    # checks run, then none of the engine's heavy libraries is in sys.modules
    assert heavy_modules_loaded(WEB_PROCESS, web_process_env(tmp_path)) == []


def test_manage_py_check_imports_no_engine_library(tmp_path):
    # given `manage.py check` as a user runs it (run through runpy, so that its
    # interpreter's sys.modules can be read after), then it loads none of them
    code = (
        "import json, runpy, sys\n"
        "sys.argv = ['manage.py', 'check']\n"
        "try:\n"
        "    runpy.run_path('manage.py', run_name='__main__')\n"
        "except SystemExit as exit:\n"
        "    assert not exit.code, exit.code\n"
        f"print(json.dumps(sorted(name for name in {HEAVY!r} if name in sys.modules)))\n"
    )
    assert heavy_modules_loaded(code, web_process_env(tmp_path)) == []


def test_the_engine_is_still_imported_where_it_is_used(tmp_path):
    # given the same fresh web process, when it reads the strategy catalogue (as the
    # experiment form and /api/strategies/ do), then PyTorch is loaded on that use: the
    # check above would pass vacuously if the subprocess could not see the engine
    code = (
        "import json, sys\n"
        "import django; django.setup()\n"
        "from visualization.views import form_choices\n"
        "from training.fl.strategies import describe_strategies\n"
        "assert describe_strategies()\n"
        "print(json.dumps(sorted(name for name in ('torch',) if name in sys.modules)))\n"
    )
    assert heavy_modules_loaded(code, web_process_env(tmp_path)) == ["torch"]
