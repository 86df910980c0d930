"""A real browser (headless Chromium) on a segmentation experiment that really ran: its page
draws Dice per round and per site, Dice per class and HD95 (no confusion matrix), and the
viewer draws the masks over the slices (ground truth filled, a checkpoint's prediction
outlined) with the prediction's Dice, in each plane of a volume.

Screenshots under test-output/screenshots/: segmentation-experiment.png (the page),
segmentation-overlay.png (the viewer's stage with a 2D image's masks and Dice) and
segmentation-overlay-coronal.png (a volume's coronal slice with its mask). A binary
classification experiment's page is checked too: the same catalogue-driven page keeps its
accuracy curves, confusion matrix and ROC curve there.
"""

import json

import pytest
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

from tests.conftest import service_env
from tests.test_browser import (  # the browser fixture and the server harness
    PASSWORD,
    SCREENSHOTS,
    Server,
    browser,  # noqa: F401 - a fixture, used by name
    click_first,
    log_in,
    manage,
)

ROUNDS = 3

pytestmark = pytest.mark.browser


@pytest.fixture
def segmentation_server(tmp_path):
    """FedLens in embedded mode with a 2D segmentation set on which an experiment ran to
    its end through run_experiment, and a 3D set to browse."""
    env = service_env(
        DJANGO_SETTINGS_MODULE="flproject.settings.local",
        DATABASE_URL=None,
        REDIS_URL=None,
        FEDLENS_DATA_DIR=str(tmp_path),
        DJANGO_SUPERUSER_PASSWORD=PASSWORD,
    )
    slices, volumes = tmp_path / "datasets" / "organs", tmp_path / "datasets" / "organ-volumes"
    manage(env, "migrate", "--noinput")
    manage(env, "createsuperuser", "--noinput", "--username", "ana", "--email", "ana@x.org")
    manage(env, "make_synthetic_dataset", "--out", str(slices), "--task", "segmentation",
           "--dims", "2", "--sites", "2", "--per-site", "6", "--size", "32")  # fmt: skip
    manage(env, "make_synthetic_dataset", "--out", str(volumes), "--task", "segmentation",
           "--dims", "3", "--sites", "2", "--per-site", "2", "--size", "32",
           "--depth", "16")  # fmt: skip
    manage(env, "register_dataset", "--name", "organs", "--path", str(slices))
    manage(env, "register_dataset", "--name", "organ-volumes", "--path", str(volumes))
    summary = tmp_path / "summary.json"
    manage(env, "run_experiment", "--dataset", "organs", "--clients", "2", "--rounds",
           str(ROUNDS), "--local-epochs", "2", "--batch-size", "4", "--optimizer", "adam",
           "--lr", "0.01", "--name", "organs in a browser", "--json", str(summary))  # fmt: skip
    fedlens = Server(env)
    fedlens.start()
    yield fedlens, json.loads(summary.read_text())
    fedlens.stop()


def chart_points(driver, chart_id: str) -> list[int]:
    """The number of points of each line of a chart, in its order."""
    return driver.execute_script(
        "const chart = Chart.getChart(arguments[0]);"
        "return chart ? chart.data.datasets.map((d) => d.data.length) : null;",
        chart_id,
    )


def chart_labels(driver, chart_id: str) -> list[str]:
    return driver.execute_script(
        "return Chart.getChart(arguments[0]).data.datasets.map((d) => d.label);", chart_id
    )


def overlay_pixels(driver) -> dict[str, int]:
    """Pixels of the overlay canvas that hold a mask colour, and the most opaque alpha."""
    return driver.execute_script(
        "const canvas = document.getElementById('overlay-canvas');"
        "const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;"
        "let painted = 0, alpha = 0;"
        "for (let i = 3; i < data.length; i += 4) {"
        "  if (data[i] > 0) { painted += 1; alpha = Math.max(alpha, data[i]); } }"
        "return {painted, alpha};"
    )


@pytest.mark.timeout(600)
def test_a_segmentation_experiment_and_its_masks_in_the_browser(segmentation_server, browser):  # noqa: F811
    server, summary = segmentation_server
    assert summary["status"] == "completed", summary["failure_reason"]
    log_in(browser, server)

    # The experiment's page: Dice per round and per site, Dice per class, HD95
    browser.get(f"{server.url}/experiments/{summary['experiment']}/")
    WebDriverWait(browser, 30).until(
        lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-status") == "completed"
    )
    WebDriverWait(browser, 30).until(
        lambda d: d.find_elements(By.CSS_SELECTOR, "#cross-site table.cross-site")
    )
    global_lines = dict(
        zip(
            chart_labels(browser, "global-chart"),
            chart_points(browser, "global-chart"),
            strict=True,
        )
    )
    assert global_lines["Dice"] == ROUNDS
    assert global_lines["loss"] == ROUNDS
    # The sites' Dice of each round's global model (the last round's arrives with the
    # cross-site round), and their weighted mean
    assert chart_labels(browser, "federated-chart") == ["sim-1", "sim-2", "weighted by samples"]
    assert chart_points(browser, "federated-chart") == [ROUNDS] * 3
    assert chart_labels(browser, "dice-class-chart") == ["organ", "lesion"]
    assert chart_points(browser, "dice-class-chart") == [ROUNDS, ROUNDS]
    assert chart_points(browser, "hd95-chart")[-1] == ROUNDS  # the held-out line
    assert not browser.find_elements(By.ID, "confusion")
    assert not browser.find_elements(By.ID, "roc-chart")
    headings = [th.text for th in browser.find_elements(By.CSS_SELECTOR, "#rounds-table th")]
    assert headings[3:6] == ["Dice", "HD95 (mm)", "Loss"]
    first_round = browser.find_element(By.CSS_SELECTOR, "#rounds-table tbody tr").text
    assert f"{summary['rounds'][0]['global']['dice']:.3f}" in first_round
    assert Select(browser.find_element(By.ID, "cross-site-metric")).first_selected_option.text == (
        "Dice"
    )
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(SCREENSHOTS / "segmentation-experiment.png"))
    assert not [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]

    # The compare page: a chart per compared metric, Dice first, and Dice as the target
    browser.get(f"{server.url}/compare/?experiment={summary['experiment']}")
    WebDriverWait(browser, 30).until(lambda d: chart_points(d, "hd95-chart"))
    charts = [c.get_attribute("data-metric") for c in browser.find_elements(
        By.CSS_SELECTOR, "#compare-charts .card")]  # fmt: skip
    assert charts == ["dice", "hd95", "loss"]
    assert chart_points(browser, "dice-chart") == [ROUNDS]
    columns = [th.text for th in browser.find_elements(By.CSS_SELECTOR, "#compare-summary th")]
    assert columns[2:5] == ["Dice", "HD95", "loss"]
    assert "rounds to dice" in browser.find_element(By.CSS_SELECTOR, ".card h2").text

    # The viewer: the ground truth over the first image, then the best checkpoint's
    # prediction with its Dice on this image
    browser.get(f"{server.url}/experiments/{summary['experiment']}/")
    browser.find_element(By.LINK_TEXT, "Images").click()
    WebDriverWait(browser, 30, ignored_exceptions=[StaleElementReferenceException]).until(
        lambda d: click_first(d, "#image-list button")
    )
    canvas = browser.find_element(By.ID, "overlay-canvas")
    WebDriverWait(browser, 30).until(lambda _: canvas.get_attribute("data-drawn") == "true")
    truth_only = overlay_pixels(browser)
    assert truth_only["painted"] > 0
    checkpoints = Select(browser.find_element(By.ID, "checkpoint-select"))
    best = next(o for o in checkpoints.options if "best" in o.text)
    assert "Dice" in best.text
    checkpoints.select_by_visible_text(best.text)
    dice = (
        WebDriverWait(browser, 60).until(lambda d: d.find_elements(By.ID, "overlay-dice"))[0].text
    )
    assert dice.startswith("Dice ") and "organ" in dice and "lesion" in dice and "HD95" in dice
    legend = [item.text for item in browser.find_elements(By.CSS_SELECTOR, "#overlay-legend li")]
    assert legend == ["1: organ", "2: lesion"]
    # The opacity control: fully opaque masks
    slider = browser.find_element(By.ID, "overlay-opacity")
    browser.execute_script(
        "arguments[0].value = 100; arguments[0].dispatchEvent(new Event('input'));", slider
    )
    assert overlay_pixels(browser)["alpha"] == 255
    browser.execute_script("arguments[0].scrollIntoView();", canvas)
    browser.find_element(By.CSS_SELECTOR, ".viewer-stage").screenshot(
        str(SCREENSHOTS / "segmentation-overlay.png")
    )
    # Each mask can be hidden: with neither, the canvas is clear
    browser.find_element(By.ID, "show-truth").click()
    browser.find_element(By.ID, "show-prediction").click()
    assert overlay_pixels(browser)["painted"] == 0

    # A volume: its mask follows the slice into the coronal plane
    browser.get(f"{server.url}/datasets/")
    rows = browser.find_elements(By.CSS_SELECTOR, "#datasets tbody tr")
    row = next(r for r in rows if r.find_element(By.TAG_NAME, "td").text == "organ-volumes")
    row.find_element(By.LINK_TEXT, "view").click()
    WebDriverWait(browser, 30, ignored_exceptions=[StaleElementReferenceException]).until(
        lambda d: click_first(d, "#image-list button")
    )
    canvas = browser.find_element(By.ID, "overlay-canvas")
    WebDriverWait(browser, 30).until(lambda _: canvas.get_attribute("data-drawn") == "true")
    browser.find_element(By.CSS_SELECTOR, "[data-plane=coronal]").click()
    WebDriverWait(browser, 30).until(
        lambda d: "coronal" in d.find_element(By.ID, "main-image").get_attribute("alt")
    )
    WebDriverWait(browser, 30).until(lambda _: overlay_pixels(browser)["painted"] > 0)
    browser.find_element(By.CSS_SELECTOR, ".viewer-stage").screenshot(
        str(SCREENSHOTS / "segmentation-overlay-coronal.png")
    )
    assert not [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]

    # The new-experiment form offers a segmentation network for a segmentation set, and
    # choosing a set after a classification network switches back to one
    browser.get(f"{server.url}/experiments/new/")
    network = Select(browser.find_element(By.ID, "network"))
    assert network.first_selected_option.text == "unet"
    network.select_by_visible_text("cnn-small")
    dataset = Select(browser.find_element(By.ID, "dataset"))
    other = next(o.text for o in dataset.options if not o.is_selected())
    dataset.select_by_visible_text(other)
    assert network.first_selected_option.text == "unet"


@pytest.fixture
def classification_server(tmp_path):
    """The same harness with a finished binary classification experiment, to check that
    the page read from the metric catalogue still draws classification's panels."""
    env = service_env(
        DJANGO_SETTINGS_MODULE="flproject.settings.local",
        DATABASE_URL=None,
        REDIS_URL=None,
        FEDLENS_DATA_DIR=str(tmp_path),
        DJANGO_SUPERUSER_PASSWORD=PASSWORD,
    )
    lesions = tmp_path / "datasets" / "lesions"
    manage(env, "migrate", "--noinput")
    manage(env, "createsuperuser", "--noinput", "--username", "ana", "--email", "ana@x.org")
    manage(env, "make_synthetic_dataset", "--out", str(lesions), "--sites", "2",
           "--per-site", "30", "--size", "32")  # fmt: skip
    manage(env, "register_dataset", "--name", "lesions", "--path", str(lesions))
    summary = tmp_path / "summary.json"
    manage(env, "run_experiment", "--dataset", "lesions", "--clients", "2", "--rounds", "2",
           "--json", str(summary))  # fmt: skip
    fedlens = Server(env)
    fedlens.start()
    yield fedlens, json.loads(summary.read_text())
    fedlens.stop()


@pytest.mark.timeout(600)
def test_a_classification_experiments_page_keeps_accuracy_confusion_and_roc(
    classification_server,
    browser,  # noqa: F811
):
    server, summary = classification_server
    assert summary["status"] == "completed", summary["failure_reason"]
    log_in(browser, server)

    browser.get(f"{server.url}/experiments/{summary['experiment']}/")
    WebDriverWait(browser, 30).until(
        lambda d: d.find_elements(By.CSS_SELECTOR, "#confusion table.confusion")
    )

    labels = chart_labels(browser, "global-chart")
    assert labels[:3] == ["loss", "accuracy", "balanced accuracy"]
    assert chart_points(browser, "global-chart")[1] == 2
    assert chart_points(browser, "roc-chart")[0] > 2  # the ROC curve of the last round
    assert not browser.find_elements(By.ID, "dice-class-chart")
    headings = [th.text for th in browser.find_elements(By.CSS_SELECTOR, "#rounds-table th")]
    assert headings[3:5] == ["Accuracy", "Balanced accuracy"]
    metrics = Select(browser.find_element(By.ID, "cross-site-metric"))
    assert metrics.options[0].get_attribute("value") == "accuracy"
    assert not [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
