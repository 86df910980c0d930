"""Report figures and metric exports: the files themselves, their values, and who gets them."""

import csv
import io
import json
from datetime import UTC, datetime, timedelta
from xml.etree import ElementTree

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from PIL import Image

from tests.conftest import client_for
from tests.factories import (
    CheckpointFactory,
    ClientUpdateFactory,
    DatasetFactory,
    ExperimentFactory,
    RoundFactory,
    SiteFactory,
    UserFactory,
)
from training.models import ClientUpdateStatus, ExperimentStatus, RoundStatus
from visualization import reports

pytestmark = pytest.mark.django_db

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
DOWNLOADS = {
    "report.png": "image/png",
    "report.svg": "image/svg+xml",
    "report.pdf": "application/pdf",
    "metrics.csv": "text/csv; charset=utf-8",
    "metrics.json": "application/json",
}
ROUND_ONE_OPENED = datetime(2025, 3, 3, 9, 0, tzinfo=UTC)


# --- A ledger: two evaluated rounds and an open one, at two hospitals ------------------------


def binary_evaluation(*, loss, accuracy, auc, matrix):
    (true_negatives, false_positives), (false_negatives, true_positives) = matrix
    return {
        "num_samples": sum(map(sum, matrix)),
        "loss": loss,
        "accuracy": accuracy,
        "balanced_accuracy": accuracy - 0.01,
        "precision": [
            true_negatives / (true_negatives + false_negatives),
            true_positives / (true_positives + false_positives),
        ],
        "recall": [
            true_negatives / (true_negatives + false_positives),
            true_positives / (true_positives + false_negatives),
        ],
        "confusion_matrix": matrix,
        "sensitivity": true_positives / (true_positives + false_negatives),
        "specificity": true_negatives / (true_negatives + false_positives),
        "roc_auc": auc,
        "roc_curve": {"fpr": [0.0, 0.05, 0.2, 0.5, 1.0], "tpr": [0.0, 0.55, 0.8, 0.93, 1.0]},
    }


def closed_round(experiment, number, evaluation):
    opened = ROUND_ONE_OPENED + timedelta(minutes=10 * (number - 1))
    return RoundFactory(
        experiment=experiment,
        number=number,
        status=RoundStatus.CLOSED,
        opened_at=opened,
        closed_at=opened + timedelta(minutes=4),
        metrics={
            "global": evaluation,
            "clients": {"loss": 0.5, "accuracy": 0.75, "num_clients": 2, "num_samples": 700},
            "aggregation_seconds": 0.8,
            "evaluation_seconds": 1.9,
            "wall_seconds": 240.0,
        },
    )


def trained_update(fl_round, site, *, loss, accuracy, num_samples, **extra_metrics):
    started = fl_round.opened_at + timedelta(seconds=5)
    return ClientUpdateFactory(
        round=fl_round,
        site=site,
        status=ClientUpdateStatus.SUCCEEDED,
        worker=f"celery@{site.slug}",
        num_samples=num_samples,
        started_at=started,
        finished_at=started + timedelta(seconds=95),
        metrics={
            "loss": loss,
            "accuracy": accuracy,
            "train_seconds": 93.5,
            "device": "cuda:0",
            **extra_metrics,
        },
    )


@pytest.fixture
def people():
    return {
        "anonymous": None,
        "owner": UserFactory(username="owner"),
        "member": UserFactory(username="member"),
        "other": UserFactory(username="other"),
        "staff": UserFactory(username="staff", is_staff=True),
    }


@pytest.fixture
def ledger(people):
    """Rounds 1 and 2 closed and evaluated, round 3 open; the newest updates have norms."""
    north, south = SiteFactory(slug="north-general"), SiteFactory(slug="south-clinic")
    experiment = ExperimentFactory(
        name="Lung nodules",
        owner=people["owner"],
        members=[people["member"]],
        sites=[north, south],
        dataset=DatasetFactory(
            name="chest-ct", owner=people["owner"], class_names=["benign", "malignant"]
        ),
        status=ExperimentStatus.RUNNING,
        num_rounds=3,
    )
    first = closed_round(
        experiment,
        1,
        binary_evaluation(loss=0.61, accuracy=0.7, auc=0.78, matrix=[[70, 30], [30, 70]]),
    )
    trained_update(first, north, loss=0.66, accuracy=0.64, num_samples=400)
    trained_update(first, south, loss=0.58, accuracy=0.71, num_samples=300)
    second = closed_round(
        experiment,
        2,
        binary_evaluation(loss=0.42, accuracy=0.83, auc=0.9, matrix=[[85, 15], [19, 81]]),
    )
    trained_update(
        second,
        north,
        loss=0.45,
        accuracy=0.81,
        num_samples=400,
        update_norm=3.25,
        distance_to_aggregate=0.5,
    )
    failed_at = second.opened_at + timedelta(seconds=30)
    ClientUpdateFactory(
        round=second,
        site=south,
        status=ClientUpdateStatus.FAILED,
        worker="celery@south-clinic",
        started_at=second.opened_at,
        finished_at=failed_at,
        error="CUDA out of memory",
    )
    third = RoundFactory(experiment=experiment, number=3)
    ClientUpdateFactory(round=third, site=north, status=ClientUpdateStatus.RUNNING)
    ClientUpdateFactory(round=third, site=south)
    CheckpointFactory(experiment=experiment, round=first)
    return experiment


def fetch(user, experiment, filename, **params):
    return client_for(user).get(f"/api/experiments/{experiment.pk}/{filename}", params)


def svg_text(experiment, **options) -> str:
    """The SVG report; matplotlib writes each drawn string beside its outline as a comment."""
    return reports.render_report(experiment, "svg", **options).decode()


# --- The figure files ------------------------------------------------------------------------


def test_png_report_decodes_to_an_image_of_the_figure_size(ledger):
    figure = reports.render_report(ledger, "png")

    assert figure.startswith(PNG_SIGNATURE)
    with Image.open(io.BytesIO(figure)) as image:
        image.load()
        assert image.format == "PNG"
        width, height = reports.FIGURE_INCHES
        assert image.size == (round(width * reports.PNG_DPI), round(height * reports.PNG_DPI))


def test_svg_report_parses_as_an_svg_document(ledger):
    figure = reports.render_report(ledger, "svg")

    root = ElementTree.fromstring(figure)  # noqa: S314 - our own output, not untrusted input

    assert root.tag == "{http://www.w3.org/2000/svg}svg"


def test_pdf_report_is_a_complete_pdf_file(ledger):
    figure = reports.render_report(ledger, "pdf")

    assert figure.startswith(b"%PDF-")
    assert figure.rstrip().endswith(b"%%EOF")


@pytest.mark.parametrize("fmt", ["png", "pdf"])
def test_unchanged_ledger_gives_a_byte_identical_file(ledger, fmt):
    assert reports.render_report(ledger, fmt) == reports.render_report(ledger, fmt)


def test_unknown_report_format_is_refused(ledger):
    with pytest.raises(ValueError, match="jpeg"):
        reports.render_report(ledger, "jpeg")


def test_report_titles_the_experiment_with_its_set_up(ledger):
    drawn = svg_text(ledger)

    assert f"Lung nodules (experiment {ledger.pk})" in drawn
    assert "dataset chest-ct" in drawn
    assert "strategy fedavg" in drawn
    assert "running, 2 of 3 rounds closed" in drawn


def test_report_shows_the_last_evaluated_round_by_default(ledger):
    drawn = svg_text(ledger)

    assert "Confusion matrix (held-out), round 2" in drawn
    assert "round 2 (AUC = 0.900)" in drawn
    assert "benign" in drawn
    assert "malignant" in drawn


def test_report_shows_the_requested_round(ledger):
    drawn = svg_text(ledger, round_number=1)

    assert "Confusion matrix (held-out), round 1" in drawn
    assert "round 1 (AUC = 0.780)" in drawn


def test_report_of_an_open_round_says_it_has_no_evaluation_yet(ledger):
    drawn = svg_text(ledger, round_number=3)

    assert "no data yet: round 3 is open" in drawn


def test_report_of_a_round_the_experiment_lacks_is_refused(ledger):
    with pytest.raises(reports.UnknownRound, match="no round 7; its rounds are 1 to 3"):
        reports.render_report(ledger, "png", round_number=7)


@pytest.mark.parametrize("fmt", ["png", "svg", "pdf"])
def test_experiment_without_rounds_still_renders(fmt):
    experiment = ExperimentFactory()

    figure = reports.render_report(experiment, fmt)

    assert len(figure) > 1000


@pytest.mark.parametrize("round_status", [RoundStatus.OPEN, RoundStatus.FAILED])
def test_experiment_without_closed_rounds_says_no_data_yet(round_status):
    experiment = ExperimentFactory(status=ExperimentStatus.RUNNING)
    fl_round = RoundFactory(experiment=experiment, number=1, status=round_status)
    for site in experiment.sites.all():
        ClientUpdateFactory(round=fl_round, site=site)

    drawn = svg_text(experiment)

    # Loss, accuracy, both site panels, confusion matrix, ROC curve, the federated
    # evaluation and the cross-site heatmap.
    assert drawn.count("no data yet") == 8


def test_multi_class_report_names_unnamed_classes_by_index():
    experiment = ExperimentFactory(dataset=DatasetFactory(num_classes=3, class_names=[]))
    closed_round(
        experiment,
        1,
        {
            "num_samples": 90,
            "loss": 0.9,
            "accuracy": 0.6,
            "balanced_accuracy": 0.58,
            "precision": [0.7, 0.5, 0.6],
            "recall": [0.8, 0.4, 0.55],
            "confusion_matrix": [[24, 3, 3], [9, 12, 9], [6, 7, 17]],
        },
    )

    drawn = svg_text(experiment)

    assert "class 0" in drawn
    assert "class 2" in drawn
    assert "Precision and recall per class (held-out), round 1" in drawn


def test_names_with_markup_and_dollar_signs_are_drawn_as_plain_text(ledger):
    ledger.name = "<script>alert(1)</script> $cost$ — Münster"
    ledger.save(update_fields=["name"])

    drawn = svg_text(ledger)
    root = ElementTree.fromstring(drawn)  # noqa: S314 - our own output, not untrusted input

    assert not root.findall(".//{http://www.w3.org/2000/svg}script")
    assert "$cost$ — Münster" in drawn
    assert reports.render_report(ledger, "pdf").startswith(b"%PDF-")
    assert reports.render_report(ledger, "png").startswith(PNG_SIGNATURE)


# --- The metric exports ----------------------------------------------------------------------


def csv_rows(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


def test_csv_has_a_header_and_one_row_per_round_and_client(ledger):
    rows = csv_rows(reports.metrics_csv(ledger))

    assert list(rows[0]) == list(reports.METRIC_COLUMNS)
    assert [(row["round"], row["site"]) for row in rows] == [
        ("1", "north-general"),
        ("1", "south-clinic"),
        ("2", "north-general"),
        ("2", "south-clinic"),
        ("3", "north-general"),
        ("3", "south-clinic"),
    ]


def test_csv_row_holds_the_clients_metrics_and_its_rounds_global_metrics(ledger):
    rows = csv_rows(reports.metrics_csv(ledger))

    assert rows[2] == {
        "experiment": str(ledger.pk),
        "round": "2",
        "round_status": "closed",
        "site": "north-general",
        "client_status": "succeeded",
        "worker": "celery@north-general",
        "num_samples": "400",
        "train_loss": "0.45",
        "train_accuracy": "0.81",
        "train_seconds": "93.5",
        "update_norm": "3.25",
        "distance_to_aggregate": "0.5",
        "started_at": "2025-03-03T09:10:05+00:00",
        "finished_at": "2025-03-03T09:11:40+00:00",
        "global_loss": "0.42",
        "global_accuracy": "0.83",
        "global_balanced_accuracy": str(0.83 - 0.01),
        "global_auc": "0.9",
        "global_sensitivity": "0.81",
        "global_specificity": "0.85",
        "epsilon": "",
        "client_error": "",
    }


def test_csv_leaves_metrics_the_ledger_lacks_empty(ledger):
    rows = csv_rows(reports.metrics_csv(ledger))
    failed, running = rows[3], rows[4]

    assert failed["client_status"] == "failed"
    assert failed["client_error"] == "CUDA out of memory"
    assert failed["train_loss"] == failed["num_samples"] == failed["update_norm"] == ""
    assert failed["global_auc"] == "0.9"
    assert rows[0]["update_norm"] == ""  # recorded before update norms were
    assert running["round_status"] == "open"
    assert running["global_loss"] == running["finished_at"] == ""


def test_metrics_rows_of_an_experiment_without_rounds_are_empty():
    experiment = ExperimentFactory()

    assert reports.metrics_rows(experiment) == []
    assert csv_rows(reports.metrics_csv(experiment)) == []


def test_metrics_json_holds_the_set_up_rounds_and_client_rows(ledger):
    response = fetch(UserFactory(username="auditor", is_staff=True), ledger, "metrics.json")
    document = json.loads(response.content)

    assert document["experiment"]["name"] == "Lung nodules"
    assert document["experiment"]["dataset"]["class_names"] == ["benign", "malignant"]
    assert document["experiment"]["strategy"] == "fedavg"
    assert [r["number"] for r in document["rounds"]] == [1, 2, 3]
    assert document["rounds"][1]["global"]["roc_auc"] == 0.9
    assert document["rounds"][1]["global"]["confusion_matrix"] == [[85, 15], [19, 81]]
    assert document["rounds"][1]["clients"]["num_samples"] == 700
    assert document["rounds"][1]["wall_seconds"] == 240.0
    assert document["rounds"][2]["global"] is None
    assert document["clients"] == reports.metrics_rows(ledger)


def test_metrics_json_names_classes_the_dataset_leaves_unnamed():
    experiment = ExperimentFactory(dataset=DatasetFactory(num_classes=3, class_names=["a"]))

    document = reports.metrics_json(experiment)

    assert document["experiment"]["dataset"]["class_names"] == ["a", "class 1", "class 2"]
    assert document["rounds"] == []
    assert document["clients"] == []


# --- The API ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("filename", "content_type"), DOWNLOADS.items())
def test_download_answers_at_its_file_name_with_type_and_file_name(
    ledger, people, filename, content_type
):
    response = fetch(people["member"], ledger, filename)

    assert response.status_code == 200  # no redirect to a trailing slash
    assert response["Content-Type"] == content_type
    stem, extension = filename.split(".")
    assert response["Content-Disposition"] == (
        f'attachment; filename="experiment-{ledger.pk}-{stem}.{extension}"'
    )


@pytest.mark.parametrize("filename", DOWNLOADS)
@pytest.mark.parametrize(
    ("role", "expected"),
    [("anonymous", 401), ("owner", 200), ("member", 200), ("other", 404), ("staff", 200)],
)
def test_downloads_are_visible_like_the_experiment(ledger, people, filename, role, expected):
    response = fetch(people[role], ledger, filename)

    assert response.status_code == expected


def test_report_of_an_unknown_experiment_is_not_found(people):
    response = client_for(people["staff"]).get("/api/experiments/987654/report.png")

    assert response.status_code == 404


def test_report_accepts_the_requested_round(ledger, people):
    response = fetch(people["owner"], ledger, "report.svg", round=1)

    assert response.status_code == 200
    assert "Confusion matrix (held-out), round 1" in response.content.decode()


@pytest.mark.parametrize(
    ("requested", "message"),
    [
        ("two", "Give a round number"),
        ("0", "Give a round number"),
        ("-1", "Give a round number"),
        ("", "Give a round number"),
        ("4", "has no round 4; its rounds are 1 to 3"),
    ],
)
def test_report_of_a_bad_round_is_a_bad_request(ledger, people, requested, message):
    response = fetch(people["owner"], ledger, "report.png", round=requested)

    assert response.status_code == 400
    assert message in response.json()["round"][0]


def test_bad_round_of_a_hidden_experiment_is_still_not_found(ledger, people):
    response = fetch(people["other"], ledger, "report.png", round="two")

    assert response.status_code == 404


def test_download_answers_an_accept_header_for_its_own_type(ledger, people):
    response = client_for(people["owner"]).get(
        f"/api/experiments/{ledger.pk}/report.pdf", HTTP_ACCEPT="application/pdf"
    )

    assert response.status_code == 200
    assert response.content.startswith(b"%PDF-")


def test_download_errors_are_json_whatever_the_accept_header(ledger, people):
    response = client_for(people["owner"]).get(
        f"/api/experiments/{ledger.pk}/report.png?round=x", HTTP_ACCEPT="image/png"
    )

    assert response.status_code == 400
    assert response["Content-Type"] == "application/json"


# --- Query counts ----------------------------------------------------------------------------


def add_round(experiment, number):
    fl_round = closed_round(
        experiment,
        number,
        binary_evaluation(loss=0.4, accuracy=0.8, auc=0.88, matrix=[[80, 20], [20, 80]]),
    )
    for site in experiment.sites.all():
        trained_update(fl_round, site, loss=0.4, accuracy=0.8, num_samples=350)


def count_queries(user, experiment, filename) -> int:
    with CaptureQueriesContext(connection) as captured:
        assert fetch(user, experiment, filename).status_code == 200
    return len(captured.captured_queries)


@pytest.mark.parametrize("filename", ["metrics.csv", "metrics.json", "report.png"])
def test_download_queries_do_not_grow_with_rounds(ledger, people, filename):
    with_three_rounds = count_queries(people["member"], ledger, filename)

    for number in range(4, 10):
        add_round(ledger, number)
    with_nine_rounds = count_queries(people["member"], ledger, filename)

    assert with_nine_rounds == with_three_rounds


def test_metrics_rows_take_two_queries_however_many_rounds(ledger):
    for number in range(4, 10):
        add_round(ledger, number)

    with CaptureQueriesContext(connection) as captured:
        rows = reports.metrics_rows(ledger)

    assert len(rows) == 18
    assert len(captured.captured_queries) == 2
