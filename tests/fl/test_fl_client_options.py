"""What a client does with the options its strategy sends (FedProx, FedBN, SCAFFOLD,
client-level DP, DP-SGD), with its validation split, and in an evaluate task. The updates
are recomputed from the papers' equations in numpy where they can be."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from tests.fl.connections import MemorySiteState, RecordingConnection
from training.fl.client import ClientTask, DataSpec, NetworkSpec, run_client_task
from training.fl.data.datasets import ImageFolderDataset
from training.fl.evaluation import evaluate_model, validation_split
from training.fl.local import TrainConfig, train_local
from training.fl.networks import build_network
from training.fl.privacy import epsilon_spent
from training.fl.weights import l2_distance

FEATURES, CLASSES, SAMPLES = 4, 3, 6


def a_task(**change) -> ClientTask:
    fields = {
        "client_update": 7, "round_id": 3, "round_number": 1, "experiment": 5, "site": "st-mary",
        "kind": "train",
        "network": NetworkSpec(name="cnn-small", in_channels=1, num_classes=2, spatial_dims=2),
        "data": DataSpec(name="lesions", num_classes=2, class_names=["normal", "lesion"],
                         channels=1, image_shape=[32, 32]),
        "train": TrainConfig(epochs=1, batch_size=8, lr=0.05, seed=11),
        "start_epoch": 0, "options": {}, "weights_sha256": "ab" * 32,
        **change,
    }  # fmt: skip
    return ClientTask(**fields)


def cnn(task: ClientTask) -> nn.Module:
    return build_network("cnn-small", in_channels=1, num_classes=2, seed=1)


def cnn_weights() -> dict[str, torch.Tensor]:
    return build_network("cnn-small", in_channels=1, num_classes=2, seed=0).state_dict()


# --- a linear model whose steps numpy can take ------------------------------------------------
def linear_data() -> list[tuple[torch.Tensor, int]]:
    generator = torch.Generator().manual_seed(3)
    inputs = torch.randn(SAMPLES, FEATURES, generator=generator)
    return [(inputs[i], i % CLASSES) for i in range(SAMPLES)]


def linear(task: ClientTask | None = None) -> nn.Module:
    return nn.Sequential(nn.Linear(FEATURES, CLASSES))


def linear_weights(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "0.weight": torch.randn(CLASSES, FEATURES, generator=generator),
        "0.bias": torch.randn(CLASSES, generator=generator),
    }


# Full-batch plain SGD: every step sees all samples, in any order.
FULL_BATCH = TrainConfig(epochs=2, batch_size=SAMPLES, lr=0.1, momentum=0.0, seed=5)


def cross_entropy_gradients(weight, bias, data) -> tuple[np.ndarray, np.ndarray]:
    """d/dW and d/db of the mean cross-entropy of softmax(x W^T + b), in float64."""
    inputs = np.stack([x.numpy() for x, _ in data]).astype(np.float64)
    labels = np.array([y for _, y in data])
    logits = inputs @ weight.T + bias
    probabilities = np.exp(logits - logits.max(axis=1, keepdims=True))
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    probabilities[np.arange(len(labels)), labels] -= 1.0
    residual = probabilities / len(labels)
    return residual.T @ inputs, residual.sum(axis=0)


def numpy_of(weights) -> tuple[np.ndarray, np.ndarray]:
    return weights["0.weight"].double().numpy(), weights["0.bias"].double().numpy()


def linear_task(options: dict, **change) -> ClientTask:
    return a_task(
        options=options, train=FULL_BATCH,
        network=NetworkSpec(name="linear", in_channels=FEATURES, num_classes=CLASSES,
                            spatial_dims=1),
        **change,
    )  # fmt: skip


# --- FedProx ----------------------------------------------------------------------------------
def test_fedprox_with_mu_zero_trains_to_the_same_bits_as_plain_training(small_synthetic_dir):
    data = ImageFolderDataset(small_synthetic_dir)
    sent = []
    for options in ({}, {"proximal_mu": 0.0}):
        connection = RecordingConnection(cnn_weights())
        run_client_task(
            a_task(options=options), connection, local_data=lambda t: (data, range(24)),
            network=cnn,
        )  # fmt: skip
        (weights, _), = connection.updates  # fmt: skip
        sent.append(weights)

    plain, proximal = sent
    assert plain.keys() == proximal.keys()
    assert all(torch.equal(plain[name], proximal[name]) for name in plain)


def test_the_proximal_term_pulls_each_step_towards_the_global_weights_by_mu():
    mu, data, start = 0.5, linear_data(), linear_weights(seed=1)
    connection = RecordingConnection(start)

    run_client_task(
        linear_task({"proximal_mu": mu}), connection,
        local_data=lambda t: (data, range(SAMPLES)), network=linear,
    )  # fmt: skip

    # w <- w - lr * (grad CE(w) + mu * (w - w_global)), twice.
    weight, bias = numpy_of(start)
    global_weight, global_bias = weight.copy(), bias.copy()
    for _ in range(FULL_BATCH.epochs):
        grad_weight, grad_bias = cross_entropy_gradients(weight, bias, data)
        weight = weight - FULL_BATCH.lr * (grad_weight + mu * (weight - global_weight))
        bias = bias - FULL_BATCH.lr * (grad_bias + mu * (bias - global_bias))
    (trained, _), = connection.updates  # fmt: skip
    np.testing.assert_allclose(trained["0.weight"].numpy(), weight, rtol=0, atol=1e-6)
    np.testing.assert_allclose(trained["0.bias"].numpy(), bias, rtol=0, atol=1e-6)
    plain = linear()
    plain.load_state_dict(start)
    train_local(plain, data, range(SAMPLES), FULL_BATCH)
    # The term is not negligible here: the result is not plain training's.
    assert not torch.allclose(plain.state_dict()["0.weight"], trained["0.weight"], atol=1e-4)


# --- SCAFFOLD ---------------------------------------------------------------------------------
def test_a_scaffold_client_corrects_its_gradients_and_updates_its_control_variate():
    data, start = linear_data(), linear_weights(seed=1)
    server_control, site_control = linear_weights(seed=2), linear_weights(seed=3)
    state = MemorySiteState({"scaffold_control": site_control})
    connection = RecordingConnection(start, payload=server_control, state=state)
    task = linear_task({"scaffold": True}, payload_sha256="cd" * 32)

    run_client_task(task, connection, local_data=lambda t: (data, range(SAMPLES)), network=linear)

    # y <- y - lr * (grad(y) + c - c_i), K = 2 steps; then c_i+ = c_i - c + (x - y)/(K lr).
    weight, bias = numpy_of(start)
    c_weight, c_bias = numpy_of(server_control)
    ci_weight, ci_bias = numpy_of(site_control)
    for _ in range(FULL_BATCH.epochs):
        grad_weight, grad_bias = cross_entropy_gradients(weight, bias, data)
        weight = weight - FULL_BATCH.lr * (grad_weight + c_weight - ci_weight)
        bias = bias - FULL_BATCH.lr * (grad_bias + c_bias - ci_bias)
    steps = FULL_BATCH.epochs
    x_weight, x_bias = numpy_of(start)
    new_ci_weight = ci_weight - c_weight + (x_weight - weight) / (steps * FULL_BATCH.lr)
    new_ci_bias = ci_bias - c_bias + (x_bias - bias) / (steps * FULL_BATCH.lr)

    (trained, report), = connection.updates  # fmt: skip
    assert connection.payloads_fetched == 1
    np.testing.assert_allclose(trained["0.weight"].numpy(), weight, rtol=0, atol=1e-6)
    np.testing.assert_allclose(trained["0.bias"].numpy(), bias, rtol=0, atol=1e-6)
    assert report.extras == {"local_steps": steps, "learning_rate": FULL_BATCH.lr}
    kept = state.entries["scaffold_control"]
    np.testing.assert_allclose(kept["0.weight"].numpy(), new_ci_weight, rtol=0, atol=1e-5)
    np.testing.assert_allclose(kept["0.bias"].numpy(), new_ci_bias, rtol=0, atol=1e-5)


def test_a_scaffold_client_starts_from_zero_variates_without_payload_or_state():
    data, start = linear_data(), linear_weights(seed=1)
    connection = RecordingConnection(start)

    run_client_task(
        linear_task({"scaffold": True}), connection,
        local_data=lambda t: (data, range(SAMPLES)), network=linear,
    )  # fmt: skip

    plain = linear()
    plain.load_state_dict(start)
    train_local(plain, data, range(SAMPLES), FULL_BATCH)
    (trained, _), = connection.updates  # fmt: skip
    assert connection.payloads_fetched == 0  # payload_sha256 "" means c = 0
    assert all(torch.equal(trained[name], plain.state_dict()[name]) for name in trained)
    expected = {
        name: (start[name] - trained[name]) / (FULL_BATCH.epochs * FULL_BATCH.lr) for name in start
    }
    kept = connection.state.entries["scaffold_control"]
    assert all(torch.allclose(kept[name], expected[name], atol=1e-6) for name in expected)


def test_site_state_is_kept_only_when_the_server_counted_the_update():
    data = linear_data()
    connection = RecordingConnection(linear_weights(seed=1), counted=False)

    counted = run_client_task(
        linear_task({"scaffold": True}), connection,
        local_data=lambda t: (data, range(SAMPLES)), network=linear,
    )  # fmt: skip

    assert not counted and connection.updates
    assert connection.state.saved == []


# --- FedBN ------------------------------------------------------------------------------------
def batch_norm_net(task: ClientTask | None = None) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
        nn.Flatten(), nn.Linear(16, 2),
    )  # fmt: skip


BN_NAMES = ["1.weight", "1.bias", "1.running_mean", "1.running_var", "1.num_batches_tracked"]


def test_fedbn_layers_come_from_the_site_state_not_from_the_global_model(small_synthetic_dir):
    data = ImageFolderDataset(small_synthetic_dir)
    global_weights = batch_norm_net().state_dict()
    local = {
        "1.weight": torch.full((4,), 2.0), "1.bias": torch.full((4,), -1.0),
        "1.running_mean": torch.full((4,), 5.0), "1.running_var": torch.full((4,), 3.0),
        "1.num_batches_tracked": torch.tensor(7),
    }  # fmt: skip
    state = MemorySiteState({"fedbn_local": local})
    task = a_task(
        options={"local_parameters": BN_NAMES},
        data=DataSpec(name="lesions", num_classes=2, class_names=[], channels=1,
                      image_shape=[32, 32], validation_fraction=0.25),
    )  # fmt: skip
    training, validation = validation_split(range(24), 0.25, "lesions/st-mary")
    steps = math.ceil(len(training) / task.train.batch_size)

    for round_number in (1, 2):
        connection = RecordingConnection(global_weights, state=state)
        personalized = batch_norm_net()
        personalized.load_state_dict({**global_weights, **state.entries["fedbn_local"]})
        expected_evaluation = evaluate_model(personalized, data, validation, batch_size=8)

        run_client_task(
            task, connection, local_data=lambda t: (data, range(24)), network=batch_norm_net
        )

        (sent, report), = connection.updates  # fmt: skip
        # The round's starting model was evaluated with the site's own layers.
        assert report.evaluation == expected_evaluation
        kept = state.entries["fedbn_local"]
        # Batch counts continue the site's own (7), round after round, not the global 0.
        assert int(kept["1.num_batches_tracked"]) == 7 + steps * round_number
        assert torch.equal(kept["1.running_mean"], sent["1.running_mean"])
        assert int(global_weights["1.num_batches_tracked"]) == 0


def test_fedbn_names_that_are_not_in_the_network_fail_the_task():
    connection = RecordingConnection(linear_weights(seed=1))

    run_client_task(
        linear_task({"local_parameters": ["bn.running_mean"]}), connection,
        local_data=lambda t: (linear_data(), range(SAMPLES)), network=linear,
    )  # fmt: skip

    assert "bn.running_mean" in connection.failures[0] and not connection.updates


# --- differential privacy at the client -------------------------------------------------------
def test_client_level_dp_clips_the_update_to_the_norm_before_it_leaves(small_synthetic_dir):
    data = ImageFolderDataset(small_synthetic_dir)
    start = cnn_weights()
    connection = RecordingConnection(start)

    run_client_task(
        a_task(options={"dp_clip": 0.01, "dp_noise_std": 0.0}), connection,
        local_data=lambda t: (data, range(24)), network=cnn,
    )  # fmt: skip

    (sent, report), = connection.updates  # fmt: skip
    assert report.metrics["update_norm_before_clip"] > 0.01
    assert l2_distance(sent, start) == pytest.approx(0.01, rel=1e-4)
    assert report.metrics["update_norm"] == pytest.approx(0.01, rel=1e-4)


def test_client_level_dp_adds_noise_of_the_given_std_from_fresh_randomness(small_synthetic_dir):
    data = ImageFolderDataset(small_synthetic_dir)
    start = cnn_weights()
    sent = []
    for _ in range(2):
        connection = RecordingConnection(start)
        run_client_task(
            a_task(options={"dp_clip": 1e-6, "dp_noise_std": 0.05}), connection,
            local_data=lambda t: (data, range(24)), network=cnn,
        )  # fmt: skip
        sent.append(connection.updates[0][0])

    noise = torch.cat([(sent[0][name] - start[name]).flatten() for name in start])
    # The update itself is 1e-6 long: what is left is the noise, of std 0.05.
    assert float(noise.std()) == pytest.approx(0.05, rel=0.05)
    assert not torch.equal(sent[0]["classifier.3.weight"], sent[1]["classifier.3.weight"])


def test_local_dp_sgd_reports_the_epsilon_of_all_the_sites_steps(small_synthetic_dir):
    data = ImageFolderDataset(small_synthetic_dir)
    dp_sgd = {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "delta": 1e-4}
    state = MemorySiteState()
    reported = []
    for _ in range(2):
        connection = RecordingConnection(cnn_weights(), state=state)
        run_client_task(
            a_task(options={"dp_sgd": dp_sgd}), connection,
            local_data=lambda t: (data, range(24)), network=cnn,
        )  # fmt: skip
        assert not connection.failures, connection.failures
        (_, report), = connection.updates  # fmt: skip
        steps = int(state.entries["local_dp_sgd"]["steps"])
        reported.append((report.metrics["local_epsilon"], steps))

    (first, first_steps), (second, total_steps) = reported
    # One epoch of 24 samples in batches of 8: 3 Poisson draws a round, each sample in a
    # batch with probability 8 / 24; the second round's ε covers both rounds' draws.
    assert (first_steps, total_steps) == (3, 6)
    expected = epsilon_spent(noise_multiplier=1.0, sample_rate=1 / 3, steps=total_steps,
                             delta=1e-4)  # fmt: skip
    assert second == pytest.approx(expected)
    assert second > first > 0


def test_local_dp_sgd_leaves_the_reused_network_free_of_opacus_hooks(small_synthetic_dir):
    data = ImageFolderDataset(small_synthetic_dir)
    network = cnn(a_task())
    connection = RecordingConnection(cnn_weights())

    run_client_task(
        a_task(options={"dp_sgd": {"noise_multiplier": 0.5, "max_grad_norm": 1.0}}),
        connection, local_data=lambda t: (data, range(24)), network=lambda t: network,
    )  # fmt: skip

    assert not connection.failures, connection.failures
    hooks = [m for m in network.modules() if m._forward_hooks or m._backward_hooks]
    assert hooks == [] and not any(hasattr(p, "grad_sample") for p in network.parameters())


# --- evaluation -------------------------------------------------------------------------------
def evaluation_spec(fraction: float) -> DataSpec:
    return DataSpec(name="lesions", num_classes=2, class_names=[], channels=1,
                    image_shape=[32, 32], validation_fraction=fraction)  # fmt: skip


def test_a_train_task_evaluates_the_starting_model_and_trains_on_the_rest(small_synthetic_dir):
    data = ImageFolderDataset(small_synthetic_dir)
    start = cnn_weights()
    connection = RecordingConnection(start)
    training, validation = validation_split(range(24), 0.25, "lesions/st-mary")
    model = cnn(a_task())
    model.load_state_dict(start)

    run_client_task(
        a_task(data=evaluation_spec(0.25)), connection,
        local_data=lambda t: (data, range(24)), network=cnn,
    )  # fmt: skip

    (_, report), = connection.updates  # fmt: skip
    assert report.num_samples == len(training) == 18
    assert report.evaluation == evaluate_model(model, data, validation, batch_size=8)


def test_an_evaluate_task_reports_one_metrics_dict_per_model(small_synthetic_dir):
    data = ImageFolderDataset(small_synthetic_dir)
    models = {"global": cnn_weights(), "st-anne": build_network(
        "cnn-small", in_channels=1, num_classes=2, seed=5).state_dict()}  # fmt: skip
    connection = RecordingConnection({}, models=models)
    _, validation = validation_split(range(24), 0.25, "lesions/st-mary")

    counted = run_client_task(
        a_task(kind="evaluate", options={"models": ["global", "st-anne"]},
               data=evaluation_spec(0.25)),
        connection, local_data=lambda t: (data, range(24)), network=cnn,
    )  # fmt: skip

    assert counted and not connection.updates and not connection.failures
    (report,) = connection.evaluations
    assert connection.models_fetched == ["global", "st-anne"]
    assert report.num_samples == len(validation)
    for label, weights in models.items():
        model = cnn(a_task())
        model.load_state_dict(weights)
        assert report.evaluation[label] == evaluate_model(model, data, validation, batch_size=8)
    assert report.evaluation["global"] != report.evaluation["st-anne"]


def test_an_evaluate_task_personalizes_the_global_model_with_the_sites_fedbn_layers(
    small_synthetic_dir,
):
    data = ImageFolderDataset(small_synthetic_dir)
    global_weights = batch_norm_net().state_dict()
    local = {"1.running_mean": torch.full((4,), 0.3), "1.running_var": torch.full((4,), 0.2)}
    connection = RecordingConnection(
        {}, models={"global": global_weights}, state=MemorySiteState({"fedbn_local": local})
    )
    _, validation = validation_split(range(24), 0.25, "lesions/st-mary")

    run_client_task(
        a_task(kind="evaluate", options={"models": ["global"]}, data=evaluation_spec(0.25)),
        connection, local_data=lambda t: (data, range(24)), network=batch_norm_net,
    )  # fmt: skip

    personalized = batch_norm_net()
    personalized.load_state_dict({**global_weights, **local})
    (report,) = connection.evaluations
    assert report.evaluation["global"] == evaluate_model(
        personalized, data, validation, batch_size=8
    )


def test_an_evaluate_task_without_a_validation_share_fails_with_the_reason(small_synthetic_dir):
    data = ImageFolderDataset(small_synthetic_dir)
    connection = RecordingConnection({}, models={"global": cnn_weights()})

    run_client_task(
        a_task(kind="evaluate", options={"models": ["global"]}), connection,
        local_data=lambda t: (data, range(24)), network=cnn,
    )  # fmt: skip

    assert "keeps no validation share" in connection.failures[0]
    assert not connection.evaluations


@pytest.mark.parametrize(
    ("options", "kind", "message"),
    [
        ({"proximal_mu": -1}, "train", "'proximal_mu' must be >= 0"),
        ({"scaffold": "yes"}, "train", "'scaffold' must be true or false"),
        ({"dp_noise_std": 0.1}, "train", "needs 'dp_clip'"),
        ({"dp_sgd": {"noise_multiplier": 1.0}}, "train", "needs noise_multiplier and max_grad"),
        ({"local_parameters": "1.weight"}, "train", "must be a list of names"),
        ({}, "evaluate", "must name its models"),
    ],
)
def test_malformed_options_fail_the_task_before_any_work(options, kind, message) -> None:
    connection = RecordingConnection({})

    run_client_task(
        a_task(options=options, kind=kind), connection,
        local_data=lambda task: pytest.fail("no data may be read"), network=cnn,
    )  # fmt: skip

    assert connection.fetched == 0 and message in connection.failures[0]


def test_the_options_and_payload_hash_survive_the_tasks_json_form() -> None:
    task = a_task(options={"scaffold": True, "dp_sgd": {"noise_multiplier": 1.0,
                  "max_grad_norm": 2.0}}, payload_sha256="ef" * 32)  # fmt: skip

    assert ClientTask.from_json(task.to_json()) == task
