"""A real browser (Debian's headless Chromium) against a real FedLens server in embedded mode:
log in, create and start an experiment, watch the charts fill in live until it completes."""

import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

from tests.conftest import PROJECT_ROOT, free_port, service_env, stop_process

SCREENSHOTS = PROJECT_ROOT / "test-output" / "screenshots"
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
ROUNDS = 4
PASSWORD = "a browser test password 42"

# Skipped only on a developer's machine without Chromium; with CI=true it must run.
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists())
        and os.environ.get("CI", "").lower() != "true",
        reason="needs Debian's chromium and chromium-driver (`make system-packages` installs them)",
    ),
]


def manage(env: dict[str, str], *args: str) -> None:
    subprocess.run([sys.executable, "manage.py", *args], cwd=PROJECT_ROOT, env=env, check=True,
                   capture_output=True, timeout=300)  # fmt: skip


class Server:
    """uvicorn serving FedLens on a fixed port, which can be stopped and started again."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env, self.port, self.process = env, free_port(), None
        self.url = f"http://127.0.0.1:{self.port}"
        # Its output goes to a file: a pipe nobody reads fills up, and the server's next log
        # line would then block every thread that logs (the embedded worker's included).
        self.log = Path(env["FEDLENS_DATA_DIR"]) / "server.log"

    def start(self) -> None:
        with self.log.open("a") as output:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "uvicorn", "flproject.asgi:application", "--port",
                 str(self.port)],
                cwd=PROJECT_ROOT, env=self.env, stdout=output, stderr=subprocess.STDOUT,
            )  # fmt: skip
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/health", timeout=2)  # noqa: S310 - local
                return
            except (OSError, urllib.error.URLError):
                assert self.process.poll() is None, self.log.read_text(errors="replace")
                assert time.monotonic() < deadline, "the server did not start"
                time.sleep(0.3)

    def stop(self) -> None:
        stop_process(self.process)


@pytest.fixture
def server(tmp_path):
    """FedLens on the embedded default, with a user, a registered dataset and three sites."""
    env = service_env(
        DJANGO_SETTINGS_MODULE="flproject.settings.local",
        DATABASE_URL=None,
        REDIS_URL=None,
        FEDLENS_DATA_DIR=str(tmp_path),
        DJANGO_SUPERUSER_PASSWORD=PASSWORD,
    )
    dataset_dir = tmp_path / "datasets" / "lesions"
    manage(env, "migrate", "--noinput")
    manage(env, "createsuperuser", "--noinput", "--username", "ana", "--email", "ana@x.org")
    manage(env, "make_synthetic_dataset", "--out", str(dataset_dir), "--sites", "3",
           "--per-site", "60", "--size", "32")  # fmt: skip
    manage(env, "register_dataset", "--name", "lesions", "--path", str(dataset_dir))
    manage(env, "shell", "--no-imports", "-c",
           "from training.runner import simulated_sites; simulated_sites(3)")  # fmt: skip
    fedlens = Server(env)
    fedlens.start()
    yield fedlens
    fedlens.stop()


@pytest.fixture
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run",
                 "--window-size=1400,2200"):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def click_first(driver, selector: str) -> bool:
    """Click the first match once there is one (lists are redrawn while they load)."""
    matches = driver.find_elements(By.CSS_SELECTOR, selector)
    if matches:
        matches[0].click()
    return bool(matches)


def points_in_global_chart(driver) -> int:
    return driver.execute_script(
        "const chart = Chart.getChart('global-chart');"
        "const accuracy = chart && chart.data.datasets[1];"
        "return accuracy ? accuracy.data.length : 0;"
    )


def points_in_distance_chart(driver) -> int:
    return driver.execute_script(
        "const chart = Chart.getChart('distance-chart');"
        "return chart ? chart.data.datasets.reduce((n, d) => n + d.data.length, 0) : 0;"
    )


def test_a_user_watches_an_experiment_run_live_to_completion(server, browser):
    browser.get(f"{server.url}/accounts/login/")
    browser.find_element(By.ID, "id_username").send_keys("ana")
    browser.find_element(By.ID, "id_password").send_keys(PASSWORD)
    browser.find_element(By.CSS_SELECTOR, "form.login button").click()
    WebDriverWait(browser, 20).until(lambda d: d.find_elements(By.LINK_TEXT, "New experiment"))

    browser.get(f"{server.url}/experiments/new/")
    browser.find_element(By.ID, "name").send_keys("watched in a browser")
    sites = Select(browser.find_element(By.ID, "sites"))
    for index in range(len(sites.options)):
        sites.select_by_index(index)
    for field, value in (("num_rounds", ROUNDS), ("clients_per_round", 3), ("min_clients", 3),
                         ("local_epochs", 10), ("batch_size", 16)):  # fmt: skip
        element = browser.find_element(By.ID, field)
        element.clear()
        element.send_keys(str(value))
    browser.find_element(By.CSS_SELECTOR, "#new-experiment button[type=submit]").click()
    WebDriverWait(browser, 20).until(lambda d: "/experiments/" in d.current_url
                                     and d.find_elements(By.ID, "global-chart"))  # fmt: skip

    seen = []  # the number of evaluated rounds on the chart, as the page showed it
    distances_while_running = 0  # points on the distance chart before the experiment ended
    deadline = time.monotonic() + 240
    while browser.find_element(By.TAG_NAME, "body").get_attribute("data-status") != "completed":
        assert time.monotonic() < deadline, f"not completed; chart points seen: {seen}"
        seen.append(points_in_global_chart(browser))
        distances_while_running = max(distances_while_running, points_in_distance_chart(browser))
        time.sleep(0.1)
    seen.append(points_in_global_chart(browser))
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(SCREENSHOTS / "experiment-page.png"))

    assert seen == sorted(seen), "the chart lost points while running"
    assert any(0 < count < ROUNDS for count in seen), f"no intermediate state seen: {seen}"
    assert seen[-1] == ROUNDS
    assert browser.find_element(By.ID, "status").text == "completed"
    # The training rounds, then the cross-site round that follows the last one
    round_rows = browser.find_elements(By.CSS_SELECTOR, "#rounds-table tbody tr")
    assert len(round_rows) == ROUNDS + 1
    assert round_rows[-1].text.startswith(f"{ROUNDS + 1} (cross-site)")
    assert distances_while_running > 0, "the distance chart stayed empty while running"
    first_round = browser.find_element(By.CSS_SELECTOR, "#rounds-table tbody tr").text
    assert "3/3 succeeded" in first_round
    assert not browser.find_element(By.ID, "stop").is_displayed()
    assert len(browser.find_elements(By.CSS_SELECTOR, "#checkpoints-table tbody tr")) == ROUNDS + 1
    assert browser.find_elements(By.CSS_SELECTOR, "#confusion table.confusion")
    timeline_bars = browser.execute_script(
        "return Chart.getChart('timeline-chart').data.datasets"
        ".reduce((n, d) => n + d.data.length, 0);"
    )
    assert timeline_bars == 3 * (ROUNDS + 1)  # each round's three tasks, the cross-site's too
    # The cross-site heatmap: the global model and each site's local model (rows) on each
    # site's validation data (columns), every cell a number, and the weighted mean per row
    heatmap = WebDriverWait(browser, 30).until(lambda d: d.find_elements(
        By.CSS_SELECTOR, "#cross-site table.cross-site[data-status=closed]"))[0]  # fmt: skip
    models = [row.get_attribute("data-model") for row in heatmap.find_elements(
        By.CSS_SELECTOR, "tbody tr")]  # fmt: skip
    assert models == ["global", "sim-1", "sim-2", "sim-3"]
    cells = heatmap.find_elements(By.CSS_SELECTOR, "tbody td[data-site]")
    assert len(cells) == 4 * (3 + 1)
    assert all(0.0 <= float(cell.text) <= 1.0 for cell in cells)
    assert cells[0].value_of_css_property("background-color") != "rgba(0, 0, 0, 0)"
    browser.execute_script("arguments[0].scrollIntoView();", heatmap)
    browser.find_element(By.ID, "cross-site-card").screenshot(
        str(SCREENSHOTS / "cross-site-heatmap.png")
    )
    accuracies = [cell.text for cell in cells]
    Select(browser.find_element(By.ID, "cross-site-metric")).select_by_value("loss")
    losses = [c.text for c in browser.find_elements(By.CSS_SELECTOR, "#cross-site td[data-site]")]
    assert losses != accuracies
    assert all(float(loss) > 0 for loss in losses)
    # The sites' evaluation of every round's global model, and its weighted mean
    weighted_points = browser.execute_script(
        "const chart = Chart.getChart('federated-chart');"
        "return chart.data.datasets[chart.data.datasets.length - 1].data.length;"
    )
    assert weighted_points == ROUNDS
    assert browser.find_element(By.ID, "connection").get_attribute("hidden") is not None
    assert not [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]

    # The page says when the stream is gone, and reconnects by itself when it is back.
    banner = browser.find_element(By.ID, "connection")
    server.stop()
    WebDriverWait(browser, 20).until(lambda _: banner.is_displayed())
    assert "reconnecting" in banner.text
    server.start()
    WebDriverWait(browser, 40).until(lambda _: not banner.is_displayed())
    assert browser.find_element(By.ID, "status").text == "completed"

    # The dataset's images, from the experiment page: one rendered, with the model's verdict.
    browser.find_element(By.LINK_TEXT, "Images").click()
    WebDriverWait(browser, 30, ignored_exceptions=[StaleElementReferenceException]).until(
        lambda d: click_first(d, "#image-list button")
    )
    WebDriverWait(browser, 30).until(lambda d: d.execute_script(
        "const image = document.getElementById('main-image');"
        "return !image.hidden && image.complete && image.naturalWidth > 0;"))  # fmt: skip
    checkpoints = Select(browser.find_element(By.ID, "checkpoint-select"))
    checkpoints.select_by_index(len(checkpoints.options) - 1)
    WebDriverWait(browser, 30).until(
        lambda d: d.find_element(By.ID, "prediction-result").text.strip()
    )
    WebDriverWait(browser, 60).until(
        lambda d: d.find_elements(By.CSS_SELECTOR, "#class-table tr td")
    )
    browser.save_screenshot(str(SCREENSHOTS / "image-viewer.png"))
    assert "class" in browser.find_element(By.ID, "prediction-result").text.lower()


def log_in(browser, server) -> None:
    browser.get(f"{server.url}/accounts/login/")
    browser.find_element(By.ID, "id_username").send_keys("ana")
    browser.find_element(By.ID, "id_password").send_keys(PASSWORD)
    browser.find_element(By.CSS_SELECTOR, "form.login button").click()
    WebDriverWait(browser, 20).until(lambda d: d.find_elements(By.LINK_TEXT, "New experiment"))


@pytest.mark.timeout(900)  # four experiments, two at a time, on a shared CPU
def test_a_sweep_is_created_in_the_browser_and_compared_when_it_ends(server, browser, tmp_path):
    screenshots = tmp_path / "screenshots"
    screenshots.mkdir()
    log_in(browser, server)

    # The experiment form: a field per parameter of the chosen strategy, checked as the
    # server checks it before anything is sent.
    browser.get(f"{server.url}/experiments/new/")
    described = browser.execute_script(
        "return JSON.parse(document.getElementById('strategy-descriptions').textContent);"
    )
    strategy = next(s for s in described if any(p["minimum"] is not None for p in s["parameters"]))
    Select(browser.find_element(By.ID, "strategy")).select_by_visible_text(strategy["name"])
    fields = browser.find_elements(By.CSS_SELECTOR, "#strategy-params input")
    assert [f.get_attribute("name") for f in fields] == [
        f"strategy_params.{p['name']}" for p in strategy["parameters"]
    ]
    bounded = next(p for p in strategy["parameters"] if p["minimum"] is not None)
    field = browser.find_element(By.ID, f"param-{bounded['name']}")
    assert float(field.get_attribute("value")) == bounded["default"]
    browser.find_element(By.ID, "name").send_keys("out of range")
    field.clear()
    field.send_keys(str(bounded["minimum"] - 1))
    browser.find_element(By.CSS_SELECTOR, "#new-experiment button[type=submit]").click()
    assert browser.current_url.endswith("/experiments/new/")  # the browser kept it
    assert browser.execute_script("return arguments[0].validationMessage;", field)
    browser.save_screenshot(str(screenshots / "experiment-form.png"))

    # A sweep from its form: 2 partitions x 2 seeds, run two at a time.
    browser.get(f"{server.url}/sweeps/new/")
    browser.find_element(By.ID, "name").send_keys("partitions in a browser")
    browser.find_element(By.CSS_SELECTOR, "#strategies input[value=fedavg]").click()
    sites = Select(browser.find_element(By.ID, "sites"))
    for index in range(len(sites.options)):
        sites.select_by_index(index)
    sweep_fields = (("partitions", "iid, dirichlet:0.5"), ("seeds", "0, 1"), ("num_rounds", 2),
                    ("clients_per_round", 3), ("min_clients", 3), ("batch_size", 16),
                    ("max_running", 2), ("target_value", 0.55))  # fmt: skip
    for name, value in sweep_fields:
        element = browser.find_element(By.ID, name)
        element.clear()
        element.send_keys(str(value))
    browser.find_element(By.CSS_SELECTOR, "#new-sweep button[type=submit]").click()
    WebDriverWait(browser, 20).until(lambda d: "/sweeps/" in d.current_url
                                     and d.find_elements(By.ID, "comparison-table"))  # fmt: skip

    deadline = time.monotonic() + 400
    while browser.find_element(By.TAG_NAME, "body").get_attribute("data-sweep") != "ended":
        assert time.monotonic() < deadline, browser.find_element(By.ID, "sweep-progress").text
        time.sleep(0.5)
    browser.save_screenshot(str(screenshots / "sweep-comparison.png"))

    assert browser.find_element(By.ID, "sweep-progress").text.startswith("4/4 ended")
    groups = browser.find_elements(By.CSS_SELECTOR, "#comparison-table tbody tr")
    assert [row.find_element(By.TAG_NAME, "td").text for row in groups] == [
        "partition=iid", "partition=dirichlet:0.5",
    ]  # fmt: skip
    for row in groups:
        cells = [cell.text for cell in row.find_elements(By.TAG_NAME, "td")]
        assert cells[1] == "2" and "±" in cells[2]
    curves = browser.execute_script(
        "return Chart.getChart('curve-chart').data.datasets.map((d) => d.data.length);"
    )
    assert curves == [2, 2]
    site_columns = browser.find_elements(By.CSS_SELECTOR, "#sites-table thead th")
    assert [c.text for c in site_columns] == ["group", "sim-1", "sim-2", "sim-3"]
    assert len(browser.find_elements(By.CSS_SELECTOR, "#experiments-table tbody tr")) == 4
    assert not [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]

    # Run one of them again with a change, from its page.
    browser.find_element(By.CSS_SELECTOR, "#experiments-table tbody tr a").click()
    WebDriverWait(browser, 20).until(lambda d: d.find_elements(By.ID, "clone"))
    browser.find_element(By.ID, "clone").click()
    WebDriverWait(browser, 20).until(lambda d: d.find_elements(By.ID, "clone-banner"))
    assert browser.find_element(By.ID, "name").get_attribute("value").endswith("(again)")
    assert browser.find_element(By.ID, "partition").get_attribute("value") == "iid"
    browser.save_screenshot(str(screenshots / "run-again-form.png"))
